//! Issue 6, benchmark 4: plugin start.
//!
//! - loading a plugins directory (the xmodem, smp and stm32 plugins) **cold**:
//!   a new host with an empty compile cache, so every plugin is compiled;
//! - loading it **warm**: a second host on the same cache directory, so every
//!   plugin comes from the on-disk cache;
//! - starting a plugin session for a job (`host.session("xmodem", None)`: a
//!   fresh Store instantiated from the cached `InstancePre`), 10,000 times.
//!
//! The warm load is reported as a ratio to the cold one measured in the same
//! run, the session start as a ratio to the 100 µs target.
//!
//! Run: `cargo bench -p otagw --bench plugin_start`

use std::path::Path;
use std::time::{Duration, Instant};

use otagw::plugin::{Limits, LoadedFrom, PluginHost};

const COLD_ROUNDS: usize = 3;
const WARM_ROUNDS: usize = 7;
const SESSIONS: usize = 10_000;
const WARMUP_SESSIONS: usize = 200;
/// The target for a warm instantiation.
const SESSION_TARGET: Duration = Duration::from_micros(100);

const PLUGINS: &[&str] = &[
    otagw_test_artifacts::XMODEM,
    otagw_test_artifacts::SMP,
    otagw_test_artifacts::STM32,
];

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run());
}

async fn run() {
    let plugins_dir = tempfile::tempdir().expect("temp dir");
    for p in PLUGINS {
        let src = Path::new(p);
        std::fs::copy(
            src,
            plugins_dir.path().join(src.file_name().expect("file name")),
        )
        .expect("copy plugin");
    }
    let n_plugins = PLUGINS.len();

    // Cold: an empty cache directory each round.
    let mut cold = Vec::new();
    for _ in 0..COLD_ROUNDS {
        let cache = tempfile::tempdir().expect("temp dir");
        let t = load(
            plugins_dir.path(),
            cache.path(),
            LoadedFrom::Compiled,
            n_plugins,
        )
        .await;
        cold.push(t);
    }

    // Warm: one cache directory, filled once, then new hosts on it.
    let cache = tempfile::tempdir().expect("temp dir");
    load(
        plugins_dir.path(),
        cache.path(),
        LoadedFrom::Compiled,
        n_plugins,
    )
    .await;
    let mut warm = Vec::new();
    for _ in 0..WARM_ROUNDS {
        warm.push(
            load(
                plugins_dir.path(),
                cache.path(),
                LoadedFrom::Cache,
                n_plugins,
            )
            .await,
        );
    }

    // Session start, on a warm host.
    let host =
        PluginHost::new(Limits::default(), Some(cache.path().to_path_buf())).expect("plugin host");
    host.load_dir(plugins_dir.path())
        .await
        .expect("load plugins");
    for _ in 0..WARMUP_SESSIONS {
        drop(host.session("xmodem", None).await.expect("session"));
    }
    let mut sessions = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        let t = Instant::now();
        let s = host.session("xmodem", None).await.expect("session");
        sessions.push(t.elapsed());
        drop(s);
    }

    cold.sort();
    warm.sort();
    sessions.sort();
    let cold_med = median(&cold);
    let warm_med = median(&warm);
    let s_med = median(&sessions);
    let s_p99 = percentile(&sessions, 0.99);

    println!();
    println!("plugin start ({n_plugins} plugins: xmodem, smp, stm32)");
    println!(
        "| {:<34} | {:>12} | {:>12} | {:>12} | {:<24} |",
        "measure", "median", "min / p99", "ratio", "reference"
    );
    println!(
        "|{:-<36}|{:-<14}|{:-<14}|{:-<14}|{:-<26}|",
        "", "", "", "", ""
    );
    println!(
        "| {:<34} | {:>9.1} ms | {:>9.1} ms | {:>12.3} | {:<24} |",
        format!("load dir cold (compile), {COLD_ROUNDS} rounds"),
        ms(cold_med),
        ms(cold[0]),
        1.0,
        "itself"
    );
    println!(
        "| {:<34} | {:>9.2} ms | {:>9.2} ms | {:>12.4} | {:<24} |",
        format!("load dir warm (cache), {WARM_ROUNDS} rounds"),
        ms(warm_med),
        ms(warm[0]),
        warm_med.as_secs_f64() / cold_med.as_secs_f64(),
        "cold load (median)"
    );
    println!(
        "| {:<34} | {:>9.1} us | {:>9.1} us | {:>12.3} | {:<24} |",
        format!("session start x{SESSIONS}: med / min"),
        us(s_med),
        us(sessions[0]),
        s_med.as_secs_f64() / SESSION_TARGET.as_secs_f64(),
        "100 us target (median)"
    );
    println!(
        "| {:<34} | {:>12} | {:>9.1} us | {:>12.3} | {:<24} |",
        format!("session start x{SESSIONS}: p99"),
        "",
        us(s_p99),
        s_p99.as_secs_f64() / SESSION_TARGET.as_secs_f64(),
        "100 us target (p99)"
    );
    println!();
    println!(
        "target: warm instantiation < 100 us: {} (median {:.1} us, p99 {:.1} us)",
        if s_med < SESSION_TARGET {
            "MET"
        } else {
            "MISSED"
        },
        us(s_med),
        us(s_p99)
    );
}

/// Load the directory with a new host on `cache`; check every plugin loaded
/// the expected way; the wall time of host creation plus `load_dir`.
async fn load(dir: &Path, cache: &Path, expect: LoadedFrom, n: usize) -> Duration {
    let t = Instant::now();
    let host = PluginHost::new(Limits::default(), Some(cache.to_path_buf())).expect("plugin host");
    let report = host.load_dir(dir).await.expect("load plugins");
    let elapsed = t.elapsed();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.loaded.len(), n);
    for p in &report.loaded {
        assert_eq!(p.loaded_from, expect, "{}", p.info.name);
    }
    elapsed
}

fn median(sorted: &[Duration]) -> Duration {
    sorted[sorted.len() / 2]
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
