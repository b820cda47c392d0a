//! Issue 6, item 3 — fan-out: 1, 16, 64 and 256 simulated leaves upgraded at
//! once from one 256 KiB image through the daemon.
//!
//! ```sh
//! cargo bench -p otagw-e2e --bench fanout
//! OTAGW_BENCH_QUICK=1 cargo bench -p otagw-e2e --bench fanout   # N = 1, 16
//! OTAGW_FANOUT_N=256 cargo bench -p otagw-e2e --bench fanout    # chosen N
//! ```
//!
//! For each N, everything is fresh: a mosquitto on a loopback port (the
//! upstream; a separate process, so the broker's memory and CPU are not
//! counted as the gateway's), an HTTP file server serving the image, N XMODEM
//! bootloader simulators on real pseudo-terminals (unpaced) and the gateway as
//! its own process (`otagw run`, `[jobs] max_parallel = N`, default log level).
//! Once every leaf's on-connect inform (1.0.0) has arrived (the gateway's
//! subscriptions are then in place), the N upgrade notices are published back
//! to back and the bench waits, on MQTT messages, until every leaf has
//! reported progress 100 and informed 2.0.0. Measured on the gateway process:
//! wall time (first publish → last of those messages), CPU seconds
//! (utime+stime from /proc/PID/stat), VmRSS sampled every few ms during the
//! run (peak, and the baseline just before the first publish) and VmHWM (which
//! includes startup). Checked: every simulator holds exactly the image (plus
//! XMODEM padding) and runs 2.0.0, every job succeeded (status API, no
//! negative step), and the image was downloaded once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use otagw_e2e::*;

/// `otagw`, as a program of this package.
const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_otagw-e2e-gateway");
const IMAGE_SIZE: usize = 256 * 1024;
const IMAGE_NAME: &str = "fw-2.0.0.bin";
/// The issue's target for 256 concurrent leaves.
const TARGET_RSS: u64 = 256 << 20;
/// How often the sampler reads the gateway's VmRSS.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);
/// Upper bounds (never synchronisation).
const READY_LIMIT: Duration = Duration::from_secs(120);
const RUN_LIMIT: Duration = Duration::from_secs(900);

fn main() {
    let ns = leaf_counts();
    let clk_tck = clk_tck();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "fan-out: {} KiB image, xmodem-1K over pseudo-terminals (unpaced), upstream mosquitto, N = {ns:?}",
        IMAGE_SIZE / 1024
    );
    let mut rows = Vec::new();
    for n in ns {
        let row = rt.block_on(run(n, clk_tck));
        row.print_line();
        rows.push(row);
    }
    print_table(&rows);
}

/// N values: `OTAGW_FANOUT_N=1,16` or quick mode, else the issue's four.
fn leaf_counts() -> Vec<usize> {
    if let Ok(list) = std::env::var("OTAGW_FANOUT_N") {
        let ns: Vec<usize> = list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("OTAGW_FANOUT_N: numbers, e.g. 1,16")
            })
            .collect();
        assert!(ns.iter().all(|n| *n >= 1), "OTAGW_FANOUT_N: at least 1");
        return ns;
    }
    if std::env::var("OTAGW_BENCH_QUICK").is_ok_and(|v| v == "1") {
        vec![1, 16]
    } else {
        vec![1, 16, 64, 256]
    }
}

fn clk_tck() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("run getconf CLK_TCK");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("getconf CLK_TCK prints a number")
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // The command name may hold spaces: fields count from after its ')'.
    let rest = &stat[stat.rfind(')').expect("stat has (comm)") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `rest` starts at field 3.
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// Lines of /proc/PID/status the bench reads (sizes in KiB).
#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    size: u64,
    rss: u64,
    hwm: u64,
    anon: u64,
    file: u64,
    shmem: u64,
    threads: u64,
}

fn mem(pid: &str) -> Option<Mem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut m = Mem::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let v = || {
            value
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match key {
            "VmSize" => m.size = v(),
            "VmRSS" => m.rss = v(),
            "VmHWM" => m.hwm = v(),
            "RssAnon" => m.anon = v(),
            "RssFile" => m.file = v(),
            "RssShmem" => m.shmem = v(),
            "Threads" => m.threads = v(),
            _ => {}
        }
    }
    Some(m)
}

/// A thread reading the gateway's VmRSS every [`SAMPLE_EVERY`]; keeps the
/// sample with the highest RSS.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Mem, u64, u64)>,
}

impl Sampler {
    fn start(pid: &str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let pid = pid.to_string();
        let thread = std::thread::spawn(move || {
            let (mut peak, mut samples, mut threads) = (Mem::default(), 0u64, 0u64);
            loop {
                // One last sample after the stop flag, so the end is covered.
                let last = s.load(Ordering::Relaxed);
                if let Some(m) = mem(&pid) {
                    samples += 1;
                    threads = threads.max(m.threads);
                    if m.rss > peak.rss {
                        peak = m;
                    }
                }
                if last {
                    return (peak, samples, threads);
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        Sampler { stop, thread }
    }

    /// (the sample with the highest VmRSS, number of samples, most threads)
    fn finish(self) -> (Mem, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler thread")
    }
}

fn topic(kind: &str, dn: &str) -> String {
    format!("/ota/device/{kind}/{LEAF_PK}/{dn}")
}

/// What the upstream has seen of every leaf, read incrementally from the probe.
struct Tracker {
    index: HashMap<String, usize>,
    read: usize,
    old_inform: Vec<bool>,
    new_inform: Vec<bool>,
    done: Vec<bool>,
    progress_messages: usize,
    /// When each leaf's first progress report and its completion arrived.
    started: Vec<Option<Instant>>,
    finished: Vec<Option<Instant>>,
    /// When the last leaf completed (its inform 2.0.0 and progress 100 both seen).
    last_done: Option<Instant>,
    failures: Vec<String>,
}

impl Tracker {
    fn new(names: &[String]) -> Tracker {
        let n = names.len();
        Tracker {
            index: names
                .iter()
                .enumerate()
                .map(|(i, s)| (s.clone(), i))
                .collect(),
            read: 0,
            old_inform: vec![false; n],
            new_inform: vec![false; n],
            done: vec![false; n],
            progress_messages: 0,
            started: vec![None; n],
            finished: vec![None; n],
            last_done: None,
            failures: Vec::new(),
        }
    }

    fn pump(&mut self, probe: &MqttProbe) {
        let new = probe.messages_from(self.read);
        self.read += new.len();
        let now = Instant::now();
        for m in new {
            let mut parts = m.topic.rsplit('/');
            let (Some(dn), Some(_pk), Some(kind)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Some(&i) = self.index.get(dn) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
                self.failures
                    .push(format!("{}: not JSON: {}", m.topic, m.text()));
                continue;
            };
            match kind {
                "inform" => match v["params"]["version"].as_str() {
                    Some("1.0.0") => self.old_inform[i] = true,
                    Some("2.0.0") => self.new_inform[i] = true,
                    _ => self.failures.push(format!("{dn}: inform {v}")),
                },
                "progress" => {
                    self.progress_messages += 1;
                    self.started[i].get_or_insert(now);
                    let step = v["params"]["step"].as_str().unwrap_or_default();
                    if step == "100" {
                        self.done[i] = true;
                    } else if step.starts_with('-') {
                        self.failures.push(format!("{dn}: progress {v}"));
                    }
                }
                _ => {}
            }
            if self.new_inform[i] && self.done[i] && self.finished[i].is_none() {
                self.finished[i] = Some(now);
                if self.all_done() {
                    self.last_done = Some(now);
                }
            }
        }
    }

    /// The most leaves between their first progress report and their
    /// completion at one moment (how many jobs really ran at once).
    fn max_overlap(&self) -> usize {
        let mut edges: Vec<(Instant, i32)> = Vec::new();
        for (s, f) in self.started.iter().zip(&self.finished) {
            if let (Some(s), Some(f)) = (s, f) {
                edges.push((*s, 1));
                edges.push((*f, -1));
            }
        }
        // At equal instants, ends before starts.
        edges.sort();
        let (mut now, mut max) = (0i32, 0i32);
        for (_, d) in edges {
            now += d;
            max = max.max(now);
        }
        max as usize
    }

    fn all_ready(&self) -> bool {
        self.old_inform.iter().all(|b| *b)
    }

    fn all_done(&self) -> bool {
        self.new_inform.iter().all(|b| *b) && self.done.iter().all(|b| *b)
    }

    /// Read messages as they come until `cond` holds; panics on a failure
    /// report or at `limit`.
    async fn wait(
        &mut self,
        probe: &MqttProbe,
        limit: Duration,
        what: &str,
        cond: fn(&Tracker) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.pump(probe);
            assert!(
                self.failures.is_empty(),
                "while waiting for {what}: {:#?}",
                self.failures
            );
            if cond(self) {
                return;
            }
            if !probe.wait_beyond(self.read, deadline).await {
                let missing: Vec<&String> = self
                    .index
                    .iter()
                    .filter(|(_, i)| !(self.new_inform[**i] && self.done[**i]))
                    .map(|(n, _)| n)
                    .take(10)
                    .collect();
                panic!("timed out after {limit:?} waiting for {what} (e.g. {missing:?})");
            }
        }
    }
}

/// One N's figures.
struct Row {
    n: usize,
    wall: Duration,
    publish: Duration,
    cpu_s: f64,
    bench_cpu_s: f64,
    baseline: Mem,
    peak: Mem,
    end: Mem,
    samples: u64,
    threads: u64,
    downloads: usize,
    progress_messages: usize,
    concurrent: usize,
}

/// /proc sizes are in KiB.
const KIB_PER_MIB: f64 = 1024.0;

impl Row {
    fn rss_per_job_kib(&self) -> f64 {
        self.peak.rss.saturating_sub(self.baseline.rss) as f64 / self.n as f64
    }

    fn print_line(&self) {
        let mib = |k: u64| k as f64 / KIB_PER_MIB;
        let (b, p) = (&self.baseline, &self.peak);
        println!(
            "N={}: wall {:.2} s (notices published in {:.1} ms), at most {} jobs at once; \
             gateway CPU {:.2} s, bench process (simulators, probe, HTTP) CPU {:.2} s",
            self.n,
            self.wall.as_secs_f64(),
            self.publish.as_secs_f64() * 1e3,
            self.concurrent,
            self.cpu_s,
            self.bench_cpu_s,
        );
        println!(
            "      RSS before {:.1} MiB (anon {:.1}, file {:.1}, shmem {:.1}) -> peak {:.1} MiB \
             (anon {:.1}, file {:.1}, shmem {:.1}); VmHWM {:.1} MiB; VmSize at peak {:.0} GiB; \
             threads {}; {} samples; {} progress messages; downloads {}",
            mib(b.rss),
            mib(b.anon),
            mib(b.file),
            mib(b.shmem),
            mib(p.rss),
            mib(p.anon),
            mib(p.file),
            mib(p.shmem),
            mib(self.end.hwm),
            p.size as f64 / KIB_PER_MIB / KIB_PER_MIB,
            self.threads,
            self.samples,
            self.progress_messages,
            self.downloads,
        );
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| leaves | jobs at once | wall | leaves/s | gateway CPU | CPU per leaf | RSS before | peak RSS in run | VmHWM | RSS per job | downloads |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.2} s | {:.1} | {:.2} s | {:.1} ms | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.0} KiB | {} |",
            r.n,
            r.concurrent,
            r.wall.as_secs_f64(),
            r.n as f64 / r.wall.as_secs_f64(),
            r.cpu_s,
            r.cpu_s * 1e3 / r.n as f64,
            r.baseline.rss as f64 / KIB_PER_MIB,
            r.peak.rss as f64 / KIB_PER_MIB,
            r.end.hwm as f64 / KIB_PER_MIB,
            r.rss_per_job_kib(),
            r.downloads,
        );
    }
    println!();
    let Some(big) = rows.iter().max_by_key(|r| r.n) else {
        return;
    };
    let peak = (big.peak.rss << 10) as f64;
    let hwm = (big.end.hwm << 10) as f64;
    let target = TARGET_RSS as f64;
    println!(
        "N={}: peak VmRSS during the run {:.1} MiB = {:.3} x the 256 MiB target -> {}; \
         VmHWM (with startup) {:.1} MiB = {:.3} x",
        big.n,
        peak / (1 << 20) as f64,
        peak / target,
        if peak < target { "met" } else { "MISSED" },
        hwm / (1 << 20) as f64,
        hwm / target,
    );
    if let Some(one) = rows.iter().find(|r| r.n == 1)
        && big.n > 1
    {
        println!(
            "N={} against N=1: wall x{:.2} for x{} the leaves",
            big.n,
            big.wall.as_secs_f64() / one.wall.as_secs_f64(),
            big.n,
        );
    }
    // Per-leaf figures against N=16: at N=1 the CPU is one or two clock
    // ticks and the RSS growth is mostly first-use (threads, caches).
    if let Some(small) = rows.iter().find(|r| r.n == 16)
        && big.n > 16
    {
        println!(
            "N={} against N=16: gateway CPU per leaf x{:.2}, RSS per job x{:.2}",
            big.n,
            (big.cpu_s / big.n as f64) / (small.cpu_s / small.n as f64).max(1e-9),
            big.rss_per_job_kib() / small.rss_per_job_kib().max(1e-9),
        );
    }
    println!(
        "downloads of the image: {:?} (must all be 1)",
        rows.iter().map(|r| r.downloads).collect::<Vec<_>>()
    );
}

async fn run(n: usize, clk_tck: u64) -> Row {
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), &format!("/ota/device/+/{LEAF_PK}/+")).await;
    let files = FileServer::start().await;
    let img = versioned_image(IMAGE_SIZE, "2.0.0");
    let url = files.add(IMAGE_NAME, img.clone());
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let dir = tempfile::tempdir().expect("temporary directory");

    let sims: Vec<PtySim> = (0..n)
        .map(|_| PtySim::spawn(xmodem_device()).expect("a simulator on a pty"))
        .collect();
    let names: Vec<String> = (0..n).map(|i| format!("leaf-{i:03}")).collect();
    let leaves: Vec<LeafSpec> = names
        .iter()
        .zip(&sims)
        .map(|(name, sim)| LeafSpec::xmodem(name, &sim.url()))
        .collect();
    let base = gateway_config(
        &dir.path().join("data"),
        plugins.path(),
        Some(&broker.url()),
        &leaves,
    );
    // Every job at once; the job deadline must not be what is measured.
    let mut config = base.replace("job_deadline = \"2m\"", "job_deadline = \"30m\"");
    assert_ne!(config, base, "gateway_config's job deadline moved");
    config.push_str(&format!("[jobs]\nmax_parallel = {n}\n"));
    let gw = GatewayProcess::start_with_log(
        GATEWAY_BIN,
        &config,
        &dir.path().join("otagw.toml"),
        // The gateway's own default filter (`otagw::cli::main`).
        "warn,rumqttd::server::broker=off",
    )
    .await;
    let pid = gw.pid().to_string();

    let mut tracker = Tracker::new(&names);
    tracker
        .wait(&probe, READY_LIMIT, "every leaf's inform of 1.0.0", |t| {
            t.all_ready()
        })
        .await;
    // Built before the clock starts (md5sum runs once per notice).
    let notices: Vec<(String, String)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            (
                topic("upgrade", name),
                notice(1000 + i as u64, "2.0.0", &url, &img),
            )
        })
        .collect();

    let baseline = mem(&pid).expect("gateway status");
    let ticks0 = cpu_ticks(&pid);
    let self0 = cpu_ticks("self");
    let sampler = Sampler::start(&pid);
    let t0 = Instant::now();
    for (t, payload) in notices {
        probe.publish(&t, payload).await;
    }
    let publish = t0.elapsed();
    tracker
        .wait(
            &probe,
            RUN_LIMIT,
            "every leaf's progress 100 and inform of 2.0.0",
            Tracker::all_done,
        )
        .await;
    let wall = tracker.last_done.expect("all done") - t0;
    let ticks1 = cpu_ticks(&pid);
    let self1 = cpu_ticks("self");
    let (peak, samples, threads) = sampler.finish();
    let end = mem(&pid).expect("gateway status");

    // Correctness: the devices, the jobs, the download.
    for (name, sim) in names.iter().zip(&sims) {
        let got = tokio::time::timeout(Duration::from_secs(10), sim.handle().next_image())
            .await
            .unwrap_or_else(|_| panic!("{name}: the simulator holds no image"));
        assert_padded(&got.data, &img, 0x1a);
        assert_eq!(sim.handle().version(), "2.0.0", "{name}");
        assert_eq!(sim.handle().images_received(), 1, "{name}");
    }
    let jobs = http_get_json(gw.api, "/api/jobs").await;
    let jobs = jobs.as_array().expect("/api/jobs is an array");
    assert_eq!(jobs.len(), n, "{jobs:?}");
    for j in jobs {
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(j["target_version"], "2.0.0", "{j}");
    }
    let requests = files.requests(IMAGE_NAME);
    let downloads = requests.len();
    assert_eq!(downloads, 1, "one download for {n} leaves: {requests:?}");

    gw.kill().await;
    for sim in sims {
        sim.shutdown().await;
    }
    drop((probe, files, broker, plugins, dir));

    Row {
        n,
        wall,
        publish,
        cpu_s: (ticks1 - ticks0) as f64 / clk_tck as f64,
        bench_cpu_s: (self1 - self0) as f64 / clk_tck as f64,
        baseline,
        peak,
        end,
        samples,
        threads,
        downloads,
        progress_messages: tracker.progress_messages,
        concurrent: tracker.max_overlap(),
    }
}
