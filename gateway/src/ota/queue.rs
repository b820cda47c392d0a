//! Which incoming notice becomes a job: dedupe and replacement, per leaf and
//! module, pure and in memory.
//!
//! - A notice with the same version and sign as the current job (queued or
//!   running), as the one waiting behind it, or as the last success (within
//!   [`DEFAULT_SUCCEEDED_WINDOW_MS`]) is a duplicate (broker redelivery, a
//!   `firmware/get` answer racing a push) and is ignored.
//! - A different notice replaces a queued job that has not started: the
//!   platform's latest word wins (versions are not compared: a downgrade is a
//!   legitimate order).
//! - A running job finishes first; the newer notice waits behind it (one
//!   waiting notice per leaf and module, the latest).
//! - A job queued again after an expired URL takes the next notice with its
//!   version and sign as its fresh URL ([`Offer::Refreshed`]).
//!
//! What it is not: it holds no jobs and persists nothing. The driver tells it
//! when a job starts, waits for a fresh notice, or finishes, and rebuilds it
//! from the journal after a restart ([`Queue::restore`]). A notice waiting
//! behind a running job is not persisted: after a restart `firmware/get`
//! brings it back.

use std::collections::BTreeMap;

use super::job::State;
use super::journal::JobRecord;
use super::protocol::Notice;
use super::topics::DeviceId;

/// How long a success makes a notice with the same version and sign a
/// duplicate: a day.
pub const DEFAULT_SUCCEEDED_WINDOW_MS: u64 = 24 * 60 * 60 * 1000;

/// What [`Queue::offer`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// A duplicate: do nothing.
    Ignored(Duplicate),
    /// Nothing was pending: create and queue a job for the notice.
    Queued,
    /// The queued (not started) job of this old notice is replaced: drop it
    /// (without reporting anything: the platform moved on) and queue a job for
    /// the new notice.
    Replaced(Notice),
    /// A job is running: the notice waits behind it and comes back from
    /// [`Queue::finished`].
    AfterCurrent,
    /// The job waiting for a fresh notice got it: store the notice in its
    /// record (new URL) and send it [`super::job::Event::NoticeRefreshed`].
    Refreshed,
}

/// Which notice an ignored one duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicate {
    /// The current job's (queued or running).
    Current,
    /// The one waiting behind the running job.
    Waiting,
    /// The last one that succeeded.
    Succeeded,
}

/// What makes two notices the same package.
fn same(a: &Notice, b: &Notice) -> bool {
    a.version == b.version && a.sign == b.sign
}

#[derive(Debug, Clone)]
struct Current {
    notice: Notice,
    started: bool,
    awaiting_notice: bool,
}

#[derive(Debug, Clone, Default)]
struct Slot {
    current: Option<Current>,
    waiting: Option<Notice>,
    /// The last notice that succeeded, and when (ms since the unix epoch).
    succeeded: Option<(Notice, u64)>,
}

/// The pending notices of every leaf and module.
#[derive(Debug, Clone)]
pub struct Queue {
    slots: BTreeMap<(DeviceId, String), Slot>,
    succeeded_window_ms: u64,
}

impl Default for Queue {
    fn default() -> Queue {
        Queue::new()
    }
}

impl Queue {
    pub fn new() -> Queue {
        Queue {
            slots: BTreeMap::new(),
            succeeded_window_ms: DEFAULT_SUCCEEDED_WINDOW_MS,
        }
    }

    /// How long after a success a notice for the same package is ignored.
    pub fn with_succeeded_window(mut self, ms: u64) -> Queue {
        self.succeeded_window_ms = ms;
        self
    }

    fn slot(&mut self, leaf: &DeviceId, module: &str) -> &mut Slot {
        self.slots
            .entry((leaf.clone(), module.to_string()))
            .or_default()
    }

    fn current(&mut self, leaf: &DeviceId, module: &str) -> Option<&mut Current> {
        self.slots
            .get_mut(&(leaf.clone(), module.to_string()))
            .and_then(|s| s.current.as_mut())
    }

    /// Decide what to do with `notice` for `leaf` (its module is the notice's),
    /// received at `now`.
    pub fn offer(&mut self, leaf: &DeviceId, notice: &Notice, now: u64) -> Offer {
        let window = self.succeeded_window_ms;
        let slot = self.slot(leaf, &notice.module);
        match &mut slot.current {
            Some(current) if same(&current.notice, notice) => {
                if current.awaiting_notice && !current.started {
                    current.notice = notice.clone();
                    current.awaiting_notice = false;
                    Offer::Refreshed
                } else {
                    Offer::Ignored(Duplicate::Current)
                }
            }
            Some(current) if !current.started => {
                let old = std::mem::replace(&mut current.notice, notice.clone());
                current.awaiting_notice = false;
                Offer::Replaced(old)
            }
            Some(_) => {
                if slot.waiting.as_ref().is_some_and(|w| same(w, notice)) {
                    return Offer::Ignored(Duplicate::Waiting);
                }
                slot.waiting = Some(notice.clone());
                Offer::AfterCurrent
            }
            None => {
                let recent_success = slot.succeeded.as_ref().is_some_and(|(done, at)| {
                    same(done, notice) && now.saturating_sub(*at) < window
                });
                if recent_success {
                    return Offer::Ignored(Duplicate::Succeeded);
                }
                slot.current = Some(Current {
                    notice: notice.clone(),
                    started: false,
                    awaiting_notice: false,
                });
                Offer::Queued
            }
        }
    }

    /// The current job of `leaf`/`module` got a slot: newer notices now wait
    /// behind it.
    pub fn started(&mut self, leaf: &DeviceId, module: &str) {
        if let Some(current) = self.current(leaf, module) {
            current.started = true;
        }
    }

    /// The current job went back to the queue to wait for a fresh notice (its
    /// URL expired): the next notice for the same package refreshes it, and a
    /// different one replaces it.
    pub fn awaiting_notice(&mut self, leaf: &DeviceId, module: &str) {
        if let Some(current) = self.current(leaf, module) {
            current.started = false;
            current.awaiting_notice = true;
        }
    }

    /// The current job of `leaf`/`module` ended (or was dropped), at `now`.
    /// Returns the notice that waited behind it, now the current one: queue a
    /// job for it.
    pub fn finished(
        &mut self,
        leaf: &DeviceId,
        module: &str,
        succeeded: bool,
        now: u64,
    ) -> Option<Notice> {
        let slot = self.slot(leaf, module);
        if let Some(current) = slot.current.take()
            && succeeded
        {
            slot.succeeded = Some((current.notice, now));
        }
        let next = slot.waiting.take()?;
        slot.current = Some(Current {
            notice: next.clone(),
            started: false,
            awaiting_notice: false,
        });
        Some(next)
    }

    /// The notice of the current job of `leaf`/`module`, if any.
    pub fn current_notice(&self, leaf: &DeviceId, module: &str) -> Option<&Notice> {
        self.slots
            .get(&(leaf.clone(), module.to_string()))
            .and_then(|s| s.current.as_ref())
            .map(|c| &c.notice)
    }

    /// Rebuild the state of one leaf and module from its journal record after
    /// a restart. A terminal record counts as the last success (at its last
    /// transition) or as nothing; another is the current job.
    pub fn restore(&mut self, record: &JobRecord) {
        let at = record.job.history().last().map_or(0, |t| t.at_ms);
        let slot = self.slot(&record.leaf, &record.module);
        match record.job.state() {
            State::Succeeded { .. } => slot.succeeded = Some((record.notice.clone(), at)),
            State::Failed { .. } => {}
            state => {
                slot.current = Some(Current {
                    notice: record.notice.clone(),
                    started: state.is_running(),
                    awaiting_notice: record.job.awaiting_notice(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ota::job::{Event, Job};
    use crate::ota::protocol::{Download, SignMethod};

    fn leaf() -> DeviceId {
        DeviceId::new("pk", "leaf-01")
    }

    fn notice(version: &str, sign: char) -> Notice {
        Notice {
            id: 1,
            version: version.into(),
            size: 10,
            download: Download::Http {
                url: format!("http://h/{version}"),
            },
            sign_method: SignMethod::Md5,
            sign: sign.to_string().repeat(32),
            module: "MCU".into(),
            is_diff: false,
            ext_data: None,
        }
    }

    #[test]
    fn the_first_notice_is_queued_and_duplicates_are_ignored() {
        let mut q = Queue::new();
        let n = notice("2.0", 'a');
        assert_eq!(q.offer(&leaf(), &n, 0), Offer::Queued);
        // Redelivery with another message id and URL is still the same package.
        let again = Notice {
            id: 9,
            download: Download::Http {
                url: "http://other".into(),
            },
            ..n.clone()
        };
        assert_eq!(
            q.offer(&leaf(), &again, 1),
            Offer::Ignored(Duplicate::Current)
        );
        q.started(&leaf(), "MCU");
        assert_eq!(q.offer(&leaf(), &n, 2), Offer::Ignored(Duplicate::Current));
        // Another module of the same leaf, or another leaf, is independent.
        let other_module = Notice {
            module: "BLE".into(),
            ..n.clone()
        };
        assert_eq!(q.offer(&leaf(), &other_module, 3), Offer::Queued);
        assert_eq!(
            q.offer(&DeviceId::new("pk", "leaf-02"), &n, 3),
            Offer::Queued
        );
    }

    #[test]
    fn a_newer_notice_replaces_a_queued_job() {
        let mut q = Queue::new();
        let old = notice("2.0", 'a');
        q.offer(&leaf(), &old, 0);
        let new = notice("3.0", 'b');
        assert_eq!(q.offer(&leaf(), &new, 1), Offer::Replaced(old));
        assert_eq!(q.current_notice(&leaf(), "MCU"), Some(&new));
        // Same version, different sign (a rebuilt package) replaces too.
        let rebuilt = notice("3.0", 'c');
        assert_eq!(q.offer(&leaf(), &rebuilt, 2), Offer::Replaced(new));
    }

    #[test]
    fn a_running_job_finishes_first_and_the_newer_notice_waits() {
        let mut q = Queue::new();
        let first = notice("2.0", 'a');
        q.offer(&leaf(), &first, 0);
        q.started(&leaf(), "MCU");
        let second = notice("3.0", 'b');
        assert_eq!(q.offer(&leaf(), &second, 1), Offer::AfterCurrent);
        assert_eq!(
            q.offer(&leaf(), &second, 2),
            Offer::Ignored(Duplicate::Waiting)
        );
        // A still newer one takes the waiting place.
        let third = notice("4.0", 'c');
        assert_eq!(q.offer(&leaf(), &third, 3), Offer::AfterCurrent);
        assert_eq!(q.finished(&leaf(), "MCU", true, 10), Some(third.clone()));
        assert_eq!(q.current_notice(&leaf(), "MCU"), Some(&third));
        // The promoted one is queued, not started: a newer notice replaces it.
        assert_eq!(q.offer(&leaf(), &second, 11), Offer::Replaced(third));
        assert_eq!(q.finished(&leaf(), "MCU", false, 12), None);
        assert_eq!(q.current_notice(&leaf(), "MCU"), None);
    }

    #[test]
    fn the_last_success_is_a_duplicate_for_a_while() {
        let mut q = Queue::new().with_succeeded_window(1_000);
        let n = notice("2.0", 'a');
        q.offer(&leaf(), &n, 0);
        q.started(&leaf(), "MCU");
        assert_eq!(q.finished(&leaf(), "MCU", true, 100), None);
        assert_eq!(
            q.offer(&leaf(), &n, 500),
            Offer::Ignored(Duplicate::Succeeded)
        );
        assert_eq!(q.offer(&leaf(), &n, 1_100), Offer::Queued);
        // A failure is not remembered: the same package may be tried again.
        q.started(&leaf(), "MCU");
        q.finished(&leaf(), "MCU", false, 2_000);
        let mut q2 = Queue::new();
        q2.offer(&leaf(), &n, 0);
        q2.finished(&leaf(), "MCU", false, 1);
        assert_eq!(q2.offer(&leaf(), &n, 2), Offer::Queued);
    }

    #[test]
    fn a_job_waiting_for_a_fresh_url_is_refreshed_by_the_same_package() {
        let mut q = Queue::new();
        let n = notice("2.0", 'a');
        q.offer(&leaf(), &n, 0);
        q.started(&leaf(), "MCU");
        q.awaiting_notice(&leaf(), "MCU");
        let fresh = Notice {
            download: Download::Http {
                url: "http://fresh".into(),
            },
            ..n.clone()
        };
        assert_eq!(q.offer(&leaf(), &fresh, 1), Offer::Refreshed);
        assert_eq!(q.current_notice(&leaf(), "MCU"), Some(&fresh));
        // Only once: a redelivery of it is a duplicate again.
        assert_eq!(
            q.offer(&leaf(), &fresh, 2),
            Offer::Ignored(Duplicate::Current)
        );
        // While waiting, a different package replaces the job.
        q.awaiting_notice(&leaf(), "MCU");
        let newer = notice("3.0", 'b');
        assert_eq!(q.offer(&leaf(), &newer, 3), Offer::Replaced(fresh));
    }

    #[test]
    fn restore_rebuilds_from_journal_records() {
        let n = notice("2.0", 'a');
        let record = |job: Job| JobRecord {
            leaf: leaf(),
            module: "MCU".into(),
            notice: n.clone(),
            job,
        };
        // A running job: a newer notice waits.
        let mut job = Job::new(&n, 0);
        job.on(Event::Start, 1);
        let mut q = Queue::new();
        q.restore(&record(job.clone()));
        assert_eq!(
            q.offer(&leaf(), &notice("3.0", 'b'), 2),
            Offer::AfterCurrent
        );
        // A queued job: replaced.
        let mut q = Queue::new();
        q.restore(&record(Job::new(&n, 0)));
        assert_eq!(
            q.offer(&leaf(), &notice("3.0", 'b'), 2),
            Offer::Replaced(n.clone())
        );
        // A job waiting for a fresh URL: refreshed.
        let mut waiting = job.clone();
        waiting.on(Event::UrlExpired, 2);
        let mut q = Queue::new();
        q.restore(&record(waiting));
        assert_eq!(q.offer(&leaf(), &n, 3), Offer::Refreshed);
        // A success: a duplicate.
        let mut done = job;
        done.on(Event::Downloaded, 2);
        done.on(Event::Verified, 3);
        done.on(Event::Flashed, 4);
        done.on(Event::IdentifyUnsupported, 5);
        let mut q = Queue::new();
        q.restore(&record(done));
        assert_eq!(
            q.offer(&leaf(), &n, 6),
            Offer::Ignored(Duplicate::Succeeded)
        );
    }
}
