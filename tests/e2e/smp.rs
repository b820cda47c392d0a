//! The SMP/MCUboot family end to end: images signed by MCUboot's own
//! `imgtool` (ECDSA P-256 and Ed25519 keys made in the test), the real plugin
//! component, and the simulated Zephyr device on a real pseudo-terminal.

use std::process::ExitCode;
use std::time::Duration;

use otagw::plugin::{JobMeta, PluginError};
use otagw_e2e::*;

const BOUND: Duration = Duration::from_secs(180);

/// A payload for an image of `size` bytes in all (header and TLVs included, roughly).
fn payload(size: usize, seed: u64) -> Vec<u8> {
    image(size - 0x200 - 0x100, seed)
}

struct Keys {
    dir: tempfile::TempDir,
    p256: std::path::PathBuf,
    ed25519: std::path::PathBuf,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let p256 = imgtool::keygen(dir.path(), "ecdsa-p256");
    let ed25519 = imgtool::keygen(dir.path(), "ed25519");
    Keys { dir, p256, ed25519 }
}

fn smp_device() -> SmpSimConfig {
    SmpSimConfig {
        version: "1.0.0".into(),
        ..Default::default()
    }
}

fn meta(options: Vec<(String, String)>) -> JobMeta {
    JobMeta {
        version: Some("2.0.0".into()),
        module: "default".into(),
        options,
    }
}

async fn smp_host() -> (PluginsDir, PluginHost) {
    let dir = PluginsDir::with(&[artifacts::SMP]);
    let host = host_with(&dir, None).await;
    (dir, host)
}

async fn flash(
    host: &PluginHost,
    url: &str,
    img: &[u8],
    options: Vec<(String, String)>,
) -> Result<otagw::flash::FlashOutcome, PluginError> {
    tokio::time::timeout(
        BOUND,
        otagw::flash::flash(host, "smp", url, source(img), &meta(options), None),
    )
    .await
    .expect("the job ends within its bound")
}

async fn otagw_cli(args: &[&str]) -> ExitCode {
    let mut argv = vec!["otagw"];
    argv.extend_from_slice(args);
    otagw::cli::main_with_args(argv).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p256_signed_mebibyte_uploads_swaps_and_confirms_through_the_cli() {
    let k = keys();
    let img = imgtool::sign(k.dir.path(), &k.p256, &payload(1 << 20, 1), "2.0.0");
    let file = k.dir.path().join("app.signed.bin");
    std::fs::write(&file, &img).unwrap();
    let key = format!(
        "public_key={}",
        imgtool::public_key_hex(&k.p256, "ecdsa-p256")
    );
    let dir = PluginsDir::with(&[artifacts::SMP]);
    let cache = tempfile::tempdir().unwrap();
    let sim = PtySim::spawn_smp(smp_device()).unwrap();
    let url = sim.url();
    let common = [
        "--plugins-dir",
        dir.path().to_str().unwrap(),
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ];
    let mut args = vec![
        "flash",
        "--family",
        "smp",
        "--link",
        &url,
        "--image",
        file.to_str().unwrap(),
        "-o",
        &key,
    ];
    args.extend(common);
    assert_eq!(otagw_cli(&args).await, ExitCode::SUCCESS);

    let slot0 = sim.handle().slot0();
    assert_eq!(slot0.version, "2.0.0");
    assert!(slot0.confirmed, "confirmed, so MCUboot keeps it");
    assert_eq!(
        slot0.data[..img.len()],
        img[..],
        "the device runs exactly the image"
    );

    let mut args = vec!["identify", "--family", "smp", "--link", &url];
    args.extend(common);
    assert_eq!(otagw_cli(&args).await, ExitCode::SUCCESS);
    let (_d, host) = smp_host().await;
    let info = otagw::flash::identify(&host, "smp", &url, &[])
        .await
        .unwrap();
    assert_eq!(info.version, "2.0.0");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ed25519_signed_image_is_verified_and_flashed() {
    let k = keys();
    let img = imgtool::sign(k.dir.path(), &k.ed25519, &payload(96 * 1024, 2), "2.0.0");
    let (_d, host) = smp_host().await;
    let sim = PtySim::spawn_smp(smp_device()).unwrap();
    let key = imgtool::public_key_hex(&k.ed25519, "ed25519");
    let out = flash(&host, &sim.url(), &img, opts(&[("public_key", &key)]))
        .await
        .expect("flash");
    assert_eq!(out.device.map(|d| d.version).as_deref(), Some("2.0.0"));
    assert!(sim.handle().slot0().confirmed);
    sim.shutdown().await;
}

/// Each broken image is refused by `verify` with -3 before a byte reaches the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_images_are_refused_before_the_device_is_touched() {
    let k = keys();
    let good = imgtool::sign(k.dir.path(), &k.p256, &payload(64 * 1024, 3), "2.0.0");
    let key = imgtool::public_key_hex(&k.p256, "ecdsa-p256");
    let other_key = imgtool::public_key_hex(&k.ed25519, "ed25519");
    let mut tampered = good.clone();
    tampered[0x200 + 1000] ^= 0x01;
    let mut bad_magic = good.clone();
    bad_magic[0] ^= 0xff;
    let truncated = good[..good.len() - 20].to_vec();
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        ("tampered payload", tampered, key.clone()),
        ("wrong key", good.clone(), other_key),
        ("truncated TLV area", truncated, key.clone()),
        ("bad magic", bad_magic, key.clone()),
    ];
    let (_d, host) = smp_host().await;
    for (what, img, key) in cases {
        let sim = PtySim::spawn_smp(smp_device()).unwrap();
        let err = flash(&host, &sim.url(), &img, opts(&[("public_key", &key)]))
            .await
            .expect_err(what);
        assert_eq!(err.step_code(), -3, "{what}: {err}");
        assert!(
            matches!(err, PluginError::Failed { call: "verify", .. }),
            "{what}: {err:?}"
        );
        assert_eq!(sim.handle().requests(), 0, "{what}: the device saw nothing");
        eprintln!("{what}: {err}");
        sim.shutdown().await;
    }
}

/// Lost and garbled answers are retried; the image arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_garbled_frames_recover() {
    let k = keys();
    let img = imgtool::sign(k.dir.path(), &k.p256, &payload(64 * 1024, 4), "2.0.0");
    let (_d, host) = smp_host().await;
    for faults in [
        SmpFaults {
            drop_answer: Some(5),
            ..Default::default()
        },
        SmpFaults {
            garble_answer: Some(7),
            ..Default::default()
        },
        SmpFaults {
            drop_request: Some(6),
            ..Default::default()
        },
    ] {
        let sim = PtySim::spawn_smp(SmpSimConfig {
            faults: faults.clone(),
            ..smp_device()
        })
        .unwrap();
        let out = flash(&host, &sim.url(), &img, opts(&[("timeout_ms", "500")]))
            .await
            .unwrap_or_else(|e| panic!("{faults:?}: {e}"));
        assert!(out.report.retries >= 1, "{faults:?}: retried");
        assert_eq!(sim.handle().slot0().version, "2.0.0");
        sim.shutdown().await;
    }
}

/// The device resets in the middle of the upload (keeping what it received):
/// the upload goes on from the offset it reports, without resending the
/// acknowledged part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_upload_resumes_from_the_reported_offset() {
    let k = keys();
    let img = imgtool::sign(k.dir.path(), &k.p256, &payload(256 * 1024, 5), "2.0.0");
    let (_d, host) = smp_host().await;
    let sim = PtySim::spawn_smp(SmpSimConfig {
        keep_upload_across_reset: true,
        faults: SmpFaults {
            reset_mid_upload: Some(40),
            ..Default::default()
        },
        ..smp_device()
    })
    .unwrap();
    flash(&host, &sim.url(), &img, opts(&[("timeout_ms", "1000")]))
        .await
        .expect("flash");
    assert_eq!(
        sim.handle().upload_bytes(),
        img.len() as u64,
        "no acknowledged byte was sent twice"
    );
    assert!(
        sim.handle().resets() >= 2,
        "the fault's reset and the test reset"
    );
    assert_eq!(sim.handle().slot0().version, "2.0.0");
    sim.shutdown().await;
}

/// A new image that does not boot is reported as a failure (MCUboot reverts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_does_not_confirm_fails() {
    let k = keys();
    let img = imgtool::sign(k.dir.path(), &k.p256, &payload(32 * 1024, 6), "2.0.0");
    let (_d, host) = smp_host().await;
    let sim = PtySim::spawn_smp(SmpSimConfig {
        faults: SmpFaults {
            no_boot: true,
            ..Default::default()
        },
        ..smp_device()
    })
    .unwrap();
    let err = flash(&host, &sim.url(), &img, vec![])
        .await
        .expect_err("must fail");
    assert_eq!(err.step_code(), -4, "{err}");
    assert!(err.to_string().contains("did not boot"), "{err}");
    assert_eq!(
        sim.handle().slot0().version,
        "1.0.0",
        "the old image still runs"
    );
    sim.shutdown().await;
}

/// Through the daemon: a notice for an SMP leaf ends with the new version on
/// `inform`, read back from the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_upgrades_an_smp_leaf_and_reports_the_version_read_back() {
    let k = keys();
    let img = imgtool::sign(k.dir.path(), &k.ed25519, &payload(200 * 1024, 7), "2.1.0");
    let key = imgtool::public_key_hex(&k.ed25519, "ed25519");
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let files = FileServer::start().await;
    let url = files.add("app.signed.bin", img.clone());
    let plugins = PluginsDir::with(&[artifacts::SMP]);
    let data = tempfile::tempdir().unwrap();
    let sim = PtySim::spawn_smp(smp_device()).unwrap();
    let leaf = LeafSpec::smp("mcu-1", &sim.url(), &[("public_key", &key)]);
    let gw = Daemon::start(&gateway_config(
        data.path(),
        plugins.path(),
        Some(&broker.url()),
        &[leaf],
    ))
    .await;
    let inform = format!("/ota/device/inform/{LEAF_PK}/mcu-1");
    probe
        .wait_until(BOUND, "inform 1.0.0", |m| has_inform(m, &inform, "1.0.0"))
        .await;
    probe
        .publish(
            &format!("/ota/device/upgrade/{LEAF_PK}/mcu-1"),
            notice(1, "2.1.0", &url, &img),
        )
        .await;
    probe
        .wait_until(BOUND, "inform 2.1.0", |m| has_inform(m, &inform, "2.1.0"))
        .await;
    assert!(has_step(
        &probe.messages(),
        &format!("/ota/device/progress/{LEAF_PK}/mcu-1"),
        "100"
    ));
    assert!(sim.handle().slot0().confirmed);
    gw.stop().await;
    sim.shutdown().await;
}
