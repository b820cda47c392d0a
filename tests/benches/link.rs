//! Issue 6, item 1: link efficiency against the physical limit.
//!
//! ```sh
//! cargo bench -p otagw-e2e --bench link
//! OTAGW_BENCH_QUICK=1 cargo bench -p otagw-e2e --bench link   # 128 KiB, one run each
//! ```
//!
//! The real xmodem and smp plugins flash an image (1 MiB by default, `OTAGW_BENCH_SIZE`
//! bytes otherwise) into the leaf simulators on real pseudo-terminals, paced at 115200 and
//! 921600 baud, 8N1 (10 bits a byte). The flash runs in process through
//! `otagw::flash::flash`, exactly what `otagw flash` runs (verify, open the link, flash,
//! identify) minus its progress bar, with the plugins loaded once from a warm compile cache.
//! The job's progress events time the transfer phase (the first `transfer` progress report,
//! sent before the first data block or upload request, to the one that reports every byte
//! acknowledged).
//!
//! For each (plugin, device buffer, baud): wall time of the whole job and of the transfer,
//! payload throughput (image bytes / transfer time), the wire rate (baud / 10 bytes/s), the
//! efficiency (throughput / wire rate), the protocol's ceiling for that efficiency (image
//! bytes / bytes the transfer puts on the wire both ways: XMODEM-1K frames of 1029 bytes and
//! an ACK each; for SMP the request and answer frames the simulator counted) and efficiency /
//! ceiling, which is the fraction of the transfer window the wire is busy. The remainder,
//! per exchange, is the turnaround of the gateway (host, plugin, link) plus the simulator's.
//!
//! `OTAGW_BENCH_RUNS` sets the runs at 921600 baud (default 3, median reported); 115200 runs
//! once. `OTAGW_BENCH_SMP_BUFS` (default `384,2048`) lists the SMP devices' MCUmgr buffer sizes.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use otagw::plugin::{ImageSource, JobMeta, Limits, PluginHost};
use otagw::progress::{JobEvent, Phase};
use otagw_e2e::{
    PluginsDir, PtySim, SmpSimConfig, XmodemSimConfig, artifacts, image, imgtool, reference,
};

const BAUDS: [u32; 2] = [115_200, 921_600];
/// XMODEM-1K: STX, block number, its complement, 1024 bytes, CRC-16; then the ACK.
const XMODEM_FRAME: u64 = 1024 + 5;
const XMODEM_EXCHANGE: u64 = XMODEM_FRAME + 1;

fn main() -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("link bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

struct Settings {
    size: usize,
    runs_fast: usize,
    smp_bufs: Vec<usize>,
}

impl Settings {
    fn from_env() -> Self {
        let quick = std::env::var("OTAGW_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let size = env_usize("OTAGW_BENCH_SIZE").unwrap_or(if quick { 128 << 10 } else { 1 << 20 });
        let runs_fast = env_usize("OTAGW_BENCH_RUNS")
            .unwrap_or(if quick { 1 } else { 3 })
            .max(1);
        let smp_bufs = std::env::var("OTAGW_BENCH_SMP_BUFS")
            .ok()
            .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![384, 2048]);
        Self {
            size,
            runs_fast,
            smp_bufs,
        }
    }

    fn runs(&self, baud: u32) -> usize {
        if baud <= 115_200 { 1 } else { self.runs_fast }
    }
}

/// One measured flash.
#[derive(Clone, Debug)]
struct Run {
    job: Duration,
    transfer: Duration,
    /// Image bytes.
    bytes: u64,
    /// Data blocks or upload requests in the transfer.
    exchanges: u64,
    /// Bytes the transfer put on the wire, both directions.
    wire_bytes: u64,
    /// Image bytes per block or request (mean).
    chunk: u64,
}

/// A table row: the median run of one configuration.
struct Row {
    what: String,
    baud: u32,
    runs: usize,
    run: Run,
}

impl Row {
    fn wire_rate(&self) -> f64 {
        f64::from(self.baud) / 10.0
    }
    fn throughput(&self) -> f64 {
        self.run.bytes as f64 / self.run.transfer.as_secs_f64()
    }
    fn efficiency(&self) -> f64 {
        self.throughput() / self.wire_rate()
    }
    fn job_efficiency(&self) -> f64 {
        self.run.bytes as f64 / self.run.job.as_secs_f64() / self.wire_rate()
    }
    fn ceiling(&self) -> f64 {
        self.run.bytes as f64 / self.run.wire_bytes as f64
    }
    /// Mean time per exchange beyond the wire time.
    fn overhead(&self) -> Duration {
        let wire = self.run.wire_bytes as f64 * 10.0 / f64::from(self.baud);
        let extra = (self.run.transfer.as_secs_f64() - wire).max(0.0);
        Duration::from_secs_f64(extra / self.run.exchanges.max(1) as f64)
    }
}

async fn run() -> Result<(), String> {
    let s = Settings::from_env();
    machine();
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let plugins = PluginsDir::with(&[artifacts::XMODEM, artifacts::SMP]);
    let cache = work.path().join("compiled");
    // Compile once into the cache, then load from it as a warm gateway does.
    for _ in 0..2 {
        load(&plugins, &cache).await?;
    }
    let host = load(&plugins, &cache).await?;
    println!(
        "flash path: otagw::flash::flash in process (verify, open the link, flash, identify), \
         plugins from a warm compile cache"
    );

    let xmodem_img = image(s.size, 1);
    let smp = if imgtool_available() {
        Some(smp_image(work.path(), s.size)?)
    } else {
        println!("imgtool not found (pip install imgtool): the SMP rows are skipped");
        None
    };
    println!(
        "images: xmodem {} bytes{}\n",
        xmodem_img.len(),
        smp.as_ref()
            .map(|(img, _)| format!(
                ", smp {} bytes (imgtool, ed25519-signed, version 2.0.0)",
                img.len()
            ))
            .unwrap_or_default()
    );

    let mut rows = Vec::new();
    for baud in BAUDS {
        let runs = s.runs(baud);
        let mut xs = Vec::new();
        for i in 0..runs {
            let r = xmodem_run(&host, &xmodem_img, baud).await?;
            report_run("xmodem-1K", baud, i, runs, &r);
            xs.push(r);
        }
        rows.push(Row {
            what: "xmodem-1K".into(),
            baud,
            runs,
            run: median(xs),
        });
        let mut xs = Vec::new();
        for i in 0..runs {
            let r = reference_run(&xmodem_img, baud).await?;
            report_run(REFERENCE, baud, i, runs, &r);
            xs.push(r);
        }
        rows.push(Row {
            what: REFERENCE.into(),
            baud,
            runs,
            run: median(xs),
        });
        if let Some((img, key)) = &smp {
            for &buf in &s.smp_bufs {
                let what = format!("smp buf {buf}");
                let mut xs = Vec::new();
                for i in 0..runs {
                    let r = smp_run(&host, img, key, buf, baud).await?;
                    report_run(&what, baud, i, runs, &r);
                    xs.push(r);
                }
                rows.push(Row {
                    what,
                    baud,
                    runs,
                    run: median(xs),
                });
            }
        }
    }
    table(&rows);
    Ok(())
}

fn machine() {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    println!("# link efficiency (issue 6, item 1)\nnproc {nproc}, cpu {cpu}, kernel {kernel}");
}

async fn load(plugins: &PluginsDir, cache: &std::path::Path) -> Result<PluginHost, String> {
    let host = PluginHost::new(Limits::default(), Some(cache.to_path_buf()))
        .map_err(|e| format!("plugin host: {e}"))?;
    let report = host
        .load_dir(plugins.path())
        .await
        .map_err(|e| format!("load plugins: {e}"))?;
    if !report.failed.is_empty() {
        return Err(format!("broken plugins: {:?}", report.failed));
    }
    Ok(host)
}

fn imgtool_available() -> bool {
    std::process::Command::new("python3")
        .args(["-m", "imgtool.main", "version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// An Ed25519-signed MCUboot image of about `size` bytes in all, and the key option.
fn smp_image(dir: &std::path::Path, size: usize) -> Result<(Vec<u8>, String), String> {
    let key = imgtool::keygen(dir, "ed25519");
    // Header 0x200 + payload + TLVs (hash, key hash, signature: ~150 bytes).
    let payload = image(size.saturating_sub(0x200 + 0x100).max(1024), 2);
    let img = imgtool::sign(dir, &key, &payload, "2.0.0");
    let hex = imgtool::public_key_hex(&key, "ed25519");
    Ok((img, format!("public_key={hex}")))
}

/// The job's wall time, its transfer phase and its log, around `otagw::flash::flash`.
struct Timed {
    job: Duration,
    transfer: Duration,
}

async fn flash_timed(
    host: &PluginHost,
    family: &str,
    url: &str,
    img: &[u8],
    options: Vec<(String, String)>,
) -> Result<Timed, String> {
    let src: Arc<dyn ImageSource> = Arc::new(img.to_vec());
    let meta = JobMeta {
        version: Some("2.0.0".into()),
        module: "default".into(),
        options,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let collector = tokio::spawn(async move {
        let (mut start, mut end, mut logs) = (None, None, Vec::new());
        while let Some(ev) = rx.recv().await {
            let now = Instant::now();
            match ev {
                JobEvent::Progress {
                    done,
                    total,
                    phase: Phase::Transfer,
                } => {
                    start.get_or_insert(now);
                    if done >= total && total > 0 {
                        end.get_or_insert(now);
                    }
                }
                JobEvent::Log { message, .. } => logs.push(message),
                JobEvent::Progress { .. } => {}
            }
        }
        (start, end, logs)
    });
    // A generous bound: never a synchronisation, only a stop for a hung job.
    let bound = Duration::from_secs(600);
    let t0 = Instant::now();
    let result = tokio::time::timeout(
        bound,
        otagw::flash::flash(host, family, url, src, &meta, Some(tx)),
    )
    .await;
    let job = t0.elapsed();
    let (start, end, logs) = collector.await.map_err(|e| e.to_string())?;
    match result {
        Err(_) => return Err(format!("{family}: no result within {bound:?}")),
        Ok(Err(e)) => return Err(format!("{family}: flash failed: {e}; log: {logs:?}")),
        Ok(Ok(_)) => {}
    }
    let (Some(start), Some(end)) = (start, end) else {
        return Err(format!("{family}: no transfer progress reported"));
    };
    Ok(Timed {
        job,
        transfer: end - start,
    })
}

async fn xmodem_run(host: &PluginHost, img: &[u8], baud: u32) -> Result<Run, String> {
    let sim = PtySim::spawn(XmodemSimConfig {
        line_rate: Some(baud),
        ..XmodemSimConfig::default()
    })
    .map_err(|e| format!("xmodem simulator: {e}"))?;
    let t = flash_timed(host, "xmodem", &sim.url(), img, Vec::new()).await?;
    let got = tokio::time::timeout(Duration::from_secs(10), sim.handle().next_image())
        .await
        .map_err(|_| "xmodem: the simulator holds no image after the flash".to_owned())?;
    sim.shutdown().await;
    reference::check_padded(&got.data, img, reference::PAD)?;
    let blocks = u64::from(got.blocks);
    if got.data.len() as u64 != blocks * 1024 {
        return Err(format!(
            "xmodem: {} blocks for {} bytes: not XMODEM-1K",
            blocks,
            got.data.len()
        ));
    }
    Ok(Run {
        job: t.job,
        transfer: t.transfer,
        bytes: img.len() as u64,
        exchanges: blocks,
        wire_bytes: blocks * XMODEM_EXCHANGE,
        chunk: 1024,
    })
}

/// The same XMODEM-1K transfer into the same paced simulator by a minimal sender in this
/// process (a blocking thread, no gateway): the floor the simulator itself sets.
const REFERENCE: &str = "xmodem-1K, minimal sender (no gateway)";

async fn reference_run(img: &[u8], baud: u32) -> Result<Run, String> {
    let sim = PtySim::spawn(XmodemSimConfig {
        line_rate: Some(baud),
        ..XmodemSimConfig::default()
    })
    .map_err(|e| format!("xmodem simulator: {e}"))?;
    let path = sim.path().to_path_buf();
    let data = img.to_vec();
    let t0 = Instant::now();
    let sender =
        tokio::task::spawn_blocking(move || reference::send(&path, &data).map(|s| s.transfer));
    let transfer = tokio::time::timeout(Duration::from_secs(600), sender)
        .await
        .map_err(|_| "reference sender: no result within 600 s".to_owned())?
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("reference sender: {e}"))?;
    let job = t0.elapsed();
    let got = tokio::time::timeout(Duration::from_secs(10), sim.handle().next_image())
        .await
        .map_err(|_| "reference: the simulator holds no image".to_owned())?;
    sim.shutdown().await;
    reference::check_padded(&got.data, img, reference::PAD)?;
    let blocks = u64::from(got.blocks);
    Ok(Run {
        job,
        transfer,
        bytes: img.len() as u64,
        exchanges: blocks,
        wire_bytes: blocks * XMODEM_EXCHANGE,
        chunk: 1024,
    })
}

async fn smp_run(
    host: &PluginHost,
    img: &[u8],
    key: &str,
    buf: usize,
    baud: u32,
) -> Result<Run, String> {
    let sim = PtySim::spawn_smp(SmpSimConfig {
        version: "1.0.0".into(),
        buf_size: buf,
        line_rate: Some(baud),
        ..SmpSimConfig::default()
    })
    .map_err(|e| format!("smp simulator: {e}"))?;
    let (k, v) = key.split_once('=').unwrap_or((key, ""));
    let t = flash_timed(
        host,
        "smp",
        &sim.url(),
        img,
        vec![(k.to_owned(), v.to_owned())],
    )
    .await?;
    let h = sim.handle().clone();
    sim.shutdown().await;
    let slot0 = h.slot0();
    if slot0.version != "2.0.0" || !slot0.confirmed || slot0.data.get(..img.len()) != Some(img) {
        return Err(format!(
            "smp: the device does not run the image confirmed: {slot0:?}"
        ));
    }
    let (rx, tx) = h.upload_wire_bytes();
    // Mean image bytes per upload request (the first carries len and sha, the last the rest).
    let chunk = h.upload_bytes().div_ceil(h.upload_chunks().max(1));
    Ok(Run {
        job: t.job,
        transfer: t.transfer,
        bytes: img.len() as u64,
        exchanges: h.upload_chunks(),
        wire_bytes: rx + tx,
        chunk,
    })
}

fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by_key(|r| r.transfer);
    runs[runs.len() / 2].clone()
}

fn report_run(what: &str, baud: u32, i: usize, n: usize, r: &Run) {
    let row = Row {
        what: what.into(),
        baud,
        runs: 1,
        run: r.clone(),
    };
    println!(
        "  {what} @ {baud}: run {}/{n}: job {:.2} s, transfer {:.2} s, efficiency {:.3}, \
         / ceiling {:.3}, {} exchanges, +{} µs each",
        i + 1,
        r.job.as_secs_f64(),
        r.transfer.as_secs_f64(),
        row.efficiency(),
        row.efficiency() / row.ceiling(),
        r.exchanges,
        row.overhead().as_micros()
    );
}

fn table(rows: &[Row]) {
    println!();
    println!(
        "| plugin | baud | runs | chunk | job wall | transfer | throughput | wire rate | efficiency | job eff. | ceiling | eff. / ceiling | beyond wire / exchange |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} B | {:.2} s | {:.2} s | {:.0} B/s | {:.0} B/s | **{:.3}** | {:.3} | {:.3} | **{:.3}** | {} µs |",
            r.what,
            r.baud,
            r.runs,
            r.run.chunk,
            r.run.job.as_secs_f64(),
            r.run.transfer.as_secs_f64(),
            r.throughput(),
            r.wire_rate(),
            r.efficiency(),
            r.job_efficiency(),
            r.ceiling(),
            r.efficiency() / r.ceiling(),
            r.overhead().as_micros(),
        );
    }
    println!(
        "\nefficiency = image bytes / transfer time / (baud / 10); job eff. uses the whole job \
         (handshake, verify, and for SMP test/reset/confirm); ceiling = image bytes / wire bytes \
         of the transfer both ways (XMODEM-1K: 1029-byte frames + ACK; SMP: the frames the \
         simulator counted); eff. / ceiling = share of the transfer time the wire is busy.\n\
         targets: xmodem-1K efficiency >= 0.95; smp >= 0.90 of its ceiling (base64 console \
         framing caps SMP below 0.75 of the wire)."
    );
}
