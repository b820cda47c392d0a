//! One download: the body of a flight. Streams the HTTP body into chunks,
//! resumes with Range, retries with backoff, verifies size and digest, and only
//! then marks the image complete.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header;
use tokio::sync::watch;

use super::db::{Db, ImageState, Meta};
use super::digest::{Digest, DigestMethod, Hashers};
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

/// Where a download stands: `received` bytes are stored (whole chunks) and
/// hashed; `buf` holds the chunk being filled.
struct Progress {
    received: u64,
    hashers: Hashers,
    buf: BytesMut,
    unflushed: u64,
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
    let d = Download {
        inner,
        req,
        tx,
        chunk,
    };
    let result = d.download(existing).await;
    match &result {
        Err(CacheError::Digest { .. } | CacheError::Size { .. }) => {
            if let Err(e) = inner.db.remove(&req.digest) {
                tracing::warn!(digest = %req.digest, "cannot remove a bad image: {e}");
            }
        }
        Err(_) => {
            // Keep what is stored for a resume; make it durable.
            if let Err(e) = inner.db.flush().await {
                tracing::warn!("cannot flush the firmware cache: {e}");
            }
        }
        Ok(_) => {}
    }
    result
}

impl Download<'_> {
    async fn download(&self, existing: Option<Meta>) -> Result<CachedImage, CacheError> {
        let mut p = Progress {
            received: 0,
            hashers: Hashers::default(),
            buf: BytesMut::with_capacity(self.chunk as usize),
            unflushed: 0,
        };
        match existing {
            Some(m)
                if m.size == self.req.size
                    && m.chunk_size == self.chunk
                    && matches!(m.state, ImageState::Partial { received } if received > 0) =>
            {
                let ImageState::Partial { received } = m.state else {
                    unreachable!()
                };
                let (stored, hashers) = self.rehash(received).await?;
                tracing::info!(digest = %self.req.digest, stored, size = self.req.size, "resuming download");
                p.received = stored;
                p.hashers = hashers;
                self.save(p.received)?;
            }
            Some(_) => {
                // A complete image of another size, or another chunk size:
                // start clean.
                self.inner.db.remove(&self.req.digest)?;
                self.save(0)?;
            }
            None => self.save(0)?,
        }
        self.report(p.received);

        let mut failures = 0u32;
        loop {
            if p.received == self.req.size {
                break;
            }
            let before = p.received;
            match self.attempt(&mut p).await? {
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

    /// Store the buffered chunk, hash it, count it.
    async fn commit(&self, p: &mut Progress) -> Result<(), CacheError> {
        let len = p.buf.len();
        self.inner
            .peak_buffer
            .fetch_max(p.buf.capacity().max(len), Ordering::Relaxed);
        let index = p.received / self.chunk;
        self.inner.db.put_chunk(&self.req.digest, index, &p.buf)?;
        p.hashers.update(&p.buf);
        p.received += len as u64;
        p.buf.clear();
        self.save(p.received)?;
        p.unflushed += len as u64;
        if p.unflushed >= self.inner.opts.flush_every {
            self.inner.db.flush().await?;
            p.unflushed = 0;
        }
        self.report(p.received);
        Ok(())
    }

    /// Forget what was stored and start from byte 0 (the old chunks are
    /// overwritten as the new ones arrive).
    fn restart(&self, p: &mut Progress) -> Result<(), CacheError> {
        p.received = 0;
        p.hashers = Hashers::default();
        p.buf.clear();
        self.save(0)?;
        self.report(0);
        Ok(())
    }

    /// Check size and digest; mark complete, pin, evict others.
    async fn finish(&self, p: Progress) -> Result<CachedImage, CacheError> {
        let req = self.req;
        if p.received != req.size {
            return Err(self.size(p.received));
        }
        let (md5, sha256) = p.hashers.finish();
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
        self.inner.db.flush().await?;
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
        tracing::info!(digest = %req.digest, size = req.size, "image downloaded and verified");
        let image = self
            .inner
            .pin(&req.digest)?
            .ok_or_else(|| CacheError::Corrupt {
                digest: req.digest.clone(),
                reason: "vanished after completion".into(),
            })?;
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

    /// Rehash the stored prefix (the hash state cannot be persisted). Returns
    /// how much of it is really there: up to the first missing or short chunk.
    async fn rehash(&self, received: u64) -> Result<(u64, Hashers), CacheError> {
        let db: Db = self.inner.db.clone();
        let digest: Digest = self.req.digest.clone();
        let (chunk, size) = (self.chunk, self.req.size);
        tokio::task::spawn_blocking(move || {
            let mut hashers = Hashers::default();
            let mut stored = 0u64;
            while stored < received {
                let want = chunk.min(size - stored);
                match db.chunk(&digest, stored / chunk)? {
                    Some(c) if c.len() as u64 == want => {
                        hashers.update(&c);
                        stored += want;
                    }
                    _ => break,
                }
            }
            Ok((stored, hashers))
        })
        .await
        .map_err(|e| CacheError::Corrupt {
            digest: self.req.digest.clone(),
            reason: format!("rehash: {e}"),
        })?
    }

    /// Record a partial state of `received` bytes.
    fn save(&self, received: u64) -> Result<(), CacheError> {
        let meta = Meta {
            size: self.req.size,
            chunk_size: self.chunk,
            md5: None,
            sha256: None,
            url: self.req.url.clone(),
            state: ImageState::Partial { received },
            last_use: self.inner.clock.load(Ordering::Relaxed),
        };
        self.inner.db.put_meta(&self.req.digest, &meta)
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
