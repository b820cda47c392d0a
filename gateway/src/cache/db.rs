//! The cache's typed view of its two sled trees (nothing else in the cache
//! touches sled):
//! - `images`: digest (`sha256:ab…`) → [`Meta`] as JSON;
//! - `chunks`: digest ‖ chunk index (u64 big-endian) → the chunk's bytes. Every
//!   chunk holds exactly `chunk_size` bytes except the last one of an image.
//!
//! Write order keeps the two consistent across a crash: chunks are written
//! before the meta that counts them, and a removal deletes (and flushes) the
//! meta before the chunks, so a meta never names chunks that are gone.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::error::CacheError;
use crate::store::Store;

pub(crate) const IMAGES: &str = "images";
pub(crate) const CHUNKS: &str = "chunks";

/// Where an image stands in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageState {
    /// Downloading (or interrupted): the first `received` bytes are stored, in
    /// whole chunks, and will be rehashed and continued with a Range request.
    Partial { received: u64 },
    /// Downloaded and verified against its digest.
    Complete,
}

/// What `images` holds for one digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub size: u64,
    pub chunk_size: u64,
    /// Lowercase hex; known once the image is complete.
    pub md5: Option<String>,
    pub sha256: Option<String>,
    /// The URL it was (last) downloaded from.
    pub url: String,
    pub state: ImageState,
    /// Unix milliseconds, strictly increasing across the cache (LRU order).
    pub last_use: u64,
}

/// The two trees.
#[derive(Clone)]
pub(crate) struct Db {
    store: Store,
    images: sled::Tree,
    chunks: sled::Tree,
}

pub(crate) fn chunk_key(digest: &Digest, index: u64) -> Vec<u8> {
    let mut k = digest.key();
    k.extend_from_slice(&index.to_be_bytes());
    k
}

impl Db {
    pub(crate) fn open(store: &Store) -> Result<Db, CacheError> {
        Ok(Db {
            store: store.clone(),
            images: store.tree(IMAGES)?,
            chunks: store.tree(CHUNKS)?,
        })
    }

    pub(crate) fn meta(&self, digest: &Digest) -> Result<Option<Meta>, CacheError> {
        let Some(raw) = self
            .images
            .get(digest.key())
            .map_err(CacheError::store("read image meta"))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| CacheError::Corrupt {
                digest: digest.clone(),
                reason: e.to_string(),
            })
    }

    pub(crate) fn put_meta(&self, digest: &Digest, meta: &Meta) -> Result<(), CacheError> {
        let json = serde_json::to_vec(meta).map_err(|e| CacheError::Corrupt {
            digest: digest.clone(),
            reason: e.to_string(),
        })?;
        self.images
            .insert(digest.key(), json)
            .map_err(CacheError::store("write image meta"))?;
        Ok(())
    }

    /// Every image's meta. Entries that do not parse are removed (with their
    /// chunks): the cache is content-addressed, the image can be fetched again.
    pub(crate) fn all(&self) -> Result<Vec<(Digest, Meta)>, CacheError> {
        let mut out = Vec::new();
        let mut broken = Vec::new();
        for entry in self.images.iter() {
            let (k, v) = entry.map_err(CacheError::store("list images"))?;
            let digest = std::str::from_utf8(&k)
                .ok()
                .and_then(|s| s.parse::<Digest>().ok());
            match (digest, serde_json::from_slice::<Meta>(&v)) {
                (Some(d), Ok(m)) => out.push((d, m)),
                (d, _) => {
                    tracing::warn!(key = %String::from_utf8_lossy(&k), "damaged image entry removed");
                    broken.push((k, d));
                }
            }
        }
        for (k, d) in broken {
            self.images
                .remove(k)
                .map_err(CacheError::store("remove image meta"))?;
            if let Some(d) = d {
                self.remove_chunks(&d)?;
            }
        }
        Ok(out)
    }

    pub(crate) fn put_chunk(
        &self,
        digest: &Digest,
        index: u64,
        bytes: &[u8],
    ) -> Result<(), CacheError> {
        self.chunks
            .insert(chunk_key(digest, index), bytes)
            .map_err(CacheError::store("write chunk"))?;
        Ok(())
    }

    pub(crate) fn chunk(
        &self,
        digest: &Digest,
        index: u64,
    ) -> Result<Option<sled::IVec>, CacheError> {
        self.chunks
            .get(chunk_key(digest, index))
            .map_err(CacheError::store("read chunk"))
    }

    /// Remove an image: its meta first (made durable), then its chunks.
    pub(crate) fn remove(&self, digest: &Digest) -> Result<(), CacheError> {
        self.images
            .remove(digest.key())
            .map_err(CacheError::store("remove image meta"))?;
        self.images.flush().map_err(CacheError::store("flush"))?;
        self.remove_chunks(digest)
    }

    fn remove_chunks(&self, digest: &Digest) -> Result<(), CacheError> {
        let mut batch = sled::Batch::default();
        for key in self.chunks.scan_prefix(digest.key()).keys() {
            batch.remove(key.map_err(CacheError::store("list chunks"))?);
        }
        self.chunks
            .apply_batch(batch)
            .map_err(CacheError::store("remove chunks"))
    }

    /// Make every write so far durable.
    pub(crate) async fn flush(&self) -> Result<(), CacheError> {
        self.store
            .flush()
            .await
            .map_err(|e| CacheError::Storage(Arc::new(e)))
    }

    #[cfg(test)]
    pub(crate) fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}
