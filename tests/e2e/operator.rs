//! Issue 15: what the operator sees. The gateway runs as a process, started
//! as an operator starts it (no RUST_LOG), its stderr read as a file or
//! journald would: a pipe, not a terminal.

use std::time::Duration;

use otagw_e2e::*;

const LIMIT: Duration = Duration::from_secs(120);
const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_otagw-e2e-gateway");

/// A gateway with a working XMODEM leaf ("press") and one whose link
/// refuses connections ("dead"), on mosquitto.
struct World {
    _broker: Mosquitto,
    probe: MqttProbe,
    files: FileServer,
    _plugins: PluginsDir,
    data: tempfile::TempDir,
    sim: PtySim,
    config: String,
}

async fn world() -> World {
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let sim = PtySim::spawn(xmodem_device()).unwrap();
    let dead = LeafSpec {
        link: "tcp://127.0.0.1:1".into(),
        ..LeafSpec::xmodem("dead", "tcp://127.0.0.1:1")
    };
    let leaves = [LeafSpec::xmodem("press", &sim.url()), dead];
    let config = gateway_config(data.path(), plugins.path(), Some(&broker.url()), &leaves);
    World {
        _broker: broker,
        probe,
        files: FileServer::start().await,
        _plugins: plugins,
        data,
        sim,
        config,
    }
}

impl World {
    /// Push 2.0.0 to both leaves, once the gateway is online (it informed
    /// press's version).
    async fn push(&self) {
        self.probe
            .wait_until(LIMIT, "the gateway online", |m| {
                has_inform(m, &format!("/ota/device/inform/{LEAF_PK}/press"), "1.0.0")
            })
            .await;
        let img = versioned_image(20_000, "2.0.0");
        let url = self.files.add("fw.bin", img.clone());
        for (id, dn) in [(1, "press"), (2, "dead")] {
            self.probe
                .publish(
                    &format!("/ota/device/upgrade/{LEAF_PK}/{dn}"),
                    notice(id, "2.0.0", &url, &img),
                )
                .await;
        }
    }
}

/// Item 1 and 8: at the default level, every job's start, each phase and
/// its end (success with the version read back, failure with step code and
/// reason) is a line naming the device, module, family and job; the
/// plugin's own lines carry the same; no colour codes when stderr is not a
/// terminal; the embedded broker's routing noise is not shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_lines_name_the_device_and_carry_no_colour_off_a_terminal() {
    let w = world().await;
    let path = w.data.path().join("otagw.toml");
    let gw = GatewayProcess::start_logged(GATEWAY_BIN, &w.config, &path, &[], &[]).await;
    w.push().await;
    let ok = gw.wait_log(LIMIT, "job succeeded").await;
    let failed = gw.wait_log(LIMIT, "job failed").await;

    let press = |line: &str| {
        line.contains(&format!("device={LEAF_PK}/press"))
            && line.contains("module=default")
            && line.contains("family=xmodem")
            && line.contains("job=2.0.0@")
    };
    assert!(press(&ok) && ok.contains("the leaf runs 2.0.0"), "{ok}");
    assert!(
        failed.contains(&format!("device={LEAF_PK}/dead"))
            && failed.contains("family=xmodem")
            && failed.contains("(-4)"),
        "{failed}"
    );
    let log = gw.log();
    for what in [
        "job started",
        "job phase: downloading the image",
        "job phase: verifying the image",
        "job phase: flashing",
        "job phase: reading the version back",
        // The plugin's own warning about XMODEM's padding.
        "XMODEM carries no size",
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(what) && l.contains("/press"))
            .unwrap_or_else(|| panic!("no line with {what:?} for press:\n{log}"));
        assert!(press(line), "{what}: {line}");
    }
    assert!(!log.contains('\u{1b}'), "colour codes in a pipe:\n{log}");
    assert!(!log.contains("rumqttd"), "{log}");
    gw.kill().await;
    w.sim.shutdown().await;
}

/// Item 8: `--log-format json` writes one JSON object a line, the job's
/// fields in its span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_a_line_with_the_job_fields() {
    let w = world().await;
    let path = w.data.path().join("otagw.toml");
    let gw = GatewayProcess::start_logged(
        GATEWAY_BIN,
        &w.config,
        &path,
        &["--log-format", "json"],
        &[],
    )
    .await;
    w.push().await;
    gw.wait_log(LIMIT, "job succeeded").await;
    let log = gw.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let end = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("job succeeded"))
        })
        .unwrap();
    assert_eq!(end["level"], "INFO", "{end}");
    assert_eq!(end["span"]["device"], format!("{LEAF_PK}/press"), "{end}");
    assert_eq!(end["span"]["family"], "xmodem", "{end}");
    gw.kill().await;
    w.sim.shutdown().await;
}

/// Item 14: the notice example in the README, run as written (only its
/// first line, the operator's values, replaced), upgrades a leaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_notice_example_upgrades_a_leaf() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let block = readme
        .split("<!-- notice-example")
        .nth(1)
        .and_then(|rest| rest.split("```sh\n").nth(1))
        .and_then(|code| code.split("```").next())
        .expect("the README has the notice example");
    let (values, script) = block.split_once('\n').unwrap();
    assert!(values.starts_with("BROKER_PORT="), "{values}");

    let sim = PtySim::spawn(xmodem_device()).unwrap();
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    // The broker the example publishes to: mosquitto here (the embedded one
    // takes the same line), so the probe listens before the gateway starts.
    let broker = Mosquitto::start().await;
    let port = broker.port();
    let probe = MqttProbe::connect(port, "#").await;
    let config = gateway_config(
        data.path(),
        plugins.path(),
        Some(&broker.url()),
        &[LeafSpec::xmodem("press", &sim.url())],
    );
    let gw = Daemon::start(&config).await;
    let files = FileServer::start().await;
    let img = versioned_image(20_000, "2.0.0");
    let url = files.add("fw.bin", img.clone());
    let fw = data.path().join("fw.bin");
    std::fs::write(&fw, &img).unwrap();

    probe
        .wait_until(LIMIT, "the gateway online", |m| {
            has_inform(m, &format!("/ota/device/inform/{LEAF_PK}/press"), "1.0.0")
        })
        .await;
    let ours = format!(
        "BROKER_PORT={port} PK={LEAF_PK} DN=press FW={} URL={url} VERSION=2.0.0",
        fw.display()
    );
    let out = tokio::process::Command::new("bash")
        .args(["-euc", &format!("{ours}\n{script}")])
        .output()
        .await
        .expect("bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    probe
        .wait_until(LIMIT, "press runs 2.0.0", |m| {
            has_inform(m, &format!("/ota/device/inform/{LEAF_PK}/press"), "2.0.0")
        })
        .await;
    gw.stop().await;
    sim.shutdown().await;
}

/// Run the `otagw` binary with `args`: (exit status, stdout, stderr).
async fn otagw(args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(GATEWAY_BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run otagw");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A technician's bench for `otagw flash` and `otagw identify`: the xmodem
/// plugin, a compile cache, an image (2.0.0) and one simulated device.
struct Bench {
    sim: PtySim,
    _plugins: PluginsDir,
    _cache: tempfile::TempDir,
    /// `--plugins-dir`, `--cache-dir`, `--link` and (for flash) `--image`.
    plugins_dir: String,
    cache_dir: String,
    image: String,
}

impl Bench {
    fn new(device: XmodemSimConfig, image_bytes: usize) -> Bench {
        let sim = PtySim::spawn(device).unwrap();
        let plugins = PluginsDir::with(&[artifacts::XMODEM]);
        let cache = tempfile::tempdir().unwrap();
        let image = cache.path().join("fw.bin");
        std::fs::write(&image, versioned_image(image_bytes, "2.0.0")).unwrap();
        Bench {
            plugins_dir: plugins.path().display().to_string(),
            cache_dir: cache.path().display().to_string(),
            image: image.display().to_string(),
            sim,
            _plugins: plugins,
            _cache: cache,
        }
    }

    /// `otagw COMMAND --family xmodem ...` for this bench's device, then `extra`.
    fn args(&self, command: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            command,
            "--family",
            "xmodem",
            "--plugins-dir",
            &self.plugins_dir,
            "--cache-dir",
            &self.cache_dir,
            "--link",
            &self.sim.url(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if command == "flash" {
            args.extend(["--image".to_string(), self.image.clone()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Run `otagw COMMAND` on this bench's device: (exit status, stdout, stderr).
    async fn run(&self, command: &str, extra: &[&str]) -> (Option<i32>, String, String) {
        let args = self.args(command, extra);
        otagw(&args.iter().map(String::as_str).collect::<Vec<_>>()).await
    }

    async fn shutdown(self) {
        self.sim.shutdown().await;
    }
}

/// Item 9: exit statuses say what kind of failure it was (and `--help`
/// says which is which); messages say what to do, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_statuses_and_messages_tell_the_operator_what_to_do() {
    let (code, out, _) = otagw(&["--help"]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("Exit status:") && out.contains("69 the gateway cannot be reached"),
        "{out}"
    );

    // The gateway is not running: unavailable (69), not a usage error.
    let (code, _, err) = otagw(&["status", "--api", "127.0.0.1:1"]).await;
    assert_eq!(code, Some(69), "{err}");
    assert!(
        err.contains("cannot reach the gateway at http://127.0.0.1:1/api/devices")
            && err.contains("is `otagw run` running?"),
        "{err}"
    );

    // A plugins directory that does not exist: no input (66), said once.
    let cache = tempfile::tempdir().unwrap();
    let cd = cache.path().to_str().unwrap();
    let (code, _, err) = otagw(&[
        "plugins",
        "--plugins-dir",
        "/nonexistent/plugins",
        "--cache-dir",
        cd,
    ])
    .await;
    assert_eq!(code, Some(66), "{err}");
    assert!(err.contains("does not exist: create it"), "{err}");
    assert_eq!(err.matches("No such file").count(), 0, "{err}");

    // A missing image: the OS error once.
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let pd = plugins.path().to_str().unwrap();
    let (code, _, err) = otagw(&[
        "flash",
        "--family",
        "xmodem",
        "--plugins-dir",
        pd,
        "--cache-dir",
        cd,
        "--image",
        "/nonexistent.bin",
        "--link",
        "tcp://127.0.0.1:1",
    ])
    .await;
    assert_eq!(code, Some(66), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");

    // A device path where a URL belongs: say how to write it.
    let img = cache.path().join("fw.bin");
    std::fs::write(&img, versioned_image(2_000, "2.0.0")).unwrap();
    let img = img.to_str().unwrap();
    let (code, _, err) = otagw(&[
        "flash",
        "--family",
        "xmodem",
        "--plugins-dir",
        pd,
        "--cache-dir",
        cd,
        "--image",
        img,
        "--link",
        "/dev/ttyUSB7",
    ])
    .await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("write serial:///dev/ttyUSB7"), "{err}");

    // A family with no plugin: the ones there are listed.
    let (code, _, err) = otagw(&[
        "identify",
        "--family",
        "esp32",
        "--plugins-dir",
        pd,
        "--cache-dir",
        cd,
        "--link",
        "tcp://127.0.0.1:1",
    ])
    .await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("the families there are: xmodem"), "{err}");
}

/// Item 15: `otagw plugins` says what it looked at, an empty directory is an
/// error, and a broken plugin is reported once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_lists_with_a_header_and_reports_each_problem_once() {
    let cache = tempfile::tempdir().unwrap();
    let cd = cache.path().to_str().unwrap();
    let empty = PluginsDir::with(&[]);
    let (code, out, err) = otagw(&[
        "plugins",
        "--plugins-dir",
        empty.path().to_str().unwrap(),
        "--cache-dir",
        cd,
    ])
    .await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("no plugins in"), "{err}");

    let dir = PluginsDir::with(&[artifacts::XMODEM]);
    dir.add_raw("broken.wasm", b"\0asm\x0d\0\x01\0garbage");
    let (code, out, err) = otagw(&[
        "plugins",
        "--plugins-dir",
        dir.path().to_str().unwrap(),
        "--cache-dir",
        cd,
    ])
    .await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.starts_with(&format!(
            "{}: 1 plugin loaded, 1 broken",
            dir.path().display()
        )),
        "{out}"
    );
    let said = format!("{out}{err}");
    assert_eq!(said.matches("broken.wasm").count(), 1, "{said}");
}

/// Item 5: `otagw flash --version V` fails when the device then runs
/// another version, as the daemon does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_fails_when_the_device_does_not_run_the_version_it_was_given() {
    let bench = Bench::new(xmodem_device(), 4_000);
    let (code, out, err) = bench
        .run(
            "flash",
            &[
                "--version",
                "9.9.9",
                "-o",
                "enter_command=update\\r",
                "-o",
                "version_command=version\\r",
            ],
        )
        .await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("the device reports version 2.0.0 after the flash, not 9.9.9"),
        "{err}"
    );
    bench.shutdown().await;
}

/// Item 2: SIGTERM with a flash under way. With a long enough `--grace` the
/// flash finishes and the platform hears it before the process exits; with
/// a short one the job is named in the log as stopped where it was, and the
/// next start finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_lets_a_flash_finish_and_names_what_it_cuts_short() {
    let held = |_| {
        PtySim::spawn(XmodemSimConfig {
            hold_after: Some(3),
            ..xmodem_device()
        })
        .unwrap()
    };
    let (one, two) = (held(1), held(2));
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let files = FileServer::start().await;
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let leaf = |dn: &str, sim: &PtySim| {
        let mut l = LeafSpec::xmodem(dn, &sim.url());
        l.options.push(("block_timeout_ms".into(), "600000".into()));
        l
    };
    let config = gateway_config(
        data.path(),
        plugins.path(),
        Some(&broker.url()),
        &[leaf("one", &one), leaf("two", &two)],
    );
    let path = data.path().join("otagw.toml");
    let img = versioned_image(20_000, "2.0.0");
    let url = files.add("fw.bin", img.clone());
    let inform = |dn: &str| format!("/ota/device/inform/{LEAF_PK}/{dn}");
    let upgrade = |dn: &str| format!("/ota/device/upgrade/{LEAF_PK}/{dn}");

    // A grace long enough: the held flash goes on after SIGTERM.
    let gw =
        GatewayProcess::start_logged(GATEWAY_BIN, &config, &path, &["--grace", "600"], &[]).await;
    probe
        .wait_until(LIMIT, "online", |m| has_inform(m, &inform("one"), "1.0.0"))
        .await;
    probe
        .publish(&upgrade("one"), notice(1, "2.0.0", &url, &img))
        .await;
    one.handle().holding().await;
    gw.terminate().await;
    gw.wait_log(LIMIT, "shutting down").await;
    one.handle().release();
    probe
        .wait_until(LIMIT, "one runs 2.0.0", |m| {
            has_inform(m, &inform("one"), "2.0.0")
        })
        .await;
    let log = gw.log();
    assert!(gw.exited(LIMIT).await.success(), "{log}");

    // A short grace: the job is stopped, named, and resumed at the next start.
    let gw =
        GatewayProcess::start_logged(GATEWAY_BIN, &config, &path, &["--grace", "1"], &[]).await;
    probe
        .publish(&upgrade("two"), notice(2, "2.0.0", &url, &img))
        .await;
    two.handle().holding().await;
    gw.terminate().await;
    let cut = gw.wait_log(LIMIT, "still under way after the grace").await;
    assert!(
        cut.contains(&format!("{LEAF_PK}/two")) && cut.contains("flashing"),
        "{cut}"
    );
    let log = gw.log();
    assert!(gw.exited(LIMIT).await.success(), "{log}");
    assert!(!has_inform(&probe.messages(), &inform("two"), "2.0.0"));
    two.handle().release();
    let gw = GatewayProcess::start_logged(GATEWAY_BIN, &config, &path, &[], &[]).await;
    probe
        .wait_until(LIMIT, "two runs 2.0.0 after the restart", |m| {
            has_inform(m, &inform("two"), "2.0.0")
        })
        .await;
    gw.kill().await;
    one.shutdown().await;
    two.shutdown().await;
}

/// `otagw flash` of a 60 kB image to a fresh XMODEM device, with `args`
/// added; through `wrap` (a program that runs a shell command line) when
/// given. (exit status, stdout, stderr)
async fn flash_by_hand(extra: &[&str], wrap: Option<&str>) -> (Option<i32>, String, String) {
    let bench = Bench::new(xmodem_device(), 60_000);
    let mut with_enter = vec!["-o", "enter_command=update\\r"];
    with_enter.extend_from_slice(extra);
    let args = bench.args("flash", &with_enter);
    let out = match wrap {
        None => bench.run("flash", &with_enter).await,
        Some(shell) => {
            let line = std::iter::once(GATEWAY_BIN.to_string())
                .chain(args.iter().map(|a| format!("'{a}'")))
                .collect::<Vec<_>>()
                .join(" ");
            let out = tokio::process::Command::new("script")
                .args(["-qefc", &format!("{shell}; {line}"), "/dev/null"])
                .env_remove("RUST_LOG")
                .output()
                .await
                .expect("script (util-linux)");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    bench.shutdown().await;
    out
}

/// Item 10, piped: progress lines every 10 % and the plugin's warnings go
/// to stderr; its debug lines only with --verbose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_output_piped_says_how_far_it_got_and_keeps_the_warnings() {
    let (code, out, err) = flash_by_hand(&[], None).await;
    assert_eq!(code, Some(0), "{out}{err}");
    for what in [
        "transfer 0%",
        "transfer 50%",
        "transfer 100%",
        "warn: xmodem: XMODEM carries no size",
    ] {
        assert!(err.contains(what), "no {what:?} in:\n{err}");
    }
    assert!(!err.contains("debug:"), "{err}");
    assert_eq!(err.matches("XMODEM carries no size").count(), 1, "{err}");
    assert!(out.contains("flashed 60000 bytes"), "{out}");
}

/// Item 10, on a terminal (a pty of 80 columns, through `script`): the bar
/// never wraps, and it does not start as a full bar of 0 B/0 B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_bar_on_a_terminal_fits_80_columns_and_starts_empty() {
    let (code, out, err) = flash_by_hand(&[], Some("stty cols 80 rows 24")).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let screen = console::strip_ansi_codes(&out);
    assert!(screen.contains("transfer"), "{screen}");
    // What was drawn between control sequences (cursor moves, line
    // erases) and line ends: each piece is one line on the screen.
    let bars: Vec<&str> = console::AnsiCodeIterator::new(&out)
        .filter(|(_, ansi)| !ansi)
        .flat_map(|(text, _)| text.split(['\r', '\n']))
        .filter(|l| l.contains(" B/") || l.contains("iB/"))
        // A line printed above the bar is padded to whole terminal lines
        // and the bar follows: the bar's own line starts 9 columns (the
        // phase, right-aligned) before its " [".
        .map(|l| &l[l.rfind(" [").map_or(0, |i| i.saturating_sub(9))..])
        .collect();
    assert!(!bars.is_empty(), "{screen}");
    for line in bars {
        assert!(
            line.chars().count() <= 80,
            "{} columns: {line:?}",
            line.chars().count()
        );
        assert!(!line.contains("0 B/0 B"), "{line:?}");
    }
    // The plugin's warning once, above the bar, not as a log line too.
    assert_eq!(
        screen.matches("XMODEM carries no size").count(),
        1,
        "{screen}"
    );
}

/// Item 16: a configured device is flashed and identified by its name (its
/// family, link, options and plugins_dir from the configuration); a name
/// that is not there lists those that are; `otagw ports` lists the serial
/// ports with a header (or says there are none, and what to do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_device_is_flashed_by_name_and_ports_are_listed() {
    let sim = PtySim::spawn(xmodem_device()).unwrap();
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let config = gateway_config(
        data.path(),
        plugins.path(),
        None,
        &[LeafSpec::xmodem("press-01", &sim.url())],
    );
    let cfg = data.path().join("otagw.toml");
    std::fs::write(&cfg, config).unwrap();
    let cfg = cfg.to_str().unwrap();
    let img = data.path().join("fw.bin");
    std::fs::write(&img, versioned_image(10_000, "3.1.0")).unwrap();

    let (code, out, err) = otagw(&[
        "flash",
        "press-01",
        "--config",
        cfg,
        "--image",
        img.to_str().unwrap(),
        "--version",
        "3.1.0",
    ])
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("device reports version 3.1.0"), "{out}");
    let (code, out, err) = otagw(&["identify", "press-01", "--config", cfg]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("version 3.1.0"), "{out}");

    let (code, _, err) = otagw(&["identify", "press-02", "--config", cfg]).await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("its devices: press-01"), "{err}");
    let (code, _, err) = otagw(&["identify", "press-01"]).await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("add --config FILE"), "{err}");

    let (code, out, err) = otagw(&["ports"]).await;
    match code {
        Some(0) => {
            assert!(out.starts_with("LINK "), "{out}");
            let (_, json, _) = otagw(&["ports", "--json"]).await;
            let ports: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
            assert!(!ports.is_empty());
            for p in ports {
                let path = p["path"].as_str().unwrap();
                assert!(std::path::Path::new(path).exists(), "{p}");
            }
        }
        Some(1) => assert!(err.contains("no serial ports found"), "{err}"),
        other => panic!("ports exited {other:?}: {out}{err}"),
    }
    sim.shutdown().await;
}

/// Item 17: a bootloader that refuses the image (CAN CAN for block 1, then
/// polling 'C' again every second) fails the flash as a refusal after two
/// tries, not after waiting for a quiet line that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_refuses_the_image_fails_as_a_refusal() {
    let bench = Bench::new(
        XmodemSimConfig {
            refuse_image: true,
            poll_interval: Duration::from_secs(1),
            ..Default::default()
        },
        4_000,
    );
    let (code, out, err) = bench.run("flash", &[]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("the device refused the image"), "{err}");
    assert_eq!(bench.sim.handle().aborts(), 2, "refused twice");
    bench.shutdown().await;
}

/// Item 3: Ctrl-C (SIGINT) and SIGTERM during `otagw flash` stop the job
/// properly: the link's reads stop, the XMODEM plugin sends CAN CAN to the
/// receiver (which records the sender's cancel), otagw says what state the
/// device is left in and exits 130 / 143.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_during_flash_cancels_the_transfer_and_exits_128_plus_the_signal() {
    for (signal, code) in [("-INT", 130), ("-TERM", 143)] {
        let bench = Bench::new(
            XmodemSimConfig {
                hold_after: Some(3),
                ..Default::default()
            },
            20_000,
        );
        let sim = &bench.sim;
        let child = tokio::process::Command::new(GATEWAY_BIN)
            .args(bench.args("flash", &["-o", "block_timeout_ms=600000"]))
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        sim.handle().holding().await;
        let pid = child.id().unwrap().to_string();
        let sent = tokio::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .await
            .unwrap();
        assert!(sent.success());
        let out = tokio::time::timeout(LIMIT, child.wait_with_output())
            .await
            .expect("otagw flash ends after the signal")
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{signal}: {err}");
        assert!(
            err.contains("stopped:") && err.contains("flash it again to finish"),
            "{signal}: {err}"
        );
        // The receiver, let go, reads the sender's CAN CAN.
        sim.handle().release();
        let abort = tokio::time::timeout(LIMIT, sim.handle().next_abort())
            .await
            .expect("the receiver records the end of the transfer");
        assert!(
            abort.contains("cancelled by the sender"),
            "{signal}: {abort}"
        );
        bench.shutdown().await;
    }
}

/// Item 12: the API keeps a bounded history per device (ended jobs with
/// their step and reason, refused notices too), a failed job keeps how far
/// it got, devices and jobs name a leaf the same way, the upstream
/// connection shows, and an unknown path answers JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_keeps_history_names_leaves_alike_and_shows_the_upstream() {
    let w = world().await;
    let gw = Daemon::start(&w.config).await;
    w.push().await;
    let progress = |dn: &str| format!("/ota/device/progress/{LEAF_PK}/{dn}");
    w.probe
        .wait_until(LIMIT, "press done, dead failed", |m| {
            has_inform(m, &format!("/ota/device/inform/{LEAF_PK}/press"), "2.0.0")
                && has_step(m, &progress("dead"), "-4")
        })
        .await;
    // A notice refused before it is a job: bigger than the gateway takes.
    w.probe
        .publish(
            &format!("/ota/device/upgrade/{LEAF_PK}/press"),
            serde_json::json!({"code": "1000", "id": 9, "message": "success", "data": {
                "size": 1u64 << 40, "version": "9.0.0", "url": "http://127.0.0.1:1/x",
                "signMethod": "Md5", "sign": "0123456789abcdef0123456789abcdef",
                "md5": "0123456789abcdef0123456789abcdef"}})
            .to_string(),
        )
        .await;
    w.probe
        .wait_until(LIMIT, "the refusal", |m| {
            has_step(m, &progress("press"), "-2")
        })
        .await;

    let devices = gw.api_get("/api/devices").await;
    let dead = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == format!("{LEAF_PK}/dead"))
        .unwrap_or_else(|| panic!("{devices}"));
    assert_eq!(dead["state"], "failed", "{dead}");
    assert!(
        dead["progress"].as_u64().unwrap() >= 30,
        "how far it got: {dead}"
    );
    let jobs = gw.api_get("/api/jobs").await;
    for j in jobs.as_array().unwrap() {
        assert_eq!(
            j["device"],
            format!(
                "{}/{}",
                j["product_key"].as_str().unwrap(),
                j["device_name"].as_str().unwrap()
            ),
            "{j}"
        );
        assert_eq!(j["target_version"], "2.0.0", "{j}");
    }

    let history = gw
        .api_get(&format!("/api/devices/{LEAF_PK}/dead/history"))
        .await;
    let entries = &history[0]["entries"];
    assert_eq!(entries[0]["outcome"], "failed", "{history}");
    assert_eq!(entries[0]["step"], -4, "{history}");
    assert!(
        entries[0]["desc"].as_str().unwrap().contains("127.0.0.1:1"),
        "{history}"
    );
    let history = gw
        .api_get(&format!("/api/devices/{LEAF_PK}/press/history"))
        .await;
    let outcomes: Vec<&str> = history[0]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["succeeded", "refused"], "{history}");

    // `otagw status`: exit 1 when a leaf failed; --json is the API's list.
    let api = gw.api.to_string();
    let (code, out, err) = otagw(&["status", "--api", &api]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("failed"), "{out}");
    let (code, out, _) = otagw(&["status", "--api", &api, "--json"]).await;
    assert_eq!(code, Some(1));
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 2, "{out}");

    let gateway = gw.api_get("/api/gateway").await;
    assert_eq!(gateway["upstream"]["connected"], true, "{gateway}");
    assert_eq!(gateway["device_name"], GW_DN, "{gateway}");
    let missing = gw.api_get("/api/nope").await;
    assert!(
        missing["error"]
            .as_str()
            .unwrap()
            .contains("/api/devices/{pk}/{dn}/history"),
        "{missing}"
    );
    let unknown = gw.api_get("/api/devices/x/y/history").await;
    assert!(
        unknown["error"].as_str().unwrap().contains("no device x/y"),
        "{unknown}"
    );
    gw.stop().await;
    w.sim.shutdown().await;
}

/// Item 11: a flash the plugin completed, whose version read-back then
/// failed, is reported as exactly that, not as a bad image or a failed
/// transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_read_back_after_a_good_flash_is_said_as_such() {
    // The firmware does not answer the version command.
    let bench = Bench::new(
        XmodemSimConfig {
            enter_command: Some(b"update\r".to_vec()),
            version_command: None,
            ..Default::default()
        },
        4_000,
    );
    let (code, out, err) = bench
        .run(
            "flash",
            &[
                "-o",
                "enter_command=update\\r",
                "-o",
                "version_command=version\\r",
                "-o",
                "version_timeout_ms=300",
            ],
        )
        .await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("flashed the image and reported success")
            && err.contains("reading the version back failed")
            && !err.contains("flashing serial"),
        "{err}"
    );
    assert_eq!(bench.sim.handle().images_received(), 1);
    bench.shutdown().await;
}

/// Item 6: SIGHUP reloads. A leaf added to the file is taken on (its
/// notices are subscribed to and run) while a job on another leaf goes on
/// untouched; a broken file is refused with the reason and the running
/// configuration stays; the plugins directory is looked at (with `watch`
/// off, only then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_devices_and_plugins_and_refuses_a_bad_file() {
    let busy = PtySim::spawn(XmodemSimConfig {
        hold_after: Some(3),
        ..xmodem_device()
    })
    .unwrap();
    let newcomer = PtySim::spawn(xmodem_device()).unwrap();
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let files = FileServer::start().await;
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let mut busy_leaf = LeafSpec::xmodem("busy", &busy.url());
    busy_leaf
        .options
        .push(("block_timeout_ms".into(), "600000".into()));
    let before = gateway_config(
        data.path(),
        plugins.path(),
        Some(&broker.url()),
        &[busy_leaf.clone()],
    )
    .replace("[plugins]\n", "[plugins]\nwatch = false\n");
    let after = gateway_config(
        data.path(),
        plugins.path(),
        Some(&broker.url()),
        &[busy_leaf, LeafSpec::xmodem("newcomer", &newcomer.url())],
    )
    .replace("[plugins]\n", "[plugins]\nwatch = false\n");
    let path = data.path().join("otagw.toml");
    let gw = GatewayProcess::start_logged(GATEWAY_BIN, &before, &path, &[], &[]).await;
    let topic = |kind: &str, dn: &str| format!("/ota/device/{kind}/{LEAF_PK}/{dn}");
    probe
        .wait_until(LIMIT, "online", |m| {
            has_inform(m, &topic("inform", "busy"), "1.0.0")
        })
        .await;
    let img = versioned_image(20_000, "2.0.0");
    let url = files.add("fw.bin", img.clone());
    probe
        .publish(&topic("upgrade", "busy"), notice(1, "2.0.0", &url, &img))
        .await;
    busy.handle().holding().await;

    // A broken file: refused, with the reason; the gateway runs on.
    std::fs::write(&path, "[gateway]\nproduct_key = \"x\"\n").unwrap();
    gw.signal("-HUP").await;
    let refused = gw.wait_log(LIMIT, "reload refused").await;
    assert!(refused.contains("otagw.toml"), "{refused}");
    let log = gw.log();
    assert!(
        log.contains("missing field") && log.contains("the running configuration stays"),
        "{log}"
    );

    // The leaf added, and a plugin dropped in (watch is off).
    std::fs::write(&path, &after).unwrap();
    std::fs::copy(artifacts::SMP, plugins.path().join("smp.wasm")).unwrap();
    gw.signal("-HUP").await;
    let reloaded = gw.wait_log(LIMIT, "configuration reloaded").await;
    assert!(reloaded.contains("newcomer"), "{reloaded}");
    probe
        .wait_until(LIMIT, "the newcomer informed, smp loaded", |m| {
            has_inform(m, &topic("inform", "newcomer"), "1.0.0")
                && m.iter().any(|m| {
                    m.topic == format!("/ota/device/inform/{GW_PK}/{GW_DN}")
                        && m.text().contains("plugin.smp")
                })
        })
        .await;
    probe
        .publish(
            &topic("upgrade", "newcomer"),
            notice(2, "2.0.0", &url, &img),
        )
        .await;
    probe
        .wait_until(LIMIT, "the newcomer runs 2.0.0", |m| {
            has_inform(m, &topic("inform", "newcomer"), "2.0.0")
        })
        .await;
    // The job that was under way on "busy" was not touched: it finishes.
    busy.handle().release();
    probe
        .wait_until(LIMIT, "busy runs 2.0.0", |m| {
            has_inform(m, &topic("inform", "busy"), "2.0.0")
        })
        .await;
    assert!(!gw.log().contains("job failed"), "{}", gw.log());
    gw.kill().await;
    busy.shutdown().await;
    newcomer.shutdown().await;
}

/// Item 4: a version read from a device must look like one: a bootloader
/// that answers the version command with its NAK polls fails identify,
/// showing what it read, escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_refuses_a_version_that_is_not_one() {
    // Still in its bootloader: it polls with NAK (0x15), whatever is sent.
    let bench = Bench::new(
        XmodemSimConfig {
            mode: Mode::Checksum,
            poll_interval: Duration::from_millis(100),
            ..Default::default()
        },
        4_000,
    );
    let (code, out, err) = bench
        .run(
            "identify",
            &[
                "-o",
                "version_command=version\\r",
                "-o",
                "version_timeout_ms=600",
            ],
        )
        .await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        !out.contains("version"),
        "nothing printed as a version: {out}"
    );
    assert!(err.contains("\\u{15}"), "what it read, escaped: {err}");
    bench.shutdown().await;
}

/// Item 9: a second gateway on the same data_dir says so in words (no
/// debug dump of an OS error) and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_same_data_dir_says_so() {
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let config = gateway_config(data.path(), plugins.path(), None, &[]);
    let path = data.path().join("otagw.toml");
    let first = GatewayProcess::start_logged(GATEWAY_BIN, &config, &path, &[], &[]).await;
    let (code, _, err) = otagw(&["run", "--config", path.to_str().unwrap()]).await;
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("in use by another otagw") && !err.contains("Os {"),
        "{err}"
    );
    first.kill().await;
}

/// Item 7: `check` says what `run` would refuse or what cannot be meant: a
/// missing ca_file is invalid (78); listeners beyond loopback without
/// authentication are warned about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_a_missing_ca_file_and_warns_of_open_listeners() {
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let base = gateway_config(data.path(), plugins.path(), None, &[]);
    let path = data.path().join("otagw.toml");
    let open = base
        .replace(
            "listen = \"127.0.0.1:0\"\n\n[api]",
            "listen = \"0.0.0.0:0\"\n\n[api]",
        )
        .replace(
            "[api]\nlisten = \"127.0.0.1:0\"",
            "[api]\nlisten = \"0.0.0.0:0\"",
        );
    std::fs::write(&path, &open).unwrap();
    let (code, out, err) = otagw(&["check", "--config", path.to_str().unwrap()]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("warning: [api] listen") && err.contains("warning: [local_broker] listen"),
        "{err}"
    );
    let ca = format!(
        "{base}[upstream]\nurl = \"mqtts://127.0.0.1:8883\"\nauth = \"none\"\nca_file = \"ca.pem\"\n"
    );
    std::fs::write(&path, ca).unwrap();
    let (code, _, err) = otagw(&["check", "--config", path.to_str().unwrap()]).await;
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("ca_file") && err.contains("ca.pem does not exist"),
        "{err}"
    );
}
