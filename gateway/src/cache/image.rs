//! [`CachedImage`]: a verified image in the cache, read chunk by chunk, pinned
//! against eviction while any clone of it is alive.

use std::fmt;
use std::sync::Arc;

use super::Inner;
use super::digest::Digest;
use crate::plugin::ImageSource;

/// A complete, verified image. Cloning is cheap; while any clone lives the
/// image is pinned and eviction leaves it alone. Reads go to the store, so the
/// image is never whole in memory.
#[derive(Clone)]
pub struct CachedImage {
    pin: Arc<Pin>,
}

/// One pin: counted in [`Inner`]'s pin table, released on drop.
pub(super) struct Pin {
    pub(super) inner: Arc<Inner>,
    pub(super) digest: Digest,
    pub(super) size: u64,
    pub(super) chunk_size: u64,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.inner.unpin(&self.digest);
    }
}

impl CachedImage {
    pub(super) fn new(pin: Pin) -> CachedImage {
        CachedImage { pin: Arc::new(pin) }
    }

    pub fn digest(&self) -> &Digest {
        &self.pin.digest
    }

    pub fn size(&self) -> u64 {
        self.pin.size
    }
}

impl fmt::Debug for CachedImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedImage")
            .field("digest", &self.pin.digest)
            .field("size", &self.pin.size)
            .finish()
    }
}

impl ImageSource for CachedImage {
    fn size(&self) -> u64 {
        self.pin.size
    }

    fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let size = self.pin.size;
        let cs = self.pin.chunk_size;
        let end = offset.saturating_add(len as u64).min(size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut pos = offset;
        while pos < end {
            let (index, within) = (pos / cs, (pos % cs) as usize);
            let chunk = self
                .pin
                .inner
                .db
                .chunk(&self.pin.digest, index)
                .map_err(std::io::Error::other)?
                .ok_or_else(|| {
                    std::io::Error::other(format!(
                        "{}: chunk {index} missing from the cache",
                        self.pin.digest.short()
                    ))
                })?;
            let take = (chunk.len().saturating_sub(within) as u64).min(end - pos) as usize;
            if take == 0 {
                return Err(std::io::Error::other(format!(
                    "{}: chunk {index} is short",
                    self.pin.digest.short()
                )));
            }
            out.extend_from_slice(&chunk[within..within + take]);
            pos += take as u64;
        }
        Ok(out)
    }
}
