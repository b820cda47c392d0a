//! Runs one job: waits for its link and a slot, then feeds the job machine
//! (`ota::job`) events and performs the actions it returns: download into the
//! cache, verify / flash / identify through the family plugin, report
//! upstream. The record is persisted before each action runs.
//!
//! On shutdown a job stops where it is; its persisted state resumes at the
//! next start.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::{Core, JobKey, lock, now_ms};
use crate::cache::{CachedImage, Digest, FetchRequest};
use crate::devices::Leaf;
use crate::link::Link;
use crate::ota::job::{Action, Event, State};
use crate::ota::journal::JobRecord;
use crate::ota::protocol::{Inform, Progress, Step};
use crate::ota::topics;
use crate::plugin::{FlashError, JobMeta, PluginError, PluginSession};
use crate::progress::JobEvent;
use crate::upstream::Delivery;

struct Ctx {
    core: Arc<Core>,
    key: JobKey,
    leaf: Leaf,
    generation: u64,
    image: Option<CachedImage>,
    session: Option<PluginSession>,
    link: Option<Link>,
    /// Events of the plugin session (progress while flashing).
    events_tx: mpsc::UnboundedSender<JobEvent>,
    events_rx: Option<mpsc::UnboundedReceiver<JobEvent>>,
}

/// Run the job of `key` to its end (or to shutdown).
pub(super) async fn run(core: Arc<Core>, key: JobKey, generation: u64, first: Option<Event>) {
    let Some(leaf) = core.leaf(&key).cloned() else {
        return;
    };
    let link_lock = lock(&core.links)
        .entry(leaf.link_key())
        .or_default()
        .clone();
    let stop = core.shutdown.clone();
    let _link_guard = tokio::select! {
        _ = stop.cancelled() => return,
        g = link_lock.lock_owned() => g,
    };
    let _permit = tokio::select! {
        _ = stop.cancelled() => return,
        p = core.permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
    };
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let mut ctx = Ctx {
        core: core.clone(),
        key: key.clone(),
        leaf,
        generation,
        image: None,
        session: None,
        link: None,
        events_tx,
        events_rx: Some(events_rx),
    };
    if !ctx.current() {
        return;
    }
    lock(&core.queue).started(&key.0, &key.1);
    let mut pending = VecDeque::from([first.unwrap_or(Event::Start)]);
    let mut done = false;
    while let Some(ev) = pending.pop_front() {
        let Some(mut actions) = ctx.apply(ev, true).await else {
            return;
        };
        // Reports describe the state just entered: publish them before the
        // long-running action of that state starts, whatever order the machine
        // listed them in.
        actions.sort_by_key(|a| match a {
            Action::Report(_) | Action::ReportInform { .. } | Action::AskFirmwareGet => 0,
            Action::StartDownload
            | Action::StartVerify
            | Action::StartFlash
            | Action::StartIdentify => 1,
            Action::Done => 2,
        });
        for action in actions {
            let more = tokio::select! {
                _ = stop.cancelled() => return,
                more = ctx.perform(action) => more,
            };
            match more {
                Step2::Events(evs) => pending.extend(evs),
                Step2::Done => done = true,
            }
        }
        if done && pending.is_empty() {
            break;
        }
    }
    drop(ctx.link.take());
    let (terminal, succeeded, awaiting) = {
        let jobs = lock(&core.jobs);
        match jobs.get(&key) {
            Some(l) => (
                l.record.job.is_terminal(),
                matches!(l.record.job.state(), State::Succeeded { .. }),
                l.record.job.awaiting_notice(),
            ),
            None => (false, false, false),
        }
    };
    if terminal {
        mark_reported(&core, &key).await;
        core.finished(&key, succeeded).await;
    } else if awaiting {
        lock(&core.queue).awaiting_notice(&key.0, &key.1);
        core.changed.notify_one();
    }
}

/// What performing an action led to.
enum Step2 {
    Events(Vec<Event>),
    Done,
}

impl Ctx {
    fn current(&self) -> bool {
        lock(&self.core.jobs)
            .get(&self.key)
            .is_some_and(|l| l.generation == self.generation)
    }

    fn record(&self) -> Option<JobRecord> {
        lock(&self.core.jobs)
            .get(&self.key)
            .map(|l| l.record.clone())
    }

    /// Feed one event to the job; persist when it changed state or reports.
    /// `None` when this task no longer owns the job.
    async fn apply(&mut self, ev: Event, persist: bool) -> Option<Vec<Action>> {
        let (actions, record) = {
            let mut jobs = lock(&self.core.jobs);
            let live = jobs.get_mut(&self.key)?;
            if live.generation != self.generation {
                return None;
            }
            let before = live.record.job.state().name();
            if let Event::DownloadFailed { desc }
            | Event::VerifyFailed { desc }
            | Event::FlashFailed { desc, .. }
            | Event::IdentifyFailed { desc } = &ev
            {
                live.last_error = Some(desc.clone());
            }
            let actions = live.record.job.on(ev, now_ms());
            let changed = before != live.record.job.state().name() || !actions.is_empty();
            (actions, (persist && changed).then(|| live.record.clone()))
        };
        if let Some(r) = record {
            if let Err(e) = self.core.journal.put(&r).await {
                tracing::error!("{e}");
            }
            self.core.changed.notify_one();
        }
        Some(actions)
    }

    /// Feed a progress event and publish the reports it yields at once.
    async fn progress(&mut self, ev: Event) {
        if let Some(actions) = self.apply(ev, true).await {
            for a in actions {
                if let Action::Report(p) = a {
                    self.report(p).await;
                }
            }
        }
    }

    async fn perform(&mut self, action: Action) -> Step2 {
        match action {
            Action::StartDownload => Step2::Events(self.download().await),
            Action::StartVerify => Step2::Events(vec![self.verify().await]),
            Action::StartFlash => Step2::Events(vec![self.flash().await]),
            Action::StartIdentify => Step2::Events(vec![self.identify().await]),
            Action::Report(p) => {
                self.report(p).await;
                Step2::Events(vec![])
            }
            Action::ReportInform { version } => {
                if let Err(e) = self.core.devices.set_version(&self.leaf, &version).await {
                    tracing::error!("{e}");
                }
                let inform = Inform::new(self.core.next_id(), version, self.key.1.clone());
                let id = &self.key.0;
                self.core
                    .publish(
                        &topics::inform(&id.product_key, &id.device_name),
                        inform.payload(),
                        Delivery::Durable,
                    )
                    .await;
                Step2::Events(vec![])
            }
            Action::AskFirmwareGet => {
                let req =
                    crate::ota::protocol::firmware_get_request(self.core.next_id(), &self.key.1);
                let id = &self.key.0;
                self.core
                    .publish(
                        &topics::firmware_get(&id.product_key, &id.device_name),
                        req,
                        Delivery::BestEffort,
                    )
                    .await;
                Step2::Events(vec![])
            }
            Action::Done => Step2::Done,
        }
    }

    async fn report(&mut self, p: Progress) {
        let terminal = p.step.is_failure() || p.step == Step::Percent(100);
        let id = &self.key.0;
        let payload = p.payload(self.core.next_id());
        let delivery = if terminal {
            Delivery::Durable
        } else {
            Delivery::BestEffort
        };
        self.core
            .publish(
                &topics::progress(&id.product_key, &id.device_name),
                payload,
                delivery,
            )
            .await;
    }

    fn meta(&self) -> JobMeta {
        let version = self.record().map(|r| r.notice.version);
        JobMeta {
            version,
            module: self.key.1.clone(),
            options: self.leaf.options.clone(),
        }
    }

    /// Download (or find) the image; progress goes to the job as it comes.
    async fn download(&mut self) -> Vec<Event> {
        let Some(r) = self.record() else {
            return vec![];
        };
        let n = &r.notice;
        let digest = match Digest::from_sign(n.sign_method.wire_name(), &n.sign) {
            Ok(d) => d,
            Err(e) => {
                return vec![
                    Event::Downloaded,
                    Event::VerifyFailed {
                        desc: e.to_string(),
                    },
                ];
            }
        };
        let Some(url) = n.url() else {
            return vec![Event::DownloadFailed {
                desc: "the notice has no http(s) url".into(),
            }];
        };
        let req = FetchRequest {
            url: url.to_string(),
            size: n.size,
            digest,
        };
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
                        self.core.bytes_downloaded.fetch_add(done - last, Ordering::Relaxed);
                        last = done;
                    }
                    self.progress(Event::DownloadProgress { done, total }).await;
                }
            }
        };
        match result {
            Ok(img) => {
                self.image = Some(img);
                vec![Event::Downloaded]
            }
            Err(e) if e.url_expired() => vec![Event::UrlExpired],
            Err(e) if e.step_code() == -3 => vec![
                Event::Downloaded,
                Event::VerifyFailed {
                    desc: e.to_string(),
                },
            ],
            Err(e) => vec![Event::DownloadFailed {
                desc: e.to_string(),
            }],
        }
    }

    /// The image, from the cache (after a restart the download is not redone).
    async fn image(&mut self) -> Result<CachedImage, String> {
        if let Some(i) = &self.image {
            return Ok(i.clone());
        }
        let r = self.record().ok_or("the job is gone")?;
        let digest = Digest::from_sign(r.notice.sign_method.wire_name(), &r.notice.sign)
            .map_err(|e| e.to_string())?;
        let img = self
            .core
            .cache
            .fetch(
                FetchRequest {
                    url: r.notice.url().unwrap_or_default().to_string(),
                    size: r.notice.size,
                    digest,
                },
                |_, _| {},
            )
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
                self.core
                    .plugins
                    .session(&self.leaf.family, Some(self.events_tx.clone()))
                    .await
            }
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
                return Event::VerifyFailed {
                    desc: e.to_string(),
                };
            }
        };
        let r = session.verify(Arc::new(img), &meta).await;
        self.session = Some(session);
        match r {
            Ok(_) => Event::Verified,
            Err(e) => Event::VerifyFailed {
                desc: e.to_string(),
            },
        }
    }

    async fn flash(&mut self) -> Event {
        let failed = |step: Step, desc: String| Event::FlashFailed { step, desc };
        let img = match self.image().await {
            Ok(i) => i,
            Err(desc) => return failed(Step::UpgradeFailed, desc),
        };
        let meta = self.meta();
        let link = match self.take_link().await {
            Ok(l) => l,
            Err(desc) => return failed(Step::FlashFailed, desc),
        };
        let mut session = match self.session().await {
            Ok(s) => s,
            Err(e) => {
                self.link = Some(link);
                return failed(Step::UpgradeFailed, e.to_string());
            }
        };
        let mut rx = self.events_rx.take();
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
                            self.progress(Event::FlashProgress { done, total }).await;
                        }
                    }
                }
            }
        };
        self.events_rx = rx;
        self.session = Some(session);
        self.link = Some(link);
        match result {
            Ok(_) => Event::Flashed,
            Err(e) => failed(
                Step::from_code(e.step_code().into()).unwrap_or(Step::FlashFailed),
                e.to_string(),
            ),
        }
    }

    /// The link of this job: the one flashing used, or a fresh one.
    async fn take_link(&mut self) -> Result<Link, String> {
        match self.link.take() {
            Some(l) => Ok(l),
            None => Link::open(&self.leaf.link).await.map_err(|e| e.to_string()),
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
        match r {
            Ok(d) => Event::Identified { version: d.version },
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

fn reported_key(key: &JobKey) -> Vec<u8> {
    format!("{}\0{}\0{}", key.0.product_key, key.0.device_name, key.1).into_bytes()
}

fn reported_mark(r: &JobRecord) -> Vec<u8> {
    format!(
        "{}\0{}\0{}",
        r.notice.version,
        r.notice.sign,
        r.job.history().len()
    )
    .into_bytes()
}

/// Remember (durably) that a terminal job's reports are in the outbox.
async fn mark_reported(core: &Core, key: &JobKey) {
    let Some(r) = lock(&core.jobs).get(key).map(|l| l.record.clone()) else {
        return;
    };
    let stored = match core.reported.insert(reported_key(key), reported_mark(&r)) {
        Ok(_) => crate::store::flush_tree(&core.reported).await.map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = stored {
        tracing::error!("cannot record a terminal report: {e}");
    }
}

/// After a restart: publish a terminal job's reports again unless they are
/// known to have reached the outbox (the gateway may have died between
/// persisting the job and publishing its end).
pub(super) async fn ensure_terminal_reported(core: &Arc<Core>, key: &JobKey) {
    let Some(r) = lock(&core.jobs).get(key).map(|l| l.record.clone()) else {
        return;
    };
    if core
        .reported
        .get(reported_key(key))
        .ok()
        .flatten()
        .as_deref()
        == Some(&reported_mark(&r)[..])
    {
        return;
    }
    let id = &key.0;
    let progress_topic = topics::progress(&id.product_key, &id.device_name);
    match r.job.state() {
        State::Succeeded { version } => {
            let p = Progress::new(Step::Percent(100), "upgrade complete", key.1.clone());
            core.publish(
                &progress_topic,
                p.payload(core.next_id()),
                Delivery::Durable,
            )
            .await;
            let inform = Inform::new(core.next_id(), version.clone(), key.1.clone());
            core.publish(
                &topics::inform(&id.product_key, &id.device_name),
                inform.payload(),
                Delivery::Durable,
            )
            .await;
        }
        State::Failed { step, desc } => {
            let p = Progress::new(*step, desc.clone(), key.1.clone());
            core.publish(
                &progress_topic,
                p.payload(core.next_id()),
                Delivery::Durable,
            )
            .await;
        }
        _ => return,
    }
    mark_reported(core, key).await;
}
