//! Hot reload of the plugins directory: a new or changed `*.wasm` is loaded
//! off the job path and swapped in; a removed one takes its family out of
//! service; a broken one is reported while the previous good version of its
//! family stays in service.
//!
//! - **When a file is read:** only once it has *settled*: its size and
//!   modification time unchanged for [`WatchOptions::settle`]. A copy in
//!   progress is never loaded (and never reported broken); renaming a
//!   finished file into place (`mv`, atomic) makes it settle at once.
//!   Names not ending in `.wasm` (`acme.wasm.part`) are ignored.
//! - **What wakes it:** file system events (the `notify` crate: inotify on
//!   Linux), and a rescan every [`WatchOptions::rescan`] for file systems
//!   without them (NFS, some overlays).
//! - **Jobs:** each job holds the plugin it started with (`Arc`), so a job
//!   under way finishes on the old version; the next one gets the new.
//!
//! What it is not: remote updates and their rollback (`daemon/plugin_update.rs`),
//! which swap their plugin in themselves; the watcher then finds the file
//! already in service (same digest) and leaves it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{LoadedPlugin, PluginHost};

/// How the directory is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchOptions {
    /// How long a file must stay unchanged before it is loaded.
    pub settle: Duration,
    /// How often the directory is listed even without events.
    pub rescan: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            settle: Duration::from_secs(1),
            rescan: Duration::from_secs(10),
        }
    }
}

/// What one look at the directory changed.
#[derive(Debug, Default)]
pub struct Changes {
    /// Plugins loaded (new families, or new versions of known ones).
    pub loaded: Vec<std::sync::Arc<LoadedPlugin>>,
    /// Families taken out of service (their file went away).
    pub removed: Vec<String>,
    /// Files that did not load, with why.
    pub failed: Vec<(PathBuf, String)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.loaded.is_empty() && self.removed.is_empty() && self.failed.is_empty()
    }
}

/// A file as last seen: size and modification time.
type Fingerprint = (u64, Option<SystemTime>);

#[derive(Debug)]
struct Seen {
    now: Fingerprint,
    /// When `now` was first seen.
    since: Instant,
    /// The fingerprint last loaded (or tried), if any.
    tried: Option<Fingerprint>,
}

/// What the watcher knows of the directory between looks.
#[derive(Debug, Default)]
pub struct DirState {
    files: HashMap<PathBuf, Seen>,
}

impl DirState {
    /// The directory as it is now, taken as loaded (after
    /// [`PluginHost::load_dir`]): nothing is loaded again until it changes.
    pub fn loaded_now(dir: &Path) -> DirState {
        let now = Instant::now();
        let files = list(dir)
            .into_iter()
            .map(|(path, fp)| {
                let seen = Seen {
                    now: fp,
                    since: now,
                    tried: Some(fp),
                };
                (path, seen)
            })
            .collect();
        DirState { files }
    }

    /// Whether a file is waiting to settle (the watcher looks again soon).
    pub fn pending(&self) -> bool {
        self.files.values().any(|s| s.tried != Some(s.now))
    }
}

/// The `*.wasm` files in `dir` with their fingerprints; nothing when the
/// directory cannot be read (it is reported when loading).
fn list(dir: &Path) -> Vec<(PathBuf, Fingerprint)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "wasm") {
                return None;
            }
            let meta = std::fs::metadata(&path).ok()?;
            meta.is_file()
                .then(|| (path, (meta.len(), meta.modified().ok())))
        })
        .collect()
}

impl PluginHost {
    /// Look at `dir` once at `now`: load what settled since the last look,
    /// take out what went away, report what failed.
    pub async fn reconcile(
        &self,
        dir: &Path,
        state: &mut DirState,
        now: Instant,
        settle: Duration,
    ) -> Changes {
        let mut changes = Changes::default();
        let listed: HashMap<PathBuf, Fingerprint> = list(dir).into_iter().collect();
        // Gone: out of service for new jobs.
        let gone: Vec<PathBuf> = state
            .files
            .keys()
            .filter(|p| !listed.contains_key(*p))
            .cloned()
            .collect();
        for path in gone {
            state.files.remove(&path);
            self.set_broken(&path, None);
            for family in self.unregister_path(&path, None) {
                tracing::warn!(%family, path = %path.display(), "plugin file removed: the family takes no new jobs");
                changes.removed.push(family);
            }
        }
        let mut paths: Vec<&PathBuf> = listed.keys().collect();
        paths.sort();
        for path in paths {
            let fp = listed[path];
            let seen = state.files.entry(path.clone()).or_insert(Seen {
                now: fp,
                since: now,
                tried: None,
            });
            if seen.now != fp {
                seen.now = fp;
                seen.since = now;
                // Settling time zero: taken as it is now (a reload).
                if !settle.is_zero() {
                    continue;
                }
            }
            if seen.tried == Some(fp) || now.duration_since(seen.since) < settle {
                continue;
            }
            seen.tried = Some(fp);
            let current = self.families().into_iter().find(|p| &p.path == path);
            // What is in service already (put there by a remote update or a
            // rollback, which swap it in themselves): nothing to do.
            if let Some(p) = &current
                && super::file_sha256(path).as_deref() == Some(p.sha256.as_str())
            {
                continue;
            }
            let previous = current.map(|p| p.info.version.clone());
            match self.load_local(path).await {
                Ok(p) => {
                    self.set_broken(path, None);
                    for family in self.unregister_path(path, Some(&p.info.name)) {
                        changes.removed.push(family);
                    }
                    tracing::info!(
                        family = %p.info.name,
                        version = %p.info.version,
                        previous = previous.as_deref().unwrap_or("none"),
                        path = %path.display(),
                        "plugin loaded: new jobs of the family use it; jobs under way finish on the one they started with"
                    );
                    changes.loaded.push(p);
                }
                Err(e) => {
                    let why = e.to_string();
                    match &previous {
                        Some(v) => tracing::error!(
                            path = %path.display(),
                            "{why}; version {v} of its family stays in service (fix or replace the file)"
                        ),
                        None => {
                            tracing::error!(path = %path.display(), "{why}; not loaded (fix or replace the file)")
                        }
                    }
                    self.set_broken(path, Some(why.clone()));
                    changes.failed.push((path.clone(), why));
                }
            }
        }
        changes
    }
}

/// Watch `dir` until `cancel`: reconcile on every file system event, on
/// every `rescan`, and while a file settles; `on_change` hears of every look
/// that changed something. The directory must have been loaded with
/// [`PluginHost::load_dir`] first.
///
/// `nudge` makes it look at once, taking every file as settled (SIGHUP);
/// with `follow` false it looks only then (no events, no rescans).
pub async fn watch_dir(
    host: &PluginHost,
    dir: &Path,
    options: WatchOptions,
    (follow, nudge): (bool, &tokio::sync::Notify),
    cancel: CancellationToken,
    mut on_change: impl FnMut(&Changes),
) {
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let watcher = if !follow {
        None
    } else {
        use notify::Watcher;
        let made = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            if e.is_ok() {
                let _ = tx.send(());
            }
        });
        match made {
            Ok(mut w) => match w.watch(dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), "cannot watch the plugins directory ({e}); rescanning every {:?}", options.rescan);
                    None
                }
            },
            Err(e) => {
                tracing::warn!(
                    "no file system events ({e}); rescanning the plugins directory every {:?}",
                    options.rescan
                );
                None
            }
        }
    };
    let mut state = DirState::loaded_now(dir);
    // While something settles, look again a few times per settle period.
    let settle_tick = (options.settle / 4).max(Duration::from_millis(20));
    let rescan = if follow {
        options.rescan
    } else {
        Duration::from_secs(365 * 24 * 3600)
    };
    let mut next_rescan = Instant::now() + rescan;
    loop {
        let wake = if state.pending() && follow {
            (Instant::now() + settle_tick).min(next_rescan)
        } else {
            next_rescan
        };
        let mut settle = options.settle;
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(()) = events.recv() => {
                // A burst of events (a copy writes many times) is one look.
                while events.try_recv().is_ok() {}
            }
            () = nudge.notified() => {
                // The operator says the directory is ready: no settling.
                settle = Duration::ZERO;
                tracing::info!(dir = %dir.display(), "looking at the plugins directory (reload)");
            }
            () = tokio::time::sleep_until(wake) => {}
        }
        let now = Instant::now();
        if now >= next_rescan {
            next_rescan = now + rescan;
        }
        let changes = host.reconcile(dir, &mut state, now, settle).await;
        if !changes.is_empty() {
            on_change(&changes);
        }
    }
    drop(watcher);
}
