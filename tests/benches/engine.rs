//! Issue 16: what the Pulley interpreter costs. Cranelift has no 32-bit ARM
//! backend, so armv7 gateways run every plugin on wasmtime's portable
//! interpreter; here both engines run the same plugins on the same machine,
//! in the same run, and each Pulley figure is a ratio to the native one.
//!
//! ```sh
//! cargo bench -p otagw-e2e --bench engine
//! OTAGW_BENCH_QUICK=1 cargo bench -p otagw-e2e --bench engine   # no 115200-baud runs
//! ```
//!
//! - **compile**: a new host loads the xmodem, smp and stm32 plugins with an
//!   empty compile cache (Cranelift to machine code, or to Pulley bytecode);
//! - **session start**: `host.session("xmodem")`, a fresh instance from the
//!   cached `InstancePre` (what every job does first), 2,000 times;
//! - **flash, unpaced**: 1 MiB over XMODEM-1K into the simulator on a real
//!   pseudo-terminal with no line rate, so the gateway's side (plugin, host,
//!   pty) is all the time there is: the interpreter's worst case. 3 runs,
//!   median; with the process's CPU time (gateway and simulator together);
//! - **flash at 115200 baud**: the same through a pty paced like a real UART
//!   (about 91 s of wire time), one run each: what an operator would see.
//!
//! On a machine without a native backend (armv7) only Pulley is measured.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use otagw::plugin::{EngineKind, ImageSource, JobMeta, Limits, LoadedFrom, PluginHost};
use otagw_e2e::{PluginsDir, PtySim, XmodemSimConfig, artifacts, image, reference};

const SESSIONS: usize = 2_000;
const IMAGE: usize = 1 << 20;
const UNPACED_RUNS: usize = 3;

fn main() -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("engine bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    compile: Duration,
    session: Duration,
    unpaced: Duration,
    unpaced_cpu: Duration,
    paced: Option<Duration>,
}

async fn run() -> Result<(), String> {
    let quick = std::env::var_os("OTAGW_BENCH_QUICK").is_some();
    let plugins = PluginsDir::with(&[artifacts::XMODEM, artifacts::SMP, artifacts::STM32]);
    let engines: &[EngineKind] = if EngineKind::native_available() {
        &[EngineKind::Native, EngineKind::Pulley]
    } else {
        &[EngineKind::Pulley]
    };
    let img = image(IMAGE, 16);
    let mut results = Vec::new();
    for &engine in engines {
        eprintln!("measuring {engine}");
        results.push((engine, measure(engine, &plugins, &img, quick).await?));
    }

    let native = results
        .iter()
        .find(|(e, _)| *e == EngineKind::Native)
        .map(|(_, f)| *f);
    println!();
    println!(
        "plugin engines: {}, {} on {}",
        results.len(),
        std::env::consts::ARCH,
        machine()
    );
    println!(
        "| {:<48} | {:>14} | {:>14} | {:>15} |",
        "measure", "native", "pulley", "pulley / native"
    );
    println!("|{:-<50}|{:-<16}|{:-<16}|{:-<17}|", "", "", "", "");
    let pulley = results
        .iter()
        .find(|(e, _)| *e == EngineKind::Pulley)
        .map(|(_, f)| *f)
        .expect("pulley measured");
    let row = |what: &str, f: fn(&Figures) -> Option<Duration>, unit: &str| {
        let n = native.as_ref().and_then(f);
        let p = f(&pulley);
        let show = |d: Option<Duration>| match (d, unit) {
            (Some(d), "us") => format!("{:.1} us", d.as_secs_f64() * 1e6),
            (Some(d), "ms") => format!("{:.1} ms", d.as_secs_f64() * 1e3),
            (Some(d), _) => format!("{:.2} s", d.as_secs_f64()),
            (None, _) => "-".into(),
        };
        let ratio = match (n, p) {
            (Some(n), Some(p)) => format!("{:.3}", p.as_secs_f64() / n.as_secs_f64()),
            _ => "-".into(),
        };
        println!(
            "| {:<48} | {:>14} | {:>14} | {:>15} |",
            what,
            show(n),
            show(p),
            ratio
        );
    };
    row(
        "compile xmodem+smp+stm32 (cold load)",
        |f| Some(f.compile),
        "ms",
    );
    row(
        &format!("session start, median of {SESSIONS}"),
        |f| Some(f.session),
        "us",
    );
    row(
        &format!("1 MiB XMODEM-1K flash, unpaced pty, median of {UNPACED_RUNS}"),
        |f| Some(f.unpaced),
        "s",
    );
    row(
        "  CPU time of that flash (gateway + simulator)",
        |f| Some(f.unpaced_cpu),
        "s",
    );
    row("1 MiB XMODEM-1K flash at 115200 baud", |f| f.paced, "s");
    println!();
    Ok(())
}

async fn measure(
    engine: EngineKind,
    plugins: &PluginsDir,
    img: &[u8],
    quick: bool,
) -> Result<Figures, String> {
    let cache = tempfile::tempdir().map_err(|e| e.to_string())?;
    let t = Instant::now();
    let host = load(engine, plugins.path(), cache.path()).await?;
    let compile = t.elapsed();

    for _ in 0..200 {
        drop(
            host.session("xmodem", None)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let mut sessions = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        let t = Instant::now();
        let s = host
            .session("xmodem", None)
            .await
            .map_err(|e| e.to_string())?;
        sessions.push(t.elapsed());
        drop(s);
    }
    sessions.sort();

    let mut unpaced = Vec::new();
    for _ in 0..UNPACED_RUNS {
        unpaced.push(flash(&host, img, None).await?);
    }
    unpaced.sort();
    let paced = if quick {
        None
    } else {
        Some(flash(&host, img, Some(115_200)).await?.0)
    };
    let (wall, cpu) = unpaced[unpaced.len() / 2];
    Ok(Figures {
        compile,
        session: sessions[sessions.len() / 2],
        unpaced: wall,
        unpaced_cpu: cpu,
        paced,
    })
}

async fn load(engine: EngineKind, dir: &Path, cache: &Path) -> Result<PluginHost, String> {
    let limits = Limits {
        engine,
        ..Limits::default()
    };
    let host = PluginHost::new(limits, Some(cache.to_path_buf())).map_err(|e| e.to_string())?;
    let report = host.load_dir(dir).await.map_err(|e| e.to_string())?;
    if !report.failed.is_empty() || report.loaded.len() != 3 {
        return Err(format!("plugins did not load: {:?}", report.failed));
    }
    if report
        .loaded
        .iter()
        .any(|p| p.loaded_from != LoadedFrom::Compiled)
    {
        return Err("the compile cache was not empty".into());
    }
    Ok(host)
}

/// One 1 MiB flash into a fresh simulator; wall time of the job and the
/// process's CPU time in it. The image is checked.
async fn flash(
    host: &PluginHost,
    img: &[u8],
    baud: Option<u32>,
) -> Result<(Duration, Duration), String> {
    let sim = PtySim::spawn(XmodemSimConfig {
        line_rate: baud,
        ..XmodemSimConfig::default()
    })
    .map_err(|e| format!("xmodem simulator: {e}"))?;
    let src: Arc<dyn ImageSource> = Arc::new(img.to_vec());
    let meta = JobMeta {
        version: Some("2.0.0".into()),
        module: "default".into(),
        options: Vec::new(),
    };
    let cpu0 = cpu_time();
    let t = Instant::now();
    let bound = Duration::from_secs(600);
    tokio::time::timeout(
        bound,
        otagw::flash::flash(host, "xmodem", &sim.url(), src, &meta, None),
    )
    .await
    .map_err(|_| format!("no result within {bound:?}"))?
    .map_err(|e| format!("flash failed: {e}"))?;
    let wall = t.elapsed();
    let cpu = cpu_time().saturating_sub(cpu0);
    let got = tokio::time::timeout(Duration::from_secs(10), sim.handle().next_image())
        .await
        .map_err(|_| "the simulator holds no image after the flash".to_owned())?;
    sim.shutdown().await;
    reference::check_padded(&got.data, img, reference::PAD)?;
    Ok((wall, cpu))
}

/// User + system time of this process so far (/proc/self/stat, in clock
/// ticks of 1/100 s).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{cpu}, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )
}
