//! The firmware cache's memory does not grow with the image: a 64 MiB image is
//! fetched from a local HTTP server and read back whole through `read_at`
//! while this process's resident set (VmRSS) is sampled.
//!
//! Its own test binary (a process of its own), so no other test's allocations
//! are counted. The server makes the image's bytes on the fly, so the image is
//! never whole in memory on either side.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::http::header;
use axum::response::Response;
use bytes::Bytes;
use otagw::cache::{Cache, CacheOptions, Digest, DigestMethod, FetchRequest};
use otagw::plugin::ImageSource;
use otagw::store::Store;
use sha2::{Digest as _, Sha256};

const SIZE: u64 = 64 << 20;
const WARM_UP: u64 = 2 << 20;
const PIECE: u64 = 64 * 1024;
/// Growth of the resident set allowed while fetching and reading the image.
const LIMIT_KIB: u64 = 24 * 1024;

/// The bytes `[offset, offset + len)` of the image `seed`: one splitmix64
/// word per 8 bytes, so any range is made without the rest.
fn bytes_at(seed: u64, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize + 16);
    let mut word = offset / 8;
    while (out.len() as u64) < len + offset % 8 {
        let mut z = (seed ^ word).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        word += 1;
    }
    out.drain(..(offset % 8) as usize);
    out.truncate(len as usize);
    out
}

fn digest_of(seed: u64, size: u64) -> Digest {
    let mut h = Sha256::new();
    let mut at = 0;
    while at < size {
        let n = PIECE.min(size - at);
        h.update(bytes_at(seed, at, n));
        at += n;
    }
    Digest::new(DigestMethod::Sha256, &hex::encode(h.finalize())).unwrap()
}

/// This process's resident set, KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `GET /{seed}/{size}`: the image, made piece by piece as it is sent.
async fn serve(axum::extract::Path((seed, size)): axum::extract::Path<(u64, u64)>) -> Response {
    let pieces = futures_util::stream::unfold(0u64, move |at| async move {
        (at < size).then(|| {
            let n = PIECE.min(size - at);
            let piece: Result<Bytes, std::io::Error> = Ok(Bytes::from(bytes_at(seed, at, n)));
            (piece, at + n)
        })
    });
    let mut resp = Response::new(Body::from_stream(pieces));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, size.to_string().parse().unwrap());
    resp
}

/// Read the whole image through `read_at` in 256 KiB pieces, hashing it, and
/// return its digest and the largest RSS seen (sampled every 4 MiB).
fn read_back(img: &dyn ImageSource) -> (Digest, u64) {
    let mut h = Sha256::new();
    let mut peak = rss_kib();
    let mut at = 0;
    while at < img.size() {
        let piece = img.read_at(at, 256 * 1024).unwrap();
        assert!(!piece.is_empty(), "short read at {at}");
        h.update(&piece);
        at += piece.len() as u64;
        if at % (4 << 20) == 0 {
            peak = peak.max(rss_kib());
        }
    }
    let d = Digest::new(DigestMethod::Sha256, &hex::encode(h.finalize())).unwrap();
    (d, peak.max(rss_kib()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_memory_stays_flat_for_a_64_mib_image() {
    let app = axum::Router::new().route("/{seed}/{size}", axum::routing::get(serve));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(&dir.path().join("db")).unwrap();
    let cache = Cache::open_with(&store, 1 << 30, CacheOptions::default()).unwrap();
    let request = |seed: u64, size: u64| FetchRequest {
        url: format!("http://{addr}/{seed}/{size}"),
        size,
        digest: digest_of(seed, size),
    };

    // Warm up: the HTTP client, the runtime, the store and the allocator's
    // arenas make their one-time allocations here, not in the measurement.
    let small = request(1, WARM_UP);
    let warm = cache.fetch(small.clone(), |_, _| {}).await.unwrap();
    assert_eq!(read_back(&warm).0, small.digest);
    drop(warm);

    let big = request(2, SIZE);
    let before = rss_kib();
    let fetch_peak = Arc::new(AtomicU64::new(before));
    let peak = fetch_peak.clone();
    let started = std::time::Instant::now();
    let img = cache
        .fetch(big.clone(), move |done, _| {
            if done % (4 << 20) == 0 {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
            }
        })
        .await
        .unwrap();
    let fetched_in = started.elapsed();
    let after_fetch = rss_kib();
    let fetch_peak = fetch_peak.load(Ordering::Relaxed).max(after_fetch);
    assert_eq!(img.size(), SIZE);

    let img2 = img.clone();
    let (got, read_peak) = tokio::task::spawn_blocking(move || read_back(&img2))
        .await
        .unwrap();
    let after_read = rss_kib();
    assert_eq!(got, big.digest, "the image reads back whole");
    eprintln!(
        "64 MiB image: fetched in {fetched_in:?}; VmRSS before {before} KiB, \
         peak while fetching {fetch_peak} KiB, after fetching {after_fetch} KiB, \
         peak while reading back {read_peak} KiB, after reading back {after_read} KiB \
         (growth {} KiB)",
        fetch_peak.max(read_peak).max(after_read) - before
    );
    for (what, kib) in [
        ("fetching", fetch_peak),
        ("reading back", read_peak),
        ("after reading back", after_read),
    ] {
        let growth = kib.saturating_sub(before);
        assert!(
            growth < LIMIT_KIB,
            "RSS grew by {growth} KiB {what} a {} KiB image (limit {LIMIT_KIB} KiB)",
            SIZE / 1024
        );
    }
    drop(img);
    cache.shutdown().await;
}
