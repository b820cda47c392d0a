//! The cache against a real HTTP server (axum on 127.0.0.1:0) and a real sled
//! store in a temporary directory. No sleeps: tests wait on the server's
//! request log and on progress callbacks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use md5::Md5;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::plugin::ImageSource;
use crate::store::Store;

// ---------------------------------------------------------------- the server

/// How the server misbehaves (for every request until changed).
#[derive(Debug, Clone, Default)]
struct Behaviour {
    /// Answer with this status.
    status: Option<u16>,
    /// End the next response cleanly after this many body bytes (chunked, no
    /// Content-Length), then behave.
    truncate_once: Option<usize>,
    /// Send this many bytes of the next response, then break the connection
    /// when [`Server::cut`] is notified.
    cut_once: Option<usize>,
    /// Send this many body bytes, then nothing, forever.
    stall_after: Option<usize>,
    /// Answer 200 with the whole file whatever the Range.
    ignore_range: bool,
    /// Flip one byte in the middle of the file.
    wrong_bytes: bool,
    /// Send no Content-Length (chunked).
    no_length: bool,
    /// Send the body in pieces of this many bytes, this many ms apart (a slow
    /// server that never goes quiet for long).
    trickle: Option<(usize, u64)>,
}

struct ServerState {
    files: HashMap<String, Bytes>,
    behaviour: Behaviour,
    /// (path, Range header) of every request, in order.
    log: watch::Sender<Vec<(String, Option<String>)>>,
    /// Responses wait until this is true.
    open: watch::Receiver<bool>,
    cut: Arc<tokio::sync::Notify>,
}

struct Server {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<ServerState>>,
    log: watch::Receiver<Vec<(String, Option<String>)>>,
    gate: watch::Sender<bool>,
    cut: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Server {
    async fn start() -> Server {
        let (log_tx, log) = watch::channel(Vec::new());
        let (gate, open) = watch::channel(true);
        let cut = Arc::new(tokio::sync::Notify::new());
        let state = Arc::new(Mutex::new(ServerState {
            files: HashMap::new(),
            behaviour: Behaviour::default(),
            log: log_tx,
            open,
            cut: cut.clone(),
        }));
        let app = axum::Router::new()
            .route("/{name}", axum::routing::get(serve))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
        Server {
            addr,
            state,
            log,
            gate,
            cut,
            stop,
        }
    }

    /// Serve `image` as `/{name}`; returns its URL.
    fn add(&self, name: &str, image: &Bytes) -> String {
        self.state
            .lock()
            .unwrap()
            .files
            .insert(name.to_string(), image.clone());
        format!("http://{}/{name}", self.addr)
    }

    fn behave(&self, b: Behaviour) {
        self.state.lock().unwrap().behaviour = b;
    }

    fn requests(&self) -> Vec<(String, Option<String>)> {
        self.log.borrow().clone()
    }

    fn ranges(&self) -> Vec<Option<String>> {
        self.requests().into_iter().map(|(_, r)| r).collect()
    }
}

async fn serve(
    State(state): State<Arc<Mutex<ServerState>>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let range = headers
        .get(header::RANGE)
        .map(|v| v.to_str().unwrap().to_string());
    let (file, behaviour, mut open, cut) = {
        let mut s = state.lock().unwrap();
        s.log.send_modify(|l| l.push((name.clone(), range.clone())));
        let b = s.behaviour.clone();
        s.behaviour.truncate_once = None;
        s.behaviour.cut_once = None;
        (
            s.files.get(&name).cloned(),
            b,
            s.open.clone(),
            s.cut.clone(),
        )
    };
    let _ = open.wait_for(|o| *o).await;
    if let Some(status) = behaviour.status {
        return StatusCode::from_u16(status).unwrap().into_response();
    }
    let Some(mut file) = file else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if behaviour.wrong_bytes {
        let mut v = file.to_vec();
        let mid = v.len() / 2;
        v[mid] ^= 0xff;
        file = Bytes::from(v);
    }
    let total = file.len();
    let start = match (&range, behaviour.ignore_range) {
        (Some(r), false) => r
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n < total),
        _ => None,
    };
    let body = file.slice(start.unwrap_or(0)..);
    let len = body.len();
    let limit = behaviour
        .truncate_once
        .or(behaviour.cut_once)
        .or(behaviour.stall_after)
        .unwrap_or(len)
        .min(len);
    let (piece, gap) = behaviour.trickle.unwrap_or((16 * 1024, 0));
    let pieces: Vec<Result<Bytes, std::io::Error>> = (0..limit)
        .step_by(piece)
        .map(|o| Ok(body.slice(o..(o + piece).min(limit))))
        .collect();
    let head = futures_util::stream::iter(pieces).then(move |p| async move {
        if gap > 0 {
            tokio::time::sleep(Duration::from_millis(gap)).await;
        }
        p
    });
    let stream = if behaviour.cut_once.is_some() {
        let cut = futures_util::stream::once(async move {
            cut.notified().await;
            Err(std::io::Error::other("cut"))
        });
        head.chain(cut).boxed()
    } else if behaviour.stall_after.is_some() {
        head.chain(futures_util::stream::pending()).boxed()
    } else {
        head.boxed()
    };
    let mut resp = Response::new(Body::from_stream(stream));
    if !behaviour.no_length && behaviour.truncate_once.is_none() {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, len.to_string().parse().unwrap());
    }
    if let Some(s) = start {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        resp.headers_mut().insert(
            header::CONTENT_RANGE,
            format!("bytes {s}-{}/{total}", total - 1).parse().unwrap(),
        );
    }
    resp
}

// ---------------------------------------------------------------- helpers

/// `n` deterministic pseudo-random bytes.
fn image(n: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    Bytes::from(v)
}

fn sha256_of(b: &[u8]) -> Digest {
    Digest::new(DigestMethod::Sha256, &hex::encode(Sha256::digest(b))).unwrap()
}

fn md5_of(b: &[u8]) -> Digest {
    Digest::new(DigestMethod::Md5, &hex::encode(Md5::digest(b))).unwrap()
}

fn request(url: &str, image: &[u8]) -> FetchRequest {
    FetchRequest {
        url: url.to_string(),
        size: image.len() as u64,
        digest: sha256_of(image),
    }
}

/// Fast retries, so failure tests take milliseconds.
fn fast() -> CacheOptions {
    CacheOptions {
        attempts: 3,
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..CacheOptions::default()
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    cache: Option<Cache>,
}

impl Fixture {
    fn new(cap: u64, opts: CacheOptions) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let cache = Some(open_cache(&dir, cap, opts));
        Fixture { dir, cache }
    }

    fn cache(&self) -> &Cache {
        self.cache.as_ref().unwrap()
    }

    /// Stop every download, drop the cache and its store, open them again.
    async fn reopen(&mut self, cap: u64, opts: CacheOptions) {
        self.cache().shutdown().await;
        self.cache = None;
        self.cache = Some(open_cache(&self.dir, cap, opts));
    }
}

fn open_cache(dir: &tempfile::TempDir, cap: u64, opts: CacheOptions) -> Cache {
    crate::store::wait_unlocked(&dir.path().join("db"));
    let (store, rebuilt) = Store::open(&dir.path().join("db")).unwrap();
    assert!(!rebuilt, "the store reopens cleanly");
    Cache::open_with(&store, cap, opts).unwrap()
}

fn no_progress(_: u64, _: u64) {}

/// The length of `digest`'s image file.
fn file_len(cache: &Cache, digest: &Digest) -> u64 {
    std::fs::metadata(cache.image_path(digest)).unwrap().len()
}

/// Read the whole image through `ImageSource` in odd-sized pieces.
fn read_all(img: &CachedImage) -> Vec<u8> {
    let mut out = Vec::new();
    while (out.len() as u64) < img.size() {
        let piece = img.read_at(out.len() as u64, 10_007).unwrap();
        assert!(!piece.is_empty());
        out.extend_from_slice(&piece);
    }
    out
}

const GB: u64 = 1 << 30;

/// The process's peak resident set (VmHWM), where /proc has it.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_eight_concurrent_fetches_share_one_download() {
    let server = Server::start().await;
    let img = image(300_000, 1);
    let url = server.add("fw.bin", &img);
    let fx = Fixture::new(GB, fast());
    server.gate.send_replace(false); // hold the response until all joined

    let (joined_tx, mut joined) = watch::channel(0usize);
    let joined_tx = Arc::new(joined_tx);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let cache = fx.cache().clone();
        let req = request(&url, &img);
        let joined_tx = joined_tx.clone();
        let last = Arc::new(Mutex::new((0u64, 0u64, false)));
        let seen = last.clone();
        tasks.push(tokio::spawn(async move {
            let r = cache
                .fetch(req, move |done, total| {
                    let mut l = seen.lock().unwrap();
                    assert!(done >= l.0, "progress never goes back");
                    if !l.2 {
                        l.2 = true;
                        joined_tx.send_modify(|n| *n += 1);
                    }
                    *l = (done, total, true);
                })
                .await;
            (r, *last.lock().unwrap())
        }));
    }
    joined.wait_for(|n| *n == 8).await.unwrap();
    server.gate.send_replace(true);
    for t in tasks {
        let (r, (done, total, _)) = t.await.unwrap();
        let got = r.unwrap();
        assert_eq!(got.digest(), &sha256_of(&img));
        assert_eq!(
            (done, total),
            (300_000, 300_000),
            "every caller saw the end"
        );
    }
    assert_eq!(server.requests().len(), 1, "one download for 8 callers");

    // Already complete: no request, progress reports it whole.
    let done = Arc::new(Mutex::new(None));
    let d = done.clone();
    let again = fx
        .cache()
        .fetch(request(&url, &img), move |a, b| {
            *d.lock().unwrap() = Some((a, b))
        })
        .await
        .unwrap();
    assert_eq!(*done.lock().unwrap(), Some((300_000, 300_000)));
    assert_eq!(read_all(&again), img);
    assert_eq!(server.requests().len(), 1);
    assert_eq!(fx.cache().usage(), (300_000, 1));
}

#[tokio::test]
async fn cache_verifies_md5_and_sha256() {
    let server = Server::start().await;
    let img = image(200_000, 2);
    let url = server.add("fw.bin", &img);
    let fx = Fixture::new(GB, fast());
    let by_md5 = FetchRequest {
        digest: md5_of(&img),
        ..request(&url, &img)
    };
    let a = fx.cache().fetch(by_md5, no_progress).await.unwrap();
    let b = fx
        .cache()
        .fetch(request(&url, &img), no_progress)
        .await
        .unwrap();
    assert_eq!(a.digest().method(), DigestMethod::Md5);
    assert_eq!(b.digest().method(), DigestMethod::Sha256);
    assert_eq!(read_all(&a), img);
    assert_eq!(read_all(&b), img);
    let list = fx.cache().list();
    assert_eq!(list.len(), 2);
    for info in list {
        assert_eq!(info.state, ImageState::Complete);
        // Each entry records the digest its notice named, and only that one
        // (computing both halved the download's throughput).
        match info.digest.method() {
            DigestMethod::Md5 => {
                assert_eq!(info.md5, Some(md5_of(&img)));
                assert_eq!(info.sha256, None);
            }
            DigestMethod::Sha256 => {
                assert_eq!(info.sha256, Some(sha256_of(&img)));
                assert_eq!(info.md5, None);
            }
        }
        assert_eq!(info.pins, 1);
    }
}

#[tokio::test]
async fn cache_wrong_bytes_fail_with_3_and_nothing_is_kept() {
    let server = Server::start().await;
    let img = image(150_000, 3);
    let url = server.add("fw.bin", &img);
    let fx = Fixture::new(GB, fast());
    server.behave(Behaviour {
        wrong_bytes: true,
        ..Behaviour::default()
    });
    let err = fx
        .cache()
        .fetch(request(&url, &img), no_progress)
        .await
        .unwrap_err();
    assert_eq!(err.step_code(), -3, "{err}");
    let CacheError::Digest { expected, got } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(expected, &sha256_of(&img));
    assert_ne!(got, expected);
    assert!(
        err.to_string().starts_with("image digest mismatch"),
        "{err}"
    );
    assert_eq!(fx.cache().usage(), (0, 0));
    assert!(fx.cache().list().is_empty());
    assert!(fx.cache().image_files().is_empty(), "the file is deleted");

    // A notice whose size is smaller than what the server sends: stopped
    // early, as soon as the count passes it (no Content-Length to warn first).
    server.behave(Behaviour {
        no_length: true,
        ..Behaviour::default()
    });
    let short = FetchRequest {
        size: 70_000,
        ..request(&url, &img)
    };
    let err = fx.cache().fetch(short, no_progress).await.unwrap_err();
    assert_eq!(err.step_code(), -3);
    assert!(
        matches!(err, CacheError::Size { expected: 70_000, got, .. } if got > 70_000 && got < 150_000),
        "{err:?}"
    );
    assert!(fx.cache().image_files().is_empty());
    // With a Content-Length, before reading the body.
    server.behave(Behaviour::default());
    let short = FetchRequest {
        size: 70_000,
        ..request(&url, &img)
    };
    let err = fx.cache().fetch(short, no_progress).await.unwrap_err();
    assert!(
        matches!(err, CacheError::Size { got: 150_000, .. }),
        "{err:?}"
    );
    assert!(fx.cache().list().is_empty());
}

#[tokio::test]
async fn cache_unreachable_and_http_errors_fail_with_2() {
    let server = Server::start().await;
    let img = image(10_000, 4);
    let url = server.add("fw.bin", &img);
    let fx = Fixture::new(GB, fast());

    // 404: no retry.
    let missing = request(&format!("http://{}/nope.bin", server.addr), &img);
    let err = fx.cache().fetch(missing, no_progress).await.unwrap_err();
    assert_eq!(err.step_code(), -2);
    assert!(
        matches!(err, CacheError::Status { status: 404, .. }),
        "{err:?}"
    );
    assert_eq!(server.requests().len(), 1);

    // 500: retried, then -2.
    server.behave(Behaviour {
        status: Some(500),
        ..Behaviour::default()
    });
    let err = fx
        .cache()
        .fetch(request(&url, &img), no_progress)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CacheError::Status { status: 500, .. }),
        "{err:?}"
    );
    assert_eq!(err.step_code(), -2);
    assert_eq!(server.requests().len(), 1 + 3, "three attempts");

    // 403: the signed URL expired; no retry, the platform is asked again.
    server.behave(Behaviour {
        status: Some(403),
        ..Behaviour::default()
    });
    let err = fx
        .cache()
        .fetch(request(&url, &img), no_progress)
        .await
        .unwrap_err();
    assert!(err.url_expired(), "{err:?}");
    assert_eq!(err.step_code(), -2);
    assert_eq!(server.requests().len(), 5);

    // Connection refused: a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let refused = request(&format!("http://127.0.0.1:{port}/fw.bin"), &img);
    let err = fx.cache().fetch(refused, no_progress).await.unwrap_err();
    assert_eq!(err.step_code(), -2);
    assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
    assert!(err.to_string().len() < 128, "{err}");

    // Not HTTP at all (e.g. a notice for an MQTT download): -2 at once.
    let err = fx
        .cache()
        .fetch(request("mqtt://stream/1", &img), no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::BadRequest { .. }), "{err:?}");
    assert_eq!(err.step_code(), -2);
}

#[tokio::test]
async fn cache_truncated_download_resumes_with_range() {
    let server = Server::start().await;
    let img = image(5 * CHUNK_SIZE + 1234, 5);
    let url = server.add("fw.bin", &img);
    let fx = Fixture::new(GB, fast());
    server.behave(Behaviour {
        cut_once: Some(2 * CHUNK_SIZE + 500),
        ..Behaviour::default()
    });
    let (stored_tx, mut stored) = watch::channel(0u64);
    let cache = fx.cache().clone();
    let req = request(&url, &img);
    let fetch = tokio::spawn(async move {
        cache
            .fetch(req, move |done, _| {
                stored_tx.send_replace(done);
            })
            .await
    });
    let before_cut = 2 * CHUNK_SIZE as u64 + 500;
    stored.wait_for(|d| *d == before_cut).await.unwrap();
    server.cut.notify_one(); // the connection breaks mid-chunk
    let got = fetch.await.unwrap().unwrap();
    assert_eq!(read_all(&got), img);
    // Every byte received before the break is kept, the partial chunk too.
    assert_eq!(
        server.ranges(),
        [None, Some(format!("bytes={before_cut}-"))]
    );
}

#[tokio::test]
async fn cache_server_ignoring_range_restarts_cleanly() {
    let server = Server::start().await;
    let img = image(4 * CHUNK_SIZE + 10, 6);
    let url = server.add("fw.bin", &img);
    let fx = Fixture::new(GB, fast());
    server.behave(Behaviour {
        truncate_once: Some(3 * CHUNK_SIZE + 1),
        ignore_range: true,
        ..Behaviour::default()
    });
    let got = fx
        .cache()
        .fetch(request(&url, &img), no_progress)
        .await
        .unwrap();
    assert_eq!(read_all(&got), img, "the image verified after the restart");
    assert_eq!(
        server.ranges(),
        [None, Some(format!("bytes={}-", 3 * CHUNK_SIZE + 1))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_restart_mid_download_resumes_with_range() {
    let server = Server::start().await;
    let img = image(6 * CHUNK_SIZE + 77, 7);
    let url = server.add("fw.bin", &img);
    let mut fx = Fixture::new(GB, fast());
    server.behave(Behaviour {
        stall_after: Some(3 * CHUNK_SIZE + 100),
        ..Behaviour::default()
    });
    let (stored_tx, mut stored) = watch::channel(0u64);
    let cache = fx.cache().clone();
    let req = request(&url, &img);
    let fetch = tokio::spawn(async move {
        cache
            .fetch(req, move |done, _| {
                stored_tx.send_replace(done);
            })
            .await
    });
    // Everything sent before the stall is stored, the partial chunk too.
    let at = 3 * CHUNK_SIZE as u64 + 100;
    stored.wait_for(|d| *d == at).await.unwrap();
    // "Kill" the gateway: stop, drop the cache and its store, open again.
    fx.cache().shutdown().await;
    let err = fetch.await.unwrap().unwrap_err();
    assert!(matches!(err, CacheError::ShutDown), "{err:?}");
    fx.reopen(GB, fast()).await;
    let partial = fx.cache().list();
    assert_eq!(partial[0].state, ImageState::Partial { received: at });

    server.behave(Behaviour::default());
    let got = fx
        .cache()
        .fetch(request(&url, &img), no_progress)
        .await
        .unwrap();
    assert_eq!(read_all(&got), img);
    assert_eq!(server.ranges(), [None, Some(format!("bytes={at}-"))]);

    // Restart again: the complete image is there without any request.
    drop(got);
    fx.reopen(GB, fast()).await;
    let got = fx
        .cache()
        .fetch(request(&url, &img), no_progress)
        .await
        .unwrap();
    assert_eq!(read_all(&got), img);
    assert_eq!(server.requests().len(), 2);
    assert!(fx.cache().get(&sha256_of(&img)).unwrap().is_some());
}

#[tokio::test]
async fn cache_eviction_honours_pins_and_lru() {
    let server = Server::start().await;
    let (a, b, c) = (image(100_000, 10), image(100_000, 11), image(100_000, 12));
    let (ua, ub, uc) = (
        server.add("a", &a),
        server.add("b", &b),
        server.add("c", &c),
    );
    let fx = Fixture::new(250_000, fast());

    let pinned_a = fx
        .cache()
        .fetch(request(&ua, &a), no_progress)
        .await
        .unwrap();
    drop(
        fx.cache()
            .fetch(request(&ub, &b), no_progress)
            .await
            .unwrap(),
    );
    let got_c = fx
        .cache()
        .fetch(request(&uc, &c), no_progress)
        .await
        .unwrap();
    // Over the cap: A is the oldest but pinned, so B goes.
    let held: Vec<_> = fx.cache().list().into_iter().map(|i| i.digest).collect();
    assert_eq!(held, [sha256_of(&a), sha256_of(&c)]);
    assert_eq!(fx.cache().usage(), (200_000, 2));

    // Use A again (C is now the least recently used), drop every pin, fetch B.
    drop(fx.cache().get(&sha256_of(&a)).unwrap().unwrap());
    drop((pinned_a, got_c));
    let _b = fx
        .cache()
        .fetch(request(&ub, &b), no_progress)
        .await
        .unwrap();
    let held: Vec<_> = fx.cache().list().into_iter().map(|i| i.digest).collect();
    assert_eq!(held, [sha256_of(&a), sha256_of(&b)], "C was the LRU");
    assert!(fx.cache().evict_now().unwrap().is_empty());
    assert_eq!(server.requests().len(), 4);
}

#[tokio::test]
async fn cache_image_larger_than_the_cap_lives_while_pinned() {
    let server = Server::start().await;
    let img = image(100_000, 20);
    let url = server.add("big", &img);
    let fx = Fixture::new(50_000, fast());
    let got = fx
        .cache()
        .fetch(request(&url, &img), no_progress)
        .await
        .unwrap();
    let second = got.clone();
    assert!(fx.cache().evict_now().unwrap().is_empty(), "pinned");
    assert_eq!(fx.cache().usage(), (100_000, 1));
    drop(got);
    assert_eq!(fx.cache().usage(), (100_000, 1), "a clone still pins it");
    assert_eq!(read_all(&second), img);
    drop(second);
    assert_eq!(fx.cache().usage(), (0, 0), "evicted with its last pin");
    assert!(fx.cache().image_files().is_empty(), "its file is deleted");
}

#[tokio::test]
async fn cache_read_at_crosses_chunk_boundaries() {
    let server = Server::start().await;
    let img = image(10_500, 30);
    let url = server.add("fw.bin", &img);
    let fx = Fixture::new(
        GB,
        CacheOptions {
            chunk_size: 1000,
            ..fast()
        },
    );
    let got = fx
        .cache()
        .fetch(request(&url, &img), no_progress)
        .await
        .unwrap();
    assert_eq!(file_len(fx.cache(), got.digest()), 10_500);
    for (off, len) in [
        (0, 1000),
        (999, 2),
        (1500, 3000),
        (10_000, 1000),
        (10_499, 5),
        (0, 20_000),
    ] {
        let want = &img[off.min(img.len())..(off + len).min(img.len())];
        assert_eq!(got.read_at(off as u64, len).unwrap(), want, "{off}+{len}");
    }
    assert!(got.read_at(10_500, 10).unwrap().is_empty());
    assert!(got.read_at(u64::MAX, 10).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_streams_a_64_mib_image_with_two_chunks_buffered() {
    let server = Server::start().await;
    let img = image(64 << 20, 40);
    let url = server.add("big.bin", &img);
    let req = request(&url, &img);
    let fx = Fixture::new(GB, fast());
    let hwm_before = peak_rss_kib();
    let started = std::time::Instant::now();
    let got = fx.cache().fetch(req, no_progress).await.unwrap();
    let took = started.elapsed();
    // Informational: the process also holds the server's copy (and other
    // tests run alongside); `tests/cache_memory.rs` measures the cache alone.
    eprintln!(
        "64 MiB fetched, stored and verified in {took:?}; peak RSS {hwm_before:?} -> {:?} KiB",
        peak_rss_kib()
    );
    assert_eq!(got.size(), 64 << 20);
    assert_eq!(file_len(fx.cache(), got.digest()), 64 << 20);
    // One chunk filling while the one before it is written and hashed.
    assert!(
        fx.cache().peak_buffer() <= 2 * CHUNK_SIZE,
        "buffered {} bytes",
        fx.cache().peak_buffer()
    );
    let mid = got.read_at((32 << 20) - 5, 10).unwrap();
    assert_eq!(mid, img[(32 << 20) - 5..(32 << 20) + 5]);
}

/// Start a download that stalls after `stall` bytes, wait until `stored`
/// bytes are in, then stop the cache (its partial state is saved).
async fn interrupt(fx: &Fixture, server: &Server, req: FetchRequest, stall: usize, stored: u64) {
    server.behave(Behaviour {
        stall_after: Some(stall),
        ..Behaviour::default()
    });
    let (stored_tx, mut seen) = watch::channel(0u64);
    let cache = fx.cache().clone();
    let fetch = tokio::spawn(async move {
        cache
            .fetch(req, move |done, _| {
                stored_tx.send_replace(done);
            })
            .await
    });
    seen.wait_for(|d| *d == stored).await.unwrap();
    fx.cache().shutdown().await;
    let err = fetch.await.unwrap().unwrap_err();
    assert!(matches!(err, CacheError::ShutDown), "{err:?}");
    server.behave(Behaviour::default());
}

/// Checkpoints run in the background while the download goes on; the progress
/// a fetcher sees must still never run more than `flush_every` ahead of what
/// the meta counts as durable (what a kill at that moment would keep).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_progress_never_runs_ahead_of_durable_bytes() {
    let server = Server::start().await;
    let chunk = 256 * 1024;
    let img = image(48 * chunk, 51);
    let url = server.add("fw.bin", &img);
    let flush_every = chunk as u64;
    let fx = Fixture::new(
        GB,
        CacheOptions {
            chunk_size: chunk,
            flush_every,
            ..fast()
        },
    );
    let req = request(&url, &img);
    let digest = req.digest.clone();
    let observed = Arc::new(Mutex::new(Vec::new()));
    let (cache, seen) = (fx.cache().clone(), Arc::clone(&observed));
    let got = fx
        .cache()
        .fetch(req, move |done, _| {
            // Read the meta at the moment the progress is seen, as a crash
            // at that moment would find it.
            let durable = match cache.inner.db.meta(&digest).unwrap() {
                Some(m) => match m.state {
                    ImageState::Partial { received } => received,
                    ImageState::Complete => m.size,
                },
                None => 0,
            };
            seen.lock().unwrap().push((done, durable));
        })
        .await
        .unwrap();
    assert_eq!(read_all(&got), img);
    let observed = observed.lock().unwrap().clone();
    assert!(observed.len() > 3, "progress was reported: {observed:?}");
    for &(done, durable) in &observed {
        assert!(
            done <= durable + flush_every,
            "progress {done} seen while only {durable} bytes were durable: {observed:?}"
        );
    }
}

/// A server that stalls mid-image: the work in flight settles and everything
/// received becomes durable while the download waits (a kill then loses
/// nothing), and the progress shows all of it. With `flush_every` of one byte,
/// progress is at most one byte ahead of the meta's durable count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_stalled_download_makes_what_it_has_durable() {
    let server = Server::start().await;
    let chunk = 64 * 1024;
    let img = image(8 * chunk + 9, 52);
    let url = server.add("fw.bin", &img);
    server.behave(Behaviour {
        stall_after: Some(5 * chunk + 100),
        ..Behaviour::default()
    });
    let fx = Fixture::new(
        GB,
        CacheOptions {
            chunk_size: chunk,
            flush_every: 1,
            ..fast()
        },
    );
    let req = request(&url, &img);
    let digest = req.digest.clone();
    let (tx, mut seen) = watch::channel(0u64);
    let cache = fx.cache().clone();
    let fetch = tokio::spawn(async move {
        cache
            .fetch(req, move |done, _| {
                tx.send_replace(done);
            })
            .await
    });
    // Everything received, the partial chunk too.
    let want = 5 * chunk as u64 + 100;
    tokio::time::timeout(Duration::from_secs(20), seen.wait_for(|d| *d == want))
        .await
        .expect("progress reaches every byte received before the stall")
        .unwrap();
    let meta = fx.cache().inner.db.meta(&digest).unwrap().expect("a meta");
    assert_eq!(meta.state, ImageState::Partial { received: want });
    fx.cache().shutdown().await;
    assert!(matches!(
        fetch.await.unwrap().unwrap_err(),
        CacheError::ShutDown
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_keeps_bytes_in_files_and_cuts_an_unsynced_tail_on_resume() {
    let server = Server::start().await;
    let img = image(6 * CHUNK_SIZE + 77, 50);
    let url = server.add("fw.bin", &img);
    let mut fx = Fixture::new(GB, fast());
    let digest = sha256_of(&img);
    let path = fx.cache().image_path(&digest);
    assert_eq!(path.parent().unwrap(), fx.dir.path().join("images"));
    assert_eq!(
        path.file_name().unwrap().to_str().unwrap(),
        format!("sha256-{}.img", digest.hex())
    );
    let at = 3 * CHUNK_SIZE as u64 + 100;
    interrupt(&fx, &server, request(&url, &img), 3 * CHUNK_SIZE + 100, at).await;
    assert_eq!(std::fs::metadata(&path).unwrap().len(), at);

    // A crash after bytes were written but before the meta counted them:
    // the file is longer than `received` (and its tail is garbage). Also an
    // orphan file (its meta removed, the crash came before the file went)
    // and a file that is not an image.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&[0xaa; 5000]).unwrap();
    }
    let orphan = fx.cache().image_path(&sha256_of(b"gone"));
    std::fs::write(&orphan, b"orphan").unwrap();
    let other = fx.dir.path().join("images").join("README");
    std::fs::write(&other, b"not an image").unwrap();
    fx.reopen(GB, fast()).await;
    assert!(!orphan.exists(), "the orphan is deleted on open");
    assert!(other.exists(), "files that are not images are left alone");
    assert_eq!(
        fx.cache().list()[0].state,
        ImageState::Partial { received: at }
    );

    let got = fx
        .cache()
        .fetch(request(&url, &img), no_progress)
        .await
        .unwrap();
    assert_eq!(read_all(&got), img, "the garbage tail was cut off");
    assert_eq!(
        server.ranges(),
        [None, Some(format!("bytes={at}-"))],
        "resumed from what the meta counts"
    );
    assert_eq!(file_len(fx.cache(), &digest), img.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_open_drops_images_whose_file_is_missing_or_short() {
    let server = Server::start().await;
    let (a, b, c) = (
        image(100_000, 60),
        image(100_000, 61),
        image(6 * CHUNK_SIZE + 5, 62),
    );
    let (ua, ub, uc) = (
        server.add("a", &a),
        server.add("b", &b),
        server.add("c", &c),
    );
    let mut fx = Fixture::new(GB, fast());
    for (u, i) in [(&ua, &a), (&ub, &b)] {
        drop(fx.cache().fetch(request(u, i), no_progress).await.unwrap());
    }
    interrupt(
        &fx,
        &server,
        request(&uc, &c),
        4 * CHUNK_SIZE + 100,
        4 * CHUNK_SIZE as u64 + 100,
    )
    .await;
    // Behind the cache's back: A's file is deleted, B's and C's cut short.
    let cache = fx.cache().clone();
    std::fs::remove_file(cache.image_path(&sha256_of(&a))).unwrap();
    let cut = |d: &Digest, len: u64| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(cache.image_path(d))
            .unwrap();
        f.set_len(len).unwrap();
    };
    cut(&sha256_of(&b), 99_999);
    cut(&sha256_of(&c), 2 * CHUNK_SIZE as u64 + 10);
    drop(cache);
    fx.reopen(GB, fast()).await;
    let list = fx.cache().list();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].digest, sha256_of(&c));
    assert_eq!(
        list[0].state,
        ImageState::Partial {
            received: 2 * CHUNK_SIZE as u64
        },
        "cut back to the whole chunks its file holds"
    );
    assert_eq!(
        fx.cache().image_files(),
        [format!("sha256-{}.img", sha256_of(&c).hex())]
    );

    let before = server.requests().len();
    let got = fx
        .cache()
        .fetch(request(&uc, &c), no_progress)
        .await
        .unwrap();
    assert_eq!(read_all(&got), c);
    assert_eq!(
        server.ranges()[before..],
        [Some(format!("bytes={}-", 2 * CHUNK_SIZE))]
    );
    let got = fx
        .cache()
        .fetch(request(&ua, &a), no_progress)
        .await
        .unwrap();
    assert_eq!(read_all(&got), a, "downloaded again");
}

#[tokio::test]
async fn cache_image_whose_file_vanished_is_fetched_again() {
    let server = Server::start().await;
    let img = image(100_000, 70);
    let url = server.add("fw.bin", &img);
    let fx = Fixture::new(GB, fast());
    let got = fx
        .cache()
        .fetch(request(&url, &img), no_progress)
        .await
        .unwrap();
    let path = fx.cache().image_path(got.digest());
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        read_all(&got),
        img,
        "a pinned image reads from its open file"
    );
    drop(got);
    assert!(fx.cache().get(&sha256_of(&img)).unwrap().is_none());
    assert!(fx.cache().list().is_empty(), "dropped");
    let got = fx
        .cache()
        .fetch(request(&url, &img), no_progress)
        .await
        .unwrap();
    assert_eq!(read_all(&got), img);
    assert_eq!(server.requests().len(), 2);
}

/// An image smaller than a chunk from a slow server that never pauses long:
/// bytes are handed to writes by time, so they become durable as they come and
/// a kill mid-way keeps them (before, nothing was written until a whole 1 MiB
/// chunk filled, so such an image restarted from byte 0 after every kill).
/// With `flush_every` of one byte the progress seen is at most one byte ahead
/// of what the meta counts as durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_a_slow_small_download_is_durable_as_it_comes_and_resumes() {
    let server = Server::start().await;
    let img = image(200_000, 61);
    let url = server.add("slow.bin", &img);
    // ~2 s of body, then silence one byte before the end.
    let stall = img.len() - 1;
    server.behave(Behaviour {
        trickle: Some((1_000, 10)),
        stall_after: Some(stall),
        ..Behaviour::default()
    });
    let opts = CacheOptions {
        flush_every: 1,
        checkpoint_every: Duration::from_millis(50),
        // Only the pause at the end counts as one.
        idle: Duration::from_millis(500),
        ..fast()
    };
    let mut fx = Fixture::new(GB, opts.clone());
    let req = request(&url, &img);
    let digest = req.digest.clone();
    let (tx, mut seen) = watch::channel(0u64);
    let history = Arc::new(Mutex::new(Vec::new()));
    let (cache, h) = (fx.cache().clone(), history.clone());
    let fetch = tokio::spawn(async move {
        cache
            .fetch(req, move |done, _| {
                h.lock().unwrap().push(done);
                tx.send_replace(done);
            })
            .await
    });
    tokio::time::timeout(
        Duration::from_secs(60),
        seen.wait_for(|d| *d == stall as u64),
    )
    .await
    .expect("everything sent becomes durable")
    .unwrap();
    let meta = fx.cache().inner.db.meta(&digest).unwrap().expect("a meta");
    assert_eq!(
        meta.state,
        ImageState::Partial {
            received: stall as u64
        }
    );
    // And it became durable along the way, not only when the server paused.
    let history = history.lock().unwrap().clone();
    assert!(
        history
            .iter()
            .filter(|d| (1_000..stall as u64).contains(d))
            .count()
            >= 5,
        "hardly any durable progress before the pause: {history:?}"
    );
    fx.cache().shutdown().await;
    assert!(matches!(
        fetch.await.unwrap().unwrap_err(),
        CacheError::ShutDown
    ));
    fx.reopen(GB, opts).await;
    server.behave(Behaviour::default());
    let got = fx
        .cache()
        .fetch(request(&url, &img), no_progress)
        .await
        .unwrap();
    assert_eq!(read_all(&got), img);
    assert_eq!(server.ranges(), [None, Some(format!("bytes={stall}-"))]);
}

/// A notice whose size the disk cannot hold: refused before a request is made
/// or a byte written (the size is the notice's claim; it may be a lie).
#[tokio::test]
async fn cache_refuses_an_image_larger_than_the_free_space_before_writing() {
    let server = Server::start().await;
    let img = image(1_000, 62);
    let url = server.add("huge.bin", &img);
    let fx = Fixture::new(u64::MAX, fast());
    let req = FetchRequest {
        size: 1 << 60,
        ..request(&url, &img)
    };
    let digest = req.digest.clone();
    let err = fx.cache().fetch(req, no_progress).await.unwrap_err();
    assert!(matches!(err, CacheError::NoSpace { .. }), "{err}");
    assert_eq!(err.step_code(), -2);
    assert!(err.to_string().contains("not enough free space"), "{err}");
    assert!(server.requests().is_empty(), "nothing was requested");
    assert!(fx.cache().image_files().is_empty(), "nothing was written");
    assert!(fx.cache().inner.db.meta(&digest).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_open_adopts_image_files_whose_content_matches_their_name() {
    // A store rebuilt after damage (or a crash between a removal's two
    // steps) leaves image files no meta names. One whose bytes hash to the
    // digest in its name is the image: it is kept and served without a
    // download; one whose bytes do not is deleted.
    let server = Server::start().await;
    let (a, b) = (image(300_000, 70), image(200_000, 71));
    let (ua, ub) = (server.add("a", &a), server.add("b", &b));
    let mut fx = Fixture::new(GB, fast());
    for (u, i) in [(&ua, &a), (&ub, &b)] {
        drop(fx.cache().fetch(request(u, i), no_progress).await.unwrap());
    }
    let cache = fx.cache().clone();
    let (pa, pb) = (
        cache.image_path(&sha256_of(&a)),
        cache.image_path(&sha256_of(&b)),
    );
    fx.cache().shutdown().await;
    fx.cache = None;
    drop(cache);
    // The store is gone (rebuilt empty); B's file lost a byte of content.
    crate::store::wait_unlocked(&fx.dir.path().join("db"));
    std::fs::remove_dir_all(fx.dir.path().join("db")).unwrap();
    {
        let mut bytes = std::fs::read(&pb).unwrap();
        bytes[1000] ^= 0xff;
        std::fs::write(&pb, bytes).unwrap();
    }
    fx.cache = Some(open_cache(&fx.dir, GB, fast()));

    assert!(pa.exists(), "the matching file is kept");
    assert!(
        !pb.exists(),
        "the file whose content does not match is deleted"
    );
    let listed = fx.cache().list();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].state, ImageState::Complete);
    assert_eq!(listed[0].size, a.len() as u64);

    let got = fx
        .cache()
        .fetch(request(&ua, &a), no_progress)
        .await
        .unwrap();
    assert_eq!(read_all(&got), a);
    assert_eq!(
        server.requests().iter().filter(|(n, _)| n == "a").count(),
        1,
        "the adopted image is served from the file, not downloaded again: {:?}",
        server.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_open_completes_a_partial_image_whose_file_holds_the_whole_image() {
    // A store that lost its latest writes (damaged, campaign seed 4) says
    // "partial" for an image whose download had completed: the file holds
    // the whole image, and bytes that hash to the digest are the image.
    let server = Server::start().await;
    let a = image(3 * CHUNK_SIZE + 123, 80);
    let ua = server.add("a", &a);
    let mut fx = Fixture::new(GB, fast());
    drop(
        fx.cache()
            .fetch(request(&ua, &a), no_progress)
            .await
            .unwrap(),
    );
    let d = sha256_of(&a);
    let db = fx.cache().inner.db.clone();
    let mut meta = db.meta(&d).unwrap().unwrap();
    meta.state = ImageState::Partial {
        received: CHUNK_SIZE as u64,
    };
    meta.sha256 = None;
    db.put_meta(&d, &meta).unwrap();
    drop(db);
    // And a partial whose file is whole but wrong stays partial (cut back).
    let b = image(2 * CHUNK_SIZE, 81);
    let ub = server.add("b", &b);
    drop(
        fx.cache()
            .fetch(request(&ub, &b), no_progress)
            .await
            .unwrap(),
    );
    let db = fx.cache().inner.db.clone();
    let db_b = sha256_of(&b);
    let mut meta_b = db.meta(&db_b).unwrap().unwrap();
    meta_b.state = ImageState::Partial { received: 0 };
    db.put_meta(&db_b, &meta_b).unwrap();
    let path_b = fx.cache().image_path(&db_b);
    drop(db);
    {
        let mut bytes = std::fs::read(&path_b).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&path_b, bytes).unwrap();
    }
    fx.reopen(GB, fast()).await;

    let state = |digest: &Digest| {
        fx.cache()
            .list()
            .into_iter()
            .find(|i| i.digest == *digest)
            .unwrap()
            .state
    };
    assert_eq!(state(&d), ImageState::Complete);
    assert_eq!(state(&db_b), ImageState::Partial { received: 0 });
    let got = fx
        .cache()
        .fetch(request(&ua, &a), no_progress)
        .await
        .unwrap();
    assert_eq!(read_all(&got), a);
    assert_eq!(
        server.requests().iter().filter(|(n, _)| n == "a").count(),
        1,
        "served from the file, not downloaded again"
    );
}
