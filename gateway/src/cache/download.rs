//! One download: the body of a flight. Streams the HTTP body into the image's
//! file chunk by chunk, resumes with Range, retries with backoff, verifies size
//! and digest, and only then marks the image complete.

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

use super::db::{ImageState, Meta, file_error};
use super::digest::{DigestMethod, Hashers};
use super::error::{CacheError, reason};
use super::{CachedImage, FetchRequest, FlightState, Inner};

/// Refuse what HTTP cannot fetch before starting a flight.
pub(super) fn check_url(req: &FetchRequest) -> Result<(), CacheError> {
    match url::Url::parse(&req.url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
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
/// `buf` holds the chunk being filled.
struct Progress {
    received: u64,
    durable: u64,
    hashers: Hashers,
    buf: BytesMut,
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
    let mut p = Progress {
        received: 0,
        durable: 0,
        hashers: Hashers::default(),
        buf: BytesMut::with_capacity(chunk as usize),
    };
    let result = d.download(&mut p, resume).await;
    match &result {
        Err(CacheError::Digest { .. } | CacheError::Size { .. }) => {
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
            let (stored, hashers) = self.rehash(received).await?;
            tracing::info!(digest = %self.req.digest, stored, size = self.req.size, "resuming download");
            // The meta never counts more than the file holds: record what
            // the rehash found first, then cut the file's unsynced tail.
            self.save(stored)?;
            self.set_len(stored)?;
            p.received = stored;
            p.durable = stored;
            p.hashers = hashers;
        }
        self.report(p.received);

        let mut failures = 0u32;
        loop {
            if p.received == self.req.size {
                break;
            }
            let before = p.received;
            match self.attempt(p).await? {
                Attempt::Complete => break,
                Attempt::Retry(e) => {
                    p.buf.clear();
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
                        self.restart(p)?;
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
                    self.restart(p)?;
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
                self.restart(p)?;
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
        loop {
            let item = tokio::select! {
                _ = self.inner.shutdown.cancelled() => return Err(CacheError::ShutDown),
                item = body.next() => item,
            };
            let mut bytes = match item {
                None => break,
                Some(Ok(b)) => b,
                Some(Err(e)) => {
                    let at = p.received + p.buf.len() as u64;
                    return Ok(Attempt::Retry(self.transport(e, at)));
                }
            };
            let seen = p.received + (p.buf.len() + bytes.len()) as u64;
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
        }
        let seen = p.received + p.buf.len() as u64;
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

    /// Append the buffered chunk to the file, hash it, count it; every
    /// `flush_every` bytes make them durable ([`Download::checkpoint`]).
    async fn commit(&self, p: &mut Progress) -> Result<(), CacheError> {
        let len = p.buf.len();
        self.inner
            .peak_buffer
            .fetch_max(p.buf.capacity().max(len), Ordering::Relaxed);
        // Off the runtime: a write may wait for the disk, hashing takes a while.
        let (buf, hashers) = (std::mem::take(&mut p.buf), std::mem::take(&mut p.hashers));
        let (file, at) = (Arc::clone(&self.file), p.received);
        let (mut buf, hashers, written) = tokio::task::spawn_blocking(move || {
            let mut hashers = hashers;
            let written = file.write_all_at(&buf, at);
            if written.is_ok() {
                hashers.update(&buf);
            }
            (buf, hashers, written)
        })
        .await
        .map_err(|e| self.corrupt(format!("write: {e}")))?;
        written.map_err(file_error("write an image file", &self.path))?;
        buf.clear();
        p.buf = buf;
        p.hashers = hashers;
        p.received += len as u64;
        if p.received - p.durable >= self.inner.opts.flush_every {
            self.checkpoint(p).await?;
        }
        self.report(p.received);
        Ok(())
    }

    /// Make the bytes received so far durable: sync the file, then count them
    /// in the meta, then flush the store (in that order, so the meta never
    /// counts bytes a crash can lose).
    async fn checkpoint(&self, p: &mut Progress) -> Result<(), CacheError> {
        self.sync().await?;
        self.save(p.received)?;
        self.inner.db.flush().await?;
        p.durable = p.received;
        Ok(())
    }

    /// Forget what was stored and start from byte 0 (the meta first, then
    /// the file).
    fn restart(&self, p: &mut Progress) -> Result<(), CacheError> {
        p.received = 0;
        p.durable = 0;
        p.hashers = Hashers::default();
        p.buf.clear();
        self.save(0)?;
        self.set_len(0)?;
        self.report(0);
        Ok(())
    }

    /// Check size and digest; sync the file, mark complete, pin, evict others.
    async fn finish(&self, p: &mut Progress) -> Result<CachedImage, CacheError> {
        let req = self.req;
        if p.received != req.size {
            return Err(self.size(p.received));
        }
        let (md5, sha256) = std::mem::take(&mut p.hashers).finish();
        let got = match req.digest.method() {
            DigestMethod::Md5 => &md5,
            DigestMethod::Sha256 => &sha256,
        };
        if *got != req.digest {
            return Err(CacheError::Digest {
                expected: req.digest.clone(),
                got: got.clone(),
            });
        }
        self.sync().await?;
        let meta = Meta {
            size: req.size,
            chunk_size: self.chunk,
            md5: Some(md5.hex().to_string()),
            sha256: Some(sha256.hex().to_string()),
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

    /// Rehash the stored prefix (the hash state cannot be persisted), one
    /// chunk at a time. Returns how much of it is really there: up to the
    /// first short chunk of the file.
    async fn rehash(&self, received: u64) -> Result<(u64, Hashers), CacheError> {
        let file = Arc::clone(&self.file);
        let (chunk, size) = (self.chunk, self.req.size);
        let read = tokio::task::spawn_blocking(move || {
            let mut hashers = Hashers::default();
            let mut buf = vec![0u8; chunk as usize];
            let mut stored = 0u64;
            while stored < received {
                let want = chunk.min(size - stored) as usize;
                if !read_exact_at(&file, &mut buf[..want], stored)? {
                    break;
                }
                hashers.update(&buf[..want]);
                stored += want as u64;
            }
            Ok((stored, hashers))
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

    fn report(&self, done: u64) {
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
