//! The gateway's persistent store: one sled database, opened here and nowhere
//! else, handed out as named trees to the few modules that persist state, each
//! through a small typed wrapper of its own (`cache/`, `ota/` persistence, the
//! `upstream/` outbox). Keep sled behind this module so it can be replaced.
//!
//! sled 0.34 has open reports of corruption after abrupt stops, so its loss must
//! be survivable: writers `flush` after every journal or outbox write, and a
//! database that fails to open is moved aside (loudly) and rebuilt empty.
//! Images are content-addressed and can be downloaded again; pending upgrades
//! come back from the platform through `firmware/get`.

use std::path::{Path, PathBuf};

/// Why the store could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error(
        "the store {path} is in use by another otagw (its lock is held): stop that one \
         first, or give this one another data_dir"
    )]
    Locked { path: PathBuf },
    #[error("cannot move the broken store {path} aside: {source}")]
    MoveAside {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store tree {tree}: {source}")]
    Tree {
        tree: &'static str,
        #[source]
        source: sled::Error,
    },
}

/// The open database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Open (or create) the database at `path`. A database that does not
    /// open for any reason but I/O (corruption, an unreadable configuration)
    /// is renamed to `{path}.broken-{unix seconds}` and a new one is created;
    /// the returned flag says that happened. I/O errors, a lock held by
    /// another process among them, are returned as they are.
    pub fn open(path: &Path) -> Result<(Store, bool), StoreError> {
        match sled::open(path) {
            Ok(db) => Ok((
                Store {
                    db,
                    path: path.to_path_buf(),
                },
                false,
            )),
            // Not ours to fix: another process holds the lock, or the disk
            // refuses us. Moving a live database aside would be a disaster.
            Err(sled::Error::Io(source))
                if source.kind() == std::io::ErrorKind::WouldBlock
                    || source.to_string().contains("could not acquire lock") =>
            {
                Err(StoreError::Locked {
                    path: path.to_path_buf(),
                })
            }
            Err(sled::Error::Io(source)) => Err(StoreError::Open {
                path: path.to_path_buf(),
                source: sled::Error::Io(source),
            }),
            Err(first) => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                let aside = path.with_extension(format!("broken-{stamp}"));
                tracing::error!(
                    path = %path.display(),
                    aside = %aside.display(),
                    "the store does not open ({first}); moving it aside and starting empty: \
                     cached images will be downloaded again and pending upgrades asked for again"
                );
                std::fs::rename(path, &aside).map_err(|source| StoreError::MoveAside {
                    path: path.to_path_buf(),
                    source,
                })?;
                let db = sled::open(path).map_err(|source| StoreError::Open {
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok((
                    Store {
                        db,
                        path: path.to_path_buf(),
                    },
                    true,
                ))
            }
        }
    }

    /// An in-memory store that vanishes when dropped (unit tests of the
    /// modules that own a tree).
    pub fn temporary() -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(|source| StoreError::Open {
                path: PathBuf::from("(temporary)"),
                source,
            })?;
        Ok(Store {
            db,
            path: PathBuf::from("(temporary)"),
        })
    }

    /// A named tree; the name is a constant of the module that owns it.
    pub fn tree(&self, name: &'static str) -> Result<sled::Tree, StoreError> {
        self.db
            .open_tree(name)
            .map_err(|source| StoreError::Tree { tree: name, source })
    }

    /// Make every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        flush_tree(&self.db)
            .await
            .map(|_| ())
            .map_err(|source| StoreError::Tree { tree: "*", source })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Blocking threads flushing at once (see [`flush_tree`]).
const FLUSHES_AT_ONCE: usize = 4;

/// Make every write to `tree`'s database so far durable. Use this, never
/// sled's `flush_async`: in sled 0.34 that runs the flush on sled's own I/O
/// pool, where it waits for a buffer write queued on the same pool, and the
/// pool does not grow (its idle count wraps below zero); seven concurrent
/// flushes occupy all its threads and wait for ever (spacejam/sled#1308,
/// unfixed in 0.34.7). Sixteen jobs persisting at once wedged the gateway.
/// The blocking `flush` on a tokio blocking thread leaves sled's pool free.
/// At most [`FLUSHES_AT_ONCE`] run at a time: a flush makes everything
/// written before it durable, so waiters mostly find nothing left to write,
/// and slow storage does not turn every waiting job into a blocked thread.
pub async fn flush_tree(tree: &sled::Tree) -> sled::Result<usize> {
    static FLUSHES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(FLUSHES_AT_ONCE);
    let _permit = FLUSHES.acquire().await;
    let tree = tree.clone();
    tokio::task::spawn_blocking(move || tree.flush())
        .await
        .unwrap_or_else(|e| {
            Err(sled::Error::Io(std::io::Error::other(format!(
                "flush: {e}"
            ))))
        })
}

/// For tests that reopen a store in the same process: sled's background I/O
/// threads may hold the database's file lock for a moment after the last
/// handle is dropped, and `Store::open` (rightly) refuses a locked store.
/// Waits, at most 10 s, until the lock of the store at `path` is free.
#[cfg(test)]
pub(crate) fn wait_unlocked(path: &Path) {
    let lock_file = path.join("db");
    let Ok(file) = std::fs::File::open(&lock_file) else {
        return; // a new store
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match file.try_lock() {
            Ok(()) => return, // released when `file` drops
            Err(std::fs::TryLockError::WouldBlock) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the store stays locked"
                );
                std::thread::yield_now();
            }
            Err(e) => panic!("lock {}: {e}", lock_file.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the daemon does when many jobs persist at once: write and flush
    /// from many tasks concurrently. Every flush must come back (with sled's
    /// `flush_async` they wedged: see [`flush_tree`]).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_flushes_all_complete() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("db")).unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..64u32 {
            let store = store.clone();
            tasks.spawn(async move {
                let tree = store.tree("t").unwrap();
                for i in 0..20u32 {
                    tree.insert(format!("{t}-{i}"), vec![0u8; 512]).unwrap();
                    if i % 2 == 0 {
                        flush_tree(&tree).await.unwrap();
                    } else {
                        store.flush().await.unwrap();
                    }
                }
            });
        }
        let all = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
        })
        .await;
        if all.is_err() {
            // Dropping the last handle flushes, which would wait for ever too.
            std::mem::forget(store);
            panic!("flushes still waiting after 60 s: sled's I/O pool is wedged");
        }
        assert_eq!(store.tree("t").unwrap().len(), 64 * 20);
    }

    #[test]
    fn a_store_locked_by_another_process_is_left_alone() {
        use std::io::{BufRead, BufReader};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let (store, _) = Store::open(&path).unwrap();
        store.tree("t").unwrap().insert(b"k", b"v").unwrap();
        store.db.flush().unwrap();
        drop(store);
        // sled takes an OS file lock on `db/db`; another process holding it
        // is what a second gateway on the same data_dir looks like. `flock`
        // blocks until sled's threads have let go, then says so and holds it.
        let mut holder = std::process::Command::new("flock")
            .arg(path.join("db"))
            .args(["-c", "echo locked; exec cat"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run flock (util-linux)");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");

        let err = Store::open(&path).expect_err("the lock is held");
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(
            err.to_string().contains("in use by another otagw")
                && !err.to_string().contains("Os {"),
            "said in words: {err}"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["db"], "nothing was moved aside");
        drop(holder.stdin.take());
        holder.wait().unwrap();
        let (store, rebuilt) = Store::open(&path).unwrap();
        assert!(!rebuilt);
        assert!(
            store.tree("t").unwrap().get(b"k").unwrap().is_some(),
            "the data is intact"
        );
    }

    #[test]
    fn a_store_that_does_not_open_is_moved_aside_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let (store, rebuilt) = Store::open(&path).unwrap();
            assert!(!rebuilt);
            store.tree("t").unwrap().insert(b"k", b"v").unwrap();
            store.db.flush().unwrap();
        }
        // Damage it: sled's config file says the database is something else.
        std::fs::write(path.join("conf"), b"not a sled config").unwrap();
        wait_unlocked(&path);
        let (store, rebuilt) = Store::open(&path).unwrap();
        assert!(rebuilt);
        assert!(store.tree("t").unwrap().get(b"k").unwrap().is_none());
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("db.broken-"))
            .collect();
        assert_eq!(aside.len(), 1, "the broken store is kept for inspection");
    }
}
