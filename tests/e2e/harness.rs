//! The one harness of otagw's end-to-end tests (CONVENTIONS 12): plugin
//! directories made of real components, hosts built on them, images, and
//! simulated leaves on real pseudo-terminals and TCP ports.
//!
//! Everything a test starts is owned by a value that cleans up when dropped
//! (temporary directories, simulator tasks); ports are ephemeral.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use otagw::plugin::{EngineKind, Limits, PluginHost};
pub use otagw_leaf_sim::smp::{SmpFaults, SmpSimConfig};
pub use otagw_leaf_sim::stm32::{EraseCommand, Stm32Faults, Stm32SimConfig};
pub use otagw_leaf_sim::transport::{PtySim, TcpSim};
pub use otagw_leaf_sim::xmodem::{Faults, Mode, Protocol, XmodemSimConfig};
pub use otagw_test_artifacts as artifacts;

/// A plugins directory holding copies of the given components.
#[derive(Debug)]
pub struct PluginsDir {
    dir: tempfile::TempDir,
}

impl PluginsDir {
    pub fn with(components: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        for c in components {
            let src = Path::new(c);
            let name = src.file_name().expect("component file name");
            std::fs::copy(src, dir.path().join(name)).expect("copy the component");
        }
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Add a file with arbitrary bytes (a broken plugin).
    pub fn add_raw(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.dir.path().join(name), bytes).expect("write a raw plugin");
    }
}

/// Limits that keep tests quick: a hostile plugin is stopped within about a second.
pub fn test_limits() -> Limits {
    Limits {
        memory: 32 << 20,
        cpu: Duration::from_secs(1),
        job: Duration::from_secs(120),
        max_instances: 32,
        ..Limits::default()
    }
}

/// A host with `dir` loaded; panics if any plugin in it is broken.
pub async fn host_with(dir: &PluginsDir, cache: Option<PathBuf>) -> PluginHost {
    host_on(EngineKind::for_this_target(), dir, cache).await
}

/// [`host_with`] on a given engine (native code or the Pulley interpreter).
pub async fn host_on(engine: EngineKind, dir: &PluginsDir, cache: Option<PathBuf>) -> PluginHost {
    let limits = Limits {
        engine,
        ..test_limits()
    };
    let host = PluginHost::new(limits, cache).expect("plugin host");
    let report = host
        .load_dir(dir.path())
        .await
        .expect("read the plugins dir");
    assert!(
        report.failed.is_empty(),
        "broken plugins: {:?}",
        report.failed
    );
    host
}

/// `size` bytes of a deterministic pseudo-random image (xorshift), so a
/// misplaced block never looks right by accident.
pub fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// An image with a version marker the simulated firmware boots with.
pub fn versioned_image(size: usize, version: &str) -> Vec<u8> {
    let mut img = image(size, 7);
    let marker = format!("FWVER:{version}\0");
    img[64..64 + marker.len()].copy_from_slice(marker.as_bytes());
    img
}

/// An image as a plugin sees it.
pub fn source(bytes: &[u8]) -> Arc<dyn otagw::plugin::ImageSource> {
    Arc::new(bytes.to_vec())
}

/// Options as `key=value` pairs.
pub fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Assert that what an XMODEM device holds is `image` followed by nothing but
/// the pad byte, up to the next block boundary.
pub fn assert_padded(received: &[u8], image: &[u8], pad: u8) {
    assert!(
        received.len() >= image.len(),
        "device holds {} bytes, image has {}",
        received.len(),
        image.len()
    );
    assert!(
        received[..image.len()] == *image,
        "device content differs from the image"
    );
    let tail = &received[image.len()..];
    assert!(tail.len() < 1024, "{} bytes of padding", tail.len());
    assert!(
        tail.iter().all(|b| *b == pad),
        "padding is not all {pad:#04x}"
    );
}

pub use otagw_testkit::{Fault, FileServer, Message, Mosquitto, MqttProbe};

#[path = "reference.rs"]
pub mod reference;

/// A leaf for the daemon's configuration.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub device_name: String,
    pub family: String,
    pub link: String,
    pub version: String,
    pub options: Vec<(String, String)>,
    /// More TOML lines of its `[[device]]` (`bus = "rs485-1"`, `tags = [...]`).
    pub extra: String,
}

/// The product key of every test leaf.
pub const LEAF_PK: &str = "a1LeafPK";
/// The gateway's identity in tests.
pub const GW_PK: &str = "a1GwPK";
pub const GW_DN: &str = "gw-test";

impl LeafSpec {
    /// A leaf behind a simulated XMODEM device with enter/version commands.
    pub fn xmodem(device_name: &str, sim_url: &str) -> LeafSpec {
        LeafSpec {
            device_name: device_name.into(),
            family: "xmodem".into(),
            link: sim_url.into(),
            version: "1.0.0".into(),
            options: opts(&[
                ("enter_command", "update\\r"),
                ("version_command", "version\\r"),
            ]),
            extra: String::new(),
        }
    }

    /// A leaf behind a simulated SMP/MCUboot device.
    pub fn smp(device_name: &str, sim_url: &str, options: &[(&str, &str)]) -> LeafSpec {
        LeafSpec {
            device_name: device_name.into(),
            family: "smp".into(),
            link: sim_url.into(),
            version: "1.0.0".into(),
            options: opts(options),
            extra: String::new(),
        }
    }
}

/// A simulated XMODEM device that enters its bootloader on "update\r" and
/// answers "version\r", as [`LeafSpec::xmodem`] expects.
pub fn xmodem_device() -> XmodemSimConfig {
    XmodemSimConfig {
        enter_command: Some(b"update\r".to_vec()),
        version_command: Some(b"version\r".to_vec()),
        version: "1.0.0".into(),
        ..Default::default()
    }
}

/// The configuration of a gateway under test, as TOML (what an operator writes).
pub fn gateway_config(
    data_dir: &Path,
    plugins_dir: &Path,
    upstream: Option<&str>,
    leaves: &[LeafSpec],
) -> String {
    let mut c = format!(
        "[gateway]\nproduct_key = \"{GW_PK}\"\ndevice_name = \"{GW_DN}\"\ndata_dir = {:?}\nplugins_dir = {:?}\n\n\
         [local_broker]\nlisten = \"127.0.0.1:0\"\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n\
         [plugins]\ncpu = \"2s\"\njob_deadline = \"2m\"\n\n",
        data_dir.display().to_string(),
        plugins_dir.display().to_string()
    );
    if let Some(url) = upstream {
        c.push_str(&format!(
            "[upstream]\nurl = {url:?}\nauth = \"none\"\nkeep_alive = \"30s\"\n\n"
        ));
    }
    for l in leaves {
        c.push_str(&format!(
            "[[device]]\nproduct_key = \"{LEAF_PK}\"\ndevice_name = {:?}\nfamily = {:?}\nlink = {:?}\nversion = {:?}\n",
            l.device_name, l.family, l.link, l.version
        ));
        let o: Vec<String> = l
            .options
            .iter()
            .map(|(k, v)| format!("{k} = {v:?}"))
            .collect();
        c.push_str(&format!("options = {{ {} }}\n", o.join(", ")));
        c.push_str(&l.extra);
        c.push('\n');
    }
    c
}

/// A gateway running in this process.
#[derive(Debug)]
pub struct Daemon {
    pub api: std::net::SocketAddr,
    pub broker: Option<std::net::SocketAddr>,
    stop: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Daemon {
    /// Build and run a gateway from configuration text.
    pub async fn start(config: &str) -> Daemon {
        let cfg =
            otagw::config::Config::parse(config, Path::new("test.toml")).expect("test config");
        let gw = otagw::daemon::Gateway::build(cfg)
            .await
            .expect("gateway builds");
        let api = gw.api_addr().expect("api bound");
        let broker = gw.broker_addr();
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            gw.run(s, Duration::from_secs(5))
                .await
                .expect("gateway runs");
        });
        Daemon {
            api,
            broker,
            stop,
            task: Some(task),
        }
    }

    /// Stop and wait for the drain.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// GET a JSON document from the status API.
    pub async fn api_get(&self, path: &str) -> serde_json::Value {
        http_get_json(self.api, path).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A minimal HTTP/1.1 GET (the API is plain JSON over loopback).
pub async fn http_get_json(addr: std::net::SocketAddr, path: &str) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the API");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.expect("read");
    let text = String::from_utf8_lossy(&resp);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("API {path} answered {text:?}: {e}"))
}

/// A minimal HTTP/1.1 request with an optional bearer token and JSON body:
/// the status and the JSON answer.
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the API");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("send");
    s.write_all(body).await.expect("send the body");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.expect("read");
    let text = String::from_utf8_lossy(&resp);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// The md5 of an image, lowercase hex (the notice's `sign`).
pub fn md5_hex(bytes: &[u8]) -> String {
    otagw_testkit::md5_hex(bytes)
}

/// An upgrade notice as the platform sends it (MD5 signed).
pub fn notice(id: u64, version: &str, url: &str, image: &[u8]) -> String {
    let md5 = md5_hex(image);
    serde_json::json!({
        "code": "1000", "message": "success", "id": id,
        "data": {"size": image.len(), "version": version, "url": url,
                 "md5": md5, "sign": md5, "signMethod": "Md5"}
    })
    .to_string()
}

/// The JSON payloads on `topic`, parsed.
pub fn payloads(probe: &MqttProbe, topic: &str) -> Vec<serde_json::Value> {
    probe
        .on(topic)
        .iter()
        .map(|m| {
            serde_json::from_slice(&m.payload)
                .unwrap_or_else(|e| panic!("{topic}: {} is not JSON: {e}", m.text()))
        })
        .collect()
}

/// Whether `topic` carried an inform with `version`.
pub fn has_inform(messages: &[Message], topic: &str, version: &str) -> bool {
    messages.iter().any(|m| {
        m.topic == topic
            && serde_json::from_slice::<serde_json::Value>(&m.payload)
                .is_ok_and(|v| v["params"]["version"] == version)
    })
}

/// Whether `topic` carried a progress message with `step`.
pub fn has_step(messages: &[Message], topic: &str, step: &str) -> bool {
    messages.iter().any(|m| {
        m.topic == topic
            && serde_json::from_slice::<serde_json::Value>(&m.payload)
                .is_ok_and(|v| v["params"]["step"] == step)
    })
}

/// A gateway running as its own process (`otagw run`), for tests that kill it.
#[derive(Debug)]
pub struct GatewayProcess {
    child: tokio::process::Child,
    pub api: std::net::SocketAddr,
    log: Arc<std::sync::Mutex<String>>,
    logged: Arc<tokio::sync::Notify>,
}

impl GatewayProcess {
    /// Write `config` to `path` and start `otagw run --config path` (`bin` is
    /// the test package's `otagw-e2e-gateway`, whose path only the test target
    /// knows); returns once the gateway printed its API address.
    pub async fn start(bin: &str, config: &str, path: &Path) -> GatewayProcess {
        Self::start_with_log(bin, config, path, "otagw=info").await
    }

    /// [`GatewayProcess::start`] with the log filter `rust_log` (`RUST_LOG`;
    /// benchmarks run at the default level, "warn").
    pub async fn start_with_log(
        bin: &str,
        config: &str,
        path: &Path,
        rust_log: &str,
    ) -> GatewayProcess {
        Self::start_with_env(bin, config, path, &[("RUST_LOG", rust_log)]).await
    }

    /// [`GatewayProcess::start`] with extra environment variables, e.g.
    /// `FAILPOINTS` for the fault injection points of the `failpoints`
    /// feature (`runner-flash=1*panic`).
    pub async fn start_with_env(
        bin: &str,
        config: &str,
        path: &Path,
        env: &[(&str, &str)],
    ) -> GatewayProcess {
        let mut cmd = tokio::process::Command::new(bin);
        cmd.env("RUST_LOG", "otagw=info").envs(env.iter().copied());
        Self::spawn(cmd, config, path, &[], false).await
    }

    /// `otagw run --config path ARGS` as an operator starts it (no
    /// RUST_LOG: the default levels), with `env`; its stderr (the log) is
    /// kept for [`GatewayProcess::log`].
    pub async fn start_logged(
        bin: &str,
        config: &str,
        path: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> GatewayProcess {
        let mut cmd = tokio::process::Command::new(bin);
        cmd.env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .envs(env.iter().copied());
        Self::spawn(cmd, config, path, args, true).await
    }

    /// What the gateway logged so far (with [`GatewayProcess::start_logged`]).
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Wait (at most `limit`) until the log holds a line with `what`.
    pub async fn wait_log(&self, limit: Duration, what: &str) -> String {
        let found = tokio::time::timeout(limit, async {
            loop {
                let notified = self.logged.notified();
                let log = self.log();
                if let Some(line) = log.lines().find(|l| l.contains(what)) {
                    return line.to_string();
                }
                notified.await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no log line with {what:?} in {limit:?}:\n{}", self.log()))
    }

    async fn spawn(
        mut cmd: tokio::process::Command,
        config: &str,
        path: &Path,
        args: &[&str],
        capture: bool,
    ) -> GatewayProcess {
        use tokio::io::AsyncBufReadExt;
        std::fs::write(path, config).expect("write the config");
        cmd.arg("run").arg("--config").arg(path).args(args);
        if capture {
            cmd.stderr(std::process::Stdio::piped());
        }
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the gateway process");
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let logged = Arc::new(tokio::sync::Notify::new());
        if let Some(err) = child.stderr.take() {
            let (log, logged) = (log.clone(), logged.clone());
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                    l.push_str(&line);
                    l.push('\n');
                    drop(l);
                    logged.notify_waiters();
                }
            });
        }
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let api = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.expect("read the gateway's stdout") {
                if let Some(a) = line.strip_prefix("api: ") {
                    return a.parse().expect("an address");
                }
            }
            panic!("the gateway exited before printing its API address")
        })
        .await
        .expect("the gateway starts within 60 s");
        // Keep draining stdout so the gateway never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        GatewayProcess {
            child,
            api,
            log,
            logged,
        }
    }

    /// SIGTERM, as systemd stops a service.
    pub async fn terminate(&self) {
        self.signal("-TERM").await;
    }

    /// Send `signal` (`-HUP`, `-TERM`...) with kill(1).
    pub async fn signal(&self, signal: &str) {
        let pid = self.pid().to_string();
        let ok = tokio::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .await
            .expect("run kill");
        assert!(ok.success(), "kill {signal} {pid}");
    }

    /// SIGKILL: no drain, no goodbye.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill the gateway");
    }

    /// Wait (at most `limit`) for the process to end by itself.
    pub async fn exited(mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("the gateway process ends in time")
            .expect("wait for the gateway process")
    }

    /// The process id (for /proc/<pid>/stat and status in benchmarks).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the gateway process is running")
    }
}

/// MCUboot's own `imgtool` (PyPI), for images the way firmware teams make them.
pub mod imgtool {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn run(args: &[&str]) -> Vec<u8> {
        // `python3 -m` works wherever pip put it, with or without a shim on PATH.
        let out = Command::new("python3")
            .args(["-m", "imgtool.main"])
            .args(args)
            .output()
            .expect("run imgtool (pip install imgtool)");
        assert!(
            out.status.success(),
            "imgtool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// A new key pair: `kind` is "ecdsa-p256" or "ed25519".
    pub fn keygen(dir: &Path, kind: &str) -> PathBuf {
        let key = dir.join(format!("{kind}.pem"));
        run(&["keygen", "-k", key.to_str().unwrap(), "-t", kind]);
        key
    }

    /// The public key as the SMP family's `public_key` option wants it: hex
    /// of the raw key (the tail of imgtool's DER SubjectPublicKeyInfo:
    /// 32 bytes for Ed25519, the 65-byte uncompressed point for P-256).
    pub fn public_key_hex(key: &Path, kind: &str) -> String {
        let der = run(&["getpub", "-k", key.to_str().unwrap(), "-e", "raw"]);
        let n = if kind == "ed25519" { 32 } else { 65 };
        der[der.len() - n..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Sign `payload` as an MCUboot image of `version`.
    pub fn sign(dir: &Path, key: &Path, payload: &[u8], version: &str) -> Vec<u8> {
        let input = dir.join(format!("in-{version}.bin"));
        let output = dir.join(format!("signed-{version}.bin"));
        std::fs::write(&input, payload).unwrap();
        run(&[
            "sign",
            "-k",
            key.to_str().unwrap(),
            "--header-size",
            "0x200",
            "--pad-header",
            "--align",
            "4",
            "--version",
            version,
            "--slot-size",
            "0x180000",
            input.to_str().unwrap(),
            output.to_str().unwrap(),
        ]);
        std::fs::read(output).unwrap()
    }
}

/// With `OTAGW_TEST_LOG=filter` (e.g. `otagw=debug`), the in-process
/// daemon's log goes to the test's output (shown for failing tests), to
/// find out why a test failed. Off by default.
pub fn test_log() {
    if let Ok(filter) = std::env::var("OTAGW_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    }
}
