//! The job journal: the typed wrapper over the sled `jobs` tree, one
//! [`JobRecord`] per leaf and module, stored as JSON.
//!
//! This is the only file of `ota/` that does I/O. Every [`Journal::put`] and
//! [`Journal::remove`] flushes the tree before it returns, so the driver can
//! persist a job *before* it performs the job's actions: a restart then
//! resumes the job or fails it with a reason. The tree comes from
//! [`crate::store::Store::tree`] (the module that opens the database); this
//! file opens nothing and knows nothing of sled's recovery.

use serde::{Deserialize, Serialize};

use super::job::Job;
use super::protocol::Notice;
use super::topics::DeviceId;

/// The name of the sled tree the journal lives in.
pub const TREE: &str = "jobs";

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
}

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
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

/// The `jobs` tree.
#[derive(Debug, Clone)]
pub struct Journal {
    tree: sled::Tree,
}

/// The key of a leaf's module: the JSON array `[pk, dn, module]`, unambiguous
/// whatever the names contain.
fn key(leaf: &DeviceId, module: &str) -> Vec<u8> {
    serde_json::to_vec(&(&leaf.product_key, &leaf.device_name, module))
        .expect("a tuple of strings always serialises")
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
    /// The journal over `tree` (normally `store.tree(journal::TREE)`).
    pub fn new(tree: sled::Tree) -> Journal {
        Journal { tree }
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

    /// Write `record` (replacing the one of the same leaf and module) and make
    /// it durable.
    pub async fn put(&self, record: &JobRecord) -> Result<(), JournalError> {
        let name = || label(&record.leaf, &record.module);
        let value = serde_json::to_vec(record).map_err(|source| JournalError::Encode {
            key: name(),
            source,
        })?;
        self.tree
            .insert(key(&record.leaf, &record.module), value)
            .map_err(|source| JournalError::Store {
                op: "write",
                key: name(),
                source,
            })?;
        self.flush(name).await
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
        let db = sled::Config::new().temporary(true).open().unwrap();
        Journal::new(db.open_tree(TREE).unwrap())
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
            let db = sled::open(&path).unwrap();
            let journal = Journal::new(db.open_tree(TREE).unwrap());
            journal.put(&record).await.unwrap();
        }
        crate::store::wait_unlocked(&path);
        let db = sled::open(&path).unwrap();
        let journal = Journal::new(db.open_tree(TREE).unwrap());
        let mut back = journal.get(&leaf, "MCU").unwrap().unwrap();
        assert_eq!(back, record);
        assert_eq!(back.job.history().len(), 4);
        // And it resumes: a restart during flashing flashes again.
        assert!(
            back.job
                .on(Event::Restarted, 6_000)
                .contains(&crate::ota::Action::StartFlash)
        );
    }
}
