//! What the gateway remembers of plugin updates across restarts, per family:
//! the security-version floor, the update under way or on probation, and
//! the versions rolled back (kept out until a newer one arrives).
//!
//! It is a small JSON file in `data_dir` (`plugin-updates.json`), replaced
//! atomically (write, fsync, rename, fsync the directory) on every change,
//! rather than a tree of the sled store: `otagw plugin install` reads the
//! floors while the daemon holds the store's lock.
//!
//! The probation rules are here too, as pure functions of the record and
//! the clock ([`Probation::observe`], [`Probation::expired`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ota::protocol::Notice;

/// The file name in `data_dir`.
pub const FILE: &str = "plugin-updates.json";

/// Every family's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    #[serde(default)]
    pub families: BTreeMap<String, FamilyRecord>,
}

/// One family's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilyRecord {
    /// The highest security version that passed probation here.
    #[serde(default)]
    pub floor: u64,
    /// The remote update under way, on probation, or being rolled back.
    #[serde(default)]
    pub update: Option<Update>,
    /// Versions rolled back, refused until a newer one installs.
    #[serde(default)]
    pub blocked: Vec<Blocked>,
}

/// A remote update of a family's plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub notice: Notice,
    /// The version in service when the notice came (`None`: a new family).
    #[serde(default)]
    pub previous: Option<String>,
    /// The message id of its terminal report (the rollback's is the next):
    /// the same id when a restart reports it again.
    pub report_id: u64,
    pub phase: Phase,
}

/// Where an update is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Taken; not installed yet (a restart runs it again: the download
    /// resumes from the cache, an install already done is not redone).
    Received,
    /// Installed and in service, its next jobs watched.
    Probation(Probation),
    /// Failed its probation; the previous version goes back.
    RollingBack {
        probation: Probation,
        reason: String,
    },
}

/// An installed update being watched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probation {
    /// The installed file.
    pub path: PathBuf,
    pub sha256: String,
    pub version: String,
    pub security_version: u64,
    /// The version it replaced (`None`: a new family).
    pub previous: Option<String>,
    /// When it went into service (ms since the epoch).
    pub since_ms: u64,
    /// Jobs of the family that ran on it, and how many of them the plugin
    /// itself failed (trap, limit, contract).
    pub jobs: u32,
    pub faults: u32,
    pub last_fault: Option<String>,
}

/// A version rolled back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    pub version: String,
    pub sha256: String,
    pub reason: String,
    pub at_ms: u64,
}

/// How updates are watched (`[plugins] probation_jobs`, `probation_time`,
/// `probation_faults`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbationPolicy {
    /// Probation ends (passed) after this many jobs of the family; 0: not
    /// counted.
    pub jobs: u32,
    /// ... or after this long in service, whichever comes first; zero: not
    /// timed.
    pub time: Duration,
    /// This many plugin faults during probation roll the update back.
    pub faults: u32,
}

impl Default for ProbationPolicy {
    fn default() -> Self {
        ProbationPolicy {
            jobs: 5,
            time: Duration::from_secs(24 * 3600),
            faults: 2,
        }
    }
}

impl ProbationPolicy {
    /// Whether updates are watched at all.
    pub fn watches(&self) -> bool {
        self.jobs > 0 || !self.time.is_zero()
    }
}

/// What a probation concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Passed,
    /// Roll back, with why (for the operator and the platform).
    Failed(String),
}

impl Probation {
    /// A job of the family ended on this plugin, with the plugin's own
    /// fault if it had one.
    pub fn observe(&mut self, fault: Option<&str>, policy: &ProbationPolicy) -> Verdict {
        self.jobs += 1;
        if let Some(f) = fault {
            self.faults += 1;
            self.last_fault = Some(f.to_string());
        }
        if policy.faults > 0 && self.faults >= policy.faults {
            let back = match &self.previous {
                Some(v) => format!("rolled back to {v}"),
                None => "removed (no previous version)".to_string(),
            };
            return Verdict::Failed(format!(
                "plugin version {} {back}: {} of its {} job(s) failed in the plugin itself; \
                 last: {}",
                self.version,
                self.faults,
                self.jobs,
                self.last_fault.as_deref().unwrap_or("?")
            ));
        }
        if policy.jobs > 0 && self.jobs >= policy.jobs {
            return Verdict::Passed;
        }
        Verdict::Continue
    }

    /// Whether its time in service ended the probation (passed).
    pub fn expired(&self, now_ms: u64, policy: &ProbationPolicy) -> bool {
        !policy.time.is_zero()
            && now_ms >= self.since_ms.saturating_add(policy.time.as_millis() as u64)
    }
}

impl FamilyRecord {
    /// Why `version` is refused, if it was rolled back here.
    pub fn blocked(&self, version: &str) -> Option<&Blocked> {
        self.blocked.iter().find(|b| b.version == version)
    }
}

impl Ledger {
    /// The ledger at `path`; empty when there is none. A file that does
    /// not parse is moved aside (`.broken`) and reported.
    pub fn load(path: &Path) -> Result<Ledger, String> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ledger::default()),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        serde_json::from_slice(&bytes).map_err(|e| {
            let aside = PathBuf::from(format!("{}.broken", path.display()));
            let _ = std::fs::rename(path, &aside);
            format!(
                "{} does not parse ({e}); moved to {} and started empty: plugin security \
                 floors and rolled-back versions are forgotten",
                path.display(),
                aside.display()
            )
        })
    }

    /// Read the floors only (`otagw plugin install`): a missing or broken
    /// file is an empty ledger, and nothing is moved.
    pub fn peek(path: &Path) -> Ledger {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Replace the file at `path` with this ledger, durably.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.part",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    }

    pub fn family(&mut self, name: &str) -> &mut FamilyRecord {
        self.families.entry(name.to_string()).or_default()
    }

    pub fn floor(&self, name: &str) -> u64 {
        self.families.get(name).map_or(0, |f| f.floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probation() -> Probation {
        Probation {
            path: "/p/acme.wasm".into(),
            sha256: "ab".into(),
            version: "1.1.0".into(),
            security_version: 2,
            previous: Some("1.0.0".into()),
            since_ms: 1_000,
            jobs: 0,
            faults: 0,
            last_fault: None,
        }
    }

    #[test]
    fn faults_past_the_threshold_fail_it_and_clean_jobs_pass_it() {
        let policy = ProbationPolicy {
            jobs: 3,
            time: Duration::ZERO,
            faults: 2,
        };
        let mut p = probation();
        assert_eq!(p.observe(None, &policy), Verdict::Continue);
        assert_eq!(p.observe(Some("trapped"), &policy), Verdict::Continue);
        match p.observe(Some("trapped again"), &policy) {
            Verdict::Failed(why) => {
                assert!(why.contains("rolled back to 1.0.0"), "{why}");
                assert!(why.contains("2 of its 3 job(s)"), "{why}");
                assert!(why.contains("trapped again"), "{why}");
            }
            v => panic!("{v:?}"),
        }

        let mut p = probation();
        assert_eq!(p.observe(Some("trapped"), &policy), Verdict::Continue);
        assert_eq!(p.observe(None, &policy), Verdict::Continue);
        assert_eq!(p.observe(None, &policy), Verdict::Passed);
    }

    #[test]
    fn time_in_service_ends_it() {
        let policy = ProbationPolicy {
            jobs: 0,
            time: Duration::from_secs(60),
            faults: 1,
        };
        let p = probation();
        assert!(!p.expired(1_000 + 59_999, &policy));
        assert!(p.expired(1_000 + 60_000, &policy));
        let untimed = ProbationPolicy {
            time: Duration::ZERO,
            ..policy
        };
        assert!(!p.expired(u64::MAX, &untimed));
        assert!(
            !ProbationPolicy {
                jobs: 0,
                time: Duration::ZERO,
                faults: 1
            }
            .watches()
        );
    }

    #[test]
    fn the_ledger_survives_a_round_trip_and_a_broken_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        assert_eq!(Ledger::load(&path).unwrap(), Ledger::default());
        let mut l = Ledger::default();
        l.family("acme").floor = 4;
        l.family("acme").blocked.push(Blocked {
            version: "1.1.0".into(),
            sha256: "ab".into(),
            reason: "trapped".into(),
            at_ms: 5,
        });
        l.save(&path).unwrap();
        let back = Ledger::load(&path).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.floor("acme"), 4);
        assert!(back.families["acme"].blocked("1.1.0").is_some());
        assert_eq!(Ledger::peek(&path), l);

        std::fs::write(&path, b"{ half").unwrap();
        let err = Ledger::load(&path).unwrap_err();
        assert!(err.contains("moved to"), "{err}");
        assert!(dir.path().join(format!("{FILE}.broken")).exists());
        assert_eq!(Ledger::load(&path).unwrap(), Ledger::default());
    }
}
