//! The XMODEM/YMODEM family end to end: the real plugin component, run by the
//! host, flashing the simulated leaf over a real pseudo-terminal and over TCP.

use std::time::Duration;

use otagw::plugin::{JobMeta, PluginError};
use otagw_e2e::*;

/// Upper bound for any single job in these tests (never a synchronisation).
const BOUND: Duration = Duration::from_secs(120);

fn meta(options: &[(&str, &str)]) -> JobMeta {
    JobMeta {
        version: None,
        module: "default".into(),
        options: opts(options),
    }
}

async fn xmodem_host() -> (PluginsDir, PluginHost) {
    let dir = PluginsDir::with(&[artifacts::XMODEM]);
    let host = host_with(&dir, None).await;
    (dir, host)
}

async fn flash(
    host: &PluginHost,
    url: &str,
    img: &[u8],
    options: &[(&str, &str)],
) -> Result<otagw::flash::FlashOutcome, PluginError> {
    tokio::time::timeout(
        BOUND,
        otagw::flash::flash(host, "xmodem", url, source(img), &meta(options), None),
    )
    .await
    .expect("the job ends within its bound")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mebibyte_over_a_pty_arrives_intact() {
    let (_dir, host) = xmodem_host().await;
    let sim = PtySim::spawn(XmodemSimConfig::default()).unwrap();
    let img = image(1 << 20, 1);
    let out = flash(&host, &sim.url(), &img, &[]).await.expect("flash");
    let got = sim.handle().next_image().await;
    assert_padded(&got.data, &img, 0x1a);
    assert_eq!(got.blocks, 1024, "1K blocks");
    assert_eq!(out.report.bytes_sent, 1 << 20);
    assert_eq!(
        out.device, None,
        "no version_command: identify is unsupported"
    );
    sim.shutdown().await;
}

/// The same flash with the plugin interpreted (armv7's engine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mebibyte_over_a_pty_arrives_intact_on_pulley() {
    let dir = PluginsDir::with(&[artifacts::XMODEM]);
    let host = host_on(EngineKind::Pulley, &dir, None).await;
    let sim = PtySim::spawn(XmodemSimConfig::default()).unwrap();
    let img = image(1 << 20, 2);
    let out = flash(&host, &sim.url(), &img, &[]).await.expect("flash");
    let got = sim.handle().next_image().await;
    assert_padded(&got.data, &img, 0x1a);
    assert_eq!(out.report.bytes_sent, 1 << 20);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mebibyte_over_tcp_arrives_intact() {
    let (_dir, host) = xmodem_host().await;
    let sim = TcpSim::bind("127.0.0.1:0", XmodemSimConfig::default())
        .await
        .unwrap();
    // An odd size: the last block is padded.
    let img = image((1 << 20) - 300, 2);
    flash(&host, &sim.url(), &img, &[]).await.expect("flash");
    let got = sim.handle().next_image().await;
    assert_padded(&got.data, &img, 0x1a);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ymodem_keeps_the_exact_size_and_name() {
    let (_dir, host) = xmodem_host().await;
    let sim = PtySim::spawn(XmodemSimConfig {
        protocol: Protocol::Ymodem,
        ..Default::default()
    })
    .unwrap();
    let img = image((1 << 20) + 77, 3);
    flash(
        &host,
        &sim.url(),
        &img,
        &[("protocol", "ymodem"), ("filename", "app.bin")],
    )
    .await
    .expect("flash");
    let got = sim.handle().next_image().await;
    assert_eq!(got.declared_size, Some(img.len() as u64));
    assert_eq!(got.name.as_deref(), Some("app.bin"));
    assert!(got.data == img, "exact image, no padding");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_128_byte_blocks_and_to_checksums() {
    let (_dir, host) = xmodem_host().await;
    for mode in [Mode::Crc128, Mode::Checksum] {
        let sim = PtySim::spawn(XmodemSimConfig {
            mode,
            ..Default::default()
        })
        .unwrap();
        let img = image(20_000, 4);
        flash(&host, &sim.url(), &img, &[])
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        let got = sim.handle().next_image().await;
        assert_padded(&got.data, &img, 0x1a);
        assert_eq!(
            got.blocks,
            20_000u32.div_ceil(128),
            "{mode:?}: 128-byte blocks"
        );
        sim.shutdown().await;
    }
}

/// Faults the protocol recovers from: the image arrives intact, with retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_from_lost_bytes_corruption_and_naks() {
    let (_dir, host) = xmodem_host().await;
    let cases = [
        Faults {
            drop_bytes: Some((3, 40)),
            ..Default::default()
        },
        Faults {
            corrupt: Some(5),
            ..Default::default()
        },
        Faults {
            nak: Some(1),
            ..Default::default()
        },
    ];
    for faults in cases {
        let sim = PtySim::spawn(XmodemSimConfig {
            faults: faults.clone(),
            ..Default::default()
        })
        .unwrap();
        let img = image(16 * 1024, 5);
        let out = flash(&host, &sim.url(), &img, &[])
            .await
            .unwrap_or_else(|e| panic!("{faults:?}: {e}"));
        assert!(out.report.retries >= 1, "{faults:?}: a block was resent");
        let got = sim.handle().next_image().await;
        assert!(got.naks >= 1, "{faults:?}");
        assert_padded(&got.data, &img, 0x1a);
        sim.shutdown().await;
    }
}

/// Faults the protocol cannot recover from: a clear reason and step -4, fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_clearly_on_stall_disconnect_and_cancel() {
    let (_dir, host) = xmodem_host().await;
    let quick = [("block_timeout_ms", "300"), ("retries", "3")];
    let cases: [(Faults, &[&str]); 3] = [
        (
            Faults {
                stall_after: Some(2),
                ..Default::default()
            },
            &["timeout", "block 3"],
        ),
        (
            Faults {
                disconnect_after: Some(2),
                ..Default::default()
            },
            &["closed"],
        ),
        (
            Faults {
                cancel_after: Some(2),
                ..Default::default()
            },
            &["cancel"],
        ),
    ];
    for (faults, needles) in cases {
        let sim = PtySim::spawn(XmodemSimConfig {
            faults: faults.clone(),
            ..Default::default()
        })
        .unwrap();
        let img = image(16 * 1024, 6);
        let err = flash(&host, &sim.url(), &img, &quick)
            .await
            .expect_err("must fail");
        let msg = err.to_string().to_lowercase();
        for n in needles {
            assert!(msg.contains(n), "{faults:?}: {msg:?} lacks {n:?}");
        }
        assert!(msg.contains("plugin xmodem flash"), "{msg}");
        assert_eq!(err.step_code(), -4, "{faults:?}: {msg}");
        sim.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_disconnect_mid_transfer_fails_clearly() {
    let (_dir, host) = xmodem_host().await;
    let sim = TcpSim::bind(
        "127.0.0.1:0",
        XmodemSimConfig {
            faults: Faults {
                disconnect_after: Some(4),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let err = flash(
        &host,
        &sim.url(),
        &image(64 * 1024, 8),
        &[("block_timeout_ms", "500"), ("retries", "2")],
    )
    .await
    .expect_err("must fail");
    assert_eq!(err.step_code(), -4, "{err}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enters_the_bootloader_and_reads_the_new_version_back() {
    let (_dir, host) = xmodem_host().await;
    let sim = PtySim::spawn(XmodemSimConfig {
        enter_command: Some(b"update\r".to_vec()),
        version: "1.0.0".into(),
        version_command: Some(b"version\r".to_vec()),
        ..Default::default()
    })
    .unwrap();
    let options = [
        ("enter_command", "update\\r"),
        ("version_command", "version\\r"),
    ];
    let before = otagw::flash::identify(&host, "xmodem", &sim.url(), &opts(&options))
        .await
        .expect("identify before");
    assert_eq!(before.version, "1.0.0");

    let img = versioned_image(40_000, "2.1.0");
    let out = flash(&host, &sim.url(), &img, &options)
        .await
        .expect("flash");
    assert_eq!(out.device.map(|d| d.version).as_deref(), Some("2.1.0"));
    assert_padded(&sim.handle().next_image().await.data, &img, 0x1a);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_bad_option_fails_before_the_device_is_touched() {
    let (_dir, host) = xmodem_host().await;
    let sim = PtySim::spawn(XmodemSimConfig::default()).unwrap();
    let err = flash(&host, &sim.url(), &image(1000, 9), &[("retries", "many")])
        .await
        .expect_err("bad option");
    let msg = err.to_string();
    assert!(msg.contains("retries"), "{msg}");
    assert_eq!(sim.handle().images_received(), 0);
    sim.shutdown().await;
}
