//! [`CachedImage`]: a verified image in the cache, read from its file at an
//! offset, pinned against eviction while any clone of it is alive.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::Inner;
use super::digest::Digest;
use crate::plugin::ImageSource;

/// A complete, verified image. Cloning is cheap; while any clone lives the
/// image is pinned and eviction leaves it alone. Reads go to the image's file
/// (opened once, shared by the clones), so the image is never whole in memory.
#[derive(Clone)]
pub struct CachedImage {
    pin: Arc<Pin>,
}

/// One pin: counted in [`Inner`]'s pin table, released on drop.
pub(super) struct Pin {
    pub(super) inner: Arc<Inner>,
    pub(super) digest: Digest,
    pub(super) size: u64,
    /// The image's file, open for reading. Should the file be deleted while
    /// pinned (it is not: eviction spares pinned images), reads still work.
    pub(super) file: File,
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
        let end = offset.saturating_add(len as u64).min(self.pin.size);
        let want = end.saturating_sub(offset) as usize;
        let mut out = vec![0u8; want];
        let mut got = 0;
        while got < want {
            match self.pin.file.read_at(&mut out[got..], offset + got as u64) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "{}: the cached image file ends at byte {}",
                            self.pin.digest.short(),
                            offset + got as u64
                        ),
                    ));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}
