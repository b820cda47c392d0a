//! The firmware cache: images stored in files (`<data_dir>/images`) with their
//! metadata in sled, addressed by the digest the upgrade notice names
//! (`signMethod` + `sign`), downloaded once however many leaves need them.
//!
//! What it does:
//! - **one download per image**: concurrent [`Cache::fetch`]es of a digest
//!   share one HTTP download (a "flight"); every caller gets the progress and
//!   the result;
//! - **streaming**: bytes are appended to the image's file chunk by chunk as
//!   they arrive (two chunks buffered: one received while the one before it
//!   is written and hashed), synced every MiB in the background; neither a
//!   download nor a read keeps the image in memory (sled would: it keeps what
//!   it writes resident, so it holds only the metadata);
//! - **resume**: an interrupted image (dropped connection, restart) continues
//!   with `Range: bytes=N-` after rehashing its stored bytes; a server that
//!   answers 200 instead of 206 is followed from byte 0; broken streams are
//!   retried a bounded number of times with backoff;
//! - **verify first**: an image becomes visible ([`CachedImage`]) only after
//!   its size and digest matched the notice; a mismatch deletes it;
//! - **eviction**: least recently used complete images go when the total
//!   exceeds the cap, never one that is pinned by a live [`CachedImage`].
//!
//! What it is not: it knows nothing of notices, jobs or leaves (the `ota`
//! side builds a [`FetchRequest`] and maps [`CacheError::step_code`] onto
//! progress), and it never reads a byte it has not hashed into an image.
//! Only `db.rs` touches sled and names files; only `download.rs` speaks HTTP
//! and writes image files.

mod db;
mod digest;
mod download;
mod error;
mod image;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use db::ImageState;
pub use digest::{Digest, DigestMethod, ParseDigestError};
pub use error::CacheError;
pub use image::CachedImage;

use db::{Db, Meta};
use image::Pin;

/// The default chunk size: the unit of a download's writes. A download buffers
/// two: one being received, the one before it being written and hashed.
pub const CHUNK_SIZE: usize = 1024 * 1024;

/// Tuning of the cache; [`Default`] is what the daemon uses.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Bytes per write of a download (of new downloads; partial images keep
    /// theirs).
    pub chunk_size: usize,
    /// Attempts of one download before it fails (an attempt that stored at
    /// least one chunk does not count against the limit).
    pub attempts: u32,
    /// Wait before the first retry; doubles up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    /// Longest silence of a server in the middle of a body.
    pub read_timeout: Duration,
    /// Sync the image file and record its length after this many new bytes
    /// (a kill loses at most this)...
    pub flush_every: u64,
    /// ...or after this long, whichever comes first, however small the image
    /// or slow the server (received bytes are written out at the same pace).
    pub checkpoint_every: Duration,
    /// A body silent this long makes everything received durable at once.
    pub idle: Duration,
    /// Where image files go (`[cache] dir`: a bigger partition, or a tmpfs
    /// on a read-mostly gateway); `None`: `<data_dir>/images`.
    pub dir: Option<std::path::PathBuf>,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            chunk_size: CHUNK_SIZE,
            attempts: 5,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(30),
            flush_every: 1024 * 1024,
            checkpoint_every: Duration::from_millis(500),
            idle: Duration::from_millis(20),
            dir: None,
        }
    }
}

/// The URL scheme of images uploaded to the cache (`Cache::add`): such an
/// image is never downloaded, only found by its digest.
pub const UPLOADED_SCHEME: &str = "otagw-upload";

/// What to fetch: the notice's `url`, `size` and digest (`signMethod`+`sign`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    pub url: String,
    pub size: u64,
    pub digest: Digest,
}

impl FetchRequest {
    /// A request from a notice's `url`, `size`, `signMethod` and `sign`.
    pub fn from_notice(
        url: &str,
        size: u64,
        sign_method: &str,
        sign: &str,
    ) -> Result<FetchRequest, ParseDigestError> {
        Ok(FetchRequest {
            url: url.to_string(),
            size,
            digest: Digest::from_sign(sign_method, sign)?,
        })
    }
}

/// One image as [`Cache::list`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub digest: Digest,
    pub size: u64,
    /// Known once complete.
    pub md5: Option<Digest>,
    pub sha256: Option<Digest>,
    pub url: String,
    pub state: ImageState,
    /// Unix milliseconds of the last fetch or completion.
    pub last_use_ms: u64,
    /// Live pins ([`CachedImage`] handles).
    pub pins: usize,
    /// A download of it is running.
    pub downloading: bool,
}

/// The firmware cache. Cheap to clone (one shared state).
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("cap", &self.inner.cap)
            .field("downloads", &lock(&self.inner.flights).len())
            .finish()
    }
}

pub(crate) struct Inner {
    db: Db,
    cap: u64,
    opts: CacheOptions,
    client: reqwest::Client,
    /// Running downloads, by digest; each task removes its own entry.
    flights: Mutex<HashMap<Digest, watch::Receiver<FlightState>>>,
    /// Live pins per digest. Also the lock under which images are pinned and
    /// evicted, so the two never race.
    pins: Mutex<HashMap<Digest, usize>>,
    /// The last `last_use` handed out (strictly increasing: a total LRU order).
    clock: AtomicU64,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// The largest chunk buffer a download has held (bytes), for tests.
    peak_buffer: AtomicUsize,
}

/// What a flight publishes to its callers.
#[derive(Clone)]
enum FlightState {
    Progress { done: u64, total: u64 },
    Done(Result<CachedImage, CacheError>),
}

impl Cache {
    /// Open the cache in `store` with a size cap for complete images.
    pub fn open(store: &crate::store::Store, cap_bytes: u64) -> Result<Cache, CacheError> {
        Cache::open_with(store, cap_bytes, CacheOptions::default())
    }

    pub fn open_with(
        store: &crate::store::Store,
        cap_bytes: u64,
        opts: CacheOptions,
    ) -> Result<Cache, CacheError> {
        assert!(opts.chunk_size > 0, "chunk_size must not be 0");
        crate::tls::init();
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(opts.connect_timeout)
                .read_timeout(opts.read_timeout)
        };
        // The system's CA certificates are read here. A gateway without them
        // (a minimal root file system) still starts: plain HTTP works, and
        // each HTTPS download fails -2 with the certificate error.
        let client = match builder().build() {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(
                    "no usable CA certificates on this machine ({:#}): HTTPS image downloads \
                     will fail until they are installed (Debian: apt-get install \
                     ca-certificates); HTTP downloads work",
                    anyhow::Error::new(e)
                );
                builder()
                    .tls_certs_only([])
                    .build()
                    .map_err(|e| CacheError::Client(Arc::new(e)))?
            }
        };
        let db = Db::open(store, opts.dir.as_deref())?;
        let all = db.all()?;
        let last = all.iter().map(|(_, m)| m.last_use).max().unwrap_or(0);
        for (d, m) in &all {
            if let ImageState::Partial { received } = m.state {
                tracing::info!(digest = %d, received, size = m.size, "interrupted download in the cache");
            }
        }
        Ok(Cache {
            inner: Arc::new(Inner {
                db,
                cap: cap_bytes,
                opts,
                client,
                flights: Mutex::default(),
                pins: Mutex::default(),
                clock: AtomicU64::new(last),
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                peak_buffer: AtomicUsize::new(0),
            }),
        })
    }

    /// The verified image for `req`, downloading it (or joining the running
    /// download of it) unless it is already complete. `progress(done, total)`
    /// is called as stored bytes grow.
    pub async fn fetch(
        &self,
        req: FetchRequest,
        progress: impl Fn(u64, u64) + Send + Sync + 'static,
    ) -> Result<CachedImage, CacheError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(CacheError::ShutDown);
        }
        if let Some(image) = self.inner.pin(&req.digest)? {
            if image.size() != req.size {
                return Err(CacheError::Size {
                    digest: req.digest,
                    expected: req.size,
                    got: image.size(),
                });
            }
            progress(image.size(), image.size());
            return Ok(image);
        }
        download::check_url(&req)?;
        let mut rx = {
            let mut flights = lock(&self.inner.flights);
            match flights.get(&req.digest) {
                Some(rx) => rx.clone(),
                None => {
                    let rx = self.inner.start(req.clone());
                    flights.insert(req.digest.clone(), rx.clone());
                    rx
                }
            }
        };
        let mut last = None;
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                FlightState::Progress { done, total } => {
                    last = Some(done);
                    progress(done, total);
                }
                FlightState::Done(result) => {
                    // Updates are coalesced: make sure every caller sees the end.
                    if let Ok(image) = &result
                        && last != Some(image.size())
                    {
                        progress(image.size(), image.size());
                    }
                    return result;
                }
            }
            if rx.changed().await.is_err() {
                // The task ended; its last word is still in the channel.
                return match rx.borrow().clone() {
                    FlightState::Done(result) => result,
                    FlightState::Progress { .. } => Err(CacheError::ShutDown),
                };
            }
        }
    }

    /// The complete image of `digest`, if the cache has it (no download).
    pub fn get(&self, digest: &Digest) -> Result<Option<CachedImage>, CacheError> {
        self.inner.pin(digest)
    }

    /// Put `bytes` (an image uploaded by an operator, `POST /api/images`)
    /// into the cache as a complete image under its SHA-256, named `origin`
    /// in the listing; pinned for the caller. An image already there is
    /// just pinned.
    pub async fn add(&self, bytes: bytes::Bytes, origin: &str) -> Result<CachedImage, CacheError> {
        use std::io::Write;
        if self.inner.shutdown.is_cancelled() {
            return Err(CacheError::ShutDown);
        }
        let digest = {
            let mut h = digest::Hasher::new(DigestMethod::Sha256);
            h.update(&bytes);
            h.finish()
        };
        if let Some(image) = self.inner.pin(&digest)? {
            return Ok(image);
        }
        let inner = Arc::clone(&self.inner);
        let origin = origin.to_string();
        let d = digest.clone();
        tokio::task::spawn_blocking(move || -> Result<(), CacheError> {
            let size = bytes.len() as u64;
            // The meta first, partial: a crash leaves an orphan the next
            // open adopts (its bytes hash to its name) or deletes.
            let mut meta = Meta {
                size,
                chunk_size: inner.opts.chunk_size as u64,
                md5: None,
                sha256: Some(d.hex().to_string()),
                url: origin,
                state: ImageState::Partial { received: 0 },
                last_use: inner.tick(),
            };
            inner.db.put_meta(&d, &meta)?;
            let path = inner.db.path(&d);
            let mut file = inner.db.open_for_write(&d)?;
            file.set_len(0)
                .and_then(|_| file.write_all(&bytes))
                .and_then(|_| file.sync_all())
                .map_err(db::file_error("write an image file", &path))?;
            meta.state = ImageState::Complete;
            inner.db.put_meta(&d, &meta)
        })
        .await
        .map_err(|e| CacheError::Corrupt {
            digest: digest.clone(),
            reason: format!("the upload task failed: {e}"),
        })??;
        self.inner.db.flush().await?;
        tracing::info!(%digest, "image uploaded into the cache");
        self.inner.pin(&digest)?.ok_or_else(|| CacheError::Corrupt {
            digest,
            reason: "vanished after the upload".into(),
        })
    }

    /// `(bytes, images)` of complete images.
    pub fn usage(&self) -> (u64, usize) {
        self.list()
            .iter()
            .filter(|i| i.state == ImageState::Complete)
            .fold((0, 0), |(b, n), i| (b + i.size, n + 1))
    }

    /// Every image in the cache, complete or partial, oldest use first.
    pub fn list(&self) -> Vec<ImageInfo> {
        let all = match self.inner.db.all() {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!("cannot list the firmware cache: {e}");
                return Vec::new();
            }
        };
        let pins = lock(&self.inner.pins).clone();
        let flights = lock(&self.inner.flights);
        let mut out: Vec<ImageInfo> = all
            .into_iter()
            .map(|(digest, m)| ImageInfo {
                pins: pins.get(&digest).copied().unwrap_or(0),
                downloading: flights.contains_key(&digest),
                md5: m.md5.and_then(|h| Digest::new(DigestMethod::Md5, &h).ok()),
                sha256: m
                    .sha256
                    .and_then(|h| Digest::new(DigestMethod::Sha256, &h).ok()),
                digest,
                size: m.size,
                url: m.url,
                state: m.state,
                last_use_ms: m.last_use,
            })
            .collect();
        out.sort_by(|a, b| (a.last_use_ms, &a.digest).cmp(&(b.last_use_ms, &b.digest)));
        out
    }

    /// Evict least recently used unpinned complete images until the total is
    /// within the cap; returns what was evicted.
    pub fn evict_now(&self) -> Result<Vec<Digest>, CacheError> {
        let pins = lock(&self.inner.pins);
        self.inner.evict(&pins)
    }

    /// The cap on the total size of complete images.
    pub fn cap(&self) -> u64 {
        self.inner.cap
    }

    /// Stop every download (each keeps what it stored, flushed, for a later
    /// resume; its callers get [`CacheError::ShutDown`]) and wait for them.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    #[cfg(test)]
    pub(crate) fn peak_buffer(&self) -> usize {
        self.inner.peak_buffer.load(Ordering::Relaxed)
    }

    /// The names of the files in the images directory, sorted.
    #[cfg(test)]
    pub(crate) fn image_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.inner.db.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// The file of `digest`'s bytes.
    #[cfg(test)]
    pub(crate) fn image_path(&self, digest: &Digest) -> std::path::PathBuf {
        self.inner.db.path(digest)
    }
}

impl Inner {
    /// Spawn the download of `req`; the caller registers the receiver.
    fn start(self: &Arc<Self>, req: FetchRequest) -> watch::Receiver<FlightState> {
        let (tx, rx) = watch::channel(FlightState::Progress {
            done: 0,
            total: req.size,
        });
        let inner = Arc::clone(self);
        self.tasks.spawn(async move {
            let result = download::run(&inner, &req, &tx).await;
            match &result {
                Err(CacheError::ShutDown) => {
                    tracing::debug!(digest = %req.digest, "download stopped by shutdown")
                }
                Err(e) => tracing::warn!(digest = %req.digest, "download failed: {e}"),
                Ok(_) => {}
            }
            lock(&inner.flights).remove(&req.digest);
            tx.send_replace(FlightState::Done(result));
        });
        rx
    }

    /// Pin `digest` if it is complete, touching its last use.
    fn pin(self: &Arc<Self>, digest: &Digest) -> Result<Option<CachedImage>, CacheError> {
        let mut pins = lock(&self.pins);
        let Some(mut meta) = self.db.meta(digest)? else {
            return Ok(None);
        };
        if meta.state != ImageState::Complete {
            return Ok(None);
        }
        let Some(file) = self.db.open_for_read(digest, meta.size)? else {
            // Deleted or cut short behind our back: gone, to be fetched again.
            tracing::warn!(%digest, "cached image file missing or short: dropped");
            self.db.remove(digest)?;
            return Ok(None);
        };
        meta.last_use = self.tick();
        self.db.put_meta(digest, &meta)?;
        *pins.entry(digest.clone()).or_default() += 1;
        Ok(Some(CachedImage::new(Pin {
            inner: Arc::clone(self),
            digest: digest.clone(),
            size: meta.size,
            file,
        })))
    }

    /// Called by the last clone of a [`CachedImage`]: an image that stayed
    /// over the cap only because it was pinned goes now.
    fn unpin(&self, digest: &Digest) {
        let mut pins = lock(&self.pins);
        if let Some(n) = pins.get_mut(digest) {
            *n -= 1;
            if *n == 0 {
                pins.remove(digest);
                if let Err(e) = self.evict(&pins) {
                    tracing::warn!("firmware cache eviction failed: {e}");
                }
            }
        }
    }

    /// Evict under the pin lock (so nothing is pinned meanwhile).
    fn evict(
        &self,
        pins: &MutexGuard<'_, HashMap<Digest, usize>>,
    ) -> Result<Vec<Digest>, CacheError> {
        let mut complete: Vec<(Digest, Meta)> = self
            .db
            .all()?
            .into_iter()
            .filter(|(_, m)| m.state == ImageState::Complete)
            .collect();
        let mut total: u64 = complete.iter().map(|(_, m)| m.size).sum();
        let mut evicted = Vec::new();
        if total <= self.cap {
            return Ok(evicted);
        }
        complete.sort_by(|a, b| (a.1.last_use, &a.0).cmp(&(b.1.last_use, &b.0)));
        for (digest, meta) in complete {
            if total <= self.cap {
                break;
            }
            if pins.contains_key(&digest) {
                continue;
            }
            self.db.remove(&digest)?;
            total -= meta.size;
            tracing::info!(%digest, size = meta.size, "evicted from the firmware cache");
            evicted.push(digest);
        }
        Ok(evicted)
    }

    /// A `last_use` stamp: now in unix ms, and always later than the last one.
    fn tick(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let prev = self
            .clock
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(now);
        now.max(prev + 1)
    }
}

/// Lock a std mutex, ignoring poisoning (the maps stay consistent: every
/// critical section is a few map operations).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
