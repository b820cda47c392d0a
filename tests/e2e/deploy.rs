//! Issue 16 (deploying on a gateway), the parts that run here: the daemon
//! speaks systemd's notify protocol (`Type=notify`, `WatchdogSec`) on the
//! socket systemd would give it (`NOTIFY_SOCKET`, a datagram socket; this
//! test binds it, as systemd does).

use std::time::Duration;

use otagw_e2e::*;

const LIMIT: Duration = Duration::from_secs(60);
const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_otagw-e2e-gateway");

/// Once the leaf `press` is online on 1.0.0, push it a notice for 2.0.0
/// served over HTTP by `files`; wait until it runs 2.0.0.
async fn upgrade_press_to_2(probe: &MqttProbe, files: &FileServer) {
    let img = versioned_image(20_000, "2.0.0");
    let url = files.add("fw.bin", img.clone());
    let inform = format!("/ota/device/inform/{LEAF_PK}/press");
    probe
        .wait_until(LIMIT, "online", |m| has_inform(m, &inform, "1.0.0"))
        .await;
    probe
        .publish(
            &format!("/ota/device/upgrade/{LEAF_PK}/press"),
            notice(1, "2.0.0", &url, &img),
        )
        .await;
    probe
        .wait_until(LIMIT, "press runs 2.0.0", |m| {
            has_inform(m, &inform, "2.0.0")
        })
        .await;
}

/// The gateway as a process with `config` in `dir`, given a notify socket as
/// systemd gives one (`NOTIFY_SOCKET`, bound here) and `env` besides.
async fn start_notifying(
    dir: &std::path::Path,
    config: &str,
    env: &[(&str, &str)],
) -> (GatewayProcess, tokio::net::UnixDatagram) {
    let sock_path = dir.join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let mut env = env.to_vec();
    env.push(("NOTIFY_SOCKET", sock_path.to_str().unwrap()));
    let gw =
        GatewayProcess::start_logged(GATEWAY_BIN, config, &dir.join("otagw.toml"), &[], &env).await;
    (gw, socket)
}

/// The next notification, as text.
async fn next(socket: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(LIMIT, socket.recv(&mut buf))
        .await
        .expect("a notification in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Notifications until one contains `what` (returned).
async fn until(socket: &tokio::net::UnixDatagram, what: &str) -> String {
    loop {
        let got = next(socket).await;
        if got.contains(what) {
            return got;
        }
    }
}

/// READY=1 once the gateway serves (after it printed its API address:
/// plugins loaded, API listening); WATCHDOG=1 from its event loop at half
/// of WatchdogSec; RELOADING=1 (with MONOTONIC_USEC) then READY=1 around a
/// SIGHUP; STOPPING=1 at SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_speaks_systemds_notify_protocol() {
    let sim = PtySim::spawn(xmodem_device()).unwrap();
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let config = gateway_config(
        data.path(),
        plugins.path(),
        None,
        &[LeafSpec::xmodem("press", &sim.url())],
    );
    let (gw, socket) = start_notifying(data.path(), &config, &[("WATCHDOG_USEC", "400000")]).await;
    let ready = next(&socket).await;
    assert!(
        ready.contains("READY=1") && ready.contains("STATUS=serving 1 leaves"),
        "{ready:?}"
    );
    for _ in 0..2 {
        assert_eq!(next(&socket).await.trim(), "WATCHDOG=1");
    }
    gw.signal("-HUP").await;
    let reloading = until(&socket, "RELOADING=1").await;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading:?}");
    until(&socket, "READY=1").await;
    gw.terminate().await;
    until(&socket, "STOPPING=1").await;
    assert!(gw.exited(LIMIT).await.success());
    sim.shutdown().await;
}

/// systemd may stop (or reload) a service the moment it said READY=1: the
/// gateway catches SIGTERM and SIGHUP before it says so, and a stop right
/// after READY is a clean stop, never the signal's default (the process
/// killed at once). Found by packaging/install-test.sh, where the signal
/// handlers were installed by tasks that had not run yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_right_after_ready_is_a_clean_stop() {
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let config = gateway_config(data.path(), plugins.path(), None, &[]);
    let (gw, socket) = start_notifying(data.path(), &config, &[]).await;
    until(&socket, "READY=1").await;
    gw.terminate().await;
    until(&socket, "STOPPING=1").await;
    let status = gw.exited(LIMIT).await;
    assert!(status.success(), "{status:?}");
}

/// Item 6: `otagw doctor` checks a deployment. With every device reachable it
/// says so and exits 0; a serial port that is not there, and a device server
/// that does not answer, are each a FAIL line saying what to do, and exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_says_what_is_wrong_with_a_deployment() {
    let sim = PtySim::spawn(xmodem_device()).unwrap();
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let good = gateway_config(
        data.path(),
        plugins.path(),
        None,
        &[LeafSpec::xmodem("press", &sim.url())],
    );
    let path = data.path().join("otagw.toml");
    std::fs::write(&path, &good).unwrap();
    let doctor = || async {
        let out = tokio::process::Command::new(GATEWAY_BIN)
            .args(["doctor", "--config", path.to_str().unwrap()])
            .output()
            .await
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = doctor().await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("ok    device a1LeafPK/press:") && out.contains("no problems found"),
        "{out}"
    );
    let engine = EngineKind::for_this_target().to_string();
    assert!(
        out.contains(&format!("ok    plugins run on {engine}")),
        "{out}"
    );

    let bad = gateway_config(
        data.path(),
        plugins.path(),
        None,
        &[
            LeafSpec::xmodem("press", &sim.url()),
            LeafSpec::xmodem("unplugged", "serial:///dev/ttyUSB-otagw-test"),
            LeafSpec::xmodem("server", "tcp://127.0.0.1:1"),
        ],
    );
    std::fs::write(&path, &bad).unwrap();
    let (code, out) = doctor().await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL  device a1LeafPK/unplugged: /dev/ttyUSB-otagw-test does not exist")
            && out.contains("otagw ports"),
        "{out}"
    );
    assert!(
        out.contains("FAIL  device a1LeafPK/server: 127.0.0.1:1"),
        "{out}"
    );
    assert!(out.contains("2 problems found"), "{out}");
    sim.shutdown().await;
}

/// Item 4: the service unit (`packaging/otagw.service`) is one systemd
/// itself accepts (`systemd-analyze verify`: no warning) and rates hardened
/// (`systemd-analyze security --offline`: exposure 2.5 or less), with
/// Type=notify and a watchdog, as the daemon speaks them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/otagw.service"
    ))
    .unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/otagw",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "DevicePolicy=closed",
        "SupplementaryGroups=dialout",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed}");
    }
    // Where the package puts otagw, this test's build of it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("otagw.service");
    std::fs::write(&file, unit.replace("/usr/bin/otagw", GATEWAY_BIN)).unwrap();
    let analyze = |args: &[&str]| {
        std::process::Command::new("systemd-analyze")
            .args(args)
            .arg(&file)
            .output()
            .expect("systemd-analyze (Debian's systemd package)")
    };
    let verify = analyze(&["verify"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");
    let security = analyze(&["security", "--offline=true", "--threshold=25"]);
    let said = String::from_utf8_lossy(&security.stdout);
    assert!(
        security.status.success(),
        "exposure above 2.5: {}",
        said.lines().last().unwrap_or_default()
    );
}

/// Item 4: the package's `/etc/otagw/otagw.toml` is the default
/// configuration with the installed paths (data and plugins under
/// /var/lib/otagw, the one tree the unit may write) and no device yet, and it
/// documents every option the default documents (a new option is not
/// forgotten there); the unit's MemoryMax holds what it allows at once.
#[test]
fn the_packaged_config_is_the_default_with_the_installed_paths() {
    let file = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/otagw.toml"
    ));
    let text = std::fs::read_to_string(file).unwrap();
    let cfg = otagw::config::Config::parse(&text, std::path::Path::new("/etc/otagw/otagw.toml"))
        .expect("the packaged config parses");
    assert_eq!(cfg.gateway.data_dir, std::path::Path::new("/var/lib/otagw"));
    assert_eq!(
        cfg.gateway.plugins_dir,
        std::path::Path::new("/var/lib/otagw/plugins")
    );
    assert!(
        cfg.devices.is_empty(),
        "no device until the operator adds one"
    );
    let unit = std::fs::read_to_string(file.with_file_name("otagw.service")).unwrap();
    assert!(unit.contains("--config /etc/otagw/otagw.toml"));
    // The unit lets the gateway use what its configuration allows.
    let memory_max: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("MemoryMax="))
        .and_then(|v| v.strip_suffix('M'))
        .and_then(|v| v.parse().ok())
        .expect("MemoryMax=<n>M in the unit");
    assert_eq!(cfg.memory_limit_warning(Some(memory_max << 20)), None);

    // Every `key =` and `[section]` of the default, set or commented out.
    let options = |t: &str| -> std::collections::BTreeSet<String> {
        t.lines()
            .map(|l| l.trim_start_matches(['#', ' ']))
            .filter_map(|l| {
                let key = l.split(['=', ' ']).next()?;
                let is_key = l.contains(" = ")
                    && !key.is_empty()
                    && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                (is_key || l.starts_with('[')).then(|| key.to_string())
            })
            .collect()
    };
    let missing: Vec<_> = options(otagw::config::DEFAULT)
        .difference(&options(&text))
        .cloned()
        .collect();
    assert!(missing.is_empty(), "packaging/otagw.toml lacks {missing:?}");
}

/// Item 5: `[cache] dir` puts the image files elsewhere than data_dir (a
/// bigger partition, a tmpfs); the gateway downloads there and flashes from
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_go_to_the_configured_cache_dir() {
    let sim = PtySim::spawn(xmodem_device()).unwrap();
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let files = FileServer::start().await;
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let config = gateway_config(
        data.path(),
        plugins.path(),
        Some(&broker.url()),
        &[LeafSpec::xmodem("press", &sim.url())],
    )
    .replace(
        "[plugins]\n",
        &format!(
            "[cache]\ndir = {:?}\n\n[plugins]\n",
            elsewhere.path().display().to_string()
        ),
    );
    let gw = Daemon::start(&config).await;
    upgrade_press_to_2(&probe, &files).await;
    gw.stop().await;
    let kept: Vec<_> = std::fs::read_dir(elsewhere.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(kept.iter().any(|n| n.ends_with(".img")), "{kept:?}");
    let default_dir = data.path().join("images");
    assert!(
        !default_dir.exists() || std::fs::read_dir(&default_dir).unwrap().next().is_none(),
        "nothing in data_dir/images"
    );
    sim.shutdown().await;
}

/// A gateway on a root file system without CA certificates (a minimal
/// Debian has none until `ca-certificates` is installed) still starts: it
/// says at start what is missing and what to install, and HTTP downloads
/// work. (It used to refuse to start with "HTTP client: builder error", found
/// by packaging/install-test.sh.) The platform verifier reads the system's
/// certificates from SSL_CERT_FILE and SSL_CERT_DIR when set: here, from
/// nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_ca_certificates_starts_and_says_what_to_install() {
    let sim = PtySim::spawn(xmodem_device()).unwrap();
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let files = FileServer::start().await;
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let no_certs = data.path().join("no-certs");
    std::fs::create_dir(&no_certs).unwrap();
    let config = gateway_config(
        data.path(),
        plugins.path(),
        Some(&broker.url()),
        &[LeafSpec::xmodem("press", &sim.url())],
    );
    let path = data.path().join("otagw.toml");
    let gw = GatewayProcess::start_logged(
        GATEWAY_BIN,
        &config,
        &path,
        &[],
        &[
            ("SSL_CERT_FILE", no_certs.join("none.pem").to_str().unwrap()),
            ("SSL_CERT_DIR", no_certs.to_str().unwrap()),
        ],
    )
    .await;
    let line = gw.wait_log(LIMIT, "no usable CA certificates").await;
    assert!(line.contains("apt-get install ca-certificates"), "{line}");

    upgrade_press_to_2(&probe, &files).await;
    gw.terminate().await;
    assert!(gw.exited(LIMIT).await.success());
    sim.shutdown().await;
}
