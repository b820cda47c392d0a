//! Runs one job: waits for its link and a slot, then feeds the job machine
//! (`ota::job`) events and performs the actions it returns, in the order it
//! returns them: download into the cache, verify / flash / identify through
//! the family plugin, report upstream. The job table persists every change
//! before the action runs. The runner decides nothing the machine decides
//! (order, step codes, report texts): it only performs and observes.
//!
//! [`supervise`] is the job's task: a panic or an unexpected error inside the
//! run ends the job with -1 and a desc naming what happened, reported durably
//! like any other end; the link, the bus and the slot are freed as the run
//! unwinds, and the leaf takes its next notice. On shutdown a job that has
//! not begun stops waiting; one under way gets the grace to finish, then
//! stops where it is (`Core::abort`); its persisted state resumes at the
//! next start.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::mpsc;

use super::Core;
use super::table::Ticket;
use crate::cache::{CachedImage, Digest, FetchRequest};
use crate::devices::Leaf;
use crate::link::Link;
use crate::ota::job::{Action, Event, State};
use crate::ota::journal::{JobRecord, JournalError};
use crate::plugin::{FlashError, JobMeta, PluginError, PluginSession};
use crate::progress::JobEvent;

/// How a run ended, when it did not fail.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The machine said `Done`: terminal, or waiting for a fresh notice.
    Ended,
    /// The daemon is shutting down: the job resumes at the next start.
    Stopped,
    /// A newer notice took the job over.
    Superseded,
}

/// Something the job machine has no state for.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("{0}")]
    Journal(#[from] JournalError),
    #[error("device {0} is no longer in the configuration")]
    Unconfigured(String),
}

/// The task of one job: run it, and end it with -1 if the run panics or fails
/// in a way the machine does not know.
pub(super) async fn supervise(core: Arc<Core>, ticket: Ticket, first: Option<Event>) {
    // The run's future (its link guard, slot and plugin session) is dropped
    // at the end of this statement, before anything below runs.
    let result = AssertUnwindSafe(run(core.clone(), ticket.clone(), first))
        .catch_unwind()
        .await;
    let failure = match result {
        Ok(Ok(Outcome::Ended)) => None,
        Ok(Ok(Outcome::Stopped | Outcome::Superseded)) => return,
        Ok(Err(e)) => Some(e.to_string()),
        Err(panic) => Some(format!("panic: {}", panic_message(panic.as_ref()))),
    };
    if let Some(what) = failure {
        crashed(&core, &ticket, what).await;
    }
    let ended = core.table.record(&ticket).filter(|r| r.job.is_terminal());
    if let Some(r) = &ended {
        core.table.remember_end(r);
        let (id, module) = &ticket.key;
        let family = core
            .devices()
            .find(id, module)
            .map_or_else(|| "unknown".to_string(), |l| l.family.clone());
        let step = match r.job.state() {
            State::Failed { step, .. } => Some(step.code()),
            _ => None,
        };
        core.metrics
            .jobs_ended
            .with_label_values(&[family.as_str(), crate::metrics::outcome_label(step)])
            .inc();
    }
    let next = core.table.end(&ticket).await;
    // Its campaign (if one started it) learns the end now; a crash before
    // this is reconciled from the journal.
    if let Some(r) = &ended {
        core.campaign_job_ended(r).await;
    }
    match next {
        Ok(Some(next)) => {
            let (id, module) = ticket.key;
            core.start(next, &id, &module).await;
        }
        Ok(None) => {}
        Err(e) => tracing::error!("{e}"),
    }
}

/// End the job with -1 after the gateway failed inside it; its reports go out
/// even if the journal cannot record the end (the outbox may still take them).
async fn crashed(core: &Core, ticket: &Ticket, what: String) {
    let Some(before) = core.table.record(ticket) else {
        return;
    };
    let phase = before.job.state().name();
    let desc = format!(
        "{} the job was {phase}: {what}",
        crate::ota::job::CRASH_PREFIX
    );
    tracing::error!("job failed inside the gateway: {desc}");
    if let Err(e) = core.table.apply(ticket, Event::Crashed { desc }).await {
        tracing::error!("{e}");
    }
    if let Some(record) = core.table.record(ticket) {
        for a in record.job.terminal_reports() {
            core.publish_report(&record, &a).await;
        }
        log_end(&record);
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// A job's name in the log: the notice's version and when it was queued.
pub(super) fn job_id(r: &JobRecord) -> String {
    let queued = r.job.history().first().map_or(0, |t| t.at_ms);
    format!("{}@{queued}", r.notice.version)
}

/// One line for a job's end (the job's span names it): success with the
/// version read back, or the failure with its step code and reason.
fn log_end(r: &JobRecord) {
    match r.job.state() {
        State::Succeeded { version } => {
            tracing::info!("job succeeded: the leaf runs {version}")
        }
        State::Failed { step, desc } => {
            tracing::warn!(step = step.code(), "job failed ({step}): {desc}")
        }
        _ => {}
    }
}

struct Ctx {
    core: Arc<Core>,
    ticket: Ticket,
    leaf: Leaf,
    image: Option<CachedImage>,
    session: Option<PluginSession>,
    link: Option<Link>,
    /// Events of the plugin session (progress while flashing).
    events_tx: mpsc::UnboundedSender<JobEvent>,
    events_rx: Option<mpsc::UnboundedReceiver<JobEvent>>,
    /// The plugin the job ran on (its digest), and its own fault if it
    /// had one: what a plugin's probation after an update counts.
    plugin_sha: Option<String>,
    fault: Option<String>,
}

/// Run the job of `ticket` to its end (or to shutdown).
async fn run(core: Arc<Core>, ticket: Ticket, first: Option<Event>) -> Result<Outcome, RunError> {
    let (id, module) = &ticket.key;
    let Some(leaf) = core.devices().find(id, module).cloned() else {
        return Err(RunError::Unconfigured(format!("{id} module {module}")));
    };
    let Some(_held) = core.hold(&leaf).await else {
        return Ok(Outcome::Stopped);
    };
    if !core.table.begin(&ticket) {
        return Ok(Outcome::Superseded);
    }
    core.metrics
        .job_runs
        .with_label_values(&[leaf.family.as_str()])
        .inc();
    if let Some(r) = core.table.record(&ticket) {
        tracing::info!(
            state = %r.job.state(),
            "job started: upgrading to {} over {}", r.notice.version, leaf.link
        );
    }
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let mut ctx = Ctx {
        core: core.clone(),
        ticket: ticket.clone(),
        leaf,
        image: None,
        session: None,
        link: None,
        events_tx,
        events_rx: Some(events_rx),
        plugin_sha: None,
        fault: None,
    };
    let mut pending = VecDeque::from([first.unwrap_or(Event::Start)]);
    while let Some(ev) = pending.pop_front() {
        let Some(actions) = core.table.apply(&ticket, ev).await? else {
            return Ok(Outcome::Superseded);
        };
        // Fault injection: the gateway dies right after a job's end is
        // persisted, before anything about it is published
        // (`FAILPOINTS=job-ended-unpublished=return`).
        #[cfg(feature = "failpoints")]
        if core
            .table
            .record(&ticket)
            .is_some_and(|r| r.job.is_terminal())
        {
            fail::fail_point!("job-ended-unpublished", |_| -> Result<Outcome, RunError> {
                std::process::abort()
            });
        }
        for action in actions {
            // A job under way finishes within the shutdown's grace; `abort`
            // stops it where it is (it resumes at the next start).
            let more = tokio::select! {
                _ = core.abort.cancelled() => return Ok(Outcome::Stopped),
                more = ctx.perform(action) => more?,
            };
            match more {
                Some(evs) => pending.extend(evs),
                None => {
                    if let Some(r) = core.table.record(&ticket) {
                        log_end(&r);
                    }
                    ctx.judged().await;
                    return Ok(Outcome::Ended);
                }
            }
        }
    }
    ctx.judged().await;
    Ok(Outcome::Ended)
}

impl Ctx {
    fn record(&self) -> Option<JobRecord> {
        self.core.table.record(&self.ticket)
    }

    /// Feed a progress event and publish the reports it yields at once.
    async fn progress(&mut self, ev: Event) -> Result<(), JournalError> {
        if let Some(actions) = self.core.table.apply(&self.ticket, ev).await?
            && let Some(r) = self.record()
        {
            for a in actions {
                self.core.publish_report(&r, &a).await;
            }
        }
        Ok(())
    }

    /// Perform one action; `None` when the machine said `Done`.
    async fn perform(&mut self, action: Action) -> Result<Option<Vec<Event>>, RunError> {
        if let Some(phase) = match action {
            Action::StartDownload => Some("downloading the image"),
            Action::StartVerify => Some("verifying the image"),
            Action::StartFlash => Some("flashing"),
            Action::StartIdentify => Some("reading the version back"),
            _ => None,
        } {
            tracing::info!("job phase: {phase}");
        }
        let ev = match action {
            Action::StartDownload => return Ok(Some(self.download().await?)),
            Action::StartVerify => self.verify().await,
            Action::StartFlash => self.flash().await?,
            Action::StartIdentify => self.identify().await,
            Action::Report(_) | Action::ReportInform { .. } | Action::AskFirmwareGet => {
                if let Some(r) = self.record() {
                    self.core.publish_report(&r, &action).await;
                }
                return Ok(Some(vec![]));
            }
            Action::Done => {
                drop(self.link.take());
                return Ok(None);
            }
        };
        Ok(Some(vec![ev]))
    }

    fn meta(&self) -> JobMeta {
        let version = self.record().map(|r| r.notice.version);
        JobMeta {
            version,
            module: self.ticket.key.1.clone(),
            options: self.leaf.options.clone(),
        }
    }

    /// What to fetch for the job's notice, or why it cannot be fetched (as
    /// the event that tells the machine).
    fn fetch_request(&self) -> Result<FetchRequest, Event> {
        let Some(r) = self.record() else {
            return Err(Event::Crashed {
                desc: "the job is gone".into(),
            });
        };
        let n = &r.notice;
        let digest = Digest::from_sign(n.sign_method.wire_name(), &n.sign).map_err(|e| {
            Event::ImageRejected {
                desc: e.to_string(),
            }
        })?;
        let Some(url) = n.url() else {
            return Err(Event::DownloadFailed {
                desc: "the notice has no http(s) url".into(),
            });
        };
        Ok(FetchRequest {
            url: url.to_string(),
            size: n.size,
            digest,
        })
    }

    /// Download (or find) the image; progress goes to the job as it comes.
    async fn download(&mut self) -> Result<Vec<Event>, JournalError> {
        #[cfg(feature = "failpoints")]
        fail::fail_point!("runner-download");
        let req = match self.fetch_request() {
            Ok(r) => r,
            Err(ev) => return Ok(vec![ev]),
        };
        let metrics = &self.core.metrics;
        match self.core.cache.get(&req.digest) {
            Ok(Some(_)) => metrics.cache_hits.inc(),
            _ => metrics.cache_misses.inc(),
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cache = self.core.cache.clone();
        let fetch = cache.fetch(req, move |done, total| {
            let _ = tx.send((done, total));
        });
        tokio::pin!(fetch);
        let mut last = 0;
        let result = loop {
            tokio::select! {
                r = &mut fetch => break r,
                Some((done, total)) = rx.recv() => {
                    if done > last {
                        self.core.metrics.download_bytes.inc_by(done - last);
                        last = done;
                    }
                    self.progress(Event::DownloadProgress { done, total }).await?;
                }
            }
        };
        if let Err(e) = &result {
            let reason = if e.url_expired() {
                "expired_url"
            } else if e.step_code() == -3 {
                "digest"
            } else {
                "http"
            };
            self.core
                .metrics
                .download_failures
                .with_label_values(&[reason])
                .inc();
        }
        Ok(vec![match result {
            Ok(img) => {
                self.image = Some(img);
                Event::Downloaded
            }
            // A local campaign's URL cannot be refreshed by the platform:
            // its 403 is a download failure, not a wait for a fresh notice.
            Err(e)
                if e.url_expired()
                    && !self
                        .record()
                        .is_some_and(|r| super::campaigns::from_local_campaign(&r.notice)) =>
            {
                Event::UrlExpired
            }
            Err(e) if e.step_code() == -3 => Event::ImageRejected {
                desc: e.to_string(),
            },
            Err(e) => Event::DownloadFailed {
                desc: e.to_string(),
            },
        }])
    }

    /// The image, from the cache (after a restart the download is not redone).
    async fn image(&mut self) -> Result<CachedImage, String> {
        if let Some(i) = &self.image {
            return Ok(i.clone());
        }
        let req = self.fetch_request().map_err(|e| match e {
            Event::ImageRejected { desc }
            | Event::DownloadFailed { desc }
            | Event::Crashed { desc } => desc,
            other => format!("{other:?}"),
        })?;
        let img = self
            .core
            .cache
            .fetch(req, |_, _| {})
            .await
            .map_err(|e| e.to_string())?;
        self.image = Some(img.clone());
        Ok(img)
    }

    /// The job's plugin session (one Store for verify, flash and identify).
    async fn session(&mut self) -> Result<PluginSession, PluginError> {
        match self.session.take() {
            Some(s) => Ok(s),
            None => {
                let started = std::time::Instant::now();
                let s = self
                    .core
                    .plugins
                    .session(&self.leaf.family, Some(self.events_tx.clone()))
                    .await;
                match &s {
                    Ok(s) => {
                        self.core
                            .metrics
                            .instantiated(&self.leaf.family, started.elapsed().as_secs_f64());
                        self.plugin_sha = Some(s.plugin().sha256.clone())
                    }
                    Err(e) => self.observe(e),
                }
                s
            }
        }
    }

    /// Note a failure of the plugin itself (not of the device or link).
    fn observe(&mut self, e: &PluginError) {
        if let PluginError::Link(_) = e {
            self.core.metrics.link_error(&self.leaf.link);
        }
        if e.is_plugin_fault() {
            self.core.metrics.plugin_fault(&self.leaf.family, e);
            self.fault = Some(e.to_string());
            if self.plugin_sha.is_none() {
                self.plugin_sha = self
                    .core
                    .plugins
                    .get(&self.leaf.family)
                    .map(|p| p.sha256.clone());
            }
        }
    }

    /// Tell the family's probation (if its plugin is on one) how the job
    /// went for the plugin.
    async fn judged(&mut self) {
        if let Some(sha) = self.plugin_sha.take() {
            super::plugin_update::job_ended(
                &self.core,
                &self.leaf.family,
                &sha,
                self.fault.as_deref(),
            )
            .await;
        }
    }

    async fn verify(&mut self) -> Event {
        let img = match self.image().await {
            Ok(i) => i,
            Err(desc) => return Event::VerifyFailed { desc },
        };
        let meta = self.meta();
        let mut session = match self.session().await {
            Ok(s) => s,
            Err(e) => {
                // No plugin for the family (yet: hot reload may bring one),
                // or it would not start: -1, the image was not judged.
                return Event::FlashFailed {
                    step: crate::ota::Step::UpgradeFailed,
                    desc: e.to_string(),
                };
            }
        };
        let r = session.verify(Arc::new(img), &meta).await;
        self.session = Some(session);
        if let Err(e) = &r {
            self.observe(e);
        }
        match r {
            Ok(_) => Event::Verified,
            Err(e) => Event::VerifyFailed {
                desc: e.to_string(),
            },
        }
    }

    async fn flash(&mut self) -> Result<Event, JournalError> {
        // Fault injection for the supervision tests (`FAILPOINTS=runner-flash=panic`).
        #[cfg(feature = "failpoints")]
        fail::fail_point!("runner-flash");
        let failed = |step, desc: String| Event::FlashFailed { step, desc };
        use crate::ota::protocol::Step;
        let img = match self.image().await {
            Ok(i) => i,
            Err(desc) => return Ok(failed(Step::UpgradeFailed, desc)),
        };
        let meta = self.meta();
        let link = match self.take_link().await {
            Ok(l) => l,
            Err(desc) => return Ok(failed(Step::FlashFailed, desc)),
        };
        let mut session = match self.session().await {
            Ok(s) => s,
            Err(e) => {
                self.link = Some(link);
                return Ok(failed(Step::UpgradeFailed, e.to_string()));
            }
        };
        let mut rx = self.events_rx.take();
        let size = img.size();
        let started = std::time::Instant::now();
        let (link, result) = {
            let fut = session.flash(link, Arc::new(img), &meta);
            tokio::pin!(fut);
            loop {
                let ev = async {
                    match rx.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = &mut fut => break r,
                    Some(ev) = ev => {
                        if let JobEvent::Progress { done, total, .. } = ev {
                            self.progress(Event::FlashProgress { done, total }).await?;
                        }
                    }
                }
            }
        };
        self.events_rx = rx;
        self.session = Some(session);
        self.link = Some(link);
        self.core.metrics.flashed(
            &self.leaf.family,
            result.is_ok(),
            size,
            started.elapsed().as_secs_f64(),
        );
        if let Err(e) = &result {
            self.observe(e);
        }
        Ok(match result {
            Ok(_) => Event::Flashed,
            Err(e) => failed(
                Step::from_code(e.step_code().into()).unwrap_or(Step::FlashFailed),
                e.to_string(),
            ),
        })
    }

    /// The link of this job: the one flashing used, or a fresh one.
    async fn take_link(&mut self) -> Result<Link, String> {
        match self.link.take() {
            Some(l) => Ok(l),
            None => self.core.open_link(&self.leaf).await.map_err(|e| {
                self.core.metrics.link_error(&self.leaf.link);
                e.to_string()
            }),
        }
    }

    async fn identify(&mut self) -> Event {
        let link = match self.take_link().await {
            Ok(l) => l,
            Err(desc) => return Event::IdentifyFailed { desc },
        };
        let mut session = match self.session().await {
            Ok(s) => s,
            Err(e) => {
                self.link = Some(link);
                return Event::IdentifyFailed {
                    desc: e.to_string(),
                };
            }
        };
        let (link, r) = session.identify(link, &self.leaf.options).await;
        self.link = Some(link);
        self.session = Some(session);
        if let Err(e) = &r {
            self.observe(e);
        }
        match r {
            Ok(d) => {
                if let Some(m) = d.hardware_id.or(d.model) {
                    self.core.table.record_model(&self.leaf, &m);
                }
                Event::Identified { version: d.version }
            }
            Err(PluginError::Failed {
                error: FlashError::Unsupported(_),
                ..
            }) => Event::IdentifyUnsupported,
            Err(e) => Event::IdentifyFailed {
                desc: e.to_string(),
            },
        }
    }
}

/// Ask a leaf whose version the journal does not know (a new or rebuilt store)
/// what it runs, then record and inform it. A family that cannot read a
/// version informs the configured one; a leaf that does not answer is not
/// informed (the next connect asks again): the platform is never told a guess.
pub(super) async fn identify_unknown(core: Arc<Core>, leaf: Leaf) {
    let key = (leaf.id.clone(), leaf.module.clone());
    let read = read_version(&core, &leaf).await;
    super::lock(&core.identifying).remove(&key);
    let (device, module) = (&leaf.id, &leaf.module);
    match read {
        None => {}
        Some(Ok(version)) => {
            tracing::info!(%device, %module, %version, "version read from the leaf (unknown to the journal)");
            if let Err(e) = core.table.record_version(&leaf, &version).await {
                tracing::error!(%device, "{e}");
            }
            core.inform(&leaf, version).await;
        }
        Some(Err(PluginError::Failed {
            error: FlashError::Unsupported(_),
            ..
        })) => {
            let version = leaf.configured_version.clone();
            tracing::info!(%device, %module, %version, "the family cannot read a version: informing the configured one");
            core.inform(&leaf, version).await;
        }
        Some(Err(e)) => tracing::warn!(
            %device, %module,
            "cannot read the leaf's version ({e}); not informing it until it can be read (at the next connect)"
        ),
    }
}

/// Identify `leaf` holding its bus, link and a slot; `None` on shutdown.
async fn read_version(core: &Core, leaf: &Leaf) -> Option<Result<String, PluginError>> {
    let _held = core.hold(leaf).await?;
    let work = async {
        let link = core.open_link(leaf).await?;
        let mut session = core.plugins.session(&leaf.family, None).await?;
        session.identify(link, &leaf.options).await.1.map(|d| {
            if let Some(m) = d.hardware_id.or(d.model) {
                core.table.record_model(leaf, &m);
            }
            d.version
        })
    };
    let r = tokio::select! {
        _ = core.abort.cancelled() => None,
        r = work => Some(r),
    };
    if let Some(Err(e)) = &r {
        core.metrics.plugin_fault(&leaf.family, e);
        if let PluginError::Link(_) = e {
            core.metrics.link_error(&leaf.link);
        }
    }
    r
}
