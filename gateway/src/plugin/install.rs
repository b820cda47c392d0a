//! Installing a plugin file into the plugins directory so that a crash at
//! any point leaves exactly one file for the family: the old one or the new
//! one, never none and never half of one. The previous version is kept
//! beside it as `NAME.wasm.prev` (not loaded: it does not end in `.wasm`),
//! for a rollback.
//!
//! 1. the new bytes go to `.NAME.wasm.part` (ignored by the loader) and are
//!    synced;
//! 2. the current file is hard-linked to `NAME.wasm.prev` (through a
//!    temporary name, renamed over the old `.prev`);
//! 3. the new file is renamed over `NAME.wasm`; the directory is synced.
//!
//! What it is not: the checks (signature, manifest, contract), which come
//! before it (`otagw plugin install`).

use std::path::{Path, PathBuf};

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub path: PathBuf,
    /// Where the version it replaced is kept, if there was one.
    pub previous: Option<PathBuf>,
}

/// The kept previous version of the plugin file `path`.
pub fn previous_of(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.prev", path.display()))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Put `bytes` in place as `path` (in the plugins directory), keeping what
/// was there as its `.prev`.
pub fn install(path: &Path, bytes: &[u8]) -> std::io::Result<Installed> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let part = dir.join(format!(".{name}.part"));
    {
        let mut f = std::fs::File::create(&part)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    let previous = if path.exists() {
        let prev = previous_of(path);
        let tmp = dir.join(format!(".{name}.prev.part"));
        let _ = std::fs::remove_file(&tmp);
        std::fs::hard_link(path, &tmp)?;
        std::fs::rename(&tmp, &prev)?;
        Some(prev)
    } else {
        None
    };
    std::fs::rename(&part, path)?;
    sync_dir(dir)?;
    Ok(Installed {
        path: path.to_path_buf(),
        previous,
    })
}

/// Put the kept previous version back in place; `false` when there is none.
pub fn roll_back(path: &Path) -> std::io::Result<bool> {
    let prev = previous_of(path);
    if !prev.exists() {
        return Ok(false);
    }
    std::fs::rename(&prev, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_keeps_the_previous_version_and_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acme.wasm");
        let first = install(&path, b"one").unwrap();
        assert_eq!(first.previous, None);
        assert_eq!(std::fs::read(&path).unwrap(), b"one");

        let second = install(&path, b"two").unwrap();
        assert_eq!(second.previous, Some(previous_of(&path)));
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read(previous_of(&path)).unwrap(), b"one");
        install(&path, b"three").unwrap();
        assert_eq!(std::fs::read(previous_of(&path)).unwrap(), b"two");

        assert!(roll_back(&path).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!previous_of(&path).exists());
        assert!(!roll_back(&path).unwrap(), "nothing more to go back to");

        // Only NAME.wasm ends in .wasm: the loader sees one file per family.
        let wasm: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "wasm"))
            .collect();
        assert_eq!(wasm.len(), 1);
    }

    #[test]
    fn a_crash_before_the_rename_leaves_the_old_file_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acme.wasm");
        install(&path, b"old").unwrap();
        // What a crash after step 1 leaves: a synced .part, nothing renamed.
        std::fs::write(dir.path().join(".acme.wasm.part"), b"new, half").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        // The next install overwrites the leftover.
        install(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!dir.path().join(".acme.wasm.part").exists());
    }

    /// The Debian package links its families into the plugins directory
    /// (`NAME.wasm -> /usr/lib/otagw/plugins/NAME.wasm`, read-only there). An
    /// update replaces the link, never writes through it; the link is the
    /// previous version, and rolling back restores it.
    #[test]
    fn an_update_replaces_a_packaged_link_and_rolls_back_to_it() {
        let packaged = tempfile::tempdir().unwrap();
        let shipped = packaged.path().join("acme.wasm");
        std::fs::write(&shipped, b"packaged").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acme.wasm");
        std::os::unix::fs::symlink(&shipped, &path).unwrap();

        install(&path, b"update").unwrap();
        assert_eq!(std::fs::read(&shipped).unwrap(), b"packaged");
        assert!(!path.is_symlink());
        assert_eq!(std::fs::read(&path).unwrap(), b"update");
        let prev = previous_of(&path);
        assert!(prev.is_symlink(), "the previous version is the link");
        assert_eq!(std::fs::read(&prev).unwrap(), b"packaged");

        assert!(roll_back(&path).unwrap());
        assert_eq!(std::fs::read_link(&path).unwrap(), shipped);
        assert_eq!(std::fs::read(&path).unwrap(), b"packaged");
    }
}
