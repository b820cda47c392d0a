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

mod runner;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::EmbeddedBroker;
use crate::cache::Cache;
use crate::config::{AuthKind, Config};
use crate::devices::{Devices, Leaf};
use crate::ota::journal::{JobRecord, Journal};
use crate::ota::protocol::{self, Download, Inform, Notice, Progress, Step};
use crate::ota::queue::{Offer, Queue};
use crate::ota::topics::{self, DeviceId, TopicKind};
use crate::plugin::PluginHost;
use crate::store::Store;
use crate::upstream::{self, Delivery, SubDevice, Upstream, UpstreamEvent};

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
    #[error("cannot create {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Milliseconds since the unix epoch: the jobs' clock.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A job's key: one job per leaf and module.
pub(crate) type JobKey = (DeviceId, String);

/// A live job record and the generation of the task that owns it.
pub(crate) struct Live {
    pub record: JobRecord,
    pub generation: u64,
    pub last_error: Option<String>,
}

/// Everything the daemon's tasks share.
pub(crate) struct Core {
    pub gw: DeviceId,
    pub devices: Devices,
    pub cache: Cache,
    pub journal: Journal,
    pub plugins: PluginHost,
    pub upstream: Upstream,
    pub queue: Mutex<Queue>,
    pub jobs: Mutex<BTreeMap<JobKey, Live>>,
    /// Terminal reports known to be published (leaf, module → version+sign).
    pub reported: sled::Tree,
    pub permits: Arc<Semaphore>,
    pub links: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    next_id: AtomicU64,
    next_generation: AtomicU64,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    /// Something a summary counts changed.
    pub changed: Notify,
    pub bytes_downloaded: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Core {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Publish, logging (not failing) when upstream cannot take it: durable
    /// messages are in the outbox by then, best-effort ones are replaced by
    /// later ones.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>, delivery: Delivery) {
        if let Err(e) = self
            .upstream
            .publish(topic, Bytes::from(payload), delivery)
            .await
        {
            match delivery {
                Delivery::Durable => tracing::error!(topic, "cannot publish: {e}"),
                Delivery::BestEffort => tracing::debug!(topic, "not published: {e}"),
            }
        }
    }

    /// Report a failure of a notice that never became a job.
    async fn reject(&self, id: &DeviceId, module: &str, step: Step, desc: String) {
        tracing::warn!(device = %id, module, "upgrade notice rejected: {desc}");
        let p = Progress::new(step, desc, module);
        let payload = p.payload(self.next_id());
        self.publish(
            &topics::progress(&id.product_key, &id.device_name),
            payload,
            Delivery::Durable,
        )
        .await;
    }

    fn leaf(&self, key: &JobKey) -> Option<&Leaf> {
        self.devices.find(&key.0, &key.1)
    }

    /// Take a notice for a leaf: validate, dedupe, persist, start.
    async fn offer(self: &Arc<Self>, id: DeviceId, notice: Notice) {
        let module = notice.module.clone();
        if id == self.gw {
            return self
                .reject(
                    &id,
                    &module,
                    Step::UpgradeFailed,
                    format!("the gateway's own module {module:?} cannot be upgraded over the air"),
                )
                .await;
        }
        if self.devices.find(&id, &module).is_none() {
            let desc = if self.devices.knows(&id) {
                format!("module {module:?} of {id} is not managed by this gateway")
            } else {
                format!("device {id} is not managed by this gateway")
            };
            return self.reject(&id, &module, Step::UpgradeFailed, desc).await;
        }
        if let Download::Mqtt { .. } = notice.download {
            return self
                .reject(
                    &id,
                    &module,
                    Step::DownloadFailed,
                    "download over MQTT (dProtocol mqtt) is not supported; send an http(s) url"
                        .into(),
                )
                .await;
        }
        let offer = lock(&self.queue).offer(&id, &notice, now_ms());
        tracing::info!(device = %id, module, version = %notice.version, ?offer, "upgrade notice");
        match offer {
            Offer::Ignored(_) | Offer::AfterCurrent => {}
            Offer::Queued | Offer::Replaced(_) => self.create(id, notice).await,
            Offer::Refreshed => {
                let key = (id, module);
                let record = {
                    let mut jobs = lock(&self.jobs);
                    let Some(live) = jobs.get_mut(&key) else {
                        return;
                    };
                    live.record.notice = notice;
                    live.record
                        .job
                        .on(crate::ota::job::Event::NoticeRefreshed, now_ms());
                    live.record.clone()
                };
                if let Err(e) = self.journal.put(&record).await {
                    tracing::error!("{e}");
                }
                self.spawn(key, None);
            }
        }
    }

    /// A new job for a notice: persisted, then scheduled.
    async fn create(self: &Arc<Self>, id: DeviceId, notice: Notice) {
        let record = JobRecord::new(id.clone(), notice, now_ms());
        let key = (id, record.module.clone());
        if let Err(e) = self.journal.put(&record).await {
            tracing::error!("{e}");
            return;
        }
        lock(&self.jobs).insert(
            key.clone(),
            Live {
                record,
                generation: 0,
                last_error: None,
            },
        );
        self.changed.notify_one();
        self.spawn(key, None);
    }

    /// Start the task that runs a job (a newer task makes older ones of the
    /// same key give up before they touch anything).
    fn spawn(self: &Arc<Self>, key: JobKey, first: Option<crate::ota::job::Event>) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        if let Some(live) = lock(&self.jobs).get_mut(&key) {
            live.generation = generation;
        }
        let core = self.clone();
        self.tasks
            .spawn(async move { runner::run(core, key, generation, first).await });
    }

    /// A job's task is over: free its place in the queue and start the notice
    /// that waited behind it.
    pub async fn finished(self: &Arc<Self>, key: &JobKey, succeeded: bool) {
        let next = lock(&self.queue).finished(&key.0, &key.1, succeeded, now_ms());
        self.changed.notify_one();
        if let Some(notice) = next {
            self.create(key.0.clone(), notice).await;
        }
    }

    async fn on_connected(self: &Arc<Self>) {
        for leaf in self.devices.all() {
            let v = self.devices.version(leaf);
            let inform = Inform::new(self.next_id(), v, leaf.module.clone());
            self.publish(
                &topics::inform(&leaf.id.product_key, &leaf.id.device_name),
                inform.payload(),
                Delivery::BestEffort,
            )
            .await;
        }
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
        // Ask for pending packages for every leaf with no job in progress.
        for leaf in self.devices.all() {
            let busy = lock(&self.jobs)
                .get(&(leaf.id.clone(), leaf.module.clone()))
                .is_some_and(|l| !l.record.job.is_terminal() && !l.record.job.awaiting_notice());
            if !busy {
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
        let jobs = lock(&self.jobs);
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
        let now = now_ms();
        let mut eta_ms: u64 = 0;
        for live in jobs.values() {
            let job = &live.record.job;
            *counts.entry(job.state().name()).or_default() += 1;
            if job.state().is_running()
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
                "bytesDownloaded": self.bytes_downloaded.load(Ordering::Relaxed),
                "etaSeconds": eta_ms / 1000,
            }
        })
    }
}

/// The daemon, built and bound, not yet running.
pub struct Gateway {
    core: Arc<Core>,
    events: mpsc::Receiver<UpstreamEvent>,
    api: Option<tokio::net::TcpListener>,
    api_addr: Option<SocketAddr>,
    broker: Option<EmbeddedBroker>,
    restored: Vec<JobRecord>,
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
        let cache = Cache::open(&store, cfg.cache.max_size_mib << 20)?;
        let journal = Journal::new(store.tree(crate::ota::journal::TREE)?);
        let devices = Devices::new(&cfg.devices, &store)?;
        let reported = store.tree("reported")?;

        let plugins = PluginHost::new(
            cfg.plugins.limits(cfg.jobs.max_parallel),
            Some(data.join("compiled")),
        )?;
        let report = plugins.load_dir(&cfg.gateway.plugins_dir).await?;
        for e in &report.failed {
            tracing::error!("{e}");
        }
        for leaf in devices.all() {
            if plugins.get(&leaf.family).is_none() {
                tracing::error!(device = %leaf.id, family = %leaf.family, "no plugin for this device's family: its upgrades will fail");
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
        let (upstream, events) = Upstream::start(
            up_cfg,
            gateway_identity,
            leaves,
            subscriptions,
            &store,
            shutdown.clone(),
        )?;

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

        let restored = journal.all()?;
        let mut queue = Queue::new();
        let mut jobs = BTreeMap::new();
        for r in &restored {
            queue.restore(r);
            jobs.insert(
                (r.leaf.clone(), r.module.clone()),
                Live {
                    record: r.clone(),
                    generation: 0,
                    last_error: None,
                },
            );
        }
        let core = Arc::new(Core {
            gw,
            devices,
            cache,
            journal,
            plugins,
            upstream,
            queue: Mutex::new(queue),
            jobs: Mutex::new(jobs),
            reported,
            permits: Arc::new(Semaphore::new(cfg.jobs.max_parallel)),
            links: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(now_ms()),
            next_generation: AtomicU64::new(1),
            tasks: TaskTracker::new(),
            shutdown,
            changed: Notify::new(),
            bytes_downloaded: AtomicU64::new(0),
        });
        Ok(Gateway {
            core,
            events,
            api,
            api_addr,
            broker,
            restored,
        })
    }

    /// The address the status API listens on.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
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
            core.tasks.spawn(async move {
                if let Err(e) = crate::api::serve(l, src, stop).await {
                    tracing::error!("status API stopped: {e}");
                }
            });
        }
        // Resume what the journal holds.
        for r in std::mem::take(&mut self.restored) {
            let key = (r.leaf.clone(), r.module.clone());
            if r.job.is_terminal() {
                runner::ensure_terminal_reported(&core, &key).await;
            } else if r.job.state().is_running() {
                core.spawn(key, Some(crate::ota::job::Event::Restarted));
            } else if r.job.ready() {
                core.spawn(key, None);
            }
            // Waiting for a fresh notice: firmware/get on connect brings it.
        }
        {
            let core = core.clone();
            core.tasks.clone().spawn(summary_loop(core));
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = self.events.recv() => match ev {
                    None => break,
                    Some(UpstreamEvent::Connected { session_present }) => {
                        tracing::info!(session_present, "upstream connected");
                        core.on_connected().await;
                    }
                    Some(UpstreamEvent::Message { topic, payload }) => core.on_message(&topic, &payload).await,
                    Some(UpstreamEvent::Disconnected { reason, .. }) => tracing::warn!("upstream disconnected: {reason}"),
                    Some(UpstreamEvent::SubDevices { request, code, message }) => {
                        tracing::info!(?request, code, message, "sub-device reply")
                    }
                },
            }
        }
        tracing::info!("shutting down");
        core.tasks.close();
        core.shutdown.cancel();
        if tokio::time::timeout(grace, core.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("jobs still running after {grace:?}: they resume at the next start");
        }
        core.cache.shutdown().await;
        Ok(())
    }
}

/// Publish the summary at most once a second, when something changed.
async fn summary_loop(core: Arc<Core>) {
    let topic = topics::summary(&core.gw.product_key, &core.gw.device_name);
    loop {
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = core.changed.notified() => {}
        }
        let payload = serde_json::to_vec(&core.summary()).unwrap_or_default();
        core.publish(&topic, payload, Delivery::BestEffort).await;
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
