//! The STM32 ROM bootloader (AN3155) family end to end: the real plugin
//! component and the simulated bootloader on a real pseudo-terminal (which
//! cannot do the 8E1 parity of a real part: the tests run 8N1, `parity=none`).

use std::process::ExitCode;
use std::time::Duration;

use otagw::plugin::{JobMeta, PluginError};
use otagw_e2e::*;

const BOUND: Duration = Duration::from_secs(180);

/// Options every test passes: no parity on a pty, no reset lines on a pty.
fn pty_options(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut o = opts(&[("parity", "none"), ("reset_sequence", "none")]);
    o.extend(opts(extra));
    o
}

/// A firmware image with its version string at offset 0x200.
fn firmware(size: usize, version: &str) -> Vec<u8> {
    let mut img = image(size, 21);
    let v = format!("{version}\0");
    img[0x200..0x200 + v.len()].copy_from_slice(v.as_bytes());
    img
}

const VERSION_AT: [(&str, &str); 2] = [("version_address", "0x08000200"), ("version_length", "16")];

async fn stm32_host() -> (PluginsDir, PluginHost) {
    let dir = PluginsDir::with(&[artifacts::STM32]);
    let host = host_with(&dir, None).await;
    (dir, host)
}

async fn flash(
    host: &PluginHost,
    url: &str,
    img: &[u8],
    options: Vec<(String, String)>,
) -> Result<otagw::flash::FlashOutcome, PluginError> {
    let meta = JobMeta {
        version: Some("3.1.4".into()),
        module: "default".into(),
        options,
    };
    tokio::time::timeout(
        BOUND,
        otagw::flash::flash(host, "stm32", url, source(img), &meta, None),
    )
    .await
    .expect("the job ends within its bound")
}

/// A 512 KiB part (PID 0x410 with the flash size given, as a board file would).
fn part() -> Stm32SimConfig {
    Stm32SimConfig {
        pid: 0x410,
        flash_size: 512 * 1024,
        page_size: 2048,
        erase: EraseCommand::Extended,
        ..Default::default()
    }
}

const PART: [(&str, &str); 2] = [("flash_size", "512K"), ("page_size", "2048")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_kib_image_flashes_verifies_and_runs_through_the_cli() {
    let img = firmware(256 * 1024, "3.1.4");
    let dir = PluginsDir::with(&[artifacts::STM32]);
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("fw.bin");
    std::fs::write(&file, &img).unwrap();
    let sim = PtySim::spawn_stm32(part()).unwrap();
    let url = sim.url();
    let mut args = vec![
        "otagw",
        "flash",
        "--family",
        "stm32",
        "--link",
        &url,
        "--image",
        file.to_str().unwrap(),
    ];
    let options: Vec<String> = pty_options(&PART)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for o in &options {
        args.extend(["-o", o.as_str()]);
    }
    args.extend([
        "--plugins-dir",
        dir.path().to_str().unwrap(),
        "--cache-dir",
        work.path().to_str().unwrap(),
    ]);
    assert_eq!(otagw::cli::main_with_args(args).await, ExitCode::SUCCESS);
    let flash = sim.handle().flash();
    assert!(
        flash[..img.len()] == img[..],
        "the part's flash holds the image byte for byte"
    );
    assert!(
        flash[img.len()..].iter().all(|b| *b == 0xff),
        "nothing beyond it was written"
    );
    assert_eq!(
        sim.handle().go_address(),
        Some(0x0800_0000),
        "the application was started"
    );
    assert!(sim.handle().reads() > 0, "the image was read back");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_reads_the_version_written_at_the_configured_address() {
    let img = firmware(40 * 1024, "3.1.4");
    let (_d, host) = stm32_host().await;
    let sim = PtySim::spawn_stm32(part()).unwrap();
    // Stay in the bootloader after writing (no GO), so identify can read: on
    // a real board reset_sequence would bring it back.
    let mut extra = PART.to_vec();
    extra.extend(VERSION_AT);
    extra.push(("go", "false"));
    let out = flash(&host, &sim.url(), &img, pty_options(&extra))
        .await
        .expect("flash");
    assert_eq!(out.device.map(|d| d.version).as_deref(), Some("3.1.4"));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_write_is_retried_or_fails_with_its_address() {
    let img = firmware(16 * 1024, "3.1.4");
    let (_d, host) = stm32_host().await;
    let nack = || Stm32SimConfig {
        faults: Stm32Faults {
            nack_write: Some(3),
            ..Default::default()
        },
        ..part()
    };
    // One NACK, retries left: the image arrives.
    let sim = PtySim::spawn_stm32(nack()).unwrap();
    flash(&host, &sim.url(), &img, pty_options(&PART))
        .await
        .expect("retried");
    assert!(sim.handle().flash()[..img.len()] == img[..]);
    sim.shutdown().await;
    // No retries: the job fails naming the block.
    let sim = PtySim::spawn_stm32(nack()).unwrap();
    let mut extra = PART.to_vec();
    extra.push(("retries", "0"));
    let err = flash(&host, &sim.url(), &img, pty_options(&extra))
        .await
        .expect_err("NACK");
    assert_eq!(err.step_code(), -4, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("write memory at 0x08000200") && msg.contains("NACK"),
        "{msg}"
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_fails_with_a_timeout() {
    let img = firmware(16 * 1024, "3.1.4");
    let (_d, host) = stm32_host().await;
    let sim = PtySim::spawn_stm32(Stm32SimConfig {
        faults: Stm32Faults {
            silent_after: Some(6),
            ..Default::default()
        },
        ..part()
    })
    .unwrap();
    let mut extra = PART.to_vec();
    extra.extend([
        ("timeout_ms", "200"),
        ("write_timeout_ms", "200"),
        ("erase_timeout_ms", "500"),
    ]);
    let err = flash(&host, &sim.url(), &img, pty_options(&extra))
        .await
        .expect_err("silence");
    assert_eq!(err.step_code(), -4, "{err}");
    assert!(err.to_string().contains("no answer"), "{err}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_larger_than_the_part_is_refused_before_writing() {
    // A 128 KiB part, as its PID says; the image is 256 KiB.
    let sim = PtySim::spawn_stm32(Stm32SimConfig {
        pid: 0x410,
        flash_size: 128 * 1024,
        ..Default::default()
    })
    .unwrap();
    let img = firmware(256 * 1024, "3.1.4");
    let (_d, host) = stm32_host().await;
    let err = flash(&host, &sim.url(), &img, pty_options(&[]))
        .await
        .expect_err("too big");
    assert_eq!(err.step_code(), -3, "{err}");
    assert!(err.to_string().contains("does not fit"), "{err}");
    assert_eq!(sim.handle().writes(), 0, "nothing was written");
    // Known in advance (flash_size), it is refused by verify, before the link opens.
    let err = flash(
        &host,
        &sim.url(),
        &img,
        pty_options(&[("flash_size", "128K")]),
    )
    .await
    .expect_err("too big");
    assert!(
        matches!(err, PluginError::Failed { call: "verify", .. }),
        "{err:?}"
    );
    sim.shutdown().await;
}
