//! `otagw flash`, `otagw identify` and `otagw plugins` as a technician runs
//! them: the same entry point as the binary, with real plugins and a
//! simulated leaf on a pseudo-terminal.

use std::process::ExitCode;

use otagw_e2e::*;

async fn otagw(args: &[&str]) -> ExitCode {
    let mut argv = vec!["otagw"];
    argv.extend_from_slice(args);
    otagw::cli::main_with_args(argv).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_and_identify_by_hand() {
    let dir = PluginsDir::with(&[artifacts::XMODEM]);
    let cache = tempfile::tempdir().unwrap();
    let sim = PtySim::spawn(XmodemSimConfig {
        enter_command: Some(b"update\r".to_vec()),
        version_command: Some(b"version\r".to_vec()),
        ..Default::default()
    })
    .unwrap();
    let img = versioned_image(100_000, "4.0.0");
    let file = cache.path().join("fw.bin");
    std::fs::write(&file, &img).unwrap();
    let common = [
        "--plugins-dir",
        dir.path().to_str().unwrap(),
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ];
    let url = sim.url();
    let mut args = vec![
        "flash",
        "--family",
        "xmodem",
        "--link",
        &url,
        "--image",
        file.to_str().unwrap(),
    ];
    args.extend([
        "-o",
        "enter_command=update\\r",
        "-o",
        "version_command=version\\r",
    ]);
    args.extend(common);
    assert_eq!(otagw(&args).await, ExitCode::SUCCESS);
    assert_padded(&sim.handle().next_image().await.data, &img, 0x1a);

    let mut args = vec![
        "identify",
        "--family",
        "xmodem",
        "--link",
        &url,
        "-o",
        "version_command=version\\r",
    ];
    args.extend(common);
    assert_eq!(otagw(&args).await, ExitCode::SUCCESS);
    assert_eq!(sim.handle().version(), "4.0.0");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_exit_non_zero() {
    let dir = PluginsDir::with(&[artifacts::XMODEM, artifacts::FS_IMPORT]);
    let cache = tempfile::tempdir().unwrap();
    let file = cache.path().join("fw.bin");
    std::fs::write(&file, image(10_000, 1)).unwrap();
    let sim = PtySim::spawn(XmodemSimConfig {
        faults: Faults {
            stall_after: Some(1),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let url = sim.url();
    let pd = dir.path().to_str().unwrap();
    let cd = cache.path().to_str().unwrap();
    let img = file.to_str().unwrap();
    let base = [
        "--plugins-dir",
        pd,
        "--cache-dir",
        cd,
        "--image",
        img,
        "--link",
    ];

    // A stalled device: failure, status 1.
    let mut a = vec![
        "flash",
        "--family",
        "xmodem",
        "-o",
        "block_timeout_ms=200",
        "-o",
        "retries=2",
    ];
    a.extend(base);
    a.push(&url);
    assert_eq!(otagw(&a).await, ExitCode::FAILURE);
    // An unknown family: failure.
    let mut a = vec!["flash", "--family", "nope"];
    a.extend(base);
    a.push(&url);
    assert_eq!(otagw(&a).await, ExitCode::FAILURE);
    // A missing image: a setup error, 64.
    let a = [
        "flash",
        "--family",
        "xmodem",
        "--plugins-dir",
        pd,
        "--image",
        "/nonexistent.bin",
        "--link",
        &url,
    ];
    assert_eq!(otagw(&a).await, ExitCode::from(64));
    // A malformed option: a usage error, 64.
    let a = [
        "flash", "--family", "xmodem", "--image", img, "--link", &url, "-o", "retries",
    ];
    assert_eq!(otagw(&a).await, ExitCode::from(64));
    // `plugins` lists the broken plugin and fails.
    assert_eq!(
        otagw(&["plugins", "--plugins-dir", pd, "--cache-dir", cd]).await,
        ExitCode::FAILURE
    );
    sim.shutdown().await;
}

/// The binary itself, as a process: `flash` and `identify` run on their own
/// (current-thread) runtime, which the in-process tests above do not use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_and_identify_as_a_process() {
    let bin = env!("CARGO_BIN_EXE_otagw-e2e-gateway");
    let dir = PluginsDir::with(&[artifacts::XMODEM]);
    let cache = tempfile::tempdir().unwrap();
    let sim = PtySim::spawn(XmodemSimConfig {
        enter_command: Some(b"update\r".to_vec()),
        version_command: Some(b"version\r".to_vec()),
        ..Default::default()
    })
    .unwrap();
    let img = versioned_image(200_000, "4.1.0");
    let file = cache.path().join("fw.bin");
    std::fs::write(&file, &img).unwrap();
    let url = sim.url();
    let common = [
        "--family",
        "xmodem",
        "--link",
        &url,
        "--plugins-dir",
        dir.path().to_str().unwrap(),
        "--cache-dir",
        cache.path().to_str().unwrap(),
        "-o",
        "version_command=version\\r",
    ];
    let run = |args: Vec<&str>| {
        tokio::process::Command::new(bin)
            .args(args)
            .kill_on_drop(true)
            .output()
    };
    let mut args = vec!["flash", "--image", file.to_str().unwrap()];
    args.extend(common);
    args.extend(["-o", "enter_command=update\\r"]);
    let out = run(args).await.expect("run the binary");
    assert!(
        out.status.success(),
        "flash: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_padded(&sim.handle().next_image().await.data, &img, 0x1a);

    let mut args = vec!["identify"];
    args.extend(common);
    let out = run(args).await.expect("run the binary");
    assert!(
        out.status.success(),
        "identify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("4.1.0"), "identify printed {stdout:?}");
    sim.shutdown().await;
}
