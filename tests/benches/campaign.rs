//! Issue 10, item 4 — the standing resilience campaign: many leaves upgraded
//! round after round through a real broker while the gateway is killed with
//! SIGKILL at chosen moments, the broker restarts, a leaf's pty disappears,
//! the disk fills up and the store is damaged; after each, the platform's
//! view is checked against what the leaves really run.
//!
//! ```sh
//! cargo bench -p otagw-e2e --bench campaign -- [--seed N] [--kills N] [--leaves N] [--quick]
//! cargo test  -p otagw-e2e --bench campaign   # the quick form, a debug build; also run by `cargo test --workspace`
//! ```
//!
//! Exit status 0 when every invariant held, 1 when one broke (each is printed,
//! naming the round, the leaf and what was wrong), 2 on bad arguments.
//! `RELIABILITY.md` explains the campaign and records figures per seed.
//!
//! # The parts
//! - mosquitto on an ephemeral loopback port is the gateway's upstream
//!   (auth none); a recording probe subscribes `#` and plays the platform:
//!   it publishes the notices and answers every leaf's `firmware/get` with
//!   the notice still pending for it (no terminal report seen yet), or `{}`.
//! - The testkit's HTTP server serves the images, throttled (so a download
//!   can be interrupted) and counting the body bytes it hands out.
//! - Every leaf is an XMODEM-1K simulator on a real pty, paced at a line rate,
//!   entering its bootloader on `update\r` and answering `version\r`.
//! - The gateway runs as its own process (`otagw run`) on one data directory
//!   for the whole run: a small tmpfs mounted for the campaign when the
//!   machine allows it, otherwise a plain directory (see the disk-full round).
//!
//! # One round
//! Every leaf gets a notice for the round's image (a new version, a new
//! image; sizes alternate below and above 1 MiB). Then the round's faults
//! run one after the other, each waiting for its moment on the probe (never
//! a sleep as synchronisation; the random delays are deliberate fault
//! timing): the scenario of the round if it has one, then up to
//! `kills_per_round` kills, each aimed at a phase drawn from the seeded PRNG:
//! during a download (a progress report 1..29), during a flash (35..94),
//! during identify (the 95 report), right after a terminal report, or at a
//! random moment; after any kill the restart itself may be killed too
//! (startup). After every restart the campaign waits until the gateway
//! informed every leaf again. The round ends when every leaf has a terminal
//! report for its notice (bounded: [`Params::end_bound`]); then the gateway
//! is killed once more and restarted (the round-end restart) so that
//! anything it re-publishes at a start is seen before the next round.
//!
//! Scenario rounds: the broker restarts mid-flash; a leaf's simulator is
//! shut down mid-flash (its pty disappears: that leaf must fail with -4 and
//! a reason; the simulator is replaced by a new one, still running the old
//! version, at the round-end restart); the gateway is killed mid-flash and
//! its sled files are damaged before it starts again (pending upgrades come
//! back through `firmware/get`); the last round first sends one leaf an
//! image larger than the free space of the data directory (it must fail
//! with -2 and a reason) and only then the others their notices.
//!
//! # Invariants (violations make the exit status 1)
//! - Every notice ends: step "100" plus an inform of the new version, the
//!   simulator running it and holding exactly the image (plus XMODEM
//!   padding); or a failure, step -1..-4 with a non-empty `desc`.
//! - Exactly one terminal report per notice: terminal progress messages are
//!   counted per leaf and notice by their payload `id` (a redelivery with
//!   the same id is a QoS-1 duplicate and counts once); no progress after it.
//! - No leaf stuck: every notice ends within [`Params::end_bound`] of the
//!   round's last fault.
//! - After every restart (and at every round end) the inform of every leaf
//!   with no upgrade in progress equals the version its simulator runs.
//! - Bytes served per distinct image ≤ 1.1 × its size.
//!
//! Failures by the gateway's designed rule (a flash survives one restart:
//! "gateway restarted twice during flashing") are counted apart, not as
//! violations.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use otagw_e2e::*;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// `otagw`, as a program of this package.
const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_otagw-e2e-gateway");

/// The gateway's own default log filter, plus its job lines.
const GATEWAY_LOG: &str = "warn,otagw=info,rumqttd::server::broker=off";

/// Upper bound for a (re)started gateway to inform every leaf.
const UP_LIMIT: Duration = Duration::from_secs(90);
/// How long a kill waits for the moment it aims at before it falls back to a
/// random moment.
const TRIGGER_LIMIT: Duration = Duration::from_secs(30);
/// Probability that the restart after a kill is itself killed.
const STARTUP_KILL_P: f64 = 0.2;
/// How long, after the last reports of a flash, the status API is watched
/// for a job in "identifying".
const IDENTIFY_HUNT: Duration = Duration::from_secs(5);
/// Download kills per image at most (each one may cost a re-fetch of the
/// bytes not yet made durable; more would make the 1.1 x bound unfair).
const DOWNLOAD_KILLS_PER_IMAGE: usize = 2;
/// How long the inform of a new version may follow its step 100.
const INFORM_GRACE: Duration = Duration::from_secs(10);
/// Allowed bytes served per image, as a multiple of its size.
const FETCH_BOUND: f64 = 1.1;

// ---------------------------------------------------------------- options

#[derive(Debug, Clone)]
struct Opts {
    seed: u64,
    kills: Option<usize>,
    leaves: Option<usize>,
    quick: bool,
}

const USAGE: &str = "usage: campaign [--seed N] [--kills N] [--leaves N] [--quick | --full]";

/// What the command line asks for: a run, or nothing (a `cargo test` filter
/// that does not name the campaign).
enum Ask {
    Run(Opts),
    Skip,
}

/// `cargo bench` passes `--bench`: a full run unless `--quick`. `cargo test`
/// (the test command, `cargo test --workspace`, runs this target too) passes
/// no `--bench`: a quick run unless `--full`; there, libtest's own flags are
/// ignored and a filter that "campaign" does not contain skips the run, as a
/// test filter would.
fn parse_args() -> Result<Ask, String> {
    let mut o = Opts {
        seed: 1,
        kills: None,
        leaves: None,
        quick: false,
    };
    let (mut bench, mut full) = (false, false);
    let mut filters: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number\n{USAGE}"))
        };
        match a.as_str() {
            "--seed" => o.seed = number("--seed")?,
            "--kills" => o.kills = Some(number("--kills")? as usize),
            "--leaves" => o.leaves = Some(number("--leaves")? as usize),
            "--quick" => o.quick = true,
            "--full" => full = true,
            // What `cargo bench` passes to a custom main.
            "--bench" => bench = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            // libtest's flags that take a value, as `cargo test -- …` may pass
            // them to every test binary.
            "--test-threads" | "--skip" | "--color" | "--format" | "--logfile"
            | "--shuffle-seed" | "-Z" => {
                args.next();
            }
            other => filters.push(other.to_string()),
        }
    }
    if bench {
        if let Some(f) = filters.first() {
            return Err(format!("unknown argument {f:?}\n{USAGE}"));
        }
    } else {
        // Under `cargo test`: honour its filters and `--list`/`--ignored`
        // (the campaign is one test, not ignored), ignore its other flags.
        if filters.iter().any(|f| f == "--list") {
            println!("campaign: test");
            return Ok(Ask::Skip);
        }
        if filters.iter().any(|f| f == "--ignored") {
            return Ok(Ask::Skip);
        }
        let names: Vec<&String> = filters.iter().filter(|f| !f.starts_with('-')).collect();
        if !names.is_empty() && !names.iter().any(|f| "campaign".contains(f.as_str())) {
            return Ok(Ask::Skip);
        }
        o.quick = !full;
    }
    if o.quick && full {
        return Err(format!("--quick and --full exclude each other\n{USAGE}"));
    }
    if o.leaves.is_some_and(|n| n < 2) {
        return Err("--leaves: at least 2 (a scenario needs a victim and others)".into());
    }
    Ok(Ask::Run(o))
}

/// The shape of a run (full or quick).
#[derive(Debug, Clone)]
struct Params {
    leaves: usize,
    /// Kills at chosen moments, at least (round-end restarts not counted).
    kills: usize,
    kills_per_round: usize,
    /// Image sizes, alternating round by round (one below 1 MiB, one above
    /// in the full run).
    image_sizes: [usize; 2],
    /// The simulators' line rate (bits/s, 8N1).
    line_rate: u32,
    /// The HTTP server's rate for round images (bytes/s).
    download_rate: u64,
    max_parallel: usize,
    /// A round's notices must all have ended this long after its last fault.
    end_bound: Duration,
    broker_round: usize,
    pty_round: usize,
    /// The store is damaged in the pty round (quick), else in a round of its
    /// own after the kill rounds.
    damage_with_pty: bool,
    tmpfs_mib: u64,
    /// Upper ends of the random delays after a trigger (ms).
    download_delay_ms: u64,
    flash_delay_ms: u64,
    random_delay_ms: u64,
}

impl Params {
    fn new(o: &Opts) -> Params {
        let mut p = if o.quick {
            Params {
                leaves: 4,
                kills: 5,
                kills_per_round: 3,
                image_sizes: [256 << 10, 384 << 10],
                line_rate: 1_000_000,
                download_rate: 128 << 10,
                max_parallel: 8,
                end_bound: Duration::from_secs(150),
                broker_round: 0,
                pty_round: 1,
                damage_with_pty: true,
                tmpfs_mib: 48,
                download_delay_ms: 300,
                flash_delay_ms: 800,
                random_delay_ms: 1500,
            }
        } else {
            Params {
                leaves: 20,
                kills: 50,
                kills_per_round: 3,
                image_sizes: [640 << 10, 1536 << 10],
                line_rate: 2_000_000,
                download_rate: 512 << 10,
                max_parallel: 8,
                end_bound: Duration::from_secs(360),
                broker_round: 1,
                pty_round: 2,
                damage_with_pty: false,
                tmpfs_mib: 64,
                download_delay_ms: 600,
                flash_delay_ms: 2000,
                random_delay_ms: 4000,
            }
        };
        if let Some(n) = o.leaves {
            p.leaves = n;
        }
        if let Some(k) = o.kills {
            p.kills = k;
        }
        p
    }
}

// ---------------------------------------------------------------- records

/// The moment a kill aims at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Phase {
    Download,
    Flash,
    Identify,
    AfterTerminal,
    Random,
    Startup,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Download => "download",
            Phase::Flash => "flash",
            Phase::Identify => "identify",
            Phase::AfterTerminal => "after a terminal report",
            Phase::Random => "random moment",
            Phase::Startup => "startup",
        }
    }

    /// The job state the status API shows when the kill hit its phase.
    fn api_state(self) -> Option<&'static str> {
        match self {
            Phase::Download => Some("downloading"),
            Phase::Flash => Some("flashing"),
            Phase::Identify => Some("identifying"),
            _ => None,
        }
    }
}

/// One kill.
#[derive(Debug, Clone)]
struct Kill {
    phase: Phase,
    /// The phase drawn for it (differs when its moment did not come).
    aimed: Phase,
    /// Whether the moment was hit: the status API showed a job in the
    /// phase's state just before the kill (download, flash, identify); for
    /// startup kills, how far the start had come.
    hit: Option<bool>,
    note: String,
}

#[derive(Debug, Clone)]
struct Violation {
    kind: Kind,
    round: Option<usize>,
    leaf: Option<String>,
    what: String,
}

/// Which invariant a violation broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// An inform that is not the version the leaf runs.
    StaleInform,
    /// More than one terminal report for a notice (different ids).
    TerminalReports,
    /// Progress after a notice's terminal report, or before any notice.
    ProgressAfterEnd,
    /// A notice with no terminal report within the bound.
    Stuck,
    /// Step 100 that the inform, the leaf's version or its image contradict.
    UnprovenSuccess,
    /// A terminal report that is not step 100 nor -1..-4 with a reason.
    NotExplicit,
    /// A scenario's own expectation (-4 for a lost pty, -2 for a full disk,
    /// the others still served).
    Scenario,
    /// More than 1.1 x an image's size fetched.
    Bytes,
    /// The gateway exited by itself, did not start or did not reconnect.
    Gateway,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::StaleInform => "inform differs from the version the leaf runs",
            Kind::TerminalReports => "more than one terminal report per notice",
            Kind::ProgressAfterEnd => "progress after the terminal report",
            Kind::Stuck => "leaf stuck (no end within the bound)",
            Kind::UnprovenSuccess => "step 100 not backed by inform, version and image",
            Kind::NotExplicit => "terminal report that is not an explicit failure",
            Kind::Scenario => "scenario expectation (-4 lost pty, -2 full disk, others served)",
            Kind::Bytes => "bytes fetched > 1.1 x the image",
            Kind::Gateway => "gateway exited, did not start or did not reconnect",
        }
    }
}

/// An image the platform offers.
#[derive(Debug, Clone)]
struct Img {
    name: String,
    version: String,
    bytes: Arc<Vec<u8>>,
    md5: String,
    url: String,
    /// Download kills aimed while this image was downloading.
    download_kills: usize,
}

/// One notice the platform sent.
#[derive(Debug, Clone)]
struct NoticeRec {
    leaf: usize,
    round: usize,
    image: usize,
    /// Where its echo is in the probe's record.
    echo: Option<usize>,
    /// The first terminal report after the echo: (record index, step, desc).
    terminal: Option<(usize, i64, String)>,
    published: Instant,
    ended_after: Option<Duration>,
    /// The disk-full notice.
    huge: bool,
    /// Its leaf's pty disappeared mid-flash at this record index.
    pty_lost_at: Option<usize>,
    outcome: Option<Outcome>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed { step: i64, desc: String },
    Stuck,
}

/// A progress message on a leaf's topic.
#[derive(Debug, Clone, Copy)]
struct PEvent {
    idx: usize,
    leaf: usize,
    step: i64,
}

fn topic(kind: &str, dn: &str) -> String {
    format!("/ota/device/{kind}/{LEAF_PK}/{dn}")
}

fn is_terminal(step: i64) -> bool {
    step == 100 || step < 0
}

fn parse_step(v: &Value) -> Option<i64> {
    let s = &v["params"]["step"];
    s.as_str()
        .and_then(|s| s.trim().parse().ok())
        .or_else(|| s.as_i64())
}

/// What the probe has seen, read incrementally.
struct Tracker {
    names: HashMap<String, usize>,
    read: usize,
    events: Vec<PEvent>,
    /// (record index, leaf, version)
    informs: Vec<(usize, usize, String)>,
    last_inform_idx: Vec<Option<usize>>,
    notices: Vec<NoticeRec>,
    /// Per leaf, its current notice (echoed).
    current: Vec<Option<usize>>,
    /// Notices published and not echoed yet: (leaf, id) -> notice.
    unechoed: HashMap<(usize, u64), usize>,
}

impl Tracker {
    fn new(names: &[String]) -> Tracker {
        Tracker {
            names: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i))
                .collect(),
            read: 0,
            events: Vec::new(),
            informs: Vec::new(),
            last_inform_idx: vec![None; names.len()],
            notices: Vec::new(),
            current: vec![None; names.len()],
            unechoed: HashMap::new(),
        }
    }

    fn pump(&mut self, probe: &MqttProbe) {
        let new = probe.messages_from(self.read);
        for m in new {
            let idx = self.read;
            self.read += 1;
            let Some(rest) = m.topic.strip_prefix("/ota/device/") else {
                continue;
            };
            let mut parts = rest.split('/');
            let (Some(kind), Some(_pk), Some(dn)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Some(&leaf) = self.names.get(dn) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else {
                continue;
            };
            match kind {
                "upgrade" => {
                    if let Some(id) = v["id"].as_u64()
                        && let Some(n) = self.unechoed.remove(&(leaf, id))
                    {
                        self.notices[n].echo = Some(idx);
                        self.current[leaf] = Some(n);
                    }
                }
                "progress" => {
                    let Some(step) = parse_step(&v) else {
                        continue;
                    };
                    self.events.push(PEvent { idx, leaf, step });
                    if is_terminal(step)
                        && let Some(n) = self.current[leaf]
                        && self.notices[n].terminal.is_none()
                    {
                        let desc = v["params"]["desc"].as_str().unwrap_or("").to_string();
                        let rec = &mut self.notices[n];
                        rec.terminal = Some((idx, step, desc));
                        rec.ended_after = Some(rec.published.elapsed());
                    }
                }
                "inform" => {
                    if let Some(ver) = v["params"]["version"].as_str() {
                        self.informs.push((idx, leaf, ver.to_string()));
                        self.last_inform_idx[leaf] = Some(idx);
                    }
                }
                _ => {}
            }
        }
    }

    /// The leaf has no upgrade in progress as far as the platform knows.
    fn settled(&self, leaf: usize) -> bool {
        !self.unechoed.keys().any(|(l, _)| *l == leaf)
            && self.current[leaf].is_none_or(|n| self.notices[n].terminal.is_some())
    }

    fn round_ended(&self, round: usize) -> bool {
        self.notices
            .iter()
            .filter(|n| n.round == round && !n.huge)
            .all(|n| n.terminal.is_some())
    }

    /// Every leaf informed after record index `idx`, except those in
    /// `exempt` (a leaf whose link is gone: a gateway that no longer knows its
    /// version, after a store rebuild, cannot read it back and must not
    /// guess it; when it does inform it, `check_informs` checks the version).
    fn all_informed_since(&self, idx: usize, exempt: &[bool]) -> bool {
        self.last_inform_idx
            .iter()
            .zip(exempt)
            .all(|(i, ex)| *ex || i.is_some_and(|i| i >= idx))
    }

    fn first_inform_since(&self, leaf: usize, idx: usize) -> Option<&str> {
        let from = self.informs.partition_point(|(i, _, _)| *i < idx);
        self.informs[from..]
            .iter()
            .find(|(_, l, _)| *l == leaf)
            .map(|(_, _, v)| v.as_str())
    }

    fn last_inform(&self, leaf: usize) -> Option<&str> {
        self.informs
            .iter()
            .rev()
            .find(|(_, l, _)| *l == leaf)
            .map(|(_, _, v)| v.as_str())
    }

    /// The first progress event at or after `from` matching `pred` for a leaf
    /// whose current notice is of `round` and has not ended.
    fn find_event(
        &self,
        from: usize,
        round: usize,
        pred: impl Fn(&PEvent) -> bool,
    ) -> Option<PEvent> {
        let start = self.events.partition_point(|e| e.idx < from);
        self.events[start..].iter().copied().find(|e| {
            pred(e)
                && self.current[e.leaf].is_some_and(|n| {
                    let n = &self.notices[n];
                    n.round == round
                        && n.echo.is_some_and(|echo| e.idx > echo)
                        && (is_terminal(e.step) || n.terminal.as_ref().is_none_or(|t| t.0 >= e.idx))
                })
        })
    }
}

// ---------------------------------------------------------------- parts

/// The gateway as a process, killed with SIGKILL (also when dropped).
struct Gateway {
    child: tokio::process::Child,
    api: Arc<Mutex<Option<SocketAddr>>>,
}

impl Gateway {
    fn spawn(config: &Path, log: &Path) -> std::io::Result<Gateway> {
        use tokio::io::AsyncBufReadExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut child = tokio::process::Command::new(GATEWAY_BIN)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", GATEWAY_LOG)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        let api = Arc::new(Mutex::new(None));
        if let Some(out) = child.stdout.take() {
            let api = api.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(a) = line.strip_prefix("api: ")
                        && let Ok(a) = a.trim().parse()
                    {
                        *api.lock().unwrap_or_else(|e| e.into_inner()) = Some(a);
                    }
                }
            });
        }
        Ok(Gateway { child, api })
    }

    fn api(&self) -> Option<SocketAddr> {
        *self.api.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The data directory: a tmpfs of a few MiB mounted for the run where the
/// machine allows it (unmounted when dropped), else a plain directory.
struct DataDir {
    path: PathBuf,
    tmpfs_mib: Option<u64>,
    note: String,
}

impl DataDir {
    fn new(path: PathBuf, mib: u64) -> DataDir {
        std::fs::create_dir_all(&path).expect("create the data directory");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700")])
            .arg("otagw-campaign")
            .arg(&path)
            .output();
        match out {
            Ok(o) if o.status.success() => DataDir {
                path,
                tmpfs_mib: Some(mib),
                note: format!("data_dir on a {mib} MiB tmpfs"),
            },
            Ok(o) => DataDir {
                path,
                tmpfs_mib: None,
                note: format!(
                    "cannot mount a tmpfs ({}): data_dir on the ordinary disk, \
                     the disk-full round uses an image larger than [cache] max_size_mib",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            },
            Err(e) => DataDir {
                path,
                tmpfs_mib: None,
                note: format!(
                    "cannot run mount ({e}): data_dir on the ordinary disk, \
                     the disk-full round uses an image larger than [cache] max_size_mib"
                ),
            },
        }
    }

    /// Free bytes of the file system holding the data directory.
    fn avail(&self) -> Option<u64> {
        let out = std::process::Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.path)
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if self.tmpfs_mib.is_some() {
            let ok = std::process::Command::new("umount")
                .arg(&self.path)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.path)
                    .status();
            }
        }
    }
}

/// A leaf's simulator, or what is left of it after its pty went away.
struct Leaf {
    sim: Option<PtySim>,
    /// The version of the simulator shut down mid-flash.
    dead_version: Option<String>,
    /// Images taken from the simulator's queue so far.
    consumed: u32,
    /// The last complete image the simulator received.
    last_image: Option<Vec<u8>>,
}

impl Leaf {
    fn version(&self) -> String {
        match (&self.sim, &self.dead_version) {
            (Some(s), _) => s.handle().version(),
            (None, Some(v)) => v.clone(),
            (None, None) => "?".into(),
        }
    }

    /// Take every image completed since the last call; keep the last.
    async fn drain_images(&mut self) {
        let Some(sim) = &self.sim else {
            return;
        };
        while self.consumed < sim.handle().images_received() {
            match tokio::time::timeout(Duration::from_secs(5), sim.handle().next_image()).await {
                Ok(img) => {
                    self.consumed += 1;
                    self.last_image = Some(img.data);
                }
                Err(_) => break,
            }
        }
    }
}

fn sim_config(version: &str, line_rate: u32) -> XmodemSimConfig {
    XmodemSimConfig {
        version: version.into(),
        line_rate: Some(line_rate),
        ..xmodem_device()
    }
}

/// `received` is `image` followed by XMODEM padding (0x1a) to the block end.
fn padded(received: &[u8], image: &[u8]) -> bool {
    received.len() >= image.len()
        && received[..image.len()] == *image
        && received.len() - image.len() < 1024
        && received[image.len()..].iter().all(|b| *b == 0x1a)
}

/// An image of `size` bytes with its own content (`salt`) and the version
/// marker the simulated firmware boots with.
fn round_image(size: usize, version: &str, salt: u64) -> Vec<u8> {
    let mut img = image(size, salt);
    let marker = format!("FWVER:{version}\0");
    img[64..64 + marker.len()].copy_from_slice(marker.as_bytes());
    img
}

fn notice_data(img: &Img) -> Value {
    json!({"size": img.bytes.len(), "version": img.version, "url": img.url,
           "md5": img.md5, "sign": img.md5, "signMethod": "Md5"})
}

/// A GET of the status API, bounded; `None` if it does not answer.
async fn api_get(addr: SocketAddr, path: &str) -> Option<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.ok()?;
        let text = String::from_utf8_lossy(&resp);
        serde_json::from_str(text.split("\r\n\r\n").nth(1)?).ok()
    };
    tokio::time::timeout(Duration::from_millis(500), get)
        .await
        .ok()
        .flatten()
}

/// The platform's side of `firmware/get`: answers each leaf's request with
/// the notice pending for it (published, no terminal report seen since), or
/// `{}`; everything from the probe's record, in order.
async fn platform(probe: Arc<MqttProbe>, leaves: HashSet<String>, stop: CancellationToken) {
    let mut read = 0;
    let mut pending: HashMap<String, Value> = HashMap::new();
    loop {
        let deadline = Instant::now() + Duration::from_secs(1);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = probe.wait_beyond(read, deadline) => {}
        }
        for m in probe.messages_from(read) {
            read += 1;
            let parts: Vec<&str> = m.topic.split('/').collect();
            let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else {
                continue;
            };
            match parts.as_slice() {
                ["", "ota", "device", "upgrade", _pk, dn] if leaves.contains(*dn) => {
                    pending.insert(dn.to_string(), v["data"].clone());
                }
                ["", "ota", "device", "progress", _pk, dn]
                    if parse_step(&v).is_some_and(is_terminal) =>
                {
                    pending.remove(*dn);
                }
                ["", "sys", pk, dn, "thing", "ota", "firmware", "get"] => {
                    let data = pending.get(*dn).cloned().unwrap_or_else(|| json!({}));
                    let reply = json!({"id": v["id"].clone(), "code": 200, "data": data});
                    probe
                        .publish(
                            &format!("/sys/{pk}/{dn}/thing/ota/firmware/get_reply"),
                            reply.to_string(),
                        )
                        .await;
                }
                _ => {}
            }
        }
    }
}

/// The scenarios of one round, besides its kills.
#[derive(Debug, Clone, Copy, Default)]
struct Scenarios {
    broker: bool,
    pty: bool,
    damage: bool,
    disk: bool,
}

/// Why a run stopped early.
#[derive(Debug)]
struct Fatal(String);

// ---------------------------------------------------------------- the campaign

struct Campaign {
    p: Params,
    seed: u64,
    rng: fastrand::Rng,
    base: tempfile::TempDir,
    data: DataDir,
    plugins: PluginsDir,
    broker: Mosquitto,
    probe: Arc<MqttProbe>,
    files: FileServer,
    names: Vec<String>,
    leaves: Vec<Leaf>,
    gw: Option<Gateway>,
    starts: usize,
    t: Tracker,
    images: Vec<Img>,
    kills: Vec<Kill>,
    round_end_restarts: usize,
    violations: Vec<Violation>,
    notes: Vec<String>,
    /// Measured time from spawn to every leaf informed (the last one).
    startup: Duration,
    round: usize,
    /// The round that filled the disk.
    disk_round: Option<usize>,
    next_id: u64,
    platform_stop: CancellationToken,
}

impl Campaign {
    async fn new(p: Params, seed: u64) -> Campaign {
        let base = tempfile::tempdir().expect("temporary directory");
        let data = DataDir::new(base.path().join("data"), p.tmpfs_mib);
        let broker = Mosquitto::start().await;
        let probe = Arc::new(MqttProbe::connect(broker.port(), "#").await);
        let names: Vec<String> = (0..p.leaves).map(|i| format!("leaf-{i:02}")).collect();
        let leaves = (0..p.leaves)
            .map(|_| Leaf {
                sim: Some(
                    PtySim::spawn(sim_config("1.0.0", p.line_rate)).expect("a pty simulator"),
                ),
                dead_version: None,
                consumed: 0,
                last_image: None,
            })
            .collect();
        let platform_stop = CancellationToken::new();
        tokio::spawn(platform(
            probe.clone(),
            names.iter().cloned().collect(),
            platform_stop.clone(),
        ));
        Campaign {
            t: Tracker::new(&names),
            rng: fastrand::Rng::with_seed(seed),
            seed,
            base,
            data,
            plugins: PluginsDir::with(&[artifacts::XMODEM]),
            broker,
            probe,
            files: FileServer::start().await,
            names,
            leaves,
            gw: None,
            starts: 0,
            images: Vec::new(),
            kills: Vec::new(),
            round_end_restarts: 0,
            violations: Vec::new(),
            notes: Vec::new(),
            startup: Duration::from_secs(2),
            round: 0,
            disk_round: None,
            next_id: 1000,
            platform_stop,
            p,
        }
    }

    fn violation(&mut self, kind: Kind, leaf: Option<usize>, what: impl Into<String>) {
        let v = Violation {
            kind,
            round: Some(self.round),
            leaf: leaf.map(|l| self.names[l].clone()),
            what: what.into(),
        };
        println!(
            "  VIOLATION [round {}] {}: {}",
            self.round,
            v.leaf.as_deref().unwrap_or("-"),
            v.what
        );
        self.violations.push(v);
    }

    fn log_path(&self) -> PathBuf {
        self.base.path().join("gateway.log")
    }

    fn config(&self) -> String {
        let specs: Vec<LeafSpec> = self
            .names
            .iter()
            .zip(&self.leaves)
            .map(|(n, l)| {
                let url = match &l.sim {
                    Some(s) => s.url(),
                    // The pty is gone: its old path (the gateway cannot open it).
                    None => "serial:///dev/pts/gone".to_string(),
                };
                LeafSpec::xmodem(n, &url)
            })
            .collect();
        let mut c = gateway_config(
            &self.data.path,
            self.plugins.path(),
            Some(&self.broker.url()),
            &specs,
        );
        c.push_str(&format!(
            "[jobs]\nmax_parallel = {}\n\n",
            self.p.max_parallel
        ));
        if self.data.tmpfs_mib.is_none() {
            c.push_str(&format!("[cache]\nmax_size_mib = {}\n\n", self.p.tmpfs_mib));
        }
        c
    }

    /// Spawn the gateway (the config names the current simulators).
    fn spawn(&mut self, why: &str) -> Result<(), Fatal> {
        self.starts += 1;
        let path = self.base.path().join("otagw.toml");
        std::fs::write(&path, self.config()).map_err(|e| Fatal(format!("write config: {e}")))?;
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .and_then(|mut f| {
                use std::io::Write;
                writeln!(f, "===== campaign: start {} ({why})", self.starts)
            });
        let gw = Gateway::spawn(&path, &self.log_path())
            .map_err(|e| Fatal(format!("start the gateway: {e}")))?;
        self.gw = Some(gw);
        Ok(())
    }

    /// The last lines of the gateway's log.
    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Wait until the running gateway informed every leaf after record index
    /// `idx`; then check the inform of every leaf in `settled`.
    async fn wait_up(&mut self, idx: usize, settled: &[bool], what: &str) -> Result<(), Fatal> {
        let t0 = Instant::now();
        let deadline = t0 + UP_LIMIT;
        loop {
            self.t.pump(&self.probe);
            if self.t.all_informed_since(idx, &self.linkless()) {
                break;
            }
            if let Some(gw) = self.gw.as_mut()
                && let Some(st) = gw.exited()
            {
                self.gw = None;
                return Err(Fatal(format!(
                    "{what}: the gateway exited ({st}) before informing every leaf; log:\n{}",
                    self.log_tail(8)
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Fatal(format!(
                    "{what}: not every leaf informed within {UP_LIMIT:?}; log:\n{}",
                    self.log_tail(8)
                )));
            }
            self.probe
                .wait_beyond(
                    self.t.read,
                    now + Duration::from_secs(1).min(deadline - now),
                )
                .await;
        }
        self.startup = t0.elapsed();
        self.check_informs(idx, settled, what);
        Ok(())
    }

    /// Every settled leaf's first inform after `idx` is what it runs.
    fn check_informs(&mut self, idx: usize, settled: &[bool], what: &str) {
        for (l, _) in settled.iter().enumerate().filter(|(_, s)| **s) {
            let runs = self.leaves[l].version();
            let said = self.t.first_inform_since(l, idx).map(str::to_string);
            if said.is_none() && self.leaves[l].sim.is_none() {
                // Its link is gone: not informing it is right when the
                // gateway cannot know its version (see `all_informed_since`).
                continue;
            }
            if said.as_deref() != Some(runs.as_str()) {
                self.violation(
                    Kind::StaleInform,
                    Some(l),
                    format!(
                        "{what}: informs {} but runs {runs} (no upgrade in progress)",
                        said.as_deref().unwrap_or("nothing")
                    ),
                );
            }
        }
    }

    /// The leaves whose link is gone (their simulator shut down).
    fn linkless(&self) -> Vec<bool> {
        self.leaves.iter().map(|l| l.sim.is_none()).collect()
    }

    fn settled_now(&mut self) -> Vec<bool> {
        self.t.pump(&self.probe);
        (0..self.names.len()).map(|l| self.t.settled(l)).collect()
    }

    /// Start the gateway and wait until it is up.
    async fn start(&mut self, why: &str) -> Result<(), Fatal> {
        let settled = self.settled_now();
        let idx = self.t.read;
        self.spawn(why)?;
        self.wait_up(idx, &settled, why).await
    }

    /// If the gateway died on its own, say so and start it again.
    async fn check_alive(&mut self) -> Result<(), Fatal> {
        let Some(gw) = self.gw.as_mut() else {
            return self.start("after an exit").await;
        };
        if let Some(st) = gw.exited() {
            self.gw = None;
            let tail = self.log_tail(5);
            self.violation(
                Kind::Gateway,
                None,
                format!("the gateway exited on its own ({st}); log ends:\n{tail}"),
            );
            self.start("after an exit").await?;
        }
        Ok(())
    }

    /// Wait (pumping the record) until `f` gives a value, at most `limit`;
    /// `stop_when_round_ended` gives up once every notice of the round ended.
    async fn wait_for<T>(
        &mut self,
        limit: Duration,
        stop_when_round_ended: bool,
        f: impl Fn(&Tracker) -> Option<T>,
    ) -> Result<Option<T>, Fatal> {
        let deadline = Instant::now() + limit;
        loop {
            self.t.pump(&self.probe);
            if let Some(v) = f(&self.t) {
                return Ok(Some(v));
            }
            if stop_when_round_ended && self.t.round_ended(self.round) {
                return Ok(None);
            }
            self.check_alive().await?;
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.probe
                .wait_beyond(
                    self.t.read,
                    now + Duration::from_secs(1).min(deadline - now),
                )
                .await;
        }
    }

    /// Deliberate fault timing: a random pause of up to `max_ms`.
    async fn random_pause(&mut self, max_ms: u64) {
        let ms = self.rng.u64(0..=max_ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Job states from the status API: (state -> count).
    async fn snapshot(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        let Some(addr) = self.gw.as_ref().and_then(Gateway::api) else {
            return counts;
        };
        if let Some(Value::Array(jobs)) = api_get(addr, "/api/jobs").await {
            for j in jobs {
                if let Some(s) = j["state"].as_str() {
                    *counts.entry(s.to_string()).or_default() += 1;
                }
            }
        }
        counts
    }

    fn publish_notice(&mut self, leaf: usize, image: usize, huge: bool) -> (String, String) {
        let id = self.next_id;
        self.next_id += 1;
        let img = &self.images[image];
        let payload = json!({"code": "1000", "message": "success", "id": id,
                             "data": notice_data(img)})
        .to_string();
        let n = self.t.notices.len();
        self.t.notices.push(NoticeRec {
            leaf,
            round: self.round,
            image,
            echo: None,
            terminal: None,
            published: Instant::now(),
            ended_after: None,
            huge,
            pty_lost_at: None,
            outcome: None,
        });
        self.t.unechoed.insert((leaf, id), n);
        (topic("upgrade", &self.names[leaf]), payload)
    }

    fn add_image(&mut self, size: usize, version: String, throttle: Option<u64>) -> usize {
        let salt = self.seed.wrapping_mul(1_000_003) ^ (self.images.len() as u64 + 1);
        let bytes = round_image(size, &version, salt);
        let name = format!("fw-{version}.bin");
        let md5 = md5_hex(&bytes);
        let url = self.files.add(&name, bytes.clone());
        if let Some(rate) = throttle {
            self.files.fault(&name, Fault::Throttle(rate));
        }
        self.images.push(Img {
            name,
            version,
            bytes: Arc::new(bytes),
            md5,
            url,
            download_kills: 0,
        });
        self.images.len() - 1
    }

    // ------------------------------------------------------------ faults

    /// Kill the gateway now (after the snapshot), restart it, maybe kill the
    /// restart too.
    async fn kill_now(
        &mut self,
        phase: Phase,
        aimed: Phase,
        pre: Option<BTreeMap<String, usize>>,
        note: String,
    ) -> Result<(), Fatal> {
        let snap = match pre {
            Some(s) => s,
            None => self.snapshot().await,
        };
        let settled = self.settled_now();
        if let Some(gw) = self.gw.take() {
            gw.kill().await;
        }
        let hit = phase
            .api_state()
            .map(|s| snap.get(s).copied().unwrap_or(0) > 0);
        let jobs: Vec<String> = snap.iter().map(|(s, n)| format!("{s} {n}")).collect();
        println!(
            "  kill {:>2} [round {}] {}{}: jobs {}",
            self.kills.len() + 1,
            self.round,
            phase.name(),
            note,
            if jobs.is_empty() {
                "(API silent)".to_string()
            } else {
                jobs.join(", ")
            }
        );
        self.kills.push(Kill {
            phase,
            aimed,
            hit,
            note,
        });
        let idx = self.t.read;
        self.spawn(&format!("after a kill at {}", phase.name()))?;
        if self.rng.f64() < STARTUP_KILL_P {
            self.startup_kill(idx).await?;
            let settled = self.settled_now();
            let idx = self.t.read;
            self.spawn("after a startup kill")?;
            return self
                .wait_up(idx, &settled, "restart after a startup kill")
                .await;
        }
        self.wait_up(
            idx,
            &settled,
            &format!("restart after a kill at {}", phase.name()),
        )
        .await
    }

    /// Kill the gateway that was just spawned, at a random moment of its start.
    async fn startup_kill(&mut self, idx: usize) -> Result<(), Fatal> {
        let max = (self.startup.as_millis() as u64 * 6 / 5).max(50);
        self.random_pause(max).await;
        self.t.pump(&self.probe);
        let Some(gw) = self.gw.take() else {
            return Ok(());
        };
        let stage = if self.t.all_informed_since(idx, &self.linkless()) {
            "connected and informed"
        } else if gw.api().is_some() {
            "API bound, not yet informed"
        } else {
            "before binding its API"
        };
        gw.kill().await;
        println!(
            "  kill {:>2} [round {}] startup: {stage}",
            self.kills.len() + 1,
            self.round
        );
        self.kills.push(Kill {
            aimed: Phase::Startup,
            phase: Phase::Startup,
            hit: None,
            note: stage.to_string(),
        });
        Ok(())
    }

    /// The round's image that is downloading now, if any leaf reports it.
    fn downloading_image(&self) -> Option<usize> {
        let round = self.round;
        self.t
            .notices
            .iter()
            .find(|n| n.round == round && !n.huge)
            .map(|n| n.image)
    }

    /// A kill aimed at `phase`: wait for its moment (falling back to a random
    /// moment), pause at random, kill, restart.
    async fn aimed_kill(&mut self, mut phase: Phase, since: usize) -> Result<bool, Fatal> {
        let aimed = phase;
        // A snapshot of the API taken by the hunt for identify.
        let mut pre = None;
        if phase == Phase::Download {
            let img = self.downloading_image();
            if img.is_none_or(|i| self.images[i].download_kills >= DOWNLOAD_KILLS_PER_IMAGE) {
                phase = Phase::Flash;
            }
        }
        let round = self.round;
        let found = match phase {
            Phase::Download => {
                self.wait_for(TRIGGER_LIMIT, true, |t| {
                    // Not once any leaf is past the download of this round.
                    let done = t
                        .find_event(0, round, |e| e.step >= 30 && !is_terminal(e.step))
                        .is_some();
                    if done {
                        return Some(None);
                    }
                    t.find_event(since, round, |e| (1..=29).contains(&e.step))
                        .map(Some)
                })
                .await?
                .flatten()
            }
            Phase::Flash => {
                self.wait_for(TRIGGER_LIMIT, true, |t| {
                    t.find_event(since, round, |e| (35..=94).contains(&e.step))
                })
                .await?
            }
            Phase::Identify => {
                // The 95 report is rarely sent (less than 5 points above the
                // last flash report): the end of a flash is the cue, then the
                // status API is watched for a job in "identifying".
                let cue = self
                    .wait_for(TRIGGER_LIMIT, true, |t| {
                        t.find_event(since, round, |e| (86..=95).contains(&e.step))
                    })
                    .await?;
                if cue.is_some() {
                    let until = Instant::now() + IDENTIFY_HUNT;
                    while Instant::now() < until {
                        let snap = self.snapshot().await;
                        if snap.contains_key("identifying") {
                            pre = Some(snap);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                cue
            }
            Phase::AfterTerminal => {
                self.wait_for(TRIGGER_LIMIT, true, |t| {
                    t.find_event(since, round, |e| is_terminal(e.step))
                })
                .await?
            }
            Phase::Random | Phase::Startup => None,
        };
        let (phase, delay_max) = match (phase, found) {
            (Phase::Download, Some(_)) => (phase, self.p.download_delay_ms),
            (Phase::Flash, Some(_)) => (phase, self.p.flash_delay_ms),
            (Phase::Identify, Some(_)) => (phase, 0),
            (Phase::AfterTerminal, Some(_)) => (phase, 30),
            _ => (Phase::Random, self.p.random_delay_ms),
        };
        if phase == Phase::Random && self.t.round_ended(self.round) {
            return Ok(false);
        }
        let ms = self.rng.u64(0..=delay_max);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        if phase == Phase::Download
            && let Some(i) = self.downloading_image()
        {
            self.images[i].download_kills += 1;
        }
        let cue = match found {
            Some(e) => format!(" ({} step {})", self.names[e.leaf], e.step),
            None if aimed != phase => format!(" (aimed at {}, not seen)", aimed.name()),
            None => String::new(),
        };
        self.kill_now(phase, aimed, pre, format!("{cue} +{ms} ms"))
            .await?;
        Ok(true)
    }

    fn draw_phase(&mut self) -> Phase {
        let x = self.rng.f64();
        match x {
            x if x < 0.20 => Phase::Download,
            x if x < 0.50 => Phase::Flash,
            x if x < 0.65 => Phase::Identify,
            x if x < 0.85 => Phase::AfterTerminal,
            _ => Phase::Random,
        }
    }

    async fn broker_restart(&mut self, since: usize) -> Result<(), Fatal> {
        let round = self.round;
        let found = self
            .wait_for(TRIGGER_LIMIT, true, |t| {
                t.find_event(since, round, |e| (35..=94).contains(&e.step))
            })
            .await?;
        self.random_pause(self.p.flash_delay_ms).await;
        let settled = self.settled_now();
        let idx = self.t.read;
        println!(
            "  broker restart [round {round}]{}",
            found
                .map(|e| format!(" ({} flashing, step {})", self.names[e.leaf], e.step))
                .unwrap_or_default()
        );
        self.broker.restart().await;
        self.notes.push(format!(
            "round {round}: mosquitto restarted{}",
            if found.is_some() {
                " while a leaf was flashing"
            } else {
                " (no flash seen within the trigger limit)"
            }
        ));
        // The gateway reconnects and informs every leaf again.
        let deadline = Instant::now() + UP_LIMIT;
        loop {
            self.t.pump(&self.probe);
            if self.t.all_informed_since(idx, &self.linkless()) {
                self.check_informs(idx, &settled, "reconnect after the broker restart");
                return Ok(());
            }
            self.check_alive().await?;
            let now = Instant::now();
            if now >= deadline {
                self.violation(
                    Kind::Gateway,
                    None,
                    format!("the gateway did not inform every leaf within {UP_LIMIT:?} of the broker restart"),
                );
                return Ok(());
            }
            self.probe
                .wait_beyond(
                    self.t.read,
                    now + Duration::from_secs(1).min(deadline - now),
                )
                .await;
        }
    }

    async fn pty_loss(&mut self, since: usize) -> Result<(), Fatal> {
        let round = self.round;
        let Some(e) = self
            .wait_for(Duration::from_secs(120), true, |t| {
                t.find_event(since, round, |e| (40..=90).contains(&e.step))
            })
            .await?
        else {
            self.notes.push(format!(
                "round {round}: no leaf seen flashing, no pty removed"
            ));
            return Ok(());
        };
        self.random_pause(500).await;
        let l = e.leaf;
        let Some(sim) = self.leaves[l].sim.take() else {
            return Ok(());
        };
        let version = sim.handle().version();
        sim.shutdown().await;
        self.t.pump(&self.probe);
        let at = self.t.read;
        if let Some(n) = self.t.current[l] {
            self.t.notices[n].pty_lost_at = Some(at);
        }
        self.leaves[l].dead_version = Some(version);
        println!(
            "  pty of {} removed mid-flash [round {round}] (step {})",
            self.names[l], e.step
        );
        self.notes.push(format!(
            "round {round}: the pty of {} disappeared mid-flash (step {})",
            self.names[l], e.step
        ));
        Ok(())
    }

    async fn damage(&mut self, since: usize) -> Result<(), Fatal> {
        let round = self.round;
        let found = self
            .wait_for(TRIGGER_LIMIT, true, |t| {
                t.find_event(since, round, |e| (35..=94).contains(&e.step))
            })
            .await?;
        self.random_pause(self.p.flash_delay_ms).await;
        let snap = self.snapshot().await;
        let settled = self.settled_now();
        if let Some(gw) = self.gw.take() {
            gw.kill().await;
        }
        let what = damage_store(&self.data.path.join("db"), &mut self.rng);
        println!(
            "  kill {:>2} [round {round}] flash, then the store damaged: {what}",
            self.kills.len() + 1
        );
        self.kills.push(Kill {
            aimed: Phase::Flash,
            phase: if found.is_some() {
                Phase::Flash
            } else {
                Phase::Random
            },
            hit: Some(snap.get("flashing").copied().unwrap_or(0) > 0),
            note: "store damaged before the restart".into(),
        });
        let idx = self.t.read;
        self.spawn("after the store was damaged")?;
        let r = self
            .wait_up(idx, &settled, "restart on the damaged store")
            .await;
        let rebuilt = std::fs::read_dir(&self.data.path)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("db.broken"))
            })
            .unwrap_or(false);
        self.notes.push(format!(
            "round {round}: store damaged ({what}); the gateway {}; store {}",
            if r.is_ok() {
                format!(
                    "started and informed every leaf in {:.1} s",
                    self.startup.as_secs_f64()
                )
            } else {
                "did not come up".to_string()
            },
            if rebuilt {
                "moved aside and rebuilt"
            } else {
                "opened as it was (not rebuilt)"
            }
        ));
        r
    }

    /// The disk-full notice: an image larger than the free space, to one
    /// leaf, before the others get theirs.
    async fn disk_full(&mut self) -> Result<(), Fatal> {
        let victim = self.rng.usize(0..self.names.len());
        let size = match (self.data.tmpfs_mib, self.data.avail()) {
            (Some(_), Some(avail)) => ((avail >> 20) + 8) << 20,
            _ => (self.p.tmpfs_mib + 16) << 20,
        } as usize;
        let version = format!("9.{}.0", self.round + 1);
        let img = self.add_image(size, version, Some(256 << 20));
        let before = self.data.avail();
        let (t, payload) = self.publish_notice(victim, img, true);
        println!(
            "  disk full [round {}]: {} gets a {} MiB image ({} MiB free)",
            self.round,
            self.names[victim],
            size >> 20,
            before.map_or("?".to_string(), |b| (b >> 20).to_string())
        );
        self.probe.publish(&t, payload).await;
        let n = self.t.notices.len() - 1;
        let ended = self
            .wait_for(self.p.end_bound, false, |t| t.notices[n].terminal.clone())
            .await?;
        let after = self.data.avail();
        self.disk_round = Some(self.round);
        if let (Some(_), Some(b), Some(a)) = (self.data.tmpfs_mib, before, after)
            && a < b / 2
        {
            self.violation(
                Kind::Scenario,
                Some(victim),
                format!(
                    "full disk: {} MiB free after the failed download ({} MiB before): \
                     its bytes stay on the disk",
                    a >> 20,
                    b >> 20
                ),
            );
        }
        match &ended {
            Some((_, -2, desc)) if !desc.trim().is_empty() => {}
            Some((_, step, desc)) => self.violation(
                Kind::Scenario,
                Some(victim),
                format!("full disk: expected step -2 with a reason, got {step} {desc:?}"),
            ),
            None => self.violation(
                Kind::Scenario,
                Some(victim),
                format!(
                    "full disk: no terminal report within {:?}",
                    self.p.end_bound
                ),
            ),
        }
        self.notes.push(format!(
            "round {}: full disk ({}): {} was sent a {} MiB image with {} MiB free; it ended {}; \
             free space afterwards {} MiB",
            self.round,
            self.data.note,
            self.names[victim],
            size >> 20,
            before.map_or("?".to_string(), |b| (b >> 20).to_string()),
            ended
                .as_ref()
                .map_or("with no terminal report".to_string(), |(_, s, d)| format!(
                    "{s} {d:?}"
                )),
            after.map_or("?".to_string(), |b| (b >> 20).to_string()),
        ));
        Ok(())
    }

    // ------------------------------------------------------------ rounds

    async fn run_round(&mut self, sc: Scenarios) -> Result<(), Fatal> {
        let r = self.round;
        let t0 = Instant::now();
        // The scenario rounds at the end of the run get kills even when the
        // count is reached.
        let final_round = sc.damage || sc.disk;
        if sc.disk {
            self.disk_full().await?;
        }
        let size = self.p.image_sizes[r % 2];
        let img = self.add_image(size, format!("2.{}.0", r + 1), Some(self.p.download_rate));
        println!(
            "round {r}: {} leaves -> {} ({} KiB)",
            self.names.len(),
            self.images[img].version,
            size >> 10
        );
        self.t.pump(&self.probe);
        let since = self.t.read;
        for l in 0..self.names.len() {
            let (t, payload) = self.publish_notice(l, img, false);
            self.probe.publish(&t, payload).await;
        }
        let echoed = self
            .wait_for(Duration::from_secs(30), false, |t| {
                t.unechoed.is_empty().then_some(())
            })
            .await?;
        if echoed.is_none() {
            return Err(Fatal("the broker did not echo the notices".into()));
        }
        // A kill drawn for the download goes first (the download is the
        // round's first seconds); then the round's scenario; then the kills.
        let mut planned = 0;
        let mut drawn = None;
        if self.aimed_kills() < self.p.kills || final_round {
            let phase = self.draw_phase();
            if phase == Phase::Download {
                planned += 1;
                let s = self.t.read;
                self.aimed_kill(phase, s).await?;
            } else {
                drawn = Some(phase);
            }
        }
        if sc.broker {
            let since = self.t.read.max(since);
            self.broker_restart(since).await?;
        }
        if sc.pty {
            self.pty_loss(since).await?;
        }
        if sc.damage {
            let s = self.t.read;
            self.damage(s).await?;
        }
        while planned < self.p.kills_per_round
            && (self.aimed_kills() < self.p.kills || final_round)
            && !self.t.round_ended(r)
        {
            planned += 1;
            let phase = drawn.take().unwrap_or_else(|| self.draw_phase());
            self.t.pump(&self.probe);
            let s = self.t.read;
            self.aimed_kill(phase, s).await?;
        }
        // Every notice ends within the bound.
        let ended = self
            .wait_for(self.p.end_bound, false, |t| t.round_ended(r).then_some(()))
            .await?;
        if ended.is_none() {
            let stuck: Vec<usize> = self
                .t
                .notices
                .iter()
                .enumerate()
                .filter(|(_, n)| n.round == r && n.terminal.is_none())
                .map(|(i, _)| i)
                .collect();
            let snap = self.snapshot().await;
            for i in stuck {
                let l = self.t.notices[i].leaf;
                let last = self
                    .t
                    .events
                    .iter()
                    .rev()
                    .find(|e| e.leaf == l)
                    .map(|e| e.step);
                self.t.notices[i].outcome = Some(Outcome::Stuck);
                self.violation(
                    Kind::Stuck,
                    Some(l),
                    format!(
                        "stuck: no terminal report within {:?} of the round's last fault \
                         (last progress {last:?}; jobs {snap:?})",
                        self.p.end_bound
                    ),
                );
            }
        }
        self.end_round(t0).await
    }

    /// Kills aimed at a moment (startup kills included).
    fn aimed_kills(&self) -> usize {
        self.kills.len()
    }

    /// Check the round's outcomes, replace a removed pty, restart once more.
    async fn end_round(&mut self, t0: Instant) -> Result<(), Fatal> {
        let r = self.round;
        // Success is the inform of the new version: let it follow step 100.
        let versions: Vec<String> = self.images.iter().map(|i| i.version.clone()).collect();
        self.wait_for(INFORM_GRACE, false, |t| {
            t.notices
                .iter()
                .filter(|n| n.round == r)
                .all(|n| match &n.terminal {
                    Some((tidx, 100, _)) => t
                        .informs
                        .iter()
                        .any(|(i, l, v)| *l == n.leaf && *i > *tidx && *v == versions[n.image]),
                    _ => true,
                })
                .then_some(())
        })
        .await?;
        // The last inform before the round-end restart.
        for l in 0..self.names.len() {
            let runs = self.leaves[l].version();
            let said = self.t.last_inform(l).map(str::to_string);
            if said.as_deref() != Some(runs.as_str()) {
                self.violation(
                    Kind::StaleInform,
                    Some(l),
                    format!(
                        "round end: last inform {} but runs {runs}",
                        said.as_deref().unwrap_or("none")
                    ),
                );
            }
        }
        for leaf in &mut self.leaves {
            leaf.drain_images().await;
        }
        let idxs: Vec<usize> = (0..self.t.notices.len())
            .filter(|i| self.t.notices[*i].round == r && self.t.notices[*i].outcome.is_none())
            .collect();
        let (mut ok, mut failed, mut rule) = (0, 0, 0);
        for i in idxs {
            let n = self.t.notices[i].clone();
            let l = n.leaf;
            let img = self.images[n.image].clone();
            let Some((tidx, step, desc)) = n.terminal.clone() else {
                continue;
            };
            let outcome = if step == 100 {
                let next_echo = self
                    .t
                    .notices
                    .iter()
                    .filter(|m| m.leaf == l && m.echo.is_some_and(|e| e > tidx))
                    .filter_map(|m| m.echo)
                    .min()
                    .unwrap_or(usize::MAX);
                let informed = self.t.informs.iter().any(|(i, il, v)| {
                    *il == l && *i > n.echo.unwrap_or(0) && *i < next_echo && *v == img.version
                });
                let runs = self.leaves[l].version();
                let holds = self.leaves[l]
                    .last_image
                    .as_deref()
                    .is_some_and(|d| padded(d, &img.bytes));
                if !informed {
                    self.violation(
                        Kind::UnprovenSuccess,
                        Some(l),
                        format!(
                            "step 100 ({desc:?}) for the notice of {} without an inform of it",
                            img.version
                        ),
                    );
                }
                if runs != img.version {
                    self.violation(
                        Kind::UnprovenSuccess,
                        Some(l),
                        format!(
                            "step 100 ({desc:?}) for the notice of {} but the leaf runs {runs}",
                            img.version
                        ),
                    );
                }
                if !holds {
                    self.violation(
                        Kind::UnprovenSuccess,
                        Some(l),
                        format!(
                            "step 100 ({desc:?}) for the notice of {} but the leaf does not \
                             hold exactly that image",
                            img.version
                        ),
                    );
                }
                ok += 1;
                Outcome::Succeeded
            } else {
                if !(-4..=-1).contains(&step) || desc.trim().is_empty() {
                    self.violation(
                        Kind::NotExplicit,
                        Some(l),
                        format!(
                            "terminal report step {step} desc {desc:?}: not an explicit failure"
                        ),
                    );
                }
                if self.disk_round == Some(r) && !n.huge && step == -2 {
                    self.violation(
                        Kind::Scenario,
                        Some(l),
                        format!("not served after the full disk: {step} {desc:?}"),
                    );
                }
                if n.pty_lost_at.is_some_and(|at| at <= tidx) && step != -4 {
                    self.violation(
                        Kind::Scenario,
                        Some(l),
                        format!("pty removed mid-flash: expected -4, got {step} {desc:?}"),
                    );
                }
                failed += 1;
                if restart_rule(&desc) {
                    rule += 1;
                }
                Outcome::Failed { step, desc }
            };
            self.t.notices[i].outcome = Some(outcome);
        }
        // A removed pty comes back as a new simulator running what it ran.
        let rate = self.p.line_rate;
        for leaf in self.leaves.iter_mut().filter(|l| l.sim.is_none()) {
            let v = leaf.version();
            *leaf = Leaf {
                sim: Some(PtySim::spawn(sim_config(&v, rate)).expect("a pty")),
                dead_version: None,
                consumed: 0,
                last_image: None,
            };
        }
        // The round-end restart: what the gateway says at a start.
        let settled = self.settled_now();
        if let Some(gw) = self.gw.take() {
            gw.kill().await;
        }
        self.round_end_restarts += 1;
        let idx = self.t.read;
        self.spawn("round end")?;
        self.wait_up(idx, &settled, "round-end restart").await?;
        println!(
            "round {r} done in {:.1} s: {ok} succeeded, {failed} failed ({rule} by the restart rule)",
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    }

    async fn run(&mut self) -> Result<(), Fatal> {
        self.start("first start").await?;
        let scenario_last = self.p.broker_round.max(self.p.pty_round);
        // Enough rounds for the kills, never endless.
        let max_rounds =
            scenario_last + 1 + 4 * self.p.kills.div_ceil(self.p.kills_per_round.max(1));
        while (self.aimed_kills() < self.p.kills || self.round <= scenario_last)
            && self.round < max_rounds
        {
            let r = self.round;
            self.run_round(Scenarios {
                broker: r == self.p.broker_round,
                pty: r == self.p.pty_round,
                damage: self.p.damage_with_pty && r == self.p.pty_round,
                disk: false,
            })
            .await?;
            self.round += 1;
        }
        // The store's loss and the full disk last: what they break would
        // otherwise colour every later round.
        if !self.p.damage_with_pty {
            self.run_round(Scenarios {
                damage: true,
                ..Scenarios::default()
            })
            .await?;
            self.round += 1;
        }
        self.run_round(Scenarios {
            disk: true,
            ..Scenarios::default()
        })
        .await?;
        self.round += 1;
        Ok(())
    }

    /// The whole record, checked notice by notice: terminal reports by id,
    /// progress after them; and bytes served per image.
    fn analyse(&mut self) -> Analysis {
        self.t.pump(&self.probe);
        let messages = self.probe.messages();
        let mut a = Analysis::default();
        // Notices per leaf by echo.
        let mut by_leaf: Vec<Vec<usize>> = vec![Vec::new(); self.names.len()];
        for (i, n) in self.t.notices.iter().enumerate() {
            if n.echo.is_some() {
                by_leaf[n.leaf].push(i);
            }
        }
        for v in &mut by_leaf {
            v.sort_by_key(|i| self.t.notices[*i].echo);
        }
        // (notice) -> id -> (payloads seen, first index)
        let mut terminals: HashMap<usize, Terminals> = HashMap::new();
        // Notice -> (progress messages after its terminal report, the first).
        let mut after_end: BTreeMap<usize, (usize, String)> = BTreeMap::new();
        let mut found: Vec<(Kind, Option<usize>, usize, String)> = Vec::new();
        for (idx, m) in messages.iter().enumerate() {
            let Some(rest) = m.topic.strip_prefix("/ota/device/progress/") else {
                continue;
            };
            let Some(dn) = rest.split('/').nth(1) else {
                continue;
            };
            let Some(&leaf) = self.t.names.get(dn) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else {
                found.push((
                    Kind::NotExplicit,
                    None,
                    leaf,
                    format!("progress that is not JSON: {}", m.text()),
                ));
                continue;
            };
            let Some(step) = parse_step(&v) else {
                found.push((
                    Kind::NotExplicit,
                    None,
                    leaf,
                    format!("progress without a step: {v}"),
                ));
                continue;
            };
            let owner = by_leaf[leaf]
                .iter()
                .rev()
                .find(|i| self.t.notices[**i].echo.is_some_and(|e| e < idx))
                .copied();
            let Some(owner) = owner else {
                found.push((
                    Kind::ProgressAfterEnd,
                    None,
                    leaf,
                    format!("progress before any notice: {v}"),
                ));
                continue;
            };
            let id = match &v["id"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let ts = terminals.entry(owner).or_default();
            if is_terminal(step) {
                a.terminal_messages += 1;
                let e = ts.entry(id).or_insert((Vec::new(), idx));
                e.0.push(m.payload.clone());
            } else if let Some(first) = ts.values().map(|(_, i)| *i).min()
                && first < idx
            {
                let e = after_end.entry(owner).or_insert((0, v.to_string()));
                e.0 += 1;
            }
        }
        for (owner, (n, first)) in &after_end {
            let notice = &self.t.notices[*owner];
            found.push((
                Kind::ProgressAfterEnd,
                Some(notice.round),
                notice.leaf,
                format!(
                    "{n} progress messages after the terminal report of its notice of {}, \
                     the first: {first}",
                    self.images[notice.image].version
                ),
            ));
        }
        for (owner, ids) in &terminals {
            let n = &self.t.notices[*owner];
            a.terminal_reports += ids.len();
            for (id, (payloads, _)) in ids {
                a.duplicates += payloads.len() - 1;
                if payloads.iter().any(|p| *p != payloads[0]) {
                    found.push((
                        Kind::TerminalReports,
                        Some(n.round),
                        n.leaf,
                        format!("terminal reports with the same id {id} but different payloads"),
                    ));
                }
            }
            if ids.len() > 1 {
                let all: Vec<String> = ids
                    .values()
                    .map(|(p, _)| String::from_utf8_lossy(&p[0]).into_owned())
                    .collect();
                found.push((
                    Kind::TerminalReports,
                    Some(n.round),
                    n.leaf,
                    format!(
                        "{} terminal reports for the notice of {} (different ids): {}",
                        ids.len(),
                        self.images[n.image].version,
                        all.join(" | ")
                    ),
                ));
            }
        }
        for (kind, round, leaf, what) in found {
            let v = Violation {
                kind,
                round,
                leaf: Some(self.names[leaf].clone()),
                what,
            };
            println!(
                "  VIOLATION [round {}] {}: {}",
                round.map_or("-".to_string(), |r| r.to_string()),
                self.names[leaf],
                v.what
            );
            self.violations.push(v);
        }
        for img in &self.images {
            let served = self.files.bytes_served(&img.name);
            let requests = self.files.requests(&img.name).len();
            let size = img.bytes.len() as u64;
            if served as f64 > FETCH_BOUND * size as f64 {
                let v = Violation {
                    kind: Kind::Bytes,
                    round: None,
                    leaf: None,
                    what: format!(
                        "image {} ({} bytes) was served {served} bytes ({:.2} x) in {requests} requests",
                        img.version,
                        size,
                        served as f64 / size as f64
                    ),
                };
                println!("  VIOLATION [image] {}", v.what);
                self.violations.push(v);
            }
            // Where each request started: 0, or the Range it resumed from.
            let starts: Vec<String> = self
                .files
                .requests(&img.name)
                .iter()
                .map(|r| {
                    r.range
                        .as_deref()
                        .and_then(|h| h.strip_prefix("bytes="))
                        .and_then(|h| h.split('-').next())
                        .unwrap_or("0")
                        .to_string()
                })
                .collect();
            a.images.push(ImageFigures {
                version: img.version.clone(),
                size,
                starts,
                served,
            });
        }
        a
    }

    async fn teardown(mut self) -> PathBuf {
        self.platform_stop.cancel();
        if let Some(gw) = self.gw.take() {
            gw.kill().await;
        }
        for leaf in std::mem::take(&mut self.leaves) {
            if let Some(sim) = leaf.sim {
                sim.shutdown().await;
            }
        }
        let keep = !self.violations.is_empty();
        if keep {
            // What the platform saw, and the store as the gateway left it.
            let record: Vec<String> = self
                .probe
                .messages()
                .iter()
                .enumerate()
                .map(|(i, m)| format!("{i} {} {}", m.topic, m.text()))
                .collect();
            let _ = std::fs::write(self.base.path().join("record.txt"), record.join("\n"));
            let _ = std::process::Command::new("cp")
                .arg("-a")
                .arg(self.data.path.join("db"))
                .arg(self.base.path().join("db-at-end"))
                .status();
        }
        let Campaign { base, data, .. } = self;
        drop(data);
        if keep { base.keep() } else { PathBuf::new() }
    }
}

/// A failure's `desc` for grouping: paths and numbers blanked, cut short.
fn reason(desc: &str) -> String {
    let words: Vec<String> = desc
        .split_whitespace()
        .map(|w| {
            if w.contains("/tmp/") || w.contains("/dev/pts/") {
                "PATH".to_string()
            } else {
                w.chars()
                    .map(|c| if c.is_ascii_digit() { '#' } else { c })
                    .collect()
            }
        })
        .collect();
    words.join(" ").chars().take(100).collect()
}

/// A failure by the gateway's designed rule: a flash survives one restart.
fn restart_rule(desc: &str) -> bool {
    let d = desc.to_lowercase();
    d.contains("restarted") && d.contains("during flashing")
}

/// Overwrite parts of the store's files with PRNG bytes: four 512-byte
/// ranges of the largest file (sled's log) and, one time in two (drawn),
/// one range of every other regular file too (snapshots, the
/// configuration); says what it did.
fn damage_store(db: &Path, rng: &mut fastrand::Rng) -> String {
    let everything = rng.bool();
    use std::io::{Seek, SeekFrom, Write};
    let mut files = Vec::new();
    let mut dirs = vec![db.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => dirs.push(p),
                Ok(t) if t.is_file() => {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    files.push((p, len));
                }
                _ => {}
            }
        }
    }
    files.sort();
    let Some(largest) = files.iter().max_by_key(|(_, l)| *l).map(|(p, _)| p.clone()) else {
        return "no store files found".into();
    };
    let mut done = Vec::new();
    for (p, len) in &files {
        if *len == 0 || (!everything && *p != largest) {
            continue;
        }
        let ranges = if *p == largest { 4 } else { 1 };
        let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(p) else {
            continue;
        };
        let mut offsets = Vec::new();
        for _ in 0..ranges {
            let n = 512.min(*len);
            let at = rng.u64(0..=len - n);
            let junk: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            if f.seek(SeekFrom::Start(at)).is_ok() && f.write_all(&junk).is_ok() {
                offsets.push(at);
            }
        }
        let name = p.strip_prefix(db).unwrap_or(p).display().to_string();
        done.push(format!("{name} ({len} B) at {offsets:?}"));
    }
    format!(
        "{}: {}",
        if everything {
            "the log and every other file"
        } else {
            "the log only"
        },
        done.join(", ")
    )
}

/// A notice's terminal reports: payload id -> (every payload seen with it,
/// record index of the first).
type Terminals = BTreeMap<String, (Vec<Vec<u8>>, usize)>;

/// (invariant, round, leaf): how the final list groups violations.
type ViolationKey = (Kind, Option<usize>, Option<String>);

/// What the HTTP server handed out for one image.
struct ImageFigures {
    version: String,
    size: u64,
    /// Per request, the byte it started from.
    starts: Vec<String>,
    served: u64,
}

#[derive(Default)]
struct Analysis {
    terminal_messages: usize,
    terminal_reports: usize,
    duplicates: usize,
    images: Vec<ImageFigures>,
}

fn print_figures(c: &Campaign, a: &Analysis, wall: Duration, kept: &Path) {
    println!();
    println!(
        "## seed {} — {} leaves, {} rounds, {} kills, run time {:.0} s",
        c.seed,
        c.names.len(),
        // Rounds started (the last may have been cut short).
        c.t.notices.iter().map(|n| n.round + 1).max().unwrap_or(0),
        c.kills.len(),
        wall.as_secs_f64()
    );
    println!();
    println!("{}", c.data.note);
    println!();
    println!("| kills by phase | kills | the API showed a job in that state |");
    println!("|---|---|---|");
    let mut phases: BTreeMap<Phase, (usize, usize, usize)> = BTreeMap::new();
    for k in &c.kills {
        let e = phases.entry(k.phase).or_default();
        e.0 += 1;
        match k.hit {
            Some(true) => e.1 += 1,
            Some(false) => e.2 += 1,
            None => {}
        }
    }
    for (p, (n, hit, miss)) in &phases {
        let hits = if p.api_state().is_some() {
            format!("{hit} of {}", hit + miss)
        } else if *p == Phase::Startup {
            let mut stages: BTreeMap<&str, usize> = BTreeMap::new();
            for k in c.kills.iter().filter(|k| k.phase == Phase::Startup) {
                *stages.entry(k.note.as_str()).or_default() += 1;
            }
            stages
                .iter()
                .map(|(s, n)| format!("{s}: {n}"))
                .collect::<Vec<_>>()
                .join("; ")
        } else if *p == Phase::Random {
            let mut from: BTreeMap<&str, usize> = BTreeMap::new();
            for k in c.kills.iter().filter(|k| k.phase == Phase::Random) {
                *from.entry(k.aimed.name()).or_default() += 1;
            }
            format!(
                "drawn as: {}",
                from.iter()
                    .map(|(s, n)| format!("{s} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            "-".into()
        };
        println!("| {} | {n} | {hits} |", p.name());
    }
    println!(
        "| round-end restarts (not counted above) | {} | - |",
        c.round_end_restarts
    );
    println!();
    let mut ok = 0;
    let mut stuck = 0;
    let mut unjudged = 0;
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    for n in &c.t.notices {
        if let Some(d) = n.ended_after {
            slowest = slowest.max(d);
        }
        match &n.outcome {
            Some(Outcome::Succeeded) => ok += 1,
            Some(Outcome::Failed { step, desc }) => {
                let tag = if restart_rule(desc) {
                    "(designed rule)".to_string()
                } else {
                    String::new()
                };
                *reasons
                    .entry(format!("{step} {} {tag}", reason(desc)))
                    .or_default() += 1;
            }
            Some(Outcome::Stuck) => stuck += 1,
            None => match &n.terminal {
                Some((_, step, desc)) => {
                    *reasons
                        .entry(format!(
                            "{step} {} (not judged: the run stopped)",
                            reason(desc)
                        ))
                        .or_default() += 1;
                }
                None => unjudged += 1,
            },
        }
    }
    println!("| notices | {} |", c.t.notices.len());
    println!("|---|---|");
    println!("| succeeded (inform of the new version, image checked) | {ok} |");
    for (r, n) in &reasons {
        println!("| failed: {} | {n} |", r.trim());
    }
    println!("| stuck (no end within the bound) | {stuck} |");
    if unjudged > 0 {
        println!("| no end yet when the run stopped | {unjudged} |");
    }
    println!(
        "| terminal reports (distinct ids) / messages / QoS-1 duplicates | {} / {} / {} |",
        a.terminal_reports, a.terminal_messages, a.duplicates
    );
    println!(
        "| slowest notice, publication to terminal report | {:.1} s |",
        slowest.as_secs_f64()
    );
    println!();
    println!("| image | size | requests (first byte of each) | bytes served | x size |");
    println!("|---|---|---|---|---|");
    for i in &a.images {
        println!(
            "| {} | {} | {} ({}) | {} | {:.3} |",
            i.version,
            i.size,
            i.starts.len(),
            i.starts.join(", "),
            i.served,
            i.served as f64 / i.size.max(1) as f64
        );
    }
    println!();
    for n in &c.notes {
        println!("- {n}");
    }
    println!();
    if !c.violations.is_empty() {
        println!("| invariant broken | violations | rounds | leaves |");
        println!("|---|---|---|---|");
        let mut kinds: BTreeMap<Kind, (usize, Vec<String>, Vec<String>)> = BTreeMap::new();
        for v in &c.violations {
            let e = kinds.entry(v.kind).or_default();
            e.0 += 1;
            let r = v.round.map_or("-".to_string(), |r| r.to_string());
            if !e.1.contains(&r) {
                e.1.push(r);
            }
            if let Some(l) = &v.leaf
                && !e.2.contains(l)
            {
                e.2.push(l.clone());
            }
        }
        for (k, (n, rounds, leaves)) in &mut kinds {
            leaves.sort();
            println!(
                "| {} | {n} | {} | {} |",
                k.name(),
                rounds.join(", "),
                if leaves.is_empty() {
                    "-".to_string()
                } else {
                    leaves.join(", ")
                }
            );
        }
        println!();
    }
    if c.violations.is_empty() {
        println!("every invariant held (seed {})", c.seed);
    } else {
        println!(
            "{} invariant violations (seed {}); gateway log, config, record.txt (every message) and db-at-end kept in {}",
            c.violations.len(),
            c.seed,
            kept.display()
        );
        // One line per (invariant, round, leaf): the first, and how many more.
        let mut seen: Vec<(ViolationKey, &Violation, usize)> = Vec::new();
        for v in &c.violations {
            let key = (v.kind, v.round, v.leaf.clone());
            match seen.iter_mut().find(|(k, _, _)| *k == key) {
                Some(e) => e.2 += 1,
                None => seen.push((key, v, 0)),
            }
        }
        for (_, v, more) in seen {
            println!(
                "  [round {}] {}: {}{}",
                v.round.map_or("-".to_string(), |r| r.to_string()),
                v.leaf.as_deref().unwrap_or("-"),
                v.what,
                if more > 0 {
                    format!(" (and {more} more of this kind for this leaf in this round)")
                } else {
                    String::new()
                }
            );
        }
    }
}

/// SIGINT or SIGTERM: the run stops and still cleans up (the gateway,
/// mosquitto, the simulators, the tmpfs).
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(Ask::Run(o)) => o,
        Ok(Ask::Skip) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let p = Params::new(&o);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        println!(
            "campaign: seed {}, {} leaves, at least {} kills, {} per round{}",
            o.seed,
            p.leaves,
            p.kills,
            p.kills_per_round,
            if o.quick { " (quick)" } else { "" }
        );
        let wall = std::time::Instant::now();
        let mut c = Campaign::new(p, o.seed).await;
        println!("{}", c.data.note);
        let outcome = tokio::select! {
            r = c.run() => r,
            _ = interrupted() => Err(Fatal("interrupted (SIGINT or SIGTERM)".into())),
        };
        if let Err(Fatal(why)) = outcome {
            c.violations.push(Violation {
                kind: Kind::Gateway,
                round: Some(c.round),
                leaf: None,
                what: format!("the campaign stopped: {why}"),
            });
            println!("  FATAL [round {}]: {why}", c.round);
        }
        let a = c.analyse();
        let wall = wall.elapsed();
        let failed = !c.violations.is_empty();
        // Print while the parts are still there, then clean up.
        let kept_hint = if failed {
            c.base.path().to_path_buf()
        } else {
            PathBuf::new()
        };
        print_figures(&c, &a, wall, &kept_hint);
        let kept = c.teardown().await;
        if failed {
            println!("kept: {}", kept.display());
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    })
}
