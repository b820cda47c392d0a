//! The campaign driver: runs the campaigns of `rollout` on the daemon's
//! jobs.
//!
//! - A member starts as a notice offered to the job table (the campaign's
//!   image, version and module, a fresh message id; a platform campaign's
//!   member runs the platform's own notice). The campaign is persisted with
//!   the member `running` and its notice id *before* the job exists, so a
//!   crash in between is seen at the next step (no job with that id: the
//!   member is pending again).
//! - A member's end is its job's end: the runner tells the driver when a job
//!   ends ([`Core::campaign_job_ended`]), and every step also reconciles
//!   running members with the journal, which covers a crash between a job's
//!   end and the campaign's record of it. Nothing that finished runs again.
//! - Starts respect the buses: no more running members on a bus than its
//!   capacity, so a pause or an error threshold holds back everything not
//!   yet started (a job waiting for its bus in the runner would not be).
//! - Under `[jobs] policy = "plan"`, platform notices for one package
//!   collect into a platform campaign for `[jobs.plan] collect`, then run the
//!   configured plan. A held leaf reports nothing upstream until it starts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::table::{Intake, JobKey};
use super::{Core, lock};
use crate::cache::{CachedImage, Digest, DigestMethod};
use crate::config::{Config, Policy};
use crate::ota::journal::JobRecord;
use crate::ota::protocol::{Download, Notice, SignMethod};
use crate::ota::queue::{Duplicate, Offer};
use crate::ota::topics::DeviceId;
use crate::rollout::plan::{self, At, Campaign, CampaignState, Candidate, MemberState, Origin};
use crate::rollout::{
    CampaignRequest, CampaignStore, CampaignStoreError, CampaignView, KEEP_ENDED, UploadedImage,
    Verb,
};

/// Why a campaign request was refused: the API's status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutError {
    /// 400: the request is wrong (the message says what to change).
    BadRequest(String),
    /// 404.
    NotFound(String),
    /// 409: the request is right but the campaign's state does not allow it.
    Conflict(String),
    /// 500: the gateway could not do it.
    Internal(String),
}

impl std::fmt::Display for RolloutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RolloutError::BadRequest(m)
            | RolloutError::NotFound(m)
            | RolloutError::Conflict(m)
            | RolloutError::Internal(m) => f.write_str(m),
        }
    }
}

fn bad(m: impl Into<String>) -> RolloutError {
    RolloutError::BadRequest(m.into())
}

/// The daemon's campaigns.
pub(crate) struct Campaigns {
    store: CampaignStore,
    /// Every campaign, by id (read by the API and the summary).
    state: Mutex<BTreeMap<String, Campaign>>,
    /// Held while a change is made and persisted, so writes are in order.
    write: tokio::sync::Mutex<()>,
    /// Uploaded images of campaigns not over, kept from eviction.
    pins: Mutex<HashMap<String, CachedImage>>,
    /// Wakes the driver (a member ended, a verb, a new campaign).
    kick: Notify,
    policy: Policy,
    /// The plan of platform campaigns (`[jobs.plan]`, validated).
    plan: plan::PlanSpec,
    collect_ms: u64,
}

impl Campaigns {
    pub fn open(
        store: &crate::store::Store,
        cfg: &Config,
    ) -> Result<Campaigns, CampaignStoreError> {
        let store = CampaignStore::open(store)?;
        let state = store.all().into_iter().map(|c| (c.id.clone(), c)).collect();
        Ok(Campaigns {
            store,
            state: Mutex::new(state),
            write: tokio::sync::Mutex::new(()),
            pins: Mutex::new(HashMap::new()),
            kick: Notify::new(),
            policy: cfg.jobs.policy,
            plan: plan::PlanSpec::from_config(&cfg.jobs.plan).unwrap_or_default(),
            collect_ms: cfg.jobs.plan.collect.as_millis() as u64,
        })
    }

    /// Every campaign, oldest first.
    pub fn all(&self) -> Vec<Campaign> {
        let mut all: Vec<Campaign> = lock(&self.state).values().cloned().collect();
        all.sort_by_key(|c| (c.created_ms, c.id.clone()));
        all
    }

    pub fn get(&self, id: &str) -> Option<Campaign> {
        lock(&self.state).get(id).cloned()
    }

    /// Whether platform notices go through campaigns.
    pub fn planned(&self) -> bool {
        self.policy == Policy::Plan
    }

    /// Forget the oldest campaigns that are over beyond [`KEEP_ENDED`] (a
    /// new one is about to be written, which makes it durable).
    fn prune(&self) {
        let mut all = lock(&self.state);
        let mut ended: Vec<(u64, String)> = all
            .values()
            .filter(|c| c.is_over())
            .map(|c| (c.created_ms, c.id.clone()))
            .collect();
        ended.sort();
        let excess = ended.len().saturating_sub(KEEP_ENDED);
        for (_, id) in ended.into_iter().take(excess) {
            match self.store.remove(&id) {
                Ok(()) => {
                    all.remove(&id);
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }

    fn next_id(&self) -> String {
        let n = lock(&self.state)
            .keys()
            .filter_map(|k| k.strip_prefix('c')?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        format!("c{}", n + 1)
    }
}

/// The digest of a campaign's image.
fn digest_of(image: &plan::Image) -> Result<Digest, String> {
    Digest::from_sign(&image.sign_method, &image.sign).map_err(|e| e.to_string())
}

impl Core {
    /// Change campaign `id` with `f` and persist it; `None` if there is no
    /// such campaign.
    async fn mutate<R>(&self, id: &str, f: impl FnOnce(&mut Campaign) -> R) -> Option<R> {
        let c = &self.campaigns;
        let _w = c.write.lock().await;
        let (r, copy) = {
            let mut all = lock(&c.state);
            let campaign = all.get_mut(id)?;
            let r = f(campaign);
            (r, campaign.clone())
        };
        self.persist(&copy).await;
        Some(r)
    }

    async fn persist(&self, c: &Campaign) -> bool {
        let saved = match self.campaigns.store.put(c).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(campaign = %c.id, "{e}");
                false
            }
        };
        self.keep_pin(c);
        self.table.touch();
        self.campaigns.kick.notify_one();
        saved
    }

    /// Keep an uploaded image of `c` from eviction while any of its leaves
    /// may still need it (pending or running), and let it go after.
    fn keep_pin(&self, c: &Campaign) {
        if c.image.url.is_some() {
            return;
        }
        let needed = c
            .members()
            .any(|(_, m)| matches!(m.state, MemberState::Pending | MemberState::Running));
        let mut pins = lock(&self.campaigns.pins);
        if !needed {
            pins.remove(&c.id);
            return;
        }
        if pins.contains_key(&c.id) {
            return;
        }
        match digest_of(&c.image).map(|d| self.cache.get(&d)) {
            Ok(Ok(Some(img))) => {
                pins.insert(c.id.clone(), img);
            }
            _ => tracing::error!(
                campaign = %c.id,
                "the campaign's uploaded image is no longer in the cache: its next leaves fail -2 \
                 until it is uploaded again (otagw upgrade --image FILE, then retry)"
            ),
        }
    }

    /// Every configured leaf as a selection sees it.
    pub(crate) fn candidates(&self) -> Vec<Candidate> {
        self.devices()
            .all()
            .iter()
            .map(|l| Candidate {
                product_key: l.id.product_key.clone(),
                device_name: l.id.device_name.clone(),
                module: l.module.clone(),
                family: l.family.clone(),
                model: self.table.model(l),
                version: self.table.version(l),
                tags: l.tags.clone(),
                bus: l.bus.clone(),
            })
            .collect()
    }

    /// The API view of a campaign, with its running members' progress.
    pub(crate) fn campaign_view(&self, c: &Campaign) -> CampaignView {
        let jobs = self.table.snapshot();
        CampaignView::of(c, |device, module| {
            let (pk, dn) = device.split_once('/')?;
            let live = jobs.get(&(DeviceId::new(pk, dn), module.to_string()))?;
            Some((
                super::table::JobTable::shown_state(live).to_string(),
                live.record.job.percent(),
            ))
        })
    }

    /// `POST /api/images`: keep an uploaded image in the cache.
    pub(crate) async fn upload_image(
        &self,
        bytes: bytes::Bytes,
    ) -> Result<UploadedImage, RolloutError> {
        if bytes.is_empty() {
            return Err(bad("the image is empty"));
        }
        let max = self.limits.max_image_bytes;
        if bytes.len() as u64 > max {
            return Err(bad(format!(
                "the image is {} bytes, more than this gateway takes ({} MiB, [cache] max_image_mib)",
                bytes.len(),
                max >> 20
            )));
        }
        let size = bytes.len() as u64;
        let image = self
            .cache
            .add(bytes, "uploaded")
            .await
            .map_err(|e| RolloutError::Internal(e.to_string()))?;
        self.table.touch();
        Ok(UploadedImage {
            sha256: image.digest().hex().to_string(),
            size,
        })
    }

    /// `POST /api/campaigns`: check the request, select, plan, persist, start.
    pub(crate) async fn create_campaign(
        &self,
        req: CampaignRequest,
    ) -> Result<CampaignView, RolloutError> {
        let version = req.version.trim().to_string();
        if version.is_empty() {
            return Err(bad("version is empty: give the version the image installs"));
        }
        let sign = req.image.sha256.trim().to_ascii_lowercase();
        let digest = Digest::new(DigestMethod::Sha256, &sign)
            .map_err(|e| bad(format!("image sha256: {e}")))?;
        if req.image.size == 0 {
            return Err(bad("image size is 0"));
        }
        if req.image.size > self.limits.max_image_bytes {
            return Err(bad(format!(
                "the image is {} bytes, more than this gateway takes ({} MiB, [cache] max_image_mib)",
                req.image.size,
                self.limits.max_image_bytes >> 20
            )));
        }
        let pin = match &req.image.url {
            Some(u) => {
                match url::Url::parse(u) {
                    Ok(p) if matches!(p.scheme(), "http" | "https") => {}
                    _ => {
                        return Err(bad(format!(
                            "image url {u:?} is not an http(s) URL (a local file is uploaded \
                             first: POST /api/images, or otagw upgrade --image FILE)"
                        )));
                    }
                }
                None
            }
            None => match self.cache.get(&digest) {
                Ok(Some(img)) if img.size() == req.image.size => Some(img),
                Ok(Some(img)) => {
                    return Err(bad(format!(
                        "the uploaded image {sign} is {} bytes, not {}",
                        img.size(),
                        req.image.size
                    )));
                }
                _ => {
                    return Err(bad(format!(
                        "no image {sign} in the gateway's cache: give its url, or upload it \
                         first (POST /api/images)"
                    )));
                }
            },
        };
        let sel = req.selection;
        sel.check().map_err(|e| bad(format!("selection: {e}")))?;
        req.plan.check().map_err(|e| bad(format!("plan: {e}")))?;
        let all = self.candidates();
        if let Some(f) = &sel.family
            && self.plugins.get(f).is_none()
            && !all.iter().any(|c| c.family == *f)
        {
            let mut known: Vec<String> = self
                .plugins
                .families()
                .iter()
                .map(|p| p.info.name.clone())
                .collect();
            known.sort();
            return Err(bad(format!(
                "unknown family {f:?}: no plugin and no device has it (families: {})",
                known.join(", ")
            )));
        }
        for d in &sel.devices {
            let pattern = d.contains(['*', '?', '[']);
            if !pattern && !all.iter().any(|c| c.device() == *d || c.device_name == *d) {
                return Err(bad(format!(
                    "no device {d} on this gateway (GET /api/devices lists them)"
                )));
            }
        }
        let matched: Vec<Candidate> = all.into_iter().filter(|c| sel.matches(c)).collect();
        if matched.is_empty() {
            return Err(bad(format!(
                "the selection matches no leaf (module {:?}); GET /api/devices lists them",
                sel.module()
            )));
        }
        let (already, todo): (Vec<Candidate>, Vec<Candidate>) =
            matched.into_iter().partition(|c| c.version == version);
        if todo.is_empty() {
            return Err(bad(format!(
                "every selected leaf already runs {version} ({})",
                already
                    .iter()
                    .map(Candidate::device)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        // From here to the insert, under the write lock: two requests at
        // once cannot both take a leaf.
        let _w = self.campaigns.write.lock().await;
        let busy: Vec<String> = {
            let state = lock(&self.campaigns.state);
            todo.iter()
                .filter_map(|cand| {
                    state.values().filter(|c| !c.is_over()).find_map(|c| {
                        c.members()
                            .any(|(_, m)| {
                                m.device() == cand.device()
                                    && m.module == cand.module
                                    && !m.state.is_ended()
                            })
                            .then(|| format!("{} (in {})", cand.device(), c.id))
                    })
                })
                .collect()
        };
        if !busy.is_empty() {
            return Err(RolloutError::Conflict(format!(
                "leaves already in a campaign that is not over: {}; stop it first",
                busy.join(", ")
            )));
        }
        let groups = req
            .plan
            .groups(&todo)
            .map_err(|e| bad(format!("plan: {e}")))?;
        self.campaigns.prune();
        let id = self.campaigns.next_id();
        let now = self.table.now_ms();
        let mut c = Campaign::new(
            id.clone(),
            Origin::Local,
            plan::Image {
                url: req.image.url.clone(),
                sign_method: "sha256".into(),
                sign,
                size: req.image.size,
            },
            version,
            sel,
            req.plan,
            groups,
            now,
        );
        if !already.is_empty() {
            c.transitions.push(plan::Transition {
                at_ms: now,
                from: c.state,
                to: c.state,
                reason: format!(
                    "left out, already on {}: {}",
                    c.version,
                    already
                        .iter()
                        .map(Candidate::device)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        self.campaigns
            .store
            .put(&c)
            .await
            .map_err(|e| RolloutError::Internal(e.to_string()))?;
        if let Some(p) = pin {
            lock(&self.campaigns.pins).insert(id.clone(), p);
        }
        lock(&self.campaigns.state).insert(id.clone(), c.clone());
        let counts = c.counts();
        tracing::info!(
            campaign = %id, version = %c.version, leaves = counts.total,
            groups = c.groups.len(),
            "campaign created: {}",
            c.groups
                .iter()
                .map(|g| format!("{} {}", g.name, g.members.len()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.table.touch();
        self.campaigns.kick.notify_one();
        Ok(self.campaign_view(&c))
    }

    /// A verb on campaign `id`.
    pub(crate) async fn campaign_verb(
        &self,
        id: &str,
        verb: Verb,
        reason: Option<String>,
    ) -> Result<CampaignView, RolloutError> {
        let now = self.table.now_ms();
        let why = reason.unwrap_or_else(|| "by the operator".into());
        let r = self
            .mutate(id, |c| {
                let r = match verb {
                    Verb::Pause => c.pause(now, &why),
                    Verb::Resume => c.resume(now, &why),
                    Verb::Stop => c.stop(now, &why),
                    Verb::Approve => c.approve(now, &why),
                    Verb::Retry => c.retry(now, &why).map(|_| ()),
                };
                (r, c.clone())
            })
            .await;
        match r {
            None => Err(RolloutError::NotFound(format!(
                "no campaign {id} (GET /api/campaigns lists them)"
            ))),
            Some((Err(e), _)) => Err(RolloutError::Conflict(e.0)),
            Some((Ok(()), c)) => {
                tracing::info!(campaign = %id, state = c.state.name(), "campaign {}: {why}", verb.name());
                if verb == Verb::Stop && c.origin == Origin::Platform {
                    self.decline_not_started(&c, &why).await;
                }
                Ok(self.campaign_view(&c))
            }
        }
    }

    /// The platform ordered the leaves of stopped platform campaign `c` that
    /// never started: tell it, once, that the gateway declined (its only
    /// terminal word is a failure, -1, whose desc says the leaf is
    /// untouched), so its task ends instead of coming back at every connect.
    async fn decline_not_started(&self, c: &Campaign, why: &str) {
        for (_, m) in c.members() {
            let Some(notice) = &m.notice else { continue };
            if m.state != MemberState::NotStarted {
                continue;
            }
            let id = DeviceId::new(&m.product_key, &m.device_name);
            let desc = format!(
                "not started: campaign {} was stopped on the gateway ({why}); the leaf still \
                 runs {}",
                c.id, m.from_version
            );
            self.table.remember_refusal(
                &id,
                &m.module,
                &notice.version,
                crate::ota::protocol::Step::UpgradeFailed.code(),
                &desc,
            );
            self.reject(
                &id,
                &m.module,
                crate::ota::protocol::Step::UpgradeFailed,
                desc,
            )
            .await;
        }
    }

    /// A job ended: its member (if a campaign started it) ends with it.
    pub(crate) async fn campaign_job_ended(&self, r: &JobRecord) {
        let Some(out) = plan::outcome(&r.job) else {
            return;
        };
        let device = r.leaf.to_string();
        let owner = lock(&self.campaigns.state)
            .values()
            .find(|c| c.find(&device, &r.module, r.notice.id).is_some())
            .map(|c| c.id.clone());
        let Some(id) = owner else {
            return;
        };
        let now = self.table.now_ms();
        let (device, module, nid) = (device.clone(), r.module.clone(), r.notice.id);
        self.mutate(&id, move |c| {
            if let Some(at) = c.find(&device, &module, nid) {
                c.ended(at, out, now);
                if c.state == CampaignState::Paused {
                    tracing::warn!(campaign = %c.id, "campaign paused: {}", c.pause_reason.as_deref().unwrap_or(""));
                }
                if c.state == CampaignState::Finished {
                    let n = c.counts();
                    tracing::info!(campaign = %c.id, succeeded = n.succeeded, failed = n.failed, "campaign finished");
                }
            }
        })
        .await;
    }

    /// A platform notice under `policy = "plan"`: it joins the platform
    /// campaign of its package (one collecting, or one under way), or
    /// starts one. Nothing is reported for the leaf until its job starts.
    pub(crate) async fn plan_notice(self: &Arc<Self>, id: DeviceId, notice: Notice) {
        let key: JobKey = (id.clone(), notice.module.clone());
        // The fresh URL of a job whose URL expired goes to that job.
        if self.table.awaits(&key, &notice) {
            let module = notice.module.clone();
            let intake = self.table.offer(&id, notice).await;
            return self.start(intake, &id, &module).await;
        }
        let Some(cand) = self.candidates().into_iter().find(|c| {
            c.product_key == id.product_key
                && c.device_name == id.device_name
                && c.module == notice.module
        }) else {
            return;
        };
        let device = cand.device();
        let now = self.table.now_ms();
        let _w = self.campaigns.write.lock().await;
        let changed = {
            let mut all = lock(&self.campaigns.state);
            let same = |c: &Campaign| {
                c.origin == Origin::Platform
                    && !c.is_over()
                    && c.module == notice.module
                    && c.version == notice.version
                    && c.image.sign == notice.sign
            };
            // A redelivery, or the answer to firmware/get for a held leaf.
            let held = all.values().any(|c| {
                same(c)
                    && c.members()
                        .any(|(_, m)| m.device() == device && m.module == notice.module)
            });
            if held {
                tracing::debug!(device = %id, "notice already in its campaign");
                return;
            }
            let mut changed = Vec::new();
            // A newer package replaces a held (not started) older one.
            for c in all
                .values_mut()
                .filter(|c| c.origin == Origin::Platform && !c.is_over())
            {
                let ats: Vec<At> = c
                    .members()
                    .filter(|(_, m)| {
                        m.device() == device
                            && m.module == notice.module
                            && m.state == MemberState::Pending
                    })
                    .map(|(at, _)| at)
                    .collect();
                for at in ats {
                    c.ended(
                        at,
                        MemberState::Superseded {
                            reason: format!(
                                "replaced by a newer notice ({}) before it started",
                                notice.version
                            ),
                        },
                        now,
                    );
                    changed.push(c.id.clone());
                }
            }
            let mut member = plan::Member::of(&cand);
            member.notice = Some(notice.clone());
            match all.values_mut().find(|c| same(c)) {
                Some(c) => {
                    if let Some(g) = c.groups.last_mut() {
                        g.members.push(member);
                    }
                    tracing::info!(device = %id, campaign = %c.id, version = %notice.version, "upgrade notice held in its campaign ([jobs] policy = \"plan\")");
                    changed.push(c.id.clone());
                }
                None => {
                    drop(all);
                    self.campaigns.prune();
                    let cid = self.campaigns.next_id();
                    let mut c = Campaign::new(
                        cid.clone(),
                        Origin::Platform,
                        plan::Image {
                            url: notice.url().map(str::to_string),
                            sign_method: match notice.sign_method {
                                SignMethod::Md5 => "md5".into(),
                                SignMethod::Sha256 => "sha256".into(),
                            },
                            sign: notice.sign.clone(),
                            size: notice.size,
                        },
                        notice.version.clone(),
                        plan::Selection {
                            module: Some(notice.module.clone()),
                            ..Default::default()
                        },
                        self.campaigns.plan.clone(),
                        vec![vec![]],
                        now,
                    );
                    c.groups[0].name = "collected".into();
                    c.groups[0].members.push(member);
                    c.state = CampaignState::Collecting;
                    c.collect_until_ms = Some(now + self.campaigns.collect_ms);
                    c.transitions[0].to = CampaignState::Collecting;
                    c.transitions[0].reason = format!(
                        "platform notices for {} collected for {} s ([jobs.plan] collect)",
                        notice.version,
                        self.campaigns.collect_ms / 1000
                    );
                    tracing::info!(device = %id, campaign = %cid, version = %notice.version, "upgrade notice held: a campaign collects the platform's notices for this package ([jobs] policy = \"plan\")");
                    all = lock(&self.campaigns.state);
                    all.insert(cid.clone(), c);
                    changed.push(cid);
                }
            }
            changed
                .into_iter()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter_map(|cid| all.get(&cid).cloned())
                .collect::<Vec<_>>()
        };
        for c in changed {
            self.persist(&c).await;
        }
    }

    /// One step of every campaign: reconcile running members with the
    /// journal, draw up collected platform campaigns, and start what is due.
    pub(crate) async fn campaign_step(self: &Arc<Self>) {
        let now = self.table.now_ms();
        let devices = self.devices();
        let w = self.campaigns.write.lock().await;
        let mut offers: Vec<(String, At, DeviceId, Notice)> = Vec::new();
        let changed: Vec<Campaign> = {
            let mut all = lock(&self.campaigns.state);
            // Nothing to do for campaigns over with nothing running (the
            // usual state of a gateway between rollouts).
            let idle = all
                .values()
                .all(|c| c.is_over() && c.members().all(|(_, m)| m.state != MemberState::Running));
            if idle {
                return;
            }
            let mut changed = BTreeSet::new();
            let drawing = all.values().any(|c| {
                c.state == CampaignState::Collecting && c.collect_until_ms.is_some_and(|t| now >= t)
            });
            let cands = if drawing {
                self.candidates()
            } else {
                Vec::new()
            };
            for c in all.values_mut() {
                if self.reconcile(c, now) {
                    changed.insert(c.id.clone());
                }
                if c.state == CampaignState::Collecting
                    && c.collect_until_ms.is_some_and(|t| now >= t)
                {
                    draw_up(c, &cands, now);
                    changed.insert(c.id.clone());
                }
            }
            // Free slots per bus: its capacity less the running members.
            let mut used: BTreeMap<String, usize> = BTreeMap::new();
            for c in all.values() {
                for (_, m) in c.members() {
                    if m.state == MemberState::Running {
                        *used.entry(m.bus.clone()).or_default() += 1;
                    }
                }
            }
            let mut free: BTreeMap<String, usize> = BTreeMap::new();
            for l in devices.all() {
                free.entry(l.bus.clone()).or_insert_with(|| {
                    self.bus_capacity(&l.bus)
                        .saturating_sub(used.get(&l.bus).copied().unwrap_or(0))
                });
            }
            // And in all, no more than [jobs] max_parallel running members:
            // what waits does so here, where a pause still holds it back.
            let running: usize = used.values().sum();
            let mut global = self.max_parallel().saturating_sub(running);
            let mut order: Vec<&mut Campaign> = all.values_mut().collect();
            order.sort_by_key(|c| (c.created_ms, c.id.clone()));
            for c in order {
                for at in c.due(now, &mut free, &mut global) {
                    let m = c.member(at).clone();
                    let id = DeviceId::new(&m.product_key, &m.device_name);
                    let key: JobKey = (id.clone(), m.module.clone());
                    if devices.find(&id, &m.module).is_none() {
                        c.ended(
                            at,
                            MemberState::Superseded {
                                reason: "no longer in the configuration".into(),
                            },
                            now,
                        );
                        changed.insert(c.id.clone());
                        continue;
                    }
                    // Another job of the leaf first (its slot is freed
                    // again: the next step looks once more).
                    if self.table.busy(&key) {
                        *free.entry(m.bus.clone()).or_default() += 1;
                        global += 1;
                        continue;
                    }
                    let notice = match &m.notice {
                        Some(n) => n.clone(),
                        None => match campaign_notice(c, self.next_id()) {
                            Ok(n) => n,
                            Err(e) => {
                                c.ended(
                                    at,
                                    MemberState::Failed {
                                        reason: e,
                                        counted: false,
                                    },
                                    now,
                                );
                                changed.insert(c.id.clone());
                                continue;
                            }
                        },
                    };
                    c.started(at, notice.id, now);
                    changed.insert(c.id.clone());
                    offers.push((c.id.clone(), at, id, notice));
                }
            }
            changed
                .into_iter()
                .filter_map(|id| all.get(&id).cloned())
                .collect()
        };
        // Persisted before the jobs exist; a campaign that could not be
        // saved starts nothing (its members would run again after a restart).
        let mut unsaved = BTreeSet::new();
        for c in &changed {
            if let Err(e) = self.campaigns.store.put(c).await {
                tracing::error!(campaign = %c.id, "{e}: its leaves do not start until it can be saved");
                unsaved.insert(c.id.clone());
            }
            self.keep_pin(c);
        }
        offers.retain(|(cid, ..)| !unsaved.contains(cid));
        drop(w);
        if !changed.is_empty() {
            self.table.touch();
        }
        for (cid, at, id, notice) in offers {
            let module = notice.module.clone();
            let nid = notice.id;
            tracing::info!(campaign = %cid, device = %id, module, "campaign starts the leaf's upgrade");
            let end = match self.table.offer(&id, notice).await {
                Intake::Run(ticket) => {
                    self.spawn(ticket, None);
                    None
                }
                // The leaf succeeded with this very package lately.
                Intake::Held(Offer::Ignored(Duplicate::Succeeded)) => {
                    let v = self.get_version(&id, &module);
                    Some(MemberState::Succeeded { version: v })
                }
                // Behind another job: reconciled when it ends.
                Intake::Held(_) => None,
                Intake::Refused(desc) => Some(MemberState::Failed {
                    reason: desc,
                    counted: false,
                }),
            };
            if let Some(state) = end {
                let now = self.table.now_ms();
                self.mutate(&cid, move |c| {
                    if c.member(at).notice_id == Some(nid)
                        && c.member(at).state == MemberState::Running
                    {
                        c.ended(at, state, now);
                    }
                })
                .await;
            }
        }
    }

    fn get_version(&self, id: &DeviceId, module: &str) -> String {
        self.devices()
            .find(id, module)
            .map(|l| self.table.version(l))
            .unwrap_or_default()
    }

    /// Bring `c`'s running members in line with the jobs; whether it changed.
    fn reconcile(&self, c: &mut Campaign, now: u64) -> bool {
        let running: Vec<At> = c
            .members()
            .filter(|(_, m)| m.state == MemberState::Running)
            .map(|(at, _)| at)
            .collect();
        let mut changed = false;
        for at in running {
            let m = c.member(at).clone();
            let key: JobKey = (
                DeviceId::new(&m.product_key, &m.device_name),
                m.module.clone(),
            );
            match self.table.job(&key) {
                // Persisted as started, but the job never came to be.
                None => {
                    c.unstart(at);
                    changed = true;
                }
                Some(r) if Some(r.notice.id) == m.notice_id => {
                    if let Some(out) = plan::outcome(&r.job) {
                        c.ended(at, out, now);
                        changed = true;
                    }
                }
                // The campaign's package under another message id: the
                // platform's fresh URL for a held member's job. It is ours.
                Some(r)
                    if r.notice.version == c.version
                        && r.notice.sign == c.image.sign
                        && r.job.history().first().map_or(0, |t| t.at_ms)
                            >= m.started_ms.unwrap_or(0) =>
                {
                    c.member_mut(at).notice_id = Some(r.notice.id);
                    if let Some(out) = plan::outcome(&r.job) {
                        c.ended(at, out, now);
                    }
                    changed = true;
                }
                Some(r) => {
                    let queued = r.job.history().first().map_or(0, |t| t.at_ms);
                    if queued >= m.started_ms.unwrap_or(0) {
                        c.ended(
                            at,
                            MemberState::Superseded {
                                reason: format!(
                                    "replaced by another notice for the leaf (version {})",
                                    r.notice.version
                                ),
                            },
                            now,
                        );
                        changed = true;
                    } else if r.job.is_terminal() && !self.table.busy(&key) {
                        // The job it waited behind ended; its notice was
                        // not kept: start it again.
                        c.unstart(at);
                        changed = true;
                    }
                }
            }
        }
        changed
    }
}

/// The notice that runs local campaign `c`'s image on a member.
fn campaign_notice(c: &Campaign, id: u64) -> Result<Notice, String> {
    digest_of(&c.image)?;
    let url = match &c.image.url {
        Some(u) => u.clone(),
        None => format!("{}:{}", crate::cache::UPLOADED_SCHEME, c.image.sign),
    };
    Ok(Notice {
        id,
        version: c.version.clone(),
        size: c.image.size,
        download: Download::Http { url },
        sign_method: if c.image.sign_method == "md5" {
            SignMethod::Md5
        } else {
            SignMethod::Sha256
        },
        sign: c.image.sign.clone(),
        module: c.module.clone(),
        is_diff: false,
        // Marks the job as the gateway's own: no platform can refresh its
        // URL, so a 403 fails it (-2) instead of waiting for a fresh notice.
        ext_data: Some(serde_json::json!({ CAMPAIGN_MARK: c.id })),
    })
}

/// The `extData` key of the notices local campaigns make.
pub(crate) const CAMPAIGN_MARK: &str = "otagwCampaign";

/// Whether `notice` was made by a local campaign (not the platform's).
pub(crate) fn from_local_campaign(notice: &Notice) -> bool {
    notice
        .ext_data
        .as_ref()
        .is_some_and(|e| e.get(CAMPAIGN_MARK).is_some())
}

/// The collection of platform campaign `c` is over: cut its members into
/// the plan's groups and run it.
fn draw_up(c: &mut Campaign, cands: &[Candidate], now: u64) {
    let members: Vec<plan::Member> = c.groups.iter().flat_map(|g| g.members.clone()).collect();
    let pick: Vec<Candidate> = members
        .iter()
        .filter_map(|m| {
            cands
                .iter()
                .find(|x| x.device() == m.device() && x.module == m.module)
                .cloned()
        })
        .collect();
    let groups = c.plan.groups(&pick).unwrap_or_else(|_| vec![pick.clone()]);
    let mut fresh = Campaign::new(
        c.id.clone(),
        c.origin,
        c.image.clone(),
        c.version.clone(),
        c.selection.clone(),
        c.plan.clone(),
        groups,
        c.created_ms,
    );
    // Keep each member's own notice (and anything it already went through).
    for g in &mut fresh.groups {
        for m in &mut g.members {
            if let Some(old) = members
                .iter()
                .find(|o| o.device() == m.device() && o.module == m.module)
            {
                *m = old.clone();
            }
        }
    }
    let mut transitions = std::mem::take(&mut c.transitions);
    let n = members.len();
    *c = fresh;
    transitions.push(plan::Transition {
        at_ms: now,
        from: CampaignState::Collecting,
        to: CampaignState::Running,
        reason: format!(
            "collected {n} leaves: {}",
            c.groups
                .iter()
                .map(|g| format!("{} {}", g.name, g.members.len()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    });
    c.transitions = transitions;
    c.advance(now);
}

/// The driver's task: a step whenever something changed, and every second
/// (rate limits, collection windows).
pub(super) async fn drive(core: Arc<Core>) {
    loop {
        core.campaign_step().await;
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = core.campaigns.kick.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The summary's account of campaigns: those not over, and the last ended.
pub(super) fn summary(core: &Core) -> serde_json::Value {
    let all = core.campaigns.all();
    let mut shown: Vec<&Campaign> = all.iter().filter(|c| !c.is_over()).collect();
    if let Some(last) = all.iter().rev().find(|c| c.is_over()) {
        shown.push(last);
    }
    serde_json::Value::Array(
        shown
            .into_iter()
            .map(|c| {
                let n = c.counts();
                let group = c.groups.get(c.current_group).map(|g| g.name.clone());
                serde_json::json!({
                    "id": c.id,
                    "origin": c.origin,
                    "version": c.version,
                    "module": c.module,
                    "state": c.state.name(),
                    "group": group,
                    "groups": c.groups.len(),
                    "pauseReason": c.pause_reason,
                    "total": n.total,
                    "pending": n.pending,
                    "running": n.running,
                    "succeeded": n.succeeded,
                    "failed": n.failed,
                    "notStarted": n.not_started,
                })
            })
            .collect(),
    )
}

/// Pin the uploaded images campaigns still need (after a restart).
pub(super) fn pin_images(core: &Core) {
    for c in core.campaigns.all() {
        core.keep_pin(&c);
    }
}
