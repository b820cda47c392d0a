//! Issue 6, benchmark 5: download into the cache.
//!
//! A 64 MiB image is served from memory by a local HTTP server (axum on
//! 127.0.0.1) and fetched into a fresh firmware cache
//! (`Cache::fetch`: streamed to the image file, checked against a SHA256 and
//! an Md5 notice digest) and, as the reference measured in the same run, by
//! `curl -s -o FILE` (into the same file system as the cache; the issue's
//! reference) and `curl -s -o /dev/null` (the network alone) from the same URL.
//! Rounds alternate between them. While the cache fetches, a thread
//! samples this process's VmRSS every 2 ms; the growth over the RSS just
//! before the fetch must stay flat (not grow with the image).
//!
//! Run: `cargo bench -p otagw --bench download`

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use otagw::cache::{Cache, Digest, DigestMethod, FetchRequest};
use sha2::Digest as _;

const SIZE: usize = 64 << 20;
const ROUNDS: usize = 5;
/// The target: the cache downloads at least this fraction of curl's speed.
const TARGET_RATIO: f64 = 0.8;
const SAMPLE_EVERY: Duration = Duration::from_millis(2);

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run());
}

async fn run() {
    let image = bytes::Bytes::from(pseudo_random(SIZE));
    let hex = hex::encode(sha2::Sha256::digest(&image));
    let digest = Digest::new(DigestMethod::Sha256, &hex).expect("digest");
    let md5_hex = hex::encode(md5::Md5::digest(&image));
    let digest_md5 = Digest::new(DigestMethod::Md5, &md5_hex).expect("digest");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let served = image.clone();
    let app = axum::Router::new().route(
        "/image.bin",
        axum::routing::get(move || {
            let body = served.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
                    body,
                )
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://{addr}/image.bin");

    let work = tempfile::tempdir().expect("temp dir");
    let curl_ok = Command::new("curl").arg("--version").output().is_ok();
    if !curl_ok {
        println!("curl is missing: the ratio to curl is skipped");
    }

    // One unmeasured round of each, to warm the server and the page cache.
    if curl_ok {
        curl(&url, None);
    }
    fetch_once(work.path(), &url, &digest, 0).await;

    // What the cache must do that curl does not: hash every byte with the
    // notice's method. Measured in memory, as a ceiling.
    let mut sha_mem = Vec::new();
    let mut md5_mem = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        std::hint::black_box(sha2::Sha256::digest(&image));
        sha_mem.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(md5::Md5::digest(&image));
        md5_mem.push(t.elapsed());
    }
    sha_mem.sort();
    md5_mem.sort();

    let mut ours = Vec::new();
    let mut ours_md5 = Vec::new();
    let mut growth = Vec::new();
    let mut curl_null = Vec::new();
    let mut curl_file = Vec::new();
    for round in 1..=ROUNDS {
        if curl_ok {
            curl_null.push(curl(&url, None));
            let out = work.path().join(format!("curl-{round}.bin"));
            curl_file.push(curl(&url, Some(&out)));
            let _ = std::fs::remove_file(&out);
        }
        let (t, g) = fetch_once(work.path(), &url, &digest, round).await;
        ours.push(t);
        growth.push(g);
        let (t, g) = fetch_once(work.path(), &url, &digest_md5, round + ROUNDS).await;
        ours_md5.push(t);
        growth.push(g);
    }
    ours.sort();
    ours_md5.sort();
    curl_null.sort();
    curl_file.sort();
    growth.sort();

    let mib = SIZE as f64 / (1024.0 * 1024.0);
    let tput = |d: Duration| mib / d.as_secs_f64();
    let ours_med = median(&ours);
    println!();
    println!("download of a {mib:.0} MiB image from 127.0.0.1, {ROUNDS} rounds (median)");
    println!(
        "| {:<38} | {:>10} | {:>13} | {:>9} | {:>9} |",
        "client", "time", "throughput", "/ curl -o", "/ null"
    );
    println!(
        "|{:-<40}|{:-<12}|{:-<15}|{:-<11}|{:-<11}|",
        "", "", "", "", ""
    );
    let mut ratio = None;
    if curl_ok {
        let null_med = median(&curl_null);
        let file_med = median(&curl_file);
        let row = |name: &str, d: Duration| {
            row(
                name,
                d,
                tput(d),
                tput(d) / tput(file_med),
                tput(d) / tput(null_med),
            );
        };
        row("curl -s -o FILE (reference)", file_med);
        row("curl -s -o /dev/null", null_med);
        row("otagw Cache::fetch, SHA256 notice", ours_med);
        row("otagw Cache::fetch, Md5 notice", median(&ours_md5));
        row("(sha256 in memory, no I/O)", median(&sha_mem));
        row("(md5 in memory, no I/O)", median(&md5_mem));
        ratio = Some(tput(ours_med) / tput(file_med));
    } else {
        println!(
            "| {:<38} | {:>7.1} ms | {:>7.1} MiB/s | {:>9} | {:>9} |",
            "otagw Cache::fetch, SHA256 notice",
            ours_med.as_secs_f64() * 1e3,
            tput(ours_med),
            "n/a",
            "n/a"
        );
    }
    let peak = *growth.last().expect("rounds");
    println!();
    println!(
        "peak RSS growth during the fetch (VmRSS every {} ms, over the RSS before it): \
         median {:.1} MiB, max {:.1} MiB = {:.3} x the image",
        SAMPLE_EVERY.as_millis(),
        median(&growth) as f64 / (1024.0 * 1024.0),
        peak as f64 / (1024.0 * 1024.0),
        peak as f64 / SIZE as f64
    );
    println!();
    match ratio {
        Some(r) => println!(
            "target: cache download >= {TARGET_RATIO} x curl -o: {} ({r:.3}, SHA256 notice)",
            if r >= TARGET_RATIO { "MET" } else { "MISSED" }
        ),
        None => println!("target: cache download >= {TARGET_RATIO} x curl: not measured (no curl)"),
    }
    // Flat: the growth is a small, fixed amount (buffers), well under the image.
    let flat = peak < (SIZE as u64) / 4;
    println!(
        "target: flat memory (growth < 1/4 of the image): {}",
        if flat { "MET" } else { "MISSED" }
    );
}

fn row(name: &str, d: Duration, mibs: f64, to_file: f64, to_null: f64) {
    println!(
        "| {:<38} | {:>7.1} ms | {:>7.1} MiB/s | {:>9.3} | {:>9.3} |",
        name,
        d.as_secs_f64() * 1e3,
        mibs,
        to_file,
        to_null
    );
}

/// Fetch the image into a fresh cache under `work`; its wall time and the
/// peak RSS growth (bytes) while it ran.
async fn fetch_once(
    work: &std::path::Path,
    url: &str,
    digest: &Digest,
    round: usize,
) -> (Duration, u64) {
    let data_dir = work.join(format!("data-{round}"));
    std::fs::create_dir_all(&data_dir).expect("data dir");
    let (store, _) = otagw::store::Store::open(&data_dir.join("db")).expect("store");
    let cache = Cache::open(&store, 1 << 30).expect("cache");
    let req = FetchRequest {
        url: url.to_string(),
        size: SIZE as u64,
        digest: digest.clone(),
    };

    let baseline = vm_rss().expect("VmRSS in /proc/self/status");
    let peak = Arc::new(AtomicU64::new(baseline));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let peak = peak.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(rss) = vm_rss() {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        })
    };
    let t = Instant::now();
    let image = cache.fetch(req, |_, _| {}).await.expect("fetch");
    let elapsed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    assert_eq!(image.size(), SIZE as u64);
    drop(image);
    cache.shutdown().await;
    drop(cache);
    drop(store);
    let _ = std::fs::remove_dir_all(&data_dir);
    (
        elapsed,
        peak.load(Ordering::Relaxed).saturating_sub(baseline),
    )
}

/// Run curl on `url` into `/dev/null` or `out`; its wall time.
fn curl(url: &str, out: Option<&std::path::Path>) -> Duration {
    let target = out
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "/dev/null".into());
    let t = Instant::now();
    let status = Command::new("curl")
        .args(["-s", "-o", &target, url])
        .status()
        .expect("run curl");
    let elapsed = t.elapsed();
    assert!(status.success(), "curl failed: {status}");
    elapsed
}

/// This process's resident set size in bytes.
fn vm_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Incompressible bytes (xorshift64*), so nothing on the way can shortcut them.
fn pseudo_random(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(n);
    v
}

fn median<T: Copy>(sorted: &[T]) -> T {
    sorted[sorted.len() / 2]
}
