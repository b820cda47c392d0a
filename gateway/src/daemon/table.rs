//! The job table: every job of the daemon, the notices waiting for them, and
//! their persistence, behind one small typed API. It is the only owner of the
//! queue (`ota::queue`), the live job records and the journal
//! (`ota::journal`: records, leaf versions, report marks): nothing else can let
//! them drift apart.
//!
//! - In memory, the queue and the live jobs change together under one lock,
//!   never held across an await.
//! - Every change of a job is written to the journal before the caller acts
//!   on it; a job that cannot be persisted is not started (its notice is
//!   refused), and a running job whose state cannot be persisted ends (the
//!   supervisor reports it).
//! - A task works on a job through a [`Ticket`]: a newer notice for the same
//!   leaf makes a newer ticket, and every call with an older one is refused,
//!   so a replaced job's task gives up before it touches anything.
//!
//! What it is not: it publishes nothing, opens no link and runs no plugin
//! (that is the runner's), and decides nothing about a job's phases (that is
//! the job machine's, `ota::job`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::ports::Clock;
use crate::devices::Leaf;
use crate::ota::job::{Action, Event, Restart, State};
use crate::ota::journal::{HistoryEntry, JobRecord, Journal, JournalError};
use crate::ota::protocol::Notice;
use crate::ota::queue::{Offer, Queue};
use crate::ota::topics::DeviceId;

/// A job's key: one job per leaf and module.
pub(crate) type JobKey = (DeviceId, String);

/// A task's claim on a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub key: JobKey,
    /// Only the task holding the newest generation of a key may change it.
    pub generation: u64,
}

/// What the intake of a notice came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Intake {
    /// A job was created (or refreshed with a new URL) and persisted: run it.
    Run(Ticket),
    /// Nothing to start: a duplicate, or a notice waiting behind a running job.
    Held(Offer),
    /// The job could not be persisted: refuse the notice with this reason.
    Refused(String),
}

/// What to do with a persisted job when the daemon starts.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Resume {
    /// Run its task, feeding it this first event (`None`: `Start`).
    Run(Ticket, Option<Event>),
    /// A terminal job whose reports may not have reached the outbox.
    Report(JobKey),
}

/// A live job as the table holds it.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    /// The persisted record (notice and job machine).
    pub record: JobRecord,
    /// The generation of the task allowed to change it.
    generation: u64,
    /// The last failure reason seen, kept for the status API after a retry.
    pub last_error: Option<String>,
    /// Whether a task holds the job's link and a slot right now (a restored
    /// job in `Flashing` whose task waits for its bus is not flashing).
    pub active: bool,
}

/// The queue and the jobs, changed together.
#[derive(Debug)]
struct Inner {
    queue: Queue,
    jobs: BTreeMap<JobKey, Live>,
    next_generation: u64,
}

impl Inner {
    fn claim(&mut self, key: &JobKey) -> Option<Ticket> {
        let live = self.jobs.get_mut(key)?;
        self.next_generation += 1;
        live.generation = self.next_generation;
        Some(Ticket {
            key: key.clone(),
            generation: live.generation,
        })
    }

    fn current(&mut self, ticket: &Ticket) -> Option<&mut Live> {
        self.jobs
            .get_mut(&ticket.key)
            .filter(|l| l.generation == ticket.generation)
    }
}

/// The daemon's jobs.
pub(crate) struct JobTable {
    /// The queue and the live jobs, under one lock (never held across an await).
    inner: Mutex<Inner>,
    /// Where records, leaf versions and report marks are persisted.
    journal: Journal,
    /// The jobs' clock (transitions, the succeeded-duplicate window).
    clock: Arc<dyn Clock>,
    /// Woken whenever something the summary or the status API shows changed.
    changed: Notify,
    /// Counts those changes, for every watcher (the dashboard's events).
    revision: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for JobTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobTable").finish_non_exhaustive()
    }
}

impl JobTable {
    /// The table of what `journal` holds, and what to do with each job now.
    /// `restart` tells persisted running jobs how the gateway came back.
    pub fn restore(
        journal: Journal,
        clock: Arc<dyn Clock>,
        restart: Restart,
    ) -> Result<(JobTable, Vec<Resume>), JournalError> {
        let mut inner = Inner {
            queue: Queue::new(),
            jobs: BTreeMap::new(),
            next_generation: 0,
        };
        let mut resume = Vec::new();
        for r in journal.all()? {
            inner.queue.restore(&r);
            let key = (r.leaf.clone(), r.module.clone());
            let job = &r.job;
            // A job waiting for a fresh notice (its URL expired) needs no task:
            // `firmware/get` on connect brings the notice.
            let what = if job.is_terminal() {
                Some(None)
            } else if job.state().is_running() {
                Some(Some(Event::Restarted(restart)))
            } else if job.ready() {
                Some(Some(Event::Start))
            } else {
                None
            };
            inner.jobs.insert(
                key.clone(),
                Live {
                    record: r,
                    generation: 0,
                    last_error: None,
                    active: false,
                },
            );
            match what {
                Some(None) => resume.push(Resume::Report(key)),
                Some(Some(first)) => {
                    let ticket = inner.claim(&key).expect("just inserted");
                    let first = (first != Event::Start).then_some(first);
                    resume.push(Resume::Run(ticket, first));
                }
                None => {}
            }
        }
        Ok((
            JobTable {
                inner: Mutex::new(inner),
                journal,
                clock,
                changed: Notify::new(),
                revision: tokio::sync::watch::Sender::new(0),
            },
            resume,
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A task that panicked while holding the lock left consistent data:
        // every change under it is a single insert or field write.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Woken when jobs changed (for the summary).
    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    /// Something the status API shows changed (a job, a campaign, the
    /// upstream session, the plugins): wake the summary and every watcher.
    pub fn touch(&self) {
        self.changed.notify_one();
        self.revision.send_modify(|r| *r = r.wrapping_add(1));
    }

    /// Whether the store answers.
    pub fn store_ok(&self) -> Result<(), JournalError> {
        self.journal.ping()
    }

    /// A receiver that sees every [`JobTable::touch`].
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Take a notice for a managed leaf: dedupe, replace, persist.
    pub async fn offer(&self, leaf: &DeviceId, notice: Notice) -> Intake {
        let now = self.now_ms();
        let key = (leaf.clone(), notice.module.clone());
        let (offer, record) = {
            let mut inner = self.lock();
            let offer = inner.queue.offer(leaf, &notice, now);
            let record = match &offer {
                Offer::Queued | Offer::Replaced(_) => {
                    let record = JobRecord::new(leaf.clone(), notice, now);
                    inner.jobs.insert(
                        key.clone(),
                        Live {
                            record: record.clone(),
                            generation: 0,
                            last_error: None,
                            active: false,
                        },
                    );
                    Some(record)
                }
                Offer::Refreshed => inner.jobs.get_mut(&key).map(|live| {
                    live.record.notice = notice;
                    live.record.job.on(Event::NoticeRefreshed, now);
                    live.record.clone()
                }),
                Offer::Ignored(_) | Offer::AfterCurrent => None,
            };
            (offer, record)
        };
        tracing::debug!(device = %leaf, module = %key.1, ?offer, "upgrade notice taken");
        let Some(record) = record else {
            return Intake::Held(offer);
        };
        if let Err(e) = self.journal.put(&record).await {
            // Not persisted, not started: forget it entirely, so the next
            // notice for this leaf is taken afresh.
            let mut inner = self.lock();
            inner.jobs.remove(&key);
            inner.queue.finished(&key.0, &key.1, false, now);
            return Intake::Refused(format!(
                "the gateway cannot store the job ({e}); check the disk of data_dir"
            ));
        }
        self.touch();
        match self.lock().claim(&key) {
            Some(t) => Intake::Run(t),
            None => Intake::Held(offer),
        }
    }

    /// A task got its link and a slot for `ticket`'s job. False when the job
    /// was replaced meanwhile (the task must give up).
    pub fn begin(&self, ticket: &Ticket) -> bool {
        let mut inner = self.lock();
        let Some(live) = inner.current(ticket) else {
            return false;
        };
        live.active = true;
        inner.queue.started(&ticket.key.0, &ticket.key.1);
        drop(inner);
        self.touch();
        true
    }

    /// Feed `event` to the job and persist it when it changed. `Ok(None)` when
    /// `ticket` is no longer the job's (replaced).
    pub async fn apply(
        &self,
        ticket: &Ticket,
        event: Event,
    ) -> Result<Option<Vec<Action>>, JournalError> {
        let now = self.now_ms();
        let (actions, record) = {
            let mut inner = self.lock();
            let Some(live) = inner.current(ticket) else {
                return Ok(None);
            };
            if let Event::DownloadFailed { desc }
            | Event::ImageRejected { desc }
            | Event::VerifyFailed { desc }
            | Event::FlashFailed { desc, .. }
            | Event::IdentifyFailed { desc }
            | Event::Crashed { desc } = &event
            {
                live.last_error = Some(desc.clone());
            }
            let before = live.record.job.state().name();
            let actions = live.record.job.on(event, now);
            let changed = before != live.record.job.state().name() || !actions.is_empty();
            (actions, changed.then(|| live.record.clone()))
        };
        if let Some(r) = record {
            self.journal.put(&r).await?;
            self.touch();
        }
        Ok(Some(actions))
    }

    /// The record of `ticket`'s job, if the ticket is still current.
    pub fn record(&self, ticket: &Ticket) -> Option<JobRecord> {
        self.lock().current(ticket).map(|l| l.record.clone())
    }

    /// The task of `ticket` is over (its job ended, waits for a fresh notice,
    /// or was stopped by shutdown). A terminal job is marked reported (its
    /// reports were published before) and frees its queue slot; the notice
    /// that waited behind it becomes a job, returned for the caller to run.
    pub async fn end(&self, ticket: &Ticket) -> Result<Option<Intake>, JournalError> {
        let record = {
            let mut inner = self.lock();
            let Some(live) = inner.current(ticket) else {
                return Ok(None);
            };
            live.active = false;
            let record = live.record.clone();
            if record.job.awaiting_notice() {
                inner.queue.awaiting_notice(&ticket.key.0, &ticket.key.1);
            }
            record
        };
        self.touch();
        if !record.job.is_terminal() {
            return Ok(None);
        }
        self.journal.mark_reported(&record).await?;
        let succeeded = matches!(record.job.state(), State::Succeeded { .. });
        let next = {
            let now = self.now_ms();
            self.lock()
                .queue
                .finished(&ticket.key.0, &ticket.key.1, succeeded, now)
        };
        match next {
            // The queue made it the current notice: create its job.
            Some(notice) => Ok(Some(self.create(&ticket.key.0, notice).await)),
            None => Ok(None),
        }
    }

    /// A job for a notice the queue already made current.
    async fn create(&self, leaf: &DeviceId, notice: Notice) -> Intake {
        let now = self.now_ms();
        let key = (leaf.clone(), notice.module.clone());
        let record = JobRecord::new(leaf.clone(), notice, now);
        if let Err(e) = self.journal.put(&record).await {
            self.lock().queue.finished(&key.0, &key.1, false, now);
            return Intake::Refused(format!(
                "the gateway cannot store the job ({e}); check the disk of data_dir"
            ));
        }
        let mut inner = self.lock();
        inner.jobs.insert(
            key.clone(),
            Live {
                record,
                generation: 0,
                last_error: None,
                active: false,
            },
        );
        let ticket = inner.claim(&key).expect("just inserted");
        drop(inner);
        self.touch();
        Intake::Run(ticket)
    }

    /// A terminal job of `key` whose reports are not known to be in the
    /// outbox (the gateway may have died between persisting the job and
    /// publishing its end): the record to report again.
    pub fn unreported(&self, key: &JobKey) -> Result<Option<JobRecord>, JournalError> {
        let Some(record) = self.lock().jobs.get(key).map(|l| l.record.clone()) else {
            return Ok(None);
        };
        if !record.job.is_terminal() || self.journal.is_reported(&record)? {
            return Ok(None);
        }
        Ok(Some(record))
    }

    /// The reports of terminal `record` are in the outbox now.
    pub async fn mark_reported(&self, record: &JobRecord) -> Result<(), JournalError> {
        self.journal.mark_reported(record).await
    }

    /// Whether `key`'s job is under way (not ended, not waiting for a fresh
    /// notice), or ended with its end not yet in the outbox: a `firmware/get`
    /// now would bring its own notice again (the platform has not seen the
    /// end, so it still counts the package as pending) and the gateway would
    /// run a notice that just failed a second time.
    pub fn busy(&self, key: &JobKey) -> bool {
        let Some(record) = self.lock().jobs.get(key).map(|l| l.record.clone()) else {
            return false;
        };
        if !record.job.is_terminal() {
            return !record.job.awaiting_notice();
        }
        !self.journal.is_reported(&record).unwrap_or(false)
    }

    /// The version `leaf` runs as far as the gateway knows: the last one a job
    /// read back (or trusted), else the configured one.
    pub fn version(&self, leaf: &Leaf) -> String {
        self.known_version(leaf)
            .unwrap_or_else(|| leaf.configured_version.clone())
    }

    /// The version the journal knows `leaf` runs (read back from it), if any.
    /// `None` on a new or rebuilt store: the configured version is only the
    /// operator's word, and the leaf must be asked before it is informed.
    pub fn known_version(&self, leaf: &Leaf) -> Option<String> {
        match self.journal.version(&leaf.id, &leaf.module) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(device = %leaf.id, module = %leaf.module, "{e}");
                None
            }
        }
    }

    /// Remember the hardware id or model `identify` read from `leaf`.
    pub fn record_model(&self, leaf: &Leaf, model: &str) {
        if let Err(e) = self.journal.set_model(&leaf.id, &leaf.module, model) {
            tracing::warn!(device = %leaf.id, module = %leaf.module, "{e}");
        }
        self.touch();
    }

    /// The hardware id or model last read from `leaf`, if any.
    pub fn model(&self, leaf: &Leaf) -> Option<String> {
        self.journal
            .model(&leaf.id, &leaf.module)
            .unwrap_or_else(|e| {
                tracing::warn!(device = %leaf.id, module = %leaf.module, "{e}");
                None
            })
    }

    /// The job of `key` as the table holds it now (running or the last ended).
    pub fn job(&self, key: &JobKey) -> Option<JobRecord> {
        self.lock().jobs.get(key).map(|l| l.record.clone())
    }

    /// Whether `key`'s job waits for a fresh notice of the package of
    /// `notice` (its URL expired): the notice is that refresh.
    pub fn awaits(&self, key: &JobKey, notice: &Notice) -> bool {
        self.lock().jobs.get(key).is_some_and(|l| {
            let r = &l.record;
            r.job.awaiting_notice()
                && r.notice.version == notice.version
                && r.notice.sign == notice.sign
        })
    }

    /// Remember the version read back from `leaf` outside a job.
    pub async fn record_version(&self, leaf: &Leaf, version: &str) -> Result<(), JournalError> {
        let r = self
            .journal
            .set_version(&leaf.id, &leaf.module, version)
            .await;
        self.touch();
        r
    }

    /// The jobs under way now (holding their link): device, module and
    /// state with progress, for the shutdown's account.
    pub fn running(&self) -> Vec<(String, String, String)> {
        self.lock()
            .jobs
            .iter()
            .filter(|(_, l)| l.active && l.record.job.state().is_running())
            .map(|((id, module), l)| {
                let state = l.record.job.state();
                let shown = match l.record.job.percent() {
                    Some(p) => format!("{} {p}%", state.name()),
                    None => state.name().to_string(),
                };
                (id.to_string(), module.clone(), shown)
            })
            .collect()
    }

    /// Put the end of terminal `record` in its leaf's history.
    pub fn remember_end(&self, record: &JobRecord) {
        use crate::ota::job::State;
        let (outcome, step, desc) = match record.job.state() {
            State::Succeeded { version } => ("succeeded", None, format!("runs {version}")),
            State::Failed { step, desc } => ("failed", Some(step.code()), desc.clone()),
            _ => return,
        };
        let history = record.job.history();
        let entry = HistoryEntry {
            target_version: record.notice.version.clone(),
            outcome: outcome.into(),
            step,
            desc,
            queued_ms: history.first().map_or(0, |t| t.at_ms),
            ended_ms: history.last().map_or(0, |t| t.at_ms),
            progress: record.job.furthest_percent(),
        };
        if let Err(e) = self
            .journal
            .add_history(&record.leaf, &record.module, entry)
        {
            tracing::warn!("{e}");
        }
    }

    /// Put a notice refused before it became a job in the leaf's history.
    pub fn remember_refusal(
        &self,
        leaf: &DeviceId,
        module: &str,
        version: &str,
        step: i32,
        desc: &str,
    ) {
        let now = self.now_ms();
        let entry = HistoryEntry {
            target_version: version.into(),
            outcome: "refused".into(),
            step: Some(step),
            desc: desc.into(),
            queued_ms: now,
            ended_ms: now,
            progress: 0,
        };
        if let Err(e) = self.journal.add_history(leaf, module, entry) {
            tracing::warn!("{e}");
        }
        self.touch();
    }

    /// A leaf's history, oldest first.
    pub fn history(&self, leaf: &DeviceId, module: &str) -> Vec<HistoryEntry> {
        self.journal.history(leaf, module).unwrap_or_else(|e| {
            tracing::warn!("{e}");
            Vec::new()
        })
    }

    /// A copy of every job, for the status API and the summary.
    pub fn snapshot(&self) -> BTreeMap<JobKey, Live> {
        self.lock().jobs.clone()
    }

    /// The shown state of a job: a job whose task does not hold a slot is
    /// `queued`, whatever phase it will resume.
    pub fn shown_state(live: &Live) -> &'static str {
        let state = live.record.job.state();
        if state.is_running() && !live.active {
            "queued"
        } else {
            state.name()
        }
    }

    /// The run stopped cleanly: tell the next start.
    pub async fn end_run(&self) -> Result<(), JournalError> {
        self.journal.end_run().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::ports::fakes::ManualClock;
    use crate::ota::protocol::{Download, SignMethod};
    use crate::store::Store;

    const RESTART: Restart = Restart {
        unclean: true,
        max_flash_restarts: 1,
    };

    fn leaf() -> DeviceId {
        DeviceId::new("pk", "leaf-01")
    }

    fn notice(version: &str) -> Notice {
        Notice {
            id: 1,
            version: version.into(),
            size: 10,
            download: Download::Http {
                url: format!("http://h/{version}"),
            },
            sign_method: SignMethod::Md5,
            sign: "a".repeat(32),
            module: "MCU".into(),
            is_diff: false,
            ext_data: None,
        }
    }

    fn table(store: &Store) -> (JobTable, Vec<Resume>) {
        let journal = Journal::open(store).unwrap();
        JobTable::restore(journal, Arc::new(ManualClock::at(1_000)), RESTART).unwrap()
    }

    fn run(intake: Intake) -> Ticket {
        match intake {
            Intake::Run(t) => t,
            other => panic!("expected a job to run, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_notice_becomes_a_persisted_job_and_a_replacement_retires_the_old_ticket() {
        let store = Store::temporary().unwrap();
        let (t, resume) = table(&store);
        assert!(resume.is_empty());
        let first = run(t.offer(&leaf(), notice("2.0")).await);
        // Persisted before it runs.
        let journal = Journal::open(&store).unwrap();
        assert!(journal.get(&leaf(), "MCU").unwrap().is_some());
        // A different notice before the job started replaces it.
        let second = run(t.offer(&leaf(), notice("3.0")).await);
        assert_ne!(first, second);
        assert!(!t.begin(&first), "the old task gives up");
        assert_eq!(t.apply(&first, Event::Start).await.unwrap(), None);
        assert!(t.begin(&second));
        assert!(t.apply(&second, Event::Start).await.unwrap().is_some());
        assert_eq!(
            journal.get(&leaf(), "MCU").unwrap().unwrap().notice.version,
            "3.0"
        );
        // Running now: a newer notice waits, the same one is a duplicate.
        assert_eq!(
            t.offer(&leaf(), notice("4.0")).await,
            Intake::Held(Offer::AfterCurrent)
        );
        assert!(matches!(
            t.offer(&leaf(), notice("3.0")).await,
            Intake::Held(Offer::Ignored(_))
        ));
    }

    #[tokio::test]
    async fn the_end_of_a_job_marks_it_reported_and_starts_the_waiting_notice() {
        let store = Store::temporary().unwrap();
        let (t, _) = table(&store);
        let ticket = run(t.offer(&leaf(), notice("2.0")).await);
        assert!(t.begin(&ticket));
        t.apply(&ticket, Event::Start).await.unwrap();
        t.offer(&leaf(), notice("3.0")).await;
        t.apply(&ticket, Event::DownloadFailed { desc: "404".into() })
            .await
            .unwrap();
        let key = ticket.key.clone();
        assert!(t.unreported(&key).unwrap().is_some());
        let next = t.end(&ticket).await.unwrap();
        assert!(t.unreported(&key).unwrap().is_none());
        let next = run(next.expect("the waiting notice"));
        assert_eq!(t.record(&next).unwrap().notice.version, "3.0");
        // The first job's failure is kept for the status API.
        assert_eq!(
            t.snapshot()[&key].last_error,
            None,
            "a new job starts without an error"
        );
    }

    #[tokio::test]
    async fn a_restart_resumes_running_jobs_and_reports_unreported_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let other = DeviceId::new("pk", "leaf-02");
        {
            let (store, _) = Store::open(&path).unwrap();
            let (t, _) = table(&store);
            let a = run(t.offer(&leaf(), notice("2.0")).await);
            t.begin(&a);
            t.apply(&a, Event::Start).await.unwrap();
            let b = run(t.offer(&other, notice("2.0")).await);
            t.begin(&b);
            t.apply(&b, Event::Start).await.unwrap();
            t.apply(&b, Event::DownloadFailed { desc: "x".into() })
                .await
                .unwrap();
            // Killed before `end`: b's reports may not have gone out.
        }
        crate::store::wait_unlocked(&path);
        let (store, _) = Store::open(&path).unwrap();
        let (t, resume) = table(&store);
        assert_eq!(resume.len(), 2, "{resume:?}");
        assert!(resume.contains(&Resume::Report((other.clone(), "MCU".into()))));
        let Some(Resume::Run(ticket, Some(Event::Restarted(r)))) =
            resume.iter().find(|r| matches!(r, Resume::Run(..)))
        else {
            panic!("{resume:?}")
        };
        assert_eq!(*r, RESTART);
        // A restored running job waiting for its slot shows as queued.
        let snap = t.snapshot();
        assert_eq!(JobTable::shown_state(&snap[&ticket.key]), "queued");
        t.begin(ticket);
        assert_eq!(
            JobTable::shown_state(&t.snapshot()[&ticket.key]),
            "downloading"
        );
    }

    #[tokio::test]
    async fn the_version_learnt_by_a_job_is_the_leaf_version_at_once() {
        let store = Store::temporary().unwrap();
        let (t, _) = table(&store);
        let leaf_cfg = Leaf {
            id: leaf(),
            module: "MCU".into(),
            family: "xmodem".into(),
            link: "tcp://127.0.0.1:1".into(),
            options: vec![],
            device_secret: None,
            configured_version: "1.0".into(),
            tags: vec![],
            bus: "tcp:127.0.0.1:1".into(),
        };
        assert_eq!(t.version(&leaf_cfg), "1.0");
        let ticket = run(t.offer(&leaf(), notice("2.0")).await);
        t.begin(&ticket);
        for ev in [
            Event::Start,
            Event::Downloaded,
            Event::Verified,
            Event::Flashed,
            Event::Identified {
                version: "2.0".into(),
            },
        ] {
            t.apply(&ticket, ev).await.unwrap();
        }
        // Before `end`, before anything was published: the version is stored.
        assert_eq!(t.version(&leaf_cfg), "2.0");
    }
}
