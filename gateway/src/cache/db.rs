//! Where the cache keeps things: metadata in sled, image bytes in files.
//! Nothing else in the cache touches sled or the images directory.
//!
//! - sled tree `images`: digest (`sha256:ab…`) → [`Meta`] as JSON;
//! - `<data_dir>/images/<method>-<hex>.img` (`sha256-ab….img`): the image's
//!   bytes, the file growing as they arrive. The directory is the store's
//!   sibling (`Store::path()` is `<data_dir>/db`).
//!
//! Bytes are in files, not sled, because sled keeps what it writes and reads
//! resident: a 64 MiB image grew the process by ~72 MiB. Reads and writes of a
//! file go through the kernel's page cache, which the kernel may reclaim.
//!
//! Write order keeps the two consistent across a crash:
//! - a download records its meta (`Partial { received: 0 }`) before it
//!   creates the file, and raises `received` only after the file's bytes up to
//!   it are on disk (`sync_data`), so `received` never counts bytes a crash can
//!   lose; on resume the file is cut back to `received` (it may be longer);
//! - an image is marked `Complete` only after its whole file is synced;
//! - a removal deletes (and flushes) the meta before the file, so a meta never
//!   names a file that is gone; a crash in between leaves an orphan file,
//!   handled by the next [`Db::open`]: adopted as a complete image when its
//!   bytes hash to the digest in its name (also what keeps the images of a
//!   store rebuilt after damage), else deleted. `open` also drops (or cuts
//!   back) metas whose file is missing or too short, and marks complete a
//!   partial image whose file holds bytes matching its digest (a damaged store
//!   that lost the record of a completed download).

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::digest::{Digest, DigestMethod, Hasher};
use super::error::CacheError;
use crate::store::Store;

pub(crate) const IMAGES: &str = "images";
/// The tree where earlier versions kept image bytes; emptied on open.
/// The extension of image files.
const EXT: &str = "img";

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
    /// The unit of a download's writes and of `received` (a partial image
    /// always holds whole chunks).
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

/// The `images` tree and the images directory.
#[derive(Clone)]
pub(crate) struct Db {
    store: Store,
    images: sled::Tree,
    dir: Arc<PathBuf>,
}

/// An I/O error on an image file, as a [`CacheError`].
pub(crate) fn file_error(
    op: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::File {
        op,
        path,
        source: Arc::new(source),
    }
}

impl Db {
    /// Open the tree and the directory, and make them agree (see the module
    /// documentation).
    /// Image files go to `dir`, or to `images/` beside the store.
    pub(crate) fn open(store: &Store, dir: Option<&Path>) -> Result<Db, CacheError> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => store
                .path()
                .parent()
                .unwrap_or(Path::new("."))
                .join("images"),
        };
        std::fs::create_dir_all(&dir).map_err(file_error("create the images directory", &dir))?;
        let db = Db {
            store: store.clone(),
            images: store.tree(IMAGES)?,
            dir: Arc::new(dir),
        };
        db.reconcile()?;
        Ok(db)
    }

    /// The file of `digest`'s bytes.
    pub(crate) fn path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join(format!("{}-{}.{EXT}", digest.method(), digest.hex()))
    }

    /// The digest a file in the images directory belongs to, if it is one.
    fn digest_of(path: &Path) -> Option<Digest> {
        if path.extension()? != EXT {
            return None;
        }
        let (method, hex) = path.file_stem()?.to_str()?.split_once('-')?;
        format!("{method}:{hex}").parse().ok()
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
    /// files): the cache is content-addressed, the image can be fetched again.
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
                self.remove_file(&d)?;
            }
        }
        Ok(out)
    }

    /// Open (creating it if need be) `digest`'s file for a download.
    pub(crate) fn open_for_write(&self, digest: &Digest) -> Result<File, CacheError> {
        let path = self.path(digest);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(file_error("open an image file", &path))
    }

    /// Open `digest`'s file for reading; `None` if it is missing or holds
    /// fewer than `size` bytes.
    pub(crate) fn open_for_read(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<Option<File>, CacheError> {
        let path = self.path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_error("open an image file", &path)(e)),
        };
        let len = file
            .metadata()
            .map_err(file_error("stat an image file", &path))?
            .len();
        Ok((len >= size).then_some(file))
    }

    /// Remove an image: its meta first (made durable), then its file.
    pub(crate) fn remove(&self, digest: &Digest) -> Result<(), CacheError> {
        self.images
            .remove(digest.key())
            .map_err(CacheError::store("remove image meta"))?;
        self.images.flush().map_err(CacheError::store("flush"))?;
        self.remove_file(digest)
    }

    /// Delete `digest`'s file (readers that have it open keep reading it).
    pub(crate) fn remove_file(&self, digest: &Digest) -> Result<(), CacheError> {
        let path = self.path(digest);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(file_error("delete an image file", &path)(e)),
        }
    }

    /// Make every meta written so far durable.
    pub(crate) async fn flush(&self) -> Result<(), CacheError> {
        self.store
            .flush()
            .await
            .map_err(|e| CacheError::Storage(Arc::new(e)))
    }

    /// Make the metas and the files agree after a crash: adopt files no meta
    /// names when their content matches their digest (else delete them), drop
    /// complete images whose file is missing or short, complete partial ones
    /// whose file matches the digest, cut the other partial ones back to the
    /// whole chunks their file holds.
    fn reconcile(&self) -> Result<(), CacheError> {
        let all = self.all()?;
        let mut changed = false;
        for (digest, mut meta) in all.iter().cloned() {
            let path = self.path(&digest);
            let len = match std::fs::metadata(&path) {
                Ok(m) => Some(m.len()),
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => return Err(file_error("stat an image file", &path)(e)),
            };
            match meta.state {
                ImageState::Complete if len.is_some_and(|l| l >= meta.size) => {}
                ImageState::Complete => {
                    tracing::warn!(%digest, file = ?len, size = meta.size, "cached image file missing or short: dropped");
                    self.images
                        .remove(digest.key())
                        .map_err(CacheError::store("remove image meta"))?;
                    self.remove_file(&digest)?;
                    changed = true;
                }
                ImageState::Partial { received } if len.unwrap_or(0) < received => {
                    let cs = meta.chunk_size.max(1);
                    let keep = len.unwrap_or(0) / cs * cs;
                    tracing::warn!(%digest, file = ?len, received, keep, "partial image file short: download cut back");
                    meta.state = ImageState::Partial { received: keep };
                    self.put_meta(&digest, &meta)?;
                    changed = true;
                }
                // The whole image is in the file although the meta says
                // partial: a store that lost its latest writes (damaged and
                // opened, or rebuilt from an older state) after the download
                // had completed. Bytes that hash to the digest are the image.
                ImageState::Partial { .. }
                    if len.is_some_and(|l| l >= meta.size)
                        && self.prefix_hashes_to(&path, &digest, meta.size)? =>
                {
                    tracing::info!(%digest, size = meta.size, "partial image found complete: its bytes match its digest");
                    if len.is_some_and(|l| l > meta.size) {
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(file_error("open an image file", &path))?;
                        f.set_len(meta.size)
                            .and_then(|()| f.sync_all())
                            .map_err(file_error("cut an image file", &path))?;
                    }
                    meta.state = ImageState::Complete;
                    match digest.method() {
                        DigestMethod::Md5 => meta.md5 = Some(digest.hex().to_owned()),
                        DigestMethod::Sha256 => meta.sha256 = Some(digest.hex().to_owned()),
                    }
                    self.put_meta(&digest, &meta)?;
                    changed = true;
                }
                ImageState::Partial { .. } => {}
            }
        }
        let entries = std::fs::read_dir(&*self.dir)
            .map_err(file_error("list the images directory", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(file_error("list the images directory", &self.dir))?;
            let path = entry.path();
            let Some(digest) = Self::digest_of(&path) else {
                continue;
            };
            if all.iter().any(|(d, _)| *d == digest) {
                continue;
            }
            // A file no meta names: a crash between a removal's two steps, or
            // a store rebuilt after damage. A file whose bytes hash to the
            // digest in its name is the whole image: keep it (as the least
            // recently used), so it is not downloaded again.
            if let Some(size) = self.hashes_to(&path, &digest)? {
                tracing::info!(file = %path.display(), %digest, size, "image file with no record adopted: its content matches its digest");
                let meta = Meta {
                    size,
                    chunk_size: super::CHUNK_SIZE as u64,
                    md5: (digest.method() == DigestMethod::Md5).then(|| digest.hex().to_owned()),
                    sha256: (digest.method() == DigestMethod::Sha256)
                        .then(|| digest.hex().to_owned()),
                    url: String::new(),
                    state: ImageState::Complete,
                    last_use: 0,
                };
                self.put_meta(&digest, &meta)?;
                changed = true;
                continue;
            }
            tracing::info!(file = %path.display(), "orphan image file deleted: its content does not match its digest");
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(file_error("delete an image file", &path)(e)),
            }
        }
        if changed {
            self.images.flush().map_err(CacheError::store("flush"))?;
        }
        Ok(())
    }

    /// Whether the first `size` bytes of the file hash to `digest`.
    fn prefix_hashes_to(
        &self,
        path: &Path,
        digest: &Digest,
        size: u64,
    ) -> Result<bool, CacheError> {
        use std::io::Read;
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(file_error("open an image file", path)(e)),
        };
        let mut hasher = Hasher::new(digest.method());
        let mut reader = file.take(size);
        let mut buf = vec![0u8; 256 * 1024];
        let mut n_total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(file_error("read an image file", path)(e)),
            };
            hasher.update(&buf[..n]);
            n_total += n as u64;
        }
        Ok(n_total == size && hasher.finish() == *digest)
    }

    /// The file's length if its whole content hashes to `digest`.
    fn hashes_to(&self, path: &Path, digest: &Digest) -> Result<Option<u64>, CacheError> {
        use std::io::Read;
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_error("open an image file", path)(e)),
        };
        let mut hasher = Hasher::new(digest.method());
        let mut buf = vec![0u8; 256 * 1024];
        let mut len = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(file_error("read an image file", path)(e)),
            };
            hasher.update(&buf[..n]);
            len += n as u64;
        }
        Ok((len > 0 && hasher.finish() == *digest).then_some(len))
    }

    /// The directory of the image files.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}
