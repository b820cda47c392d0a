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
    // An unknown family: the command line is wrong, 64.
    let mut a = vec!["flash", "--family", "nope"];
    a.extend(base);
    a.push(&url);
    assert_eq!(otagw(&a).await, ExitCode::from(64));
    // A missing image: no input, 66.
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
    assert_eq!(otagw(&a).await, ExitCode::from(66));
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

/// Run the `otagw` binary (as a process) with `args`; (success, stdout, stderr).
async fn otagw_process(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_otagw-e2e-gateway"))
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run the binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run cargo in `dir` as a plugin author would, offline (the workspace's
/// lock file pins what the workspace build already fetched).
async fn cargo_in(dir: &std::path::Path, args: &[&str]) -> String {
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-new-target");
    let out = tokio::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .args(args)
        .arg("--offline")
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run cargo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "cargo {args:?} in {}: {text}",
        dir.display()
    );
    text
}

/// `otagw plugin new acme`: the crate builds for wasm32-wasip2 as written,
/// passes its own tests, and `otagw plugins` lists it from a plugins dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_family_from_the_template_builds_tests_and_loads() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().to_str().unwrap();
    assert_eq!(
        otagw(&["plugin", "new", "acme", "--dir", dir]).await,
        ExitCode::SUCCESS
    );
    let root = work.path().join("acme");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"),
        root.join("Cargo.lock"),
    )
    .unwrap();
    let tested = cargo_in(&root, &["test"]).await;
    assert!(tested.contains("test result: ok. 4 passed"), "{tested}");
    cargo_in(&root, &["build", "--release", "--target", "wasm32-wasip2"]).await;

    let wasm = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("plugin-new-target/wasm32-wasip2/release/otagw_plugin_acme.wasm");
    let plugins = PluginsDir::with(&[wasm.to_str().unwrap(), artifacts::XMODEM]);
    let cache = tempfile::tempdir().unwrap();
    let common = [
        "--plugins-dir",
        plugins.path().to_str().unwrap(),
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ];
    let mut args = vec!["plugins", "--family", "acme", "--json"];
    args.extend(common);
    let (ok, out, err) = otagw_process(&args).await;
    assert!(ok, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let listed = doc["plugins"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "only the family asked for: {out}");
    assert_eq!(listed[0]["family"], "acme");
    assert_eq!(listed[0]["contract"], "0.2.0");
    let chunk = listed[0]["options"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "chunk_size")
        .expect("the template's options are listed");
    assert_eq!(chunk["default"], "256");
    assert_eq!(chunk["doc"], "bytes sent before each ACK");

    let mut args = vec!["plugins", "--family", "xmodem"];
    args.extend(common);
    let (ok, out, err) = otagw_process(&args).await;
    assert!(ok, "{err}");
    assert!(out.contains("handshake_timeout_ms"), "{out}");
    assert!(out.contains("re-sends allowed per block"), "{out}");
    assert!(!out.contains("acme"), "{out}");

    let mut args = vec!["plugins", "--family", "nope"];
    args.extend(common);
    let (ok, _, err) = otagw_process(&args).await;
    assert!(!ok);
    assert!(
        err.contains("no plugin") && err.contains("acme, xmodem"),
        "{err}"
    );
}

/// `otagw check` refuses each kind of option mistake with a precise error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_bad_device_options_naming_each() {
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let device = |name: &str, options: &str| {
        format!(
            "[[device]]\nproduct_key = \"pk\"\ndevice_name = \"{name}\"\nfamily = \"xmodem\"\n\
             link = \"tcp://127.0.0.1:1\"\nversion = \"1.0.0\"\noptions = {{ {options} }}\n"
        )
    };
    let head = format!(
        "[gateway]\nproduct_key = \"gw\"\ndevice_name = \"gw\"\ndata_dir = {:?}\nplugins_dir = {:?}\n",
        data.path(),
        plugins.path()
    );
    let good = format!(
        "{head}{}",
        device("fine", "retries = 5, small_tail = false")
    );
    let file = data.path().join("good.toml");
    std::fs::write(&file, &good).unwrap();
    let (ok, out, err) = otagw_process(&["check", "--config", file.to_str().unwrap()]).await;
    assert!(ok, "{out}{err}");

    let bad = format!(
        "{head}{}{}{}{}{}",
        device("misspelt", "retrys = \"5\""),
        device("wrong-type", "small_tail = \"maybe\""),
        device("out-of-range", "retries = 5000"),
        device("non-ascii", "protocol = \"ýmodem\""),
        "[[device]]\nproduct_key = \"pk\"\ndevice_name = \"no-plugin\"\nfamily = \"esp32\"\n\
         link = \"tcp://127.0.0.1:1\"\nversion = \"1.0.0\"\n"
    );
    let file = data.path().join("bad.toml");
    std::fs::write(&file, &bad).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_otagw-e2e-gateway"))
        .args(["check", "--config", file.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "an invalid configuration");
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "device pk/misspelt: unknown option `retrys` (did you mean `retries`?)",
        "device pk/wrong-type: option `small_tail` = \"maybe\"",
        "device pk/out-of-range: option `retries` = \"5000\"",
        "device pk/non-ascii: option `protocol` = \"ýmodem\"",
        "device pk/no-plugin: no plugin for family \"esp32\"",
        "5 problems",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}
