//! Issue 6, item 2: `otagw flash --family xmodem` against lrzsz's `sx -k`, sending the same
//! image into the same receiver.
//!
//! ```sh
//! apt-get install lrzsz socat
//! cargo bench -p otagw-e2e --bench lrzsz
//! OTAGW_BENCH_QUICK=1 cargo bench -p otagw-e2e --bench lrzsz   # 256 KiB, 2 rounds
//! ```
//!
//! The receiver is lrzsz `rx -c OUT` (XMODEM, CRC-16) behind
//! `socat -t 1 PTY,link=DIR/tty,rawer EXEC:'rx -c OUT'`: socat owns the pseudo-terminal's
//! master and talks to rx over a socket pair, so when rx exits after ACKing the EOT its last
//! byte is already with socat, which keeps the master open one more second (`-t 1`) before it
//! closes it (closing a master hangs the slave up and discards unread input). A fresh receiver
//! serves every transfer; the bench waits for the link to appear (a bounded poll of the path)
//! and afterwards checks that rx's file is the image plus nothing but 0x1A padding.
//!
//! The senders, on the same unpaced pseudo-terminal (no line rate: this measures the
//! software):
//! - **sx**: `sx -k IMAGE` (XMODEM-1K) with stdin and stdout opened on the pty;
//! - **otagw (process)**: `otagw flash --family xmodem --link serial://DIR/tty --image IMAGE`
//!   (the tests package's `otagw-e2e-gateway`, the same entry point as `otagw`) with a warm
//!   plugin compile cache (`--cache-dir`): process start, plugin load from the cache, verify,
//!   link open, handshake, transfer, EOT;
//! - **otagw (in process)**: the same job (`otagw::flash::flash`, the image as a file) on a
//!   plugin host loaded beforehand: no process start, no plugin load;
//! - **minimal**: a bare XMODEM-1K loop in the bench's thread with blocking I/O (no timeouts,
//!   no checks): the floor the receiver chain (pty, socat, rx) sets for any sender.
//!
//! Each is timed from its start to its end (the process's exit, the call's return). Rounds
//! rotate the order; one unmeasured round first; medians are reported. `OTAGW_BENCH_SIZE`
//! (bytes) and `OTAGW_BENCH_ROUNDS` (default 7) override the defaults. Without lrzsz or socat
//! the bench says so and exits 0.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use otagw::plugin::{FileImage, JobMeta, Limits, PluginHost};
use otagw_e2e::{PluginsDir, artifacts, image, reference};

const GATEWAY: &str = env!("CARGO_BIN_EXE_otagw-e2e-gateway");
// The pad byte of both senders (CP/M EOF): lrzsz's `sx` and the xmodem plugin's default.
use reference::PAD;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sender {
    Sx,
    OtagwProcess,
    OtagwInProcess,
    Minimal,
}

const SENDERS: [Sender; 4] = [
    Sender::Sx,
    Sender::OtagwProcess,
    Sender::OtagwInProcess,
    Sender::Minimal,
];

impl Sender {
    fn name(self) -> &'static str {
        match self {
            Sender::Sx => "lrzsz sx -k (reference)",
            Sender::OtagwProcess => "otagw flash (process)",
            Sender::OtagwInProcess => "otagw flash::flash (in process)",
            Sender::Minimal => "minimal sender (floor of the receiver)",
        }
    }
}

fn main() -> ExitCode {
    println!("# otagw against lrzsz (issue 6, item 2)");
    machine();
    let missing: Vec<&str> = ["rx", "sx", "socat"]
        .into_iter()
        .filter(|t| find_in_path(t).is_none())
        .collect();
    if !missing.is_empty() {
        println!(
            "skipped: {} not found on PATH (apt-get install lrzsz socat)",
            missing.join(", ")
        );
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lrzsz bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn machine() {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let version = |tool: &str, arg: &str| {
        Command::new(tool)
            .arg(arg)
            .output()
            .ok()
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr);
                text.lines()
                    .find(|l| l.contains("version") || l.contains("lrzsz"))
                    .map(|l| l.trim().to_owned())
            })
            .unwrap_or_else(|| "?".into())
    };
    println!(
        "nproc {nproc}; sx: {}; socat: {}",
        version("sx", "--version"),
        version("socat", "-V")
    );
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn run() -> Result<(), String> {
    let quick = std::env::var("OTAGW_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let size = env_usize("OTAGW_BENCH_SIZE").unwrap_or(if quick { 256 << 10 } else { 1 << 20 });
    let rounds = env_usize("OTAGW_BENCH_ROUNDS")
        .unwrap_or(if quick { 2 } else { 7 })
        .max(1);

    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let img = image(size, 3);
    let img_path = work.path().join("image.bin");
    std::fs::write(&img_path, &img).map_err(|e| e.to_string())?;
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let cache = work.path().join("compiled");

    // Fill the compile cache with the binary itself, so no timed run compiles.
    let out = Command::new(GATEWAY)
        .arg("plugins")
        .args(plugin_args(plugins.path(), &cache))
        .env_remove("RUST_LOG")
        .output()
        .map_err(|e| format!("{GATEWAY}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "otagw plugins: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }

    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let host = rt.block_on(async {
        let host = PluginHost::new(Limits::default(), Some(cache.clone()))
            .map_err(|e| format!("plugin host: {e}"))?;
        let report = host
            .load_dir(plugins.path())
            .await
            .map_err(|e| format!("load plugins: {e}"))?;
        if report.failed.is_empty() {
            Ok(host)
        } else {
            Err(format!("broken plugins: {:?}", report.failed))
        }
    })?;
    println!(
        "image: {size} bytes; receiver: rx -c behind socat PTY,rawer EXEC (fresh per transfer); \
         unpaced pty; {rounds} rounds + 1 unmeasured, order rotated\n"
    );

    let ctx = Ctx {
        img: &img,
        img_path: &img_path,
        plugins: plugins.path(),
        cache: &cache,
        host: &host,
        rt: &rt,
    };
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); SENDERS.len()];
    let mut plugin_times = Vec::new();
    for round in 0..=rounds {
        for k in 0..SENDERS.len() {
            let i = (k + round) % SENDERS.len();
            let sender = SENDERS[i];
            let (t, reported) = ctx.transfer(sender)?;
            if round == 0 {
                continue; // warm-up
            }
            println!("  round {round}: {:<34} {:>8.1} ms", sender.name(), ms(t));
            times[i].push(t);
            plugin_times.extend(reported);
        }
    }

    let times_min_max: Vec<(Duration, Duration)> = times
        .iter()
        .map(|t| {
            let lo = t.iter().min().copied().unwrap_or_default();
            let hi = t.iter().max().copied().unwrap_or_default();
            (lo, hi)
        })
        .collect();
    let med: Vec<Duration> = times.into_iter().map(median).collect();
    let sx = med[0];
    println!();
    // rx waits 1 s after an EOT for a second one before it ACKs (alarm(1) in strace): the
    // receiver's time, in every sender's. The last column leaves it out of both.
    let eot = Duration::from_secs(1);
    let without_eot = |t: Duration| t.saturating_sub(eot).as_secs_f64();
    println!("| sender | median | throughput | time / sx | (time - 1 s) / (sx - 1 s) |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, t: Duration| {
        println!(
            "| {name} | {:.1} ms | {:.0} KiB/s | **{:.3}** | {:.3} |",
            ms(t),
            size as f64 / 1024.0 / t.as_secs_f64(),
            t.as_secs_f64() / sx.as_secs_f64(),
            without_eot(t) / without_eot(sx)
        );
    };
    for (i, sender) in SENDERS.iter().enumerate() {
        row(sender.name(), med[i]);
    }
    if !plugin_times.is_empty() {
        row(
            "(otagw process: its plugin's own time, link open to EOT ACK)",
            median(plugin_times),
        );
    }
    let spread = |i: usize| {
        let (lo, hi) = (
            times_min_max[i].0.as_secs_f64() * 1000.0,
            times_min_max[i].1.as_secs_f64() * 1000.0,
        );
        format!("{lo:.0}-{hi:.0} ms")
    };
    println!(
        "\nrun-to-run range: sx {}, otagw (process) {}, minimal {}",
        spread(0),
        spread(1),
        spread(3)
    );
    println!(
        "target: otagw flash (process) <= 1.0 x sx: {} ({:.3})",
        if med[1] <= sx { "met" } else { "missed" },
        med[1].as_secs_f64() / sx.as_secs_f64()
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn plugin_args(plugins: &Path, cache: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "--plugins-dir".into(),
        plugins.into(),
        "--cache-dir".into(),
        cache.into(),
    ]
}

struct Ctx<'a> {
    img: &'a [u8],
    img_path: &'a Path,
    plugins: &'a Path,
    cache: &'a Path,
    host: &'a PluginHost,
    rt: &'a tokio::runtime::Runtime,
}

impl Ctx<'_> {
    /// One transfer into a fresh receiver: the sender's time and, for the otagw process,
    /// the time its plugin reports.
    fn transfer(&self, sender: Sender) -> Result<(Duration, Option<Duration>), String> {
        let rx = Receiver::start()?;
        let result = match sender {
            Sender::Sx => self.sx(&rx.tty).map(|t| (t, None)),
            Sender::OtagwProcess => self.otagw_process(&rx.tty),
            Sender::OtagwInProcess => self.otagw_in_process(&rx.tty).map(|t| (t, None)),
            Sender::Minimal => reference::send(&rx.tty, self.img)
                .map(|s| (s.total, None))
                .map_err(|e| e.to_string()),
        };
        let received = rx.finish();
        let timed = result.map_err(|e| format!("{}: {e}", sender.name()))?;
        let got = received.map_err(|e| format!("{}: receiver: {e}", sender.name()))?;
        reference::check_padded(&got, self.img, PAD)
            .map_err(|e| format!("{}: {e}", sender.name()))?;
        Ok(timed)
    }

    fn sx(&self, tty: &Path) -> Result<Duration, String> {
        let port = OpenOptions::new()
            .read(true)
            .write(true)
            .open(tty)
            .map_err(|e| format!("open {}: {e}", tty.display()))?;
        let stdin = port.try_clone().map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let status = Command::new("sx")
            .arg("-k")
            .arg(self.img_path)
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(port))
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("sx: {e}"))?;
        let t = t0.elapsed();
        if !status.success() {
            return Err(format!("sx exited with {status}"));
        }
        Ok(t)
    }

    fn otagw_process(&self, tty: &Path) -> Result<(Duration, Option<Duration>), String> {
        let t0 = Instant::now();
        let out = Command::new(GATEWAY)
            .args(["flash", "--family", "xmodem", "--link"])
            .arg(format!("serial://{}", tty.display()))
            .arg("--image")
            .arg(self.img_path)
            .args(plugin_args(self.plugins, self.cache))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{GATEWAY}: {e}"))?;
        let t = t0.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "exit {}: {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok((t, plugin_seconds(&stdout)))
    }

    fn otagw_in_process(&self, tty: &Path) -> Result<Duration, String> {
        let image = FileImage::open(self.img_path).map_err(|e| e.to_string())?;
        let meta = JobMeta {
            version: None,
            module: "default".into(),
            options: Vec::new(),
        };
        let url = format!("serial://{}", tty.display());
        self.rt.block_on(async {
            let t0 = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(120),
                otagw::flash::flash(self.host, "xmodem", &url, Arc::new(image), &meta, None),
            )
            .await;
            let t = t0.elapsed();
            match r {
                Ok(Ok(_)) => Ok(t),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no result within 120 s".into()),
            }
        })
    }
}

/// The plugin's own duration from its summary ("..., 0 retries, 1.234 s").
fn plugin_seconds(stdout: &str) -> Option<Duration> {
    let line = stdout.lines().find(|l| l.starts_with("flashed "))?;
    let secs = line.trim_end().strip_suffix(" s")?.rsplit(' ').next()?;
    secs.parse::<f64>().ok().map(Duration::from_secs_f64)
}

/// lrzsz `rx -c` behind socat on a new pty; cleaned up when finished or dropped.
struct Receiver {
    child: Child,
    dir: tempfile::TempDir,
    tty: PathBuf,
}

impl Receiver {
    fn start() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let tty = dir.path().join("tty");
        let out = dir.path().join("out.bin");
        let mut child = Command::new("socat")
            .args(["-t", "1"])
            .arg(format!("PTY,link={},rawer", tty.display()))
            .arg(format!("EXEC:rx -c {}", out.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("socat: {e}"))?;
        // Wait for the link: a bounded poll of the path, not a fixed sleep.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::symlink_metadata(&tty).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("socat exited early ({status})"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("socat made no pty within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Self { child, dir, tty })
    }

    /// Waits (bounded) for rx and socat to exit; returns what rx wrote.
    fn finish(mut self) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => return Err("rx/socat did not exit within 15 s".into()),
            }
        }
        std::fs::read(self.dir.path().join("out.bin")).map_err(|e| format!("rx's file: {e}"))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Only after a failure: SIGTERM, which socat passes on to rx, then SIGKILL.
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(2);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
