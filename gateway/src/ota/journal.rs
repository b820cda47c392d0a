//! The job journal: what the gateway must remember about its jobs and leaves
//! across a crash, in six sled trees that only this file touches:
//!
//! | tree | key | value |
//! |---|---|---|
//! | `jobs` | leaf, module | the [`JobRecord`] (JSON) |
//! | `devices` | leaf, module | the version the leaf last reported |
//! | `reported` | leaf, module | which terminal record's reports are in the outbox |
//! | `lifecycle` | `run` | whether the last run stopped cleanly |
//! | `history` | leaf, module | the last [`HISTORY_LEN`] ended jobs and refused notices |
//! | `models` | leaf, module | the hardware id (else model) `identify` last read |
//!
//! A terminal record and the leaf's version are written in **one sled
//! transaction** ([`Journal::put`]): after a crash at the moment of success the
//! gateway can never inform the old version while the journal says the leaf
//! was upgraded. Every write is flushed before it returns, so the driver can
//! persist a job *before* it performs the job's actions.
//!
//! This is the only file of `ota/` that does I/O. The trees come from
//! [`crate::store::Store`] (which opens the database and knows sled's recovery).

use serde::{Deserialize, Serialize};
use sled::Transactional;

use super::job::Job;
use super::protocol::Notice;
use super::topics::DeviceId;
use crate::store::{Store, StoreError};

/// The trees of the journal.
pub const TREE: &str = "jobs";
const VERSIONS: &str = "devices";
const REPORTED: &str = "reported";
const LIFECYCLE: &str = "lifecycle";
const HISTORY: &str = "history";
const MODELS: &str = "models";

/// How many entries a leaf's history keeps (the oldest go first).
pub const HISTORY_LEN: usize = 20;

/// One ended job, or one notice refused before it became a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The notice's version (the target).
    pub target_version: String,
    /// `succeeded`, `failed` or `refused`.
    pub outcome: String,
    /// The upstream step code of a failure or refusal.
    pub step: Option<i32>,
    /// Why it failed, or the version read back.
    pub desc: String,
    /// When the notice was taken and when it ended (ms since the epoch).
    pub queued_ms: u64,
    pub ended_ms: u64,
    /// The furthest percent it reached.
    pub progress: u8,
}
const RUN_KEY: &[u8] = b"run";
const RUNNING: &[u8] = b"running";
const STOPPED: &[u8] = b"stopped";

/// One leaf's job for one module, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub leaf: DeviceId,
    pub module: String,
    /// The notice the job works on (the latest one, after a URL refresh).
    pub notice: Notice,
    pub job: Job,
}

impl JobRecord {
    /// A queued job for `notice` on `leaf`.
    pub fn new(leaf: DeviceId, notice: Notice, now: u64) -> JobRecord {
        JobRecord {
            module: notice.module.clone(),
            job: Job::new(&notice, now),
            leaf,
            notice,
        }
    }

    /// What marks this terminal record as reported: a newer terminal record of
    /// the same leaf and module has another mark.
    fn mark(&self) -> Vec<u8> {
        format!(
            "{}\0{}\0{}",
            self.notice.version,
            self.notice.sign,
            self.job.history().len()
        )
        .into_bytes()
    }
}

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("job journal: {0}")]
    Open(#[from] StoreError),
    #[error("job journal: cannot {op} the job of {key}: {source}")]
    Store {
        op: &'static str,
        key: String,
        #[source]
        source: sled::Error,
    },
    #[error("job journal: cannot flush after writing the job of {key}: {source}")]
    Flush {
        key: String,
        #[source]
        source: sled::Error,
    },
    #[error("job journal: the record of {key} does not decode: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("job journal: cannot encode the job of {key}: {source}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The journal's trees.
#[derive(Debug, Clone)]
pub struct Journal {
    tree: sled::Tree,
    versions: sled::Tree,
    reported: sled::Tree,
    lifecycle: sled::Tree,
    history: sled::Tree,
    models: sled::Tree,
}

/// The key of a leaf's module: the JSON array `[pk, dn, module]`, unambiguous
/// whatever the names contain.
fn key(leaf: &DeviceId, module: &str) -> Vec<u8> {
    serde_json::to_vec(&(&leaf.product_key, &leaf.device_name, module))
        .expect("a tuple of strings always serialises")
}

/// The key the leaf registry used for versions before the journal owned them.
fn legacy_key(leaf: &DeviceId, module: &str) -> Vec<u8> {
    format!("{}\0{}\0{}", leaf.product_key, leaf.device_name, module).into_bytes()
}

/// A key for messages: `pk/dn module`.
fn label(leaf: &DeviceId, module: &str) -> String {
    format!("{leaf} module {module}")
}

fn label_of_raw(key: &[u8]) -> String {
    match serde_json::from_slice::<(String, String, String)>(key) {
        Ok((pk, dn, module)) => label(&DeviceId::new(pk, dn), &module),
        Err(_) => format!("key {}", String::from_utf8_lossy(key)),
    }
}

impl Journal {
    /// The journal in `store`.
    pub fn open(store: &Store) -> Result<Journal, JournalError> {
        Ok(Journal {
            tree: store.tree(TREE)?,
            versions: store.tree(VERSIONS)?,
            reported: store.tree(REPORTED)?,
            lifecycle: store.tree(LIFECYCLE)?,
            history: store.tree(HISTORY)?,
            models: store.tree(MODELS)?,
        })
    }

    /// Remember the hardware id (else the model) `identify` read from
    /// `leaf`/`module`. Not flushed on its own (rollouts select by it; the
    /// next durable write takes it along, the next identify writes it again).
    pub fn set_model(
        &self,
        leaf: &DeviceId,
        module: &str,
        model: &str,
    ) -> Result<(), JournalError> {
        self.models
            .insert(key(leaf, module), model.as_bytes())
            .map_err(Self::store_error("write the model of", label(leaf, module)))?;
        Ok(())
    }

    /// The model last read from `leaf`/`module`, if any.
    pub fn model(&self, leaf: &DeviceId, module: &str) -> Result<Option<String>, JournalError> {
        let got = self
            .models
            .get(key(leaf, module))
            .map_err(Self::store_error("read the model of", label(leaf, module)))?;
        Ok(got.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Add `entry` to the history of `leaf`/`module` (the last
    /// [`HISTORY_LEN`] are kept). Not flushed on its own: it is what the
    /// operator reads, and the next durable write takes it along.
    pub fn add_history(
        &self,
        leaf: &DeviceId,
        module: &str,
        entry: HistoryEntry,
    ) -> Result<(), JournalError> {
        let mut all = self.history(leaf, module)?;
        all.push(entry);
        let drop = all.len().saturating_sub(HISTORY_LEN);
        all.drain(..drop);
        let value = serde_json::to_vec(&all).expect("history entries serialise");
        self.history
            .insert(key(leaf, module), value)
            .map_err(Self::store_error(
                "write the history of",
                label(leaf, module),
            ))?;
        Ok(())
    }

    /// The history of `leaf`/`module`, oldest first.
    pub fn history(
        &self,
        leaf: &DeviceId,
        module: &str,
    ) -> Result<Vec<HistoryEntry>, JournalError> {
        let got = self
            .history
            .get(key(leaf, module))
            .map_err(Self::store_error(
                "read the history of",
                label(leaf, module),
            ))?;
        Ok(got
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default())
    }

    fn store_error(op: &'static str, key: String) -> impl FnOnce(sled::Error) -> JournalError {
        move |source| JournalError::Store { op, key, source }
    }

    async fn flush(&self, label: impl FnOnce() -> String) -> Result<(), JournalError> {
        crate::store::flush_tree(&self.tree)
            .await
            .map(|_| ())
            .map_err(|source| JournalError::Flush {
                key: label(),
                source,
            })
    }

    /// Write `record` (replacing the one of the same leaf and module) and,
    /// when the job has learnt the leaf's version, that version, in one
    /// transaction; then make it durable.
    pub async fn put(&self, record: &JobRecord) -> Result<(), JournalError> {
        let name = || label(&record.leaf, &record.module);
        let value = serde_json::to_vec(record).map_err(|source| JournalError::Encode {
            key: name(),
            source,
        })?;
        let k = key(&record.leaf, &record.module);
        let version = record.job.leaf_version().map(str::as_bytes);
        (&self.tree, &self.versions)
            .transaction(|(jobs, versions)| {
                jobs.insert(&k[..], &value[..])?;
                if let Some(v) = version {
                    versions.insert(&k[..], v)?;
                }
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| match e {
                sled::transaction::TransactionError::Storage(source) => JournalError::Store {
                    op: "write",
                    key: name(),
                    source,
                },
                sled::transaction::TransactionError::Abort(()) => JournalError::Store {
                    op: "write",
                    key: name(),
                    source: sled::Error::Unsupported("transaction aborted".into()),
                },
            })?;
        self.flush(name).await
    }

    /// The version `leaf`/`module` last reported (through a job), if any.
    pub fn version(&self, leaf: &DeviceId, module: &str) -> Result<Option<String>, JournalError> {
        let read = |k: Vec<u8>| {
            self.versions.get(k).map_err(Self::store_error(
                "read the version of",
                label(leaf, module),
            ))
        };
        let v = match read(key(leaf, module))? {
            Some(v) => Some(v),
            // Written by gateways before the journal owned the versions.
            None => read(legacy_key(leaf, module))?,
        };
        Ok(v.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Remember (durably) the version `leaf`/`module` reported outside a job
    /// (read back at start because the journal did not know it).
    pub async fn set_version(
        &self,
        leaf: &DeviceId,
        module: &str,
        version: &str,
    ) -> Result<(), JournalError> {
        let name = || label(leaf, module);
        self.versions
            .insert(key(leaf, module), version.as_bytes())
            .map_err(Self::store_error("write the version of", name()))?;
        crate::store::flush_tree(&self.versions)
            .await
            .map(|_| ())
            .map_err(|source| JournalError::Flush {
                key: name(),
                source,
            })
    }

    /// Whether the reports of terminal `record` are known to be in the outbox.
    pub fn is_reported(&self, record: &JobRecord) -> Result<bool, JournalError> {
        let name = label(&record.leaf, &record.module);
        let got = self
            .reported
            .get(key(&record.leaf, &record.module))
            .map_err(Self::store_error("read the report mark of", name))?;
        Ok(got.as_deref() == Some(&record.mark()[..]))
    }

    /// Remember (durably) that the reports of terminal `record` are in the
    /// outbox, so a restart does not publish them again.
    pub async fn mark_reported(&self, record: &JobRecord) -> Result<(), JournalError> {
        let name = || label(&record.leaf, &record.module);
        self.reported
            .insert(key(&record.leaf, &record.module), record.mark())
            .map_err(Self::store_error("mark the reports of", name()))?;
        crate::store::flush_tree(&self.reported)
            .await
            .map(|_| ())
            .map_err(|source| JournalError::Flush {
                key: name(),
                source,
            })
    }

    /// Whether the store answers: reads this run's marker (`/readyz`).
    pub fn ping(&self) -> Result<(), JournalError> {
        self.lifecycle
            .get(RUN_KEY)
            .map(|_| ())
            .map_err(Self::store_error("read", "the run marker".to_string()))
    }

    /// A run starts: returns whether the previous one stopped cleanly (a new
    /// store counts as clean), and records that this one is running.
    pub async fn begin_run(&self) -> Result<bool, JournalError> {
        let name = || "the run marker".to_string();
        let before = self
            .lifecycle
            .insert(RUN_KEY, RUNNING)
            .map_err(Self::store_error("write", name()))?;
        crate::store::flush_tree(&self.lifecycle)
            .await
            .map_err(|source| JournalError::Flush {
                key: name(),
                source,
            })?;
        Ok(before.as_deref() != Some(RUNNING))
    }

    /// The run stops cleanly (whatever jobs were interrupted were stopped by
    /// the gateway, not by a crash).
    pub async fn end_run(&self) -> Result<(), JournalError> {
        let name = || "the run marker".to_string();
        self.lifecycle
            .insert(RUN_KEY, STOPPED)
            .map_err(Self::store_error("write", name()))?;
        crate::store::flush_tree(&self.lifecycle)
            .await
            .map(|_| ())
            .map_err(|source| JournalError::Flush {
                key: name(),
                source,
            })
    }

    /// The record of `leaf`/`module`, if any.
    pub fn get(&self, leaf: &DeviceId, module: &str) -> Result<Option<JobRecord>, JournalError> {
        let name = || label(leaf, module);
        let Some(bytes) =
            self.tree
                .get(key(leaf, module))
                .map_err(|source| JournalError::Store {
                    op: "read",
                    key: name(),
                    source,
                })?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| JournalError::Decode {
                key: name(),
                source,
            })
    }

    /// Every record, in key order. A record that does not decode (damage, or a
    /// format this version does not know) is skipped and logged as an error:
    /// one bad record must not keep the gateway from starting, and its pending
    /// upgrade comes back from the platform through `firmware/get`.
    pub fn all(&self) -> Result<Vec<JobRecord>, JournalError> {
        let mut records = Vec::new();
        for entry in self.tree.iter() {
            let (k, v) = entry.map_err(|source| JournalError::Store {
                op: "list",
                key: "every leaf".to_string(),
                source,
            })?;
            match serde_json::from_slice::<JobRecord>(&v) {
                Ok(record) => records.push(record),
                Err(source) => {
                    let error = JournalError::Decode {
                        key: label_of_raw(&k),
                        source,
                    };
                    tracing::error!("{error}; skipping it");
                }
            }
        }
        Ok(records)
    }

    /// Delete the record of `leaf`/`module` (durably) and return it; `None`
    /// when there was none or it did not decode.
    pub async fn remove(
        &self,
        leaf: &DeviceId,
        module: &str,
    ) -> Result<Option<JobRecord>, JournalError> {
        let name = || label(leaf, module);
        let old = self
            .tree
            .remove(key(leaf, module))
            .map_err(|source| JournalError::Store {
                op: "remove",
                key: name(),
                source,
            })?;
        self.flush(name).await?;
        Ok(old.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ota::job::{Event, State};
    use crate::ota::protocol::{Download, SignMethod};

    fn notice(module: &str) -> Notice {
        Notice {
            id: 1,
            version: "2.0.0".into(),
            size: 100,
            download: Download::Http {
                url: "https://h/f?Expires=1".into(),
            },
            sign_method: SignMethod::Sha256,
            sign: "ab".repeat(32),
            module: module.into(),
            is_diff: true,
            ext_data: Some(serde_json::json!({"k":"v"})),
        }
    }

    fn temporary() -> Journal {
        Journal::open(&Store::temporary().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn put_get_all_remove() {
        let journal = temporary();
        let leaf = DeviceId::new("pk", "leaf-01");
        assert_eq!(journal.get(&leaf, "MCU").unwrap(), None);

        let mut record = JobRecord::new(leaf.clone(), notice("MCU"), 1_000);
        journal.put(&record).await.unwrap();
        let other = JobRecord::new(leaf.clone(), notice("default"), 1_000);
        journal.put(&other).await.unwrap();
        assert_eq!(journal.get(&leaf, "MCU").unwrap().as_ref(), Some(&record));

        // A put replaces the record of the same leaf and module.
        record.job.on(Event::Start, 2_000);
        journal.put(&record).await.unwrap();
        let got = journal.get(&leaf, "MCU").unwrap().unwrap();
        assert!(matches!(got.job.state(), State::Downloading { .. }));
        assert_eq!(journal.all().unwrap().len(), 2);

        assert_eq!(journal.remove(&leaf, "MCU").await.unwrap(), Some(record));
        assert_eq!(journal.remove(&leaf, "MCU").await.unwrap(), None);
        assert_eq!(journal.all().unwrap(), vec![other]);
    }

    #[tokio::test]
    async fn a_damaged_record_is_skipped_by_all_and_an_error_for_get() {
        let journal = temporary();
        let leaf = DeviceId::new("pk", "leaf-01");
        let good = JobRecord::new(DeviceId::new("pk", "leaf-02"), notice("MCU"), 1);
        journal.put(&good).await.unwrap();
        journal
            .tree
            .insert(key(&leaf, "MCU"), &b"{not json"[..])
            .unwrap();
        assert_eq!(journal.all().unwrap(), vec![good]);
        let e = journal.get(&leaf, "MCU").unwrap_err();
        assert!(e.to_string().contains("pk/leaf-01 module MCU"), "{e}");
    }

    #[tokio::test]
    async fn records_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let leaf = DeviceId::new("a1PK", "leaf/with/slashes");
        let mut record = JobRecord::new(leaf.clone(), notice("MCU"), 1_000);
        record.job.on(Event::Start, 2_000);
        record.job.on(Event::Downloaded, 3_000);
        record.job.on(Event::Verified, 4_000);
        record
            .job
            .on(Event::FlashProgress { done: 5, total: 10 }, 5_000);
        {
            let (store, _) = Store::open(&path).unwrap();
            let journal = Journal::open(&store).unwrap();
            journal.put(&record).await.unwrap();
        }
        crate::store::wait_unlocked(&path);
        let (store, _) = Store::open(&path).unwrap();
        let journal = Journal::open(&store).unwrap();
        let mut back = journal.get(&leaf, "MCU").unwrap().unwrap();
        assert_eq!(back, record);
        assert_eq!(back.job.history().len(), 4);
        // And it resumes: a restart during flashing flashes again.
        assert!(
            back.job
                .on(
                    Event::Restarted(crate::ota::job::Restart {
                        unclean: true,
                        max_flash_restarts: 1
                    }),
                    6_000
                )
                .contains(&crate::ota::Action::StartFlash)
        );
    }

    fn succeeded(leaf: &DeviceId) -> JobRecord {
        let mut record = JobRecord::new(leaf.clone(), notice("MCU"), 1_000);
        for ev in [
            Event::Start,
            Event::Downloaded,
            Event::Verified,
            Event::Flashed,
        ] {
            record.job.on(ev, 2_000);
        }
        record.job.on(
            Event::Identified {
                version: "2.0.0".into(),
            },
            3_000,
        );
        record
    }

    #[tokio::test]
    async fn a_terminal_record_and_the_leaf_version_are_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let leaf = DeviceId::new("pk", "leaf-01");
        let record = succeeded(&leaf);
        {
            let (store, _) = Store::open(&path).unwrap();
            let journal = Journal::open(&store).unwrap();
            assert_eq!(journal.version(&leaf, "MCU").unwrap(), None);
            journal.put(&record).await.unwrap();
            // Nothing else is written: a crash right here keeps both.
        }
        crate::store::wait_unlocked(&path);
        let (store, _) = Store::open(&path).unwrap();
        let journal = Journal::open(&store).unwrap();
        assert_eq!(journal.get(&leaf, "MCU").unwrap().as_ref(), Some(&record));
        assert_eq!(
            journal.version(&leaf, "MCU").unwrap().as_deref(),
            Some("2.0.0")
        );
    }

    #[tokio::test]
    async fn report_marks_name_one_terminal_record() {
        let journal = temporary();
        let leaf = DeviceId::new("pk", "leaf-01");
        let record = succeeded(&leaf);
        assert!(!journal.is_reported(&record).unwrap());
        journal.mark_reported(&record).await.unwrap();
        assert!(journal.is_reported(&record).unwrap());
        // A later job of the same leaf and module is not covered by it.
        let mut next = JobRecord::new(leaf.clone(), notice("MCU"), 5_000);
        next.notice.version = "3.0.0".into();
        next.job.on(Event::Start, 5_001);
        next.job
            .on(Event::DownloadFailed { desc: "404".into() }, 5_002);
        assert!(!journal.is_reported(&next).unwrap());
    }

    #[tokio::test]
    async fn the_run_marker_tells_a_clean_stop_from_a_crash() {
        let journal = temporary();
        assert!(journal.begin_run().await.unwrap(), "a new store is clean");
        // Killed: no end_run.
        assert!(!journal.begin_run().await.unwrap());
        journal.end_run().await.unwrap();
        assert!(journal.begin_run().await.unwrap());
    }
}
