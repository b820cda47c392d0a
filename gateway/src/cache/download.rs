//! One download: the body of a flight. Streams the HTTP body into the image's
//! file chunk by chunk, resumes with Range, retries with backoff, verifies size
//! and digest, and only then marks the image complete.
//!
//! The stages overlap: while one chunk is written and hashed on a blocking
//! thread, the next is received; a checkpoint (sync the file, then count the
//! bytes in the meta) runs in the background while both go on. Every state
//! change that is not a plain append (a restart, a failure, completion) first
//! waits for both ([`Download::drain`]), so a meta never counts bytes the file
//! may not hold, and nothing in flight writes after the image is removed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header;
use tokio::sync::watch;

use tokio::task::JoinHandle;

use super::db::{ImageState, Meta, file_error};
use super::digest::{DigestMethod, Hasher};
use super::error::{CacheError, reason};
use super::{CachedImage, FetchRequest, FlightState, Inner};

/// Refuse what HTTP cannot fetch before starting a flight.
pub(super) fn check_url(req: &FetchRequest) -> Result<(), CacheError> {
    match url::Url::parse(&req.url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        Ok(u) if u.scheme() == super::UPLOADED_SCHEME => Err(CacheError::BadRequest {
            url: req.url.clone(),
            reason: "the uploaded image is no longer in the gateway's cache: upload it again \
                     (otagw upgrade --image FILE)"
                .into(),
        }),
        Ok(u) => Err(CacheError::BadRequest {
            url: req.url.clone(),
            reason: format!("unsupported scheme {:?}", u.scheme()),
        }),
        Err(e) => Err(CacheError::BadRequest {
            url: req.url.clone(),
            reason: format!("bad URL ({e})"),
        }),
    }
}

/// Where a download stands: `received` bytes are in the file (whole chunks)
/// and hashed, the first `durable` of them synced and counted by the meta;
/// `buf` holds the chunk being filled, `writing` the one before it.
struct Progress {
    received: u64,
    durable: u64,
    /// `None` while a write holds it (or after a write task died).
    hasher: Option<Hasher>,
    buf: BytesMut,
    /// The buffer of the last settled write, for the next chunk.
    spare: Option<BytesMut>,
    /// The chunk being written and hashed.
    writing: Option<InFlight>,
    /// A checkpoint running in the background, and the count it records.
    syncing: Option<(JoinHandle<Result<(), CacheError>>, u64)>,
    /// When received bytes were last handed to a write, and when a checkpoint
    /// last started: both happen at least every `checkpoint_every`.
    committed_at: tokio::time::Instant,
    checkpointed_at: tokio::time::Instant,
}

/// A chunk being appended to the file and hashed, on two blocking threads at
/// once (hashing and writing one after the other made the thread doing both
/// the download's bottleneck).
struct InFlight {
    write: JoinHandle<std::io::Result<()>>,
    hash: JoinHandle<Hasher>,
    buf: Arc<BytesMut>,
}

impl Progress {
    fn new(method: DigestMethod, chunk: u64) -> Progress {
        Progress {
            received: 0,
            durable: 0,
            hasher: Some(Hasher::new(method)),
            buf: BytesMut::with_capacity(chunk as usize),
            spare: None,
            writing: None,
            syncing: None,
            committed_at: tokio::time::Instant::now(),
            checkpointed_at: tokio::time::Instant::now(),
        }
    }

    /// The offset of the next byte the body delivers.
    fn at(&self) -> u64 {
        let writing = self.writing.as_ref().map_or(0, |w| w.buf.len());
        self.received + (writing + self.buf.len()) as u64
    }
}

/// How one attempt ended, when it did not fail for good.
enum Attempt {
    /// Every byte is stored.
    Complete,
    /// A transient failure: try again (from `received`).
    Retry(CacheError),
}

struct Download<'a> {
    inner: &'a Arc<Inner>,
    req: &'a FetchRequest,
    tx: &'a watch::Sender<FlightState>,
    chunk: u64,
    /// The image's file, open for reading and writing.
    file: Arc<File>,
    path: PathBuf,
}

/// Download, verify and pin `req`'s image.
pub(super) async fn run(
    inner: &Arc<Inner>,
    req: &FetchRequest,
    tx: &watch::Sender<FlightState>,
) -> Result<CachedImage, CacheError> {
    // Completed by an earlier flight between the caller's check and now?
    if let Some(image) = inner.pin(&req.digest)? {
        return Ok(image);
    }
    let existing = inner.db.meta(&req.digest)?;
    let chunk = match &existing {
        Some(m) if m.size == req.size && m.chunk_size > 0 => m.chunk_size,
        _ => inner.opts.chunk_size as u64,
    };
    let resume = match &existing {
        Some(m) if m.size == req.size && m.chunk_size == chunk => match m.state {
            ImageState::Partial { received } if received > 0 => Some(received),
            _ => None,
        },
        _ => None,
    };
    // Bounded before a byte is written: the notice's size is a claim, and a
    // lie must not fill the disk (the body is cut at `size` as it comes; the
    // daemon refuses notices over `[cache] max_image_mib` before this).
    let needed = req.size - resume.unwrap_or(0).min(req.size);
    let dir = inner.db.dir();
    let free = free_space(dir).map_err(file_error("read the free space of", dir))?;
    if needed > free {
        return Err(CacheError::NoSpace {
            needed,
            free,
            path: dir.to_path_buf(),
        });
    }
    if resume.is_none() {
        // Nothing to continue (or a complete image of another size, or
        // another chunk size): start clean. The meta goes before the file is
        // created, so a crash never leaves a file without one.
        match existing {
            Some(_) => inner.db.remove(&req.digest)?,
            None => inner.db.remove_file(&req.digest)?,
        }
        save(inner, req, chunk, 0)?;
    }
    let path = inner.db.path(&req.digest);
    let d = Download {
        inner,
        req,
        tx,
        chunk,
        file: Arc::new(inner.db.open_for_write(&req.digest)?),
        path,
    };
    let mut p = Progress::new(req.digest.method(), chunk);
    let result = d.download(&mut p, resume).await;
    match &result {
        Err(CacheError::Digest { .. } | CacheError::Size { .. }) => {
            // Nothing in flight may write (the file or the meta) after this.
            if let Err(e) = d.drain(&mut p).await {
                tracing::warn!(digest = %req.digest, "while dropping a bad image: {e}");
            }
            if let Err(e) = inner.db.remove(&req.digest) {
                tracing::warn!(digest = %req.digest, "cannot remove a bad image: {e}");
            }
        }
        Err(_) => {
            // Keep what is stored for a resume; make it durable.
            if let Err(e) = d.checkpoint(&mut p).await {
                tracing::warn!("cannot save the firmware cache's partial image: {e}");
            }
        }
        Ok(_) => {}
    }
    result
}

/// Bytes an unprivileged writer may still write in `dir`'s file system.
fn free_space(dir: &std::path::Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Record a partial state of `received` bytes.
fn save(inner: &Inner, req: &FetchRequest, chunk: u64, received: u64) -> Result<(), CacheError> {
    let meta = Meta {
        size: req.size,
        chunk_size: chunk,
        md5: None,
        sha256: None,
        url: req.url.clone(),
        state: ImageState::Partial { received },
        last_use: inner.clock.load(Ordering::Relaxed),
    };
    inner.db.put_meta(&req.digest, &meta)
}

impl Download<'_> {
    async fn download(
        &self,
        p: &mut Progress,
        resume: Option<u64>,
    ) -> Result<CachedImage, CacheError> {
        if let Some(received) = resume {
            let (stored, hasher) = self.rehash(received).await?;
            tracing::info!(digest = %self.req.digest, stored, size = self.req.size, "resuming download");
            // The meta never counts more than the file holds: record what
            // the rehash found first, then cut the file's unsynced tail.
            self.save(stored)?;
            self.set_len(stored)?;
            p.received = stored;
            p.durable = stored;
            p.hasher = Some(hasher);
        }
        self.report(p);

        let mut failures = 0u32;
        loop {
            if p.received == self.req.size {
                break;
            }
            let before = p.received;
            match self.attempt(p).await? {
                Attempt::Complete => break,
                Attempt::Retry(e) => {
                    // Keep every byte received (they are the body's, in
                    // order); the next request starts after them.
                    if !p.buf.is_empty() {
                        self.commit(p).await?;
                    }
                    self.settle_write(p).await?;
                    if p.received > before {
                        failures = 0;
                    }
                    failures += 1;
                    if failures >= self.inner.opts.attempts {
                        return Err(e);
                    }
                    let wait = self
                        .inner
                        .opts
                        .backoff
                        .saturating_mul(1 << (failures - 1).min(16))
                        .min(self.inner.opts.max_backoff);
                    tracing::info!(digest = %self.req.digest, attempt = failures, ?wait, "retrying download: {e}");
                    tokio::select! {
                        _ = self.inner.shutdown.cancelled() => return Err(CacheError::ShutDown),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        self.finish(p).await
    }

    /// One HTTP request from `p.received` to the end (or a failure).
    async fn attempt(&self, p: &mut Progress) -> Result<Attempt, CacheError> {
        let req = self.req;
        let mut rb = self
            .inner
            .client
            .get(&req.url)
            .header(header::ACCEPT_ENCODING, "identity");
        if p.received > 0 {
            rb = rb.header(header::RANGE, format!("bytes={}-", p.received));
        }
        let sent = tokio::select! {
            _ = self.inner.shutdown.cancelled() => return Err(CacheError::ShutDown),
            r = rb.send() => r,
        };
        let resp = match sent {
            Ok(r) => r,
            Err(e) => return Ok(Attempt::Retry(self.transport(e, p.received))),
        };
        let status = resp.status();
        match status {
            StatusCode::PARTIAL_CONTENT if p.received > 0 => {
                let range = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range);
                match range {
                    Some((_, Some(total))) if total != req.size => {
                        return Err(self.size(total));
                    }
                    Some((start, _)) if start == p.received => {}
                    _ => {
                        // Not the range we asked for: start over without one.
                        self.restart(p).await?;
                        return Ok(Attempt::Retry(CacheError::Download {
                            url: req.url.clone(),
                            digest: req.digest.clone(),
                            offset: 0,
                            reason: "unexpected Content-Range".into(),
                            source: None,
                        }));
                    }
                }
            }
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => {
                if p.received > 0 {
                    tracing::info!(digest = %req.digest, "server ignored the Range request; starting over");
                    self.restart(p).await?;
                }
                if let Some(len) = resp.content_length()
                    && status == StatusCode::OK
                    && len != req.size
                {
                    return Err(self.size(len));
                }
            }
            StatusCode::FORBIDDEN => {
                return Err(CacheError::UrlExpired {
                    url: req.url.clone(),
                    digest: req.digest.clone(),
                });
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                self.restart(p).await?;
                return Ok(Attempt::Retry(self.status(status, p.received)));
            }
            s if s.is_server_error()
                || s == StatusCode::REQUEST_TIMEOUT
                || s == StatusCode::TOO_MANY_REQUESTS =>
            {
                return Ok(Attempt::Retry(self.status(status, p.received)));
            }
            _ => return Err(self.status(status, p.received)),
        }

        let mut body = resp.bytes_stream();
        let every = self.inner.opts.checkpoint_every;
        loop {
            let busy = p.writing.is_some() || p.syncing.is_some() || !p.buf.is_empty();
            let item = tokio::select! {
                _ = self.inner.shutdown.cancelled() => return Err(CacheError::ShutDown),
                item = body.next() => item,
                // The server went quiet: finish the work in flight and make
                // everything received durable now, rather than whenever the
                // next chunk fills (a stalled server may never send it).
                () = tokio::time::sleep(self.inner.opts.idle), if busy => {
                    if !p.buf.is_empty() {
                        self.commit(p).await?;
                    }
                    self.checkpoint(p).await?;
                    self.report(p);
                    continue;
                }
            };
            let mut bytes = match item {
                None => break,
                Some(Ok(b)) => b,
                Some(Err(e)) => return Ok(Attempt::Retry(self.transport(e, p.at()))),
            };
            let seen = p.at() + bytes.len() as u64;
            if seen > req.size {
                return Err(self.size(seen));
            }
            while !bytes.is_empty() {
                let room = self.chunk as usize - p.buf.len();
                let piece = bytes.split_to(room.min(bytes.len()));
                p.buf.extend_from_slice(&piece);
                if p.buf.len() == self.chunk as usize {
                    self.commit(p).await?;
                }
            }
            // A slow body or a small image: hand what arrived to a write by
            // time too, so checkpoints (and resumes) do not wait for a whole
            // chunk.
            if !p.buf.is_empty() && p.committed_at.elapsed() >= every {
                self.commit(p).await?;
            }
        }
        let seen = p.at();
        if seen < req.size {
            return Ok(Attempt::Retry(CacheError::Download {
                url: req.url.clone(),
                digest: req.digest.clone(),
                offset: seen,
                reason: format!("connection closed at byte {seen} of {}", req.size),
                source: None,
            }));
        }
        if !p.buf.is_empty() {
            self.commit(p).await?;
        }
        Ok(Attempt::Complete)
    }

    /// Hand the filled chunk to a blocking thread that appends it to the file
    /// and hashes it, after the previous chunk's write settled (at most one
    /// chunk is in flight while the next is received).
    async fn commit(&self, p: &mut Progress) -> Result<(), CacheError> {
        self.settle_write(p).await?;
        let len = p.buf.len();
        let next = p
            .spare
            .take()
            .unwrap_or_else(|| BytesMut::with_capacity(self.chunk as usize));
        let buf = Arc::new(std::mem::replace(&mut p.buf, next));
        p.committed_at = tokio::time::Instant::now();
        self.inner.peak_buffer.fetch_max(
            buf.capacity().max(len) + p.buf.capacity(),
            Ordering::Relaxed,
        );
        let mut hasher = p
            .hasher
            .take()
            .ok_or_else(|| self.corrupt("hash state lost".into()))?;
        let (file, at, data) = (Arc::clone(&self.file), p.received, Arc::clone(&buf));
        let write = tokio::task::spawn_blocking(move || file.write_all_at(&data, at));
        let data = Arc::clone(&buf);
        let hash = tokio::task::spawn_blocking(move || {
            hasher.update(&data);
            hasher
        });
        p.writing = Some(InFlight { write, hash, buf });
        Ok(())
    }

    /// Wait for the chunk in flight, count it, and start a checkpoint in the
    /// background every `flush_every` bytes.
    async fn settle_write(&self, p: &mut Progress) -> Result<(), CacheError> {
        let Some(InFlight { write, hash, buf }) = p.writing.take() else {
            return Ok(());
        };
        let (written, hashed) = (write.await, hash.await);
        let written = written.map_err(|e| self.corrupt(format!("write: {e}")))?;
        p.hasher = Some(hashed.map_err(|e| self.corrupt(format!("hash: {e}")))?);
        written.map_err(file_error("write an image file", &self.path))?;
        let len = buf.len();
        // Both tasks are done and dropped their references: reuse the buffer.
        if let Ok(mut buf) = Arc::try_unwrap(buf) {
            buf.clear();
            p.spare = Some(buf);
        }
        p.received += len as u64;
        self.report(p);
        if p.syncing.as_ref().is_some_and(|(t, _)| t.is_finished()) {
            self.settle_sync(p).await?;
        }
        let opts = &self.inner.opts;
        let due = p.received - p.durable >= opts.flush_every
            || (p.received > p.durable && p.checkpointed_at.elapsed() >= opts.checkpoint_every);
        if p.syncing.is_none() && due {
            p.checkpointed_at = tokio::time::Instant::now();
            p.syncing = Some((self.background_checkpoint(p.received), p.received));
        }
        Ok(())
    }

    /// Sync the file, then count `upto` bytes in the meta and flush the store,
    /// while the download goes on. Writes after the sync began do not matter:
    /// `sync_data` makes durable what was written before it was called, and
    /// `upto` counts only that.
    fn background_checkpoint(&self, upto: u64) -> JoinHandle<Result<(), CacheError>> {
        let (file, path) = (Arc::clone(&self.file), self.path.clone());
        let (inner, req, chunk) = (Arc::clone(self.inner), self.req.clone(), self.chunk);
        tokio::spawn(async move {
            let digest = req.digest.clone();
            tokio::task::spawn_blocking(move || file.sync_data())
                .await
                .map_err(|e| CacheError::Corrupt {
                    digest,
                    reason: format!("sync: {e}"),
                })?
                .map_err(file_error("sync an image file", &path))?;
            save(&inner, &req, chunk, upto)?;
            inner.db.flush().await
        })
    }

    /// Wait for the background checkpoint, if one runs.
    async fn settle_sync(&self, p: &mut Progress) -> Result<(), CacheError> {
        let Some((task, upto)) = p.syncing.take() else {
            return Ok(());
        };
        task.await
            .map_err(|e| self.corrupt(format!("sync: {e}")))??;
        p.durable = p.durable.max(upto);
        self.report(p);
        Ok(())
    }

    /// Wait for the write and the checkpoint in flight (both, whatever the
    /// first one's outcome); the first error wins.
    async fn drain(&self, p: &mut Progress) -> Result<(), CacheError> {
        let written = self.settle_write(p).await;
        let synced = self.settle_sync(p).await;
        written.and(synced)
    }

    /// Make the bytes received so far durable: sync the file, then count them
    /// in the meta, then flush the store (in that order, so the meta never
    /// counts bytes a crash can lose).
    async fn checkpoint(&self, p: &mut Progress) -> Result<(), CacheError> {
        let drained = self.drain(p).await;
        if p.received > p.durable {
            self.background_checkpoint(p.received)
                .await
                .map_err(|e| self.corrupt(format!("sync: {e}")))??;
            p.durable = p.received;
        }
        drained
    }

    /// Forget what was stored and start from byte 0 (the meta first, then
    /// the file).
    async fn restart(&self, p: &mut Progress) -> Result<(), CacheError> {
        self.drain(p).await?;
        p.received = 0;
        p.durable = 0;
        p.hasher = Some(Hasher::new(self.req.digest.method()));
        p.buf.clear();
        self.save(0)?;
        self.set_len(0)?;
        self.report(p);
        Ok(())
    }

    /// Check size and digest; sync the file, mark complete, pin, evict others.
    async fn finish(&self, p: &mut Progress) -> Result<CachedImage, CacheError> {
        let req = self.req;
        self.drain(p).await?;
        if p.received != req.size {
            return Err(self.size(p.received));
        }
        let got = p
            .hasher
            .take()
            .ok_or_else(|| self.corrupt("hash state lost".into()))?
            .finish();
        if got != req.digest {
            return Err(CacheError::Digest {
                expected: req.digest.clone(),
                got,
            });
        }
        self.sync().await?;
        // Only the notice's digest is computed (see `Hasher`).
        let hex = Some(got.hex().to_string());
        let (md5, sha256) = match got.method() {
            DigestMethod::Md5 => (hex, None),
            DigestMethod::Sha256 => (None, hex),
        };
        let meta = Meta {
            size: req.size,
            chunk_size: self.chunk,
            md5,
            sha256,
            url: req.url.clone(),
            state: ImageState::Complete,
            last_use: self.inner.tick(),
        };
        self.inner.db.put_meta(&req.digest, &meta)?;
        self.inner.db.flush().await?;
        p.durable = p.received;
        tracing::info!(digest = %req.digest, size = req.size, "image downloaded and verified");
        let image = self
            .inner
            .pin(&req.digest)?
            .ok_or_else(|| self.corrupt("vanished after completion".into()))?;
        {
            let pins = super::lock(&self.inner.pins);
            match self.inner.evict(&pins) {
                Ok(evicted) if !evicted.is_empty() => {
                    tracing::info!(count = evicted.len(), "cache over its cap: evicted")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("firmware cache eviction failed: {e}"),
            }
        }
        Ok(image)
    }

    /// Rehash the stored prefix of `received` bytes (the hash state cannot be
    /// persisted), one chunk at a time. Returns how much of it is really
    /// there: up to the first short read of the file.
    async fn rehash(&self, received: u64) -> Result<(u64, Hasher), CacheError> {
        let file = Arc::clone(&self.file);
        let (chunk, size) = (self.chunk, self.req.size);
        let method = self.req.digest.method();
        let read = tokio::task::spawn_blocking(move || {
            let mut hasher = Hasher::new(method);
            let mut buf = vec![0u8; chunk as usize];
            let mut stored = 0u64;
            while stored < received {
                let want = chunk.min(received.min(size) - stored) as usize;
                if !read_exact_at(&file, &mut buf[..want], stored)? {
                    break;
                }
                hasher.update(&buf[..want]);
                stored += want as u64;
            }
            Ok((stored, hasher))
        })
        .await
        .map_err(|e| self.corrupt(format!("rehash: {e}")))?;
        read.map_err(file_error("read an image file", &self.path))
    }

    /// Make the file's bytes durable.
    async fn sync(&self) -> Result<(), CacheError> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|e| self.corrupt(format!("sync: {e}")))?
            .map_err(file_error("sync an image file", &self.path))
    }

    fn set_len(&self, len: u64) -> Result<(), CacheError> {
        self.file
            .set_len(len)
            .map_err(file_error("truncate an image file", &self.path))
    }

    /// Record a partial state of `received` bytes.
    fn save(&self, received: u64) -> Result<(), CacheError> {
        save(self.inner, self.req, self.chunk, received)
    }

    fn corrupt(&self, reason: String) -> CacheError {
        CacheError::Corrupt {
            digest: self.req.digest.clone(),
            reason,
        }
    }

    /// Publish progress: what is stored, but never more than `flush_every`
    /// beyond what is durable, so that progress seen by anyone is (nearly)
    /// what survives a kill.
    fn report(&self, p: &Progress) {
        let done = p
            .received
            .min(p.durable.saturating_add(self.inner.opts.flush_every));
        self.tx.send_replace(FlightState::Progress {
            done,
            total: self.req.size,
        });
    }

    fn size(&self, got: u64) -> CacheError {
        CacheError::Size {
            digest: self.req.digest.clone(),
            expected: self.req.size,
            got,
        }
    }

    fn status(&self, status: StatusCode, offset: u64) -> CacheError {
        CacheError::Status {
            url: self.req.url.clone(),
            digest: self.req.digest.clone(),
            offset,
            status: status.as_u16(),
        }
    }

    fn transport(&self, e: reqwest::Error, offset: u64) -> CacheError {
        CacheError::Download {
            url: self.req.url.clone(),
            digest: self.req.digest.clone(),
            offset,
            reason: reason(&e),
            source: Some(Arc::new(e.without_url())),
        }
    }
}

/// Fill `buf` from `offset`; `false` if the file ends first.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// `bytes START-END/TOTAL` → (START, TOTAL if known).
fn content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.trim().parse().ok()?, total))
}

#[cfg(test)]
mod tests {
    use super::content_range;

    #[test]
    fn cache_parses_content_range() {
        assert_eq!(content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(content_range("bytes */200"), None);
        assert_eq!(content_range("items 1-2/3"), None);
    }
}
