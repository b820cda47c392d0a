//! The daemon: takes upgrade notices from upstream for many leaves, downloads
//! each image once, flashes every leaf through its family plugin and reports
//! progress and the new version exactly as the platform expects.
//!
//! [`Gateway::build`] opens and binds everything (store, cache, plugins, the
//! embedded broker, the upstream session, the API listener) and reports the
//! bound addresses; [`Gateway::run`] serves until its shutdown token is
//! cancelled, then drains. The logic of one job is the sans-I/O machine in
//! `ota::job`; [`runner`] performs its actions. Every job is persisted before
//! its actions run, so a restart resumes it or fails it with a reason.

mod campaigns;
mod plugin_update;
mod ports;
mod runner;
mod status;
mod table;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::EmbeddedBroker;
use crate::cache::Cache;
use crate::config::{AuthKind, Config};
use crate::devices::{Devices, Leaf};
use crate::ota::job::{Action, Event, Restart};
use crate::ota::journal::{JobRecord, Journal};
use crate::ota::protocol::{self, Download, Inform, Notice, Progress, Step};
use crate::ota::topics::{self, DeviceId, TopicKind};
use crate::plugin::PluginHost;
use crate::store::Store;
use crate::upstream::{self, Delivery, SubDevice, Upstream, UpstreamEvent};
use ports::{Clock, Publisher};
use table::{Intake, JobKey, JobTable, Resume, Ticket};

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Cache(#[from] crate::cache::CacheError),
    #[error("{0}")]
    Journal(#[from] crate::ota::journal::JournalError),
    #[error("{0}")]
    Plugin(#[from] crate::plugin::PluginError),
    #[error("{0}")]
    Broker(#[from] crate::broker::BrokerError),
    #[error("{0}")]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("cannot listen for the API on {addr}: {source}")]
    Api {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Campaigns(#[from] crate::rollout::CampaignStoreError),
    #[error("{0}")]
    ApiTls(String),
    #[error("cannot read or make the API token {path}: {source} (check the file's owner and mode)")]
    Token {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the intake refuses before a notice becomes a job.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IntakeLimits {
    /// The largest image a notice may announce (`[cache] max_image_mib`).
    pub max_image_bytes: u64,
}

/// Everything the daemon's tasks share. Each field says why it is here.
pub(crate) struct Core {
    /// The gateway's own identity upstream: its modules are its plugins
    /// (`plugin.<family>`), updated by notices on its own topic.
    pub gw: DeviceId,
    /// The configured leaves (identity, family, link, options); replaced
    /// whole by a reload (jobs under way keep the leaf they started with).
    devices: std::sync::RwLock<Arc<Devices>>,
    /// The configuration running now, to tell what a reload changes.
    config: Mutex<Config>,
    /// Nudges the plugins watcher to look at the directory now (SIGHUP).
    pub plugins_rescan: Arc<tokio::sync::Notify>,
    /// Every job, the queue of notices and their persistence.
    pub table: JobTable,
    /// Rollouts: campaigns of leaves upgraded group by group.
    pub(crate) campaigns: campaigns::Campaigns,
    /// Firmware images, downloaded once each.
    pub cache: Cache,
    /// Device-family plugins.
    pub plugins: PluginHost,
    /// Remote updates of them, and their probation.
    pub(crate) updates: plugin_update::PluginUpdates,
    /// Their directory, and how it is watched for hot reload (`None`: not).
    pub plugins_dir: std::path::PathBuf,
    pub plugin_watch: Option<crate::plugin::watch::WatchOptions>,
    /// Opens the leaves' links (BLE ones through the `[ble]` adapter).
    pub opener: crate::link::Opener,
    /// Where reports, informs and requests go upstream.
    pub publisher: Arc<dyn Publisher>,
    /// What the intake refuses up front.
    pub limits: IntakeLimits,
    /// The global limit of jobs holding a link at once (`[jobs] max_parallel`).
    pub permits: Arc<Semaphore>,
    /// One lock per physical link (`Leaf::link_key`): one job per port.
    links: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One semaphore per bus (`Leaf::bus`): `[[bus]] max_parallel` jobs
    /// at once on it (1 for a link of its own, `[ble] max_connections` for
    /// the BLE adapter).
    buses: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Leaves being asked for their version (unknown to the journal), so a
    /// reconnect does not ask twice.
    identifying: Mutex<std::collections::HashSet<JobKey>>,
    /// Message ids of what the daemon publishes (seeded with the clock).
    next_id: AtomicU64,
    /// Every task the daemon spawns, waited for at shutdown.
    pub tasks: TaskTracker,
    /// Cancelled when the daemon stops taking work.
    pub shutdown: CancellationToken,
    /// Cancelled when the shutdown's grace is over: work under way stops
    /// where it is (and resumes at the next start).
    pub abort: CancellationToken,
    /// Stops the upstream session, last, so what the jobs report during the
    /// grace still goes out.
    upstream_stop: CancellationToken,
    /// The upstream session as the API shows it.
    pub upstream_status: Mutex<crate::api::UpstreamStatus>,
    /// What `/metrics` shows (the summary's downloaded bytes too).
    pub metrics: crate::metrics::Metrics,
    /// Connections to the upstream so far (the first is no reconnect).
    connects: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Core {
    /// The configured leaves now.
    pub(crate) fn devices(&self) -> Arc<Devices> {
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Open a leaf's link, as its family's plugin needs it opened.
    pub(crate) async fn open_link(
        &self,
        leaf: &crate::devices::Leaf,
    ) -> Result<crate::link::Link, crate::link::LinkError> {
        let plan = self
            .plugins
            .get(&leaf.family)
            .and_then(|p| p.info.gatt_plan());
        self.opener.open(&leaf.link, plan.as_ref()).await
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The lock of `leaf`'s physical link.
    fn link_lock(&self, leaf: &Leaf) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.links)
            .entry(leaf.link_key())
            .or_default()
            .clone()
    }

    /// `[jobs] max_parallel`.
    pub(crate) fn max_parallel(&self) -> usize {
        lock(&self.config).jobs.max_parallel
    }

    /// How many leaves of `bus` may be upgraded at once.
    pub(crate) fn bus_capacity(&self, bus: &str) -> usize {
        lock(&self.config).bus_capacity(bus)
    }

    /// The semaphore of `leaf`'s bus.
    fn bus(&self, leaf: &Leaf) -> Arc<Semaphore> {
        let cap = self.bus_capacity(&leaf.bus);
        lock(&self.buses)
            .entry(leaf.bus.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(cap)))
            .clone()
    }

    /// Wait until `leaf` may use its link: a slot of its bus, its physical
    /// link, then a global slot (`[jobs] max_parallel`), in this order, so
    /// a job waiting for its bus holds no global slot. `None` when the
    /// daemon stops first.
    pub(crate) async fn hold(&self, leaf: &Leaf) -> Option<Held> {
        let stop = self.shutdown.clone();
        let bus = self.bus(leaf);
        let bus = tokio::select! {
            _ = stop.cancelled() => return None,
            p = bus.acquire_owned() => p.ok()?,
        };
        let link_lock = self.link_lock(leaf);
        let link = tokio::select! {
            _ = stop.cancelled() => return None,
            g = link_lock.lock_owned() => g,
        };
        let slot = tokio::select! {
            _ = stop.cancelled() => return None,
            p = self.permits.clone().acquire_owned() => p.ok()?,
        };
        Some(Held {
            _bus: bus,
            _link: link,
            _slot: slot,
        })
    }

    /// Publish, logging (not failing) when upstream cannot take it: durable
    /// messages are in the outbox by then, best-effort ones are replaced by
    /// later ones.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>, delivery: Delivery) {
        if let Err(e) = self.publisher.publish(topic, payload, delivery).await {
            match delivery {
                Delivery::Durable => tracing::error!(topic, "cannot publish: {e}"),
                Delivery::BestEffort => tracing::debug!(topic, "not published: {e}"),
            }
        }
    }

    /// Publish one report of a job: progress (durable when terminal, with the
    /// job's stable message id), the leaf's version, or a `firmware/get`.
    async fn publish_report(&self, record: &JobRecord, action: &Action) {
        let id = &record.leaf;
        let terminal_id = record.job.terminal_id();
        match action {
            Action::Report(p) => {
                let (msg_id, delivery) = match terminal_id {
                    Some(t) if p.step.is_failure() || p.step == Step::Percent(100) => {
                        (t, Delivery::Durable)
                    }
                    _ => (self.next_id(), Delivery::BestEffort),
                };
                let topic = topics::progress(&id.product_key, &id.device_name);
                self.publish(&topic, p.payload(msg_id), delivery).await;
            }
            Action::ReportInform { version } => {
                let msg_id = terminal_id.map_or_else(|| self.next_id(), |t| t + 1);
                let inform = Inform::new(msg_id, version.clone(), record.module.clone());
                let topic = topics::inform(&id.product_key, &id.device_name);
                self.publish(&topic, inform.payload(), Delivery::Durable)
                    .await;
            }
            Action::AskFirmwareGet => {
                let req = protocol::firmware_get_request(self.next_id(), &record.module);
                let topic = topics::firmware_get(&id.product_key, &id.device_name);
                self.publish(&topic, req, Delivery::BestEffort).await;
            }
            _ => {}
        }
    }

    /// Report a failure of a notice that never became a job.
    async fn reject(&self, id: &DeviceId, module: &str, step: Step, desc: String) {
        tracing::warn!(device = %id, module, step = step.code(), "upgrade notice rejected: {desc}");
        let p = Progress::new(step, desc, module);
        let payload = p.payload(self.next_id());
        self.publish(
            &topics::progress(&id.product_key, &id.device_name),
            payload,
            Delivery::Durable,
        )
        .await;
    }

    /// Why a notice for `id` cannot become a job, if it cannot.
    fn refuse(&self, id: &DeviceId, notice: &Notice) -> Option<(Step, String)> {
        let module = &notice.module;
        if self.devices().find(id, module).is_none() {
            let desc = if self.devices().knows(id) {
                format!("module {module:?} of {id} is not managed by this gateway")
            } else {
                format!("device {id} is not managed by this gateway")
            };
            return Some((Step::UpgradeFailed, desc));
        }
        if let Download::Mqtt { .. } = notice.download {
            let desc = "download over MQTT (dProtocol mqtt) is not supported; send an http(s) url";
            return Some((Step::DownloadFailed, desc.into()));
        }
        let max = self.limits.max_image_bytes;
        if notice.size > max {
            let desc = format!(
                "the image is {} bytes, more than this gateway takes ({} MiB, [cache] max_image_mib)",
                notice.size,
                max >> 20
            );
            return Some((Step::DownloadFailed, desc));
        }
        None
    }

    /// Take a notice for a leaf: validate, dedupe, persist, start.
    async fn offer(self: &Arc<Self>, id: DeviceId, notice: Notice) {
        if id == self.gw {
            return plugin_update::offer(self, notice).await;
        }
        let module = notice.module.clone();
        if let Some((step, desc)) = self.refuse(&id, &notice) {
            if self.devices().find(&id, &module).is_some() {
                self.table
                    .remember_refusal(&id, &module, &notice.version, step.code(), &desc);
            }
            return self.reject(&id, &module, step, desc).await;
        }
        tracing::info!(device = %id, module, version = %notice.version, size = notice.size, "upgrade notice");
        if self.campaigns.planned() {
            return self.plan_notice(id, notice).await;
        }
        let version = notice.version.clone();
        let intake = self.table.offer(&id, notice).await;
        if let Intake::Refused(desc) = &intake {
            self.table
                .remember_refusal(&id, &module, &version, Step::UpgradeFailed.code(), desc);
        }
        self.start(intake, &id, &module).await;
    }

    /// Act on an intake: run the job, or refuse the notice.
    async fn start(self: &Arc<Self>, intake: Intake, id: &DeviceId, module: &str) {
        match intake {
            Intake::Run(ticket) => self.spawn(ticket, None),
            Intake::Held(offer) => {
                tracing::info!(device = %id, module, ?offer, "upgrade notice held")
            }
            Intake::Refused(desc) => {
                self.reject(id, module, Step::UpgradeFailed, desc).await;
            }
        }
    }

    /// Start the supervised task that runs a job, in a span naming the
    /// device, module, family and job: every line of the job, the plugin's
    /// own included, carries them.
    fn spawn(self: &Arc<Self>, ticket: Ticket, first: Option<Event>) {
        use tracing::Instrument;
        let (id, module) = &ticket.key;
        let family = self
            .devices()
            .find(id, module)
            .map(|l| l.family.clone())
            .unwrap_or_default();
        let job = self
            .table
            .record(&ticket)
            .map(|r| runner::job_id(&r))
            .unwrap_or_default();
        let span = tracing::info_span!("job", device = %id, module = %module, family = %family, job = %job);
        self.tasks
            .spawn(runner::supervise(self.clone(), ticket, first).instrument(span));
    }

    /// A terminal job's reports, published again if they are not known to
    /// have reached the outbox (the gateway may have died between persisting
    /// the job and publishing its end). The same messages, the same ids.
    async fn ensure_reported(&self, key: &JobKey) {
        let record = match self.table.unreported(key) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        tracing::info!(device = %key.0, module = %key.1, state = %record.job.state(), "publishing the end of a job again after a restart");
        for a in record.job.terminal_reports() {
            self.publish_report(&record, &a).await;
        }
        if let Err(e) = self.table.mark_reported(&record).await {
            tracing::error!("{e}");
        }
    }

    /// Inform `leaf`'s version upstream (best effort: every connect informs
    /// again).
    async fn inform(&self, leaf: &Leaf, version: String) {
        let inform = Inform::new(self.next_id(), version, leaf.module.clone());
        self.publish(
            &topics::inform(&leaf.id.product_key, &leaf.id.device_name),
            inform.payload(),
            Delivery::BestEffort,
        )
        .await;
    }

    /// Take a new configuration (SIGHUP): the devices are replaced (jobs
    /// under way keep the leaf they started with; a leaf added is
    /// subscribed to and asked its version), the plugins directory is
    /// looked at now; settings that need a restart are named in the log and
    /// keep their running values.
    pub(crate) async fn reload(self: &Arc<Self>, new: Config) {
        let old = lock(&self.config).clone();
        let differs =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
        let restart: Vec<&str> = [
            ("[gateway]", differs(&old.gateway, &new.gateway)),
            ("[upstream]", differs(&old.upstream, &new.upstream)),
            (
                "[local_broker]",
                differs(&old.local_broker, &new.local_broker),
            ),
            ("[api]", differs(&old.api, &new.api)),
            ("[jobs]", differs(&old.jobs, &new.jobs)),
            ("[cache]", differs(&old.cache, &new.cache)),
            ("[plugins]", differs(&old.plugins, &new.plugins)),
            ("[ble]", differs(&old.ble, &new.ble)),
            ("[[bus]]", differs(&old.buses, &new.buses)),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect();
        for name in &restart {
            tracing::warn!(
                "{name} changed: it takes effect at the next restart (the running values stay)"
            );
        }
        let key = |d: &crate::config::DeviceConfig| {
            format!("{}/{} {}", d.product_key, d.device_name, d.module)
        };
        let before: BTreeMap<String, String> = old
            .devices
            .iter()
            .map(|d| (key(d), format!("{d:?}")))
            .collect();
        let after: BTreeMap<String, String> = new
            .devices
            .iter()
            .map(|d| (key(d), format!("{d:?}")))
            .collect();
        let added: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
        let removed: Vec<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
        let changed: Vec<&String> = after
            .iter()
            .filter(|(k, v)| before.get(*k).is_some_and(|b| b != *v))
            .map(|(k, _)| k)
            .collect();
        let aliyun = matches!(&old.upstream, Some(u) if u.auth == AuthKind::Aliyun);
        if aliyun && !added.is_empty() {
            tracing::error!(
                added = ?added,
                "reload: adding leaves in aliyun mode needs a restart (they are added to the \
                 gateway's topology and logged in at start); the devices stay as they were"
            );
        } else if !(added.is_empty() && removed.is_empty() && changed.is_empty()) {
            let devices = Arc::new(Devices::new(&new.devices));
            *self.devices.write().unwrap_or_else(|e| e.into_inner()) = devices.clone();
            lock(&self.config).devices = new.devices.clone();
            let fresh: Vec<&Leaf> = devices
                .all()
                .iter()
                .filter(|l| added.contains(&&format!("{} {}", l.id, l.module)))
                .collect();
            let mut topics = Vec::new();
            for l in &fresh {
                topics.push(topics::upgrade(&l.id.product_key, &l.id.device_name));
                topics.push(topics::firmware_get_reply(
                    &l.id.product_key,
                    &l.id.device_name,
                ));
            }
            if let Err(e) = self.publisher.subscribe(topics).await {
                tracing::error!("reload: cannot subscribe for the added leaves: {e}");
            }
            for l in fresh {
                self.announce(l).await;
            }
            tracing::info!(
                devices = devices.all().len(),
                added = ?added, removed = ?removed, changed = ?changed,
                "configuration reloaded: new notices use the new devices; jobs under way keep theirs"
            );
        } else {
            tracing::info!("configuration reloaded: the devices did not change");
        }
        self.plugins_rescan.notify_one();
    }

    /// Tell the platform every plugin's version, as a module of the
    /// gateway's own (`plugin.<family>`): at connect and after a reload.
    pub async fn inform_plugins(&self) {
        for p in self.plugins.families() {
            let inform = Inform::new(
                self.next_id(),
                p.info.version.clone(),
                format!("plugin.{}", p.info.name),
            );
            self.publish(
                &topics::inform(&self.gw.product_key, &self.gw.device_name),
                inform.payload(),
                Delivery::BestEffort,
            )
            .await;
        }
    }

    /// Tell the platform the version `leaf` runs: the one the journal knows,
    /// else the one read from the leaf (never a guess).
    async fn announce(self: &Arc<Self>, leaf: &Leaf) {
        let key = (leaf.id.clone(), leaf.module.clone());
        match self.table.known_version(leaf) {
            Some(v) => self.inform(leaf, v).await,
            // A job under way reports the version it reads back.
            None if self.table.busy(&key) => {}
            // Never inform a guess: ask the leaf first (a new or rebuilt
            // store does not know what it runs).
            None => {
                if lock(&self.identifying).insert(key) {
                    self.tasks
                        .spawn(runner::identify_unknown(self.clone(), leaf.clone()));
                }
            }
        }
    }

    async fn on_connected(self: &Arc<Self>) {
        let devices = self.devices();
        for leaf in devices.all() {
            self.announce(leaf).await;
        }
        self.inform_plugins().await;
        // Ask for a pending update of every plugin (the gateway may have
        // been offline when it was pushed).
        for p in self.plugins.families() {
            let req = protocol::firmware_get_request(
                self.next_id(),
                &format!("{}{}", plugin_update::MODULE_PREFIX, p.info.name),
            );
            self.publish(
                &topics::firmware_get(&self.gw.product_key, &self.gw.device_name),
                req,
                Delivery::BestEffort,
            )
            .await;
        }
        // Ask for pending packages for every leaf with no job under way.
        for leaf in devices.all() {
            if !self.table.busy(&(leaf.id.clone(), leaf.module.clone())) {
                let req = protocol::firmware_get_request(self.next_id(), &leaf.module);
                self.publish(
                    &topics::firmware_get(&leaf.id.product_key, &leaf.id.device_name),
                    req,
                    Delivery::BestEffort,
                )
                .await;
            }
        }
    }

    async fn on_message(self: &Arc<Self>, topic: &str, payload: &[u8]) {
        let Some((kind, id)) = topics::parse(topic) else {
            tracing::debug!(topic, "message on a topic otagw does not handle");
            return;
        };
        match kind {
            TopicKind::Upgrade => match protocol::parse_notice(payload) {
                Ok(n) => self.offer(id, n).await,
                Err(e) => {
                    let module = protocol::module_hint(payload);
                    self.reject(
                        &id,
                        &module,
                        Step::UpgradeFailed,
                        format!("rejected upgrade notice: {e}"),
                    )
                    .await
                }
            },
            TopicKind::FirmwareGetReply => match protocol::parse_get_reply(payload) {
                Ok(Some(n)) => self.offer(id, n).await,
                Ok(None) => tracing::debug!(device = %id, "nothing pending"),
                Err(e) => tracing::warn!(device = %id, "bad firmware/get reply: {e}"),
            },
            _ => {}
        }
    }

    /// The summary of all jobs, for `/{gwPk}/{gwDn}/user/ota/summary`.
    fn summary(&self) -> serde_json::Value {
        let jobs = self.table.snapshot();
        let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        for s in [
            "queued",
            "downloading",
            "verifying",
            "flashing",
            "identifying",
            "succeeded",
            "failed",
        ] {
            counts.insert(s, 0);
        }
        let now = self.table.now_ms();
        let mut eta_ms: u64 = 0;
        for live in jobs.values() {
            let job = &live.record.job;
            *counts.entry(JobTable::shown_state(live)).or_default() += 1;
            if live.active
                && job.state().is_running()
                && let (Some(p), Some(start)) = (
                    job.percent(),
                    job.history()
                        .iter()
                        .find(|t| t.note == "download started" || t.from != t.to)
                        .map(|t| t.at_ms),
                )
                && p > 0
            {
                let spent = now.saturating_sub(start);
                eta_ms = eta_ms.max(spent * u64::from(100 - p.min(100)) / u64::from(p));
            }
        }
        serde_json::json!({
            "id": self.next_id().to_string(),
            "params": {
                "jobs": counts,
                "bytesDownloaded": self.metrics.download_bytes.get(),
                "etaSeconds": eta_ms / 1000,
                "campaigns": campaigns::summary(self),
            }
        })
    }
}

/// A leaf's bus slot, link and global slot, released on drop.
pub(crate) struct Held {
    _bus: tokio::sync::OwnedSemaphorePermit,
    _link: tokio::sync::OwnedMutexGuard<()>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// Hands a new configuration to a running gateway (SIGHUP).
#[derive(Debug, Clone)]
pub struct Reloader(mpsc::Sender<Config>);

impl Reloader {
    /// Take `cfg` (already loaded and validated).
    pub async fn reload(&self, cfg: Config) {
        let _ = self.0.send(cfg).await;
    }
}

/// The daemon, built and bound, not yet running.
pub struct Gateway {
    core: Arc<Core>,
    events: mpsc::Receiver<UpstreamEvent>,
    reloads: (mpsc::Sender<Config>, mpsc::Receiver<Config>),
    api: Option<tokio::net::TcpListener>,
    api_addr: Option<SocketAddr>,
    /// What changing API requests must carry.
    api_token: String,
    /// HTTPS for the API (`[api] tls_cert`).
    api_tls: Option<Arc<rustls::ServerConfig>>,
    broker: Option<EmbeddedBroker>,
    /// What to do with the journal's jobs once running.
    resume: Vec<Resume>,
    /// Resolves when the upstream session has stopped.
    upstream_stopped: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("api", &self.api_addr)
            .field("broker", &self.broker.map(|b| b.addr()))
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Open, load and bind everything the configuration names.
    pub async fn build(cfg: Config) -> Result<Gateway, DaemonError> {
        crate::tls::init();
        for w in cfg.warnings() {
            tracing::warn!("{w}");
        }
        if let Some(w) = cfg.memory_limit_warning(crate::config::own_memory_limit()) {
            tracing::warn!("{w}");
        }
        let data = cfg.gateway.data_dir.clone();
        std::fs::create_dir_all(&data).map_err(|source| DaemonError::DataDir {
            path: data.clone(),
            source,
        })?;
        let (store, rebuilt) = Store::open(&data.join("db"))?;
        if rebuilt {
            tracing::error!(
                "the store was rebuilt: pending upgrades come back through firmware/get"
            );
        }
        let cache = Cache::open_with(
            &store,
            cfg.cache.max_size_mib << 20,
            crate::cache::CacheOptions {
                dir: cfg.cache.dir.clone(),
                ..Default::default()
            },
        )?;
        let journal = Journal::open(&store)?;
        let campaigns = campaigns::Campaigns::open(&store, &cfg)?;
        let devices = Devices::new(&cfg.devices);
        let clean = journal.begin_run().await?;
        if !clean {
            tracing::warn!("the previous run did not stop cleanly: resuming its jobs");
        }
        let restart = Restart {
            unclean: !clean,
            max_flash_restarts: cfg.jobs.flash_restarts,
        };

        let plugins = PluginHost::new(
            cfg.plugins.limits(cfg.jobs.max_parallel),
            Some(data.join("compiled")),
        )?;
        plugins.set_trust(
            crate::plugin::Trust::load(
                &cfg.plugins.trusted_keys,
                cfg.plugins.threshold,
                cfg.plugins.require_signatures,
            )
            .map_err(|e| {
                crate::plugin::PluginError::Engine(format!("[plugins] trusted_keys: {e}"))
            })?,
        );
        let report = plugins.load_dir(&cfg.gateway.plugins_dir).await?;
        for e in &report.failed {
            tracing::error!("{e}");
        }
        for leaf in devices.all() {
            if plugins.get(&leaf.family).is_none() {
                tracing::error!(device = %leaf.id, family = %leaf.family, "no plugin for this device's family: its upgrades will fail");
                continue;
            }
            // Said once at start; every job checks again before it touches the device.
            let checked = match plugins.session(&leaf.family, None).await {
                Ok(mut session) => session.check_options(&leaf.options).await,
                Err(e) => Err(e),
            };
            if let Err(e) = checked {
                tracing::error!(device = %leaf.id, family = %leaf.family, "{e}");
            }
        }

        let broker = match cfg.local_broker.listen {
            Some(addr) => Some(EmbeddedBroker::start(addr).await?),
            None => None,
        };
        let gw = DeviceId::new(&cfg.gateway.product_key, &cfg.gateway.device_name);
        let up_cfg = match &cfg.upstream {
            Some(u) => {
                let auth = match u.auth {
                    AuthKind::None => upstream::Auth::None,
                    AuthKind::Password => upstream::Auth::Password {
                        username: u.username.clone().unwrap_or_default(),
                        password: u.password.clone().unwrap_or_default(),
                    },
                    AuthKind::Aliyun => upstream::Auth::Aliyun {
                        product_key: gw.product_key.clone(),
                        device_name: gw.device_name.clone(),
                        device_secret: cfg.gateway.device_secret.clone().unwrap_or_default(),
                    },
                };
                let mut c = upstream::UpstreamConfig::new(u.url.clone(), auth);
                c.client_id = u.client_id.clone();
                c.keep_alive = u.keep_alive;
                c.ca_file = u.ca_file.clone();
                c.max_packet = u.max_message_kib << 10;
                c.delete_removed_leaves = u.delete_removed_leaves;
                c
            }
            None => {
                let b = broker.expect("validated: standalone mode has a local broker");
                upstream::UpstreamConfig::new(b.url(), upstream::Auth::None)
            }
        };
        let mut subscriptions = Vec::new();
        let mut ids = devices.ids();
        ids.push(gw.clone());
        for id in &ids {
            subscriptions.push(topics::upgrade(&id.product_key, &id.device_name));
            subscriptions.push(topics::firmware_get_reply(&id.product_key, &id.device_name));
        }
        let leaves = devices
            .all()
            .iter()
            .map(|l| SubDevice {
                product_key: l.id.product_key.clone(),
                device_name: l.id.device_name.clone(),
                device_secret: l.device_secret.clone(),
            })
            .collect();
        let shutdown = CancellationToken::new();
        let gateway_identity = SubDevice {
            product_key: gw.product_key.clone(),
            device_name: gw.device_name.clone(),
            device_secret: cfg.gateway.device_secret.clone(),
        };
        let upstream_stop = CancellationToken::new();
        let (upstream, events) = Upstream::start(
            up_cfg,
            gateway_identity,
            leaves,
            subscriptions,
            &store,
            upstream_stop.clone(),
        )?;

        let token_path = cfg.api_token_path();
        let (api_token, made) =
            crate::api::load_or_create_token(&token_path).map_err(|source| DaemonError::Token {
                path: token_path.clone(),
                source,
            })?;
        if made {
            tracing::info!(path = %token_path.display(), "API token made: changing requests (otagw upgrade, otagw campaign) carry it");
        }
        let api_tls = match (&cfg.api.tls_cert, &cfg.api.tls_key) {
            (Some(cert), Some(key)) => {
                Some(crate::api::tls::server_config(cert, key).map_err(DaemonError::ApiTls)?)
            }
            _ => None,
        };
        let (api, api_addr) = match cfg.api.listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| DaemonError::Api { addr, source })?;
                let a = l
                    .local_addr()
                    .map_err(|source| DaemonError::Api { addr, source })?;
                (Some(l), Some(a))
            }
            None => (None, None),
        };

        let clock: Arc<dyn Clock> = ports::system_clock();
        let next_id = AtomicU64::new(clock.now_ms());
        let (table, resume) = JobTable::restore(journal, clock, restart)?;
        let upstream_stopped = Box::pin(upstream.stopped());
        let core = Arc::new(Core {
            gw,
            devices: std::sync::RwLock::new(Arc::new(devices)),
            config: Mutex::new(cfg.clone()),
            plugins_rescan: Arc::new(tokio::sync::Notify::new()),
            table,
            campaigns,
            cache,
            plugins,
            updates: plugin_update::PluginUpdates::open(
                &data,
                cfg.plugins.probation(),
                cfg.plugins.allow_downgrade,
            ),
            plugins_dir: cfg.gateway.plugins_dir.clone(),
            plugin_watch: cfg
                .plugins
                .watch
                .then_some(crate::plugin::watch::WatchOptions {
                    settle: cfg.plugins.settle,
                    rescan: cfg.plugins.rescan,
                }),
            opener: match &cfg.ble.adapter {
                Some(spec) => crate::link::Opener::with_ble(
                    spec,
                    cfg.ble.max_connections,
                    cfg.ble.connect_timeout,
                ),
                None => crate::link::Opener::default(),
            },
            publisher: Arc::new(upstream),
            limits: IntakeLimits {
                max_image_bytes: cfg.cache.max_image_bytes(),
            },
            permits: Arc::new(Semaphore::new(cfg.jobs.max_parallel)),
            links: Mutex::new(HashMap::new()),
            buses: Mutex::new(HashMap::new()),
            identifying: Mutex::new(Default::default()),
            next_id,
            tasks: TaskTracker::new(),
            shutdown,
            abort: CancellationToken::new(),
            upstream_stop,
            upstream_status: Mutex::new(Default::default()),
            metrics: crate::metrics::Metrics::new(),
            connects: AtomicU64::new(0),
        });
        Ok(Gateway {
            core,
            events,
            reloads: mpsc::channel(4),
            api,
            api_addr,
            api_token,
            api_tls,
            broker,
            resume,
            upstream_stopped,
        })
    }

    /// How to hand the running gateway a new configuration.
    pub fn reloader(&self) -> Reloader {
        Reloader(self.reloads.0.clone())
    }

    /// The address the status API listens on.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// The dashboard's address (`https` when the API speaks TLS).
    pub fn dashboard_url(&self) -> Option<String> {
        let scheme = if self.api_tls.is_some() {
            "https"
        } else {
            "http"
        };
        self.api_addr.map(|a| format!("{scheme}://{a}/"))
    }

    /// The address of the embedded broker.
    pub fn broker_addr(&self) -> Option<SocketAddr> {
        self.broker.map(|b| b.addr())
    }

    /// Serve until `shutdown` is cancelled; then stop taking work and give
    /// running jobs `grace` to finish (what does not finish resumes at the
    /// next start).
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Result<(), DaemonError> {
        let core = self.core.clone();
        if let Some(l) = self.api.take() {
            let src: Arc<dyn crate::api::StatusSource> = Arc::new(status::Status(core.clone()));
            let stop = core.shutdown.clone();
            let token = Some(self.api_token.clone());
            let tls = self.api_tls.clone();
            core.tasks.spawn(async move {
                if let Err(e) = crate::api::serve(l, src, token, tls, stop).await {
                    tracing::error!("status API stopped: {e}");
                }
            });
        }
        // The upstream session's driver, waited for last at shutdown.
        let upstream_stopped = tokio::spawn(std::mem::replace(
            &mut self.upstream_stopped,
            Box::pin(std::future::ready(())),
        ));
        // Finish plugin updates a restart interrupted, then resume what the
        // journal holds.
        plugin_update::resume(&core).await;
        for r in std::mem::take(&mut self.resume) {
            match r {
                Resume::Report(key) => core.ensure_reported(&key).await,
                Resume::Run(ticket, first) => core.spawn(ticket, first),
            }
        }
        {
            let core = core.clone();
            core.tasks.clone().spawn(summary_loop(core));
        }
        campaigns::pin_images(&core);
        {
            let core = core.clone();
            core.tasks.clone().spawn(campaigns::drive(core));
        }
        {
            // Without `watch`, the directory is looked at only on SIGHUP.
            let (options, follow) = match core.plugin_watch {
                Some(o) => (o, true),
                None => (Default::default(), false),
            };
            let core = core.clone();
            core.tasks
                .clone()
                .spawn(watch_plugins(core, options, follow));
        }
        // systemd (Type=notify): ready once the plugins are loaded, the API
        // listens and the jobs are resumed; the watchdog is fed by this loop
        // itself, so a loop that stops turning is restarted.
        let watchdog = sd_notify::watchdog_enabled();
        let mut feed = tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |w| {
            (w / 2).max(Duration::from_millis(100))
        }));
        let status = format!("serving {} leaves", core.devices().all().len());
        notify_systemd(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = feed.tick(), if watchdog.is_some() => {
                    notify_systemd(&[sd_notify::NotifyState::Watchdog]);
                }
                Some(cfg) = self.reloads.1.recv() => {
                    let mut reloading = vec![sd_notify::NotifyState::Reloading];
                    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
                        reloading.push(now);
                    }
                    notify_systemd(&reloading);
                    core.reload(cfg).await;
                    core.table.touch();
                    notify_systemd(&[sd_notify::NotifyState::Ready]);
                }
                ev = self.events.recv() => match ev {
                    None => break,
                    Some(UpstreamEvent::Connected { session_present }) => {
                        tracing::info!(session_present, "upstream connected");
                        {
                            let mut u = lock(&core.upstream_status);
                            u.connected = true;
                            u.since_ms = Some(core.table.now_ms());
                        }
                        if core.connects.fetch_add(1, Ordering::Relaxed) > 0 {
                            core.metrics.upstream_reconnects.inc();
                        }
                        core.table.touch();
                        core.on_connected().await;
                    }
                    Some(UpstreamEvent::Message { topic, payload }) => core.on_message(&topic, &payload).await,
                    Some(UpstreamEvent::Disconnected { reason, .. }) => {
                        tracing::warn!("upstream disconnected: {reason}");
                        {
                            let mut u = lock(&core.upstream_status);
                            u.connected = false;
                            u.since_ms = Some(core.table.now_ms());
                            u.last_error = Some(reason.to_string());
                        }
                        core.table.touch();
                    }
                    // The session logs what it does about them.
                    Some(UpstreamEvent::SubDevices { .. }) => {}
                },
            }
        }
        notify_systemd(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping: jobs under way get the grace to finish"),
        ]);
        let running = core.table.running();
        tracing::info!(
            jobs = running.len(),
            "shutting down: jobs under way get {grace:?} to finish; no new ones start"
        );
        core.tasks.close();
        core.shutdown.cancel();
        if tokio::time::timeout(grace, core.tasks.wait())
            .await
            .is_err()
        {
            for (device, module, state) in core.table.running() {
                tracing::warn!(
                    %device, %module, %state,
                    "job still under way after the grace of {grace:?}: stopped where it is; it resumes at the next start"
                );
            }
            core.abort.cancel();
            core.tasks.wait().await;
        }
        core.abort.cancel();
        // What the jobs reported is in the outbox; say goodbye upstream.
        core.upstream_stop.cancel();
        if tokio::time::timeout(Duration::from_secs(5), upstream_stopped)
            .await
            .is_err()
        {
            tracing::warn!("the upstream session did not close within 5s");
        }
        core.cache.shutdown().await;
        // Whatever was interrupted was stopped by us, not by a crash.
        if let Err(e) = core.table.end_run().await {
            tracing::error!("{e}");
        }
        Ok(())
    }
}

/// Tell systemd (through `NOTIFY_SOCKET`, when it is set) how the daemon
/// stands; nothing without it.
fn notify_systemd(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// Hot reload of the plugins directory for the daemon's life; the platform
/// hears the new versions.
async fn watch_plugins(core: Arc<Core>, options: crate::plugin::watch::WatchOptions, follow: bool) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watch = crate::plugin::watch::watch_dir(
        &core.plugins,
        &core.plugins_dir,
        options,
        (follow, &core.plugins_rescan),
        core.shutdown.clone(),
        move |changes| {
            let _ = tx.send(!changes.loaded.is_empty());
        },
    );
    let inform = async {
        while let Some(loaded) = rx.recv().await {
            core.table.touch();
            if loaded {
                core.inform_plugins().await;
            }
        }
    };
    tokio::join!(watch, inform);
}

/// Publish the summary at most once a second, when something changed.
async fn summary_loop(core: Arc<Core>) {
    let topic = topics::summary(&core.gw.product_key, &core.gw.device_name);
    loop {
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = core.table.changed().notified() => {}
        }
        let payload = serde_json::to_vec(&core.summary()).unwrap_or_default();
        core.publish(&topic, payload, Delivery::BestEffort).await;
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
