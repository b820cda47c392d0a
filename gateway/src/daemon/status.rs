//! The daemon's answers to the status API.

use std::sync::Arc;

use super::Core;
use super::campaigns::RolloutError;
use super::table::JobTable;
use crate::api::{ApiError, DevicePlatform, DeviceStatus, JobStatus, Reply, StatusSource};
use crate::ota::job::State;

pub(super) struct Status(pub Arc<Core>);

fn step_desc(state: &State) -> (Option<i32>, Option<String>) {
    match state {
        State::Failed { step, desc } => (Some(step.code()), Some(desc.clone())),
        _ => (None, None),
    }
}

fn api_error(e: RolloutError) -> ApiError {
    use axum::http::StatusCode;
    let status = match &e {
        RolloutError::BadRequest(_) => StatusCode::BAD_REQUEST,
        RolloutError::NotFound(_) => StatusCode::NOT_FOUND,
        RolloutError::Conflict(_) => StatusCode::CONFLICT,
        RolloutError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

impl StatusSource for Status {
    fn plugins(&self) -> crate::api::PluginsStatus {
        let host = &self.0.plugins;
        crate::api::PluginsStatus {
            loaded: host
                .families()
                .iter()
                .map(|p| crate::api::PluginStatus {
                    family: p.info.name.clone(),
                    version: p.info.version.clone(),
                    contract: p.info.contract.to_string(),
                    path: p.path.display().to_string(),
                    sha256: p.sha256.clone(),
                    description: p.info.description.clone(),
                    transports: p.transport_names(),
                    options: p.info.options_json(),
                })
                .collect(),
            broken: host
                .broken()
                .into_iter()
                .map(|(path, error)| crate::api::BrokenPlugin {
                    path: path.display().to_string(),
                    error,
                })
                .collect(),
            updates: {
                // A platform URL is signed (a credential for a day): the
                // view shows where it points, not its query.
                let mut families = self.0.updates.snapshot().families;
                for f in families.values_mut() {
                    if let Some(u) = &mut f.update
                        && let crate::ota::protocol::Download::Http { url } = &mut u.notice.download
                    {
                        *url = crate::rollout::without_query(url);
                    }
                }
                families
            },
        }
    }

    fn gateway(&self) -> crate::api::GatewayStatus {
        let core = &self.0;
        crate::api::GatewayStatus {
            product_key: core.gw.product_key.clone(),
            device_name: core.gw.device_name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            upstream: super::lock(&core.upstream_status).clone(),
        }
    }

    fn history(&self, pk: &str, dn: &str) -> Option<Vec<crate::api::ModuleHistory>> {
        let core = &self.0;
        let id = crate::ota::topics::DeviceId::new(pk, dn);
        let devices = core.devices();
        let leaves: Vec<_> = devices.all().iter().filter(|l| l.id == id).collect();
        if leaves.is_empty() {
            return None;
        }
        Some(
            leaves
                .into_iter()
                .map(|l| crate::api::ModuleHistory {
                    module: l.module.clone(),
                    entries: core.table.history(&l.id, &l.module),
                })
                .collect(),
        )
    }

    fn devices(&self) -> Vec<DeviceStatus> {
        let core = &self.0;
        let jobs = core.table.snapshot();
        let platform = core.publisher.platform();
        core.devices()
            .all()
            .iter()
            .map(|leaf| {
                let live = jobs.get(&(leaf.id.clone(), leaf.module.clone()));
                let job = live.map(|l| &l.record.job);
                DeviceStatus {
                    product_key: leaf.id.product_key.clone(),
                    device_name: leaf.id.device_name.clone(),
                    device: leaf.id.to_string(),
                    module: leaf.module.clone(),
                    family: leaf.family.clone(),
                    link: leaf.link.clone(),
                    version: core.table.version(leaf),
                    state: live.map_or("idle", JobTable::shown_state).to_string(),
                    progress: job.and_then(|j| match j.state() {
                        State::Succeeded { .. } => Some(100),
                        State::Failed { .. } => Some(j.furthest_percent()),
                        _ => j.percent(),
                    }),
                    target_version: job.map(|j| j.version().to_string()),
                    last_job_ms: job.and_then(|j| j.history().last().map(|t| t.at_ms)),
                    last_error: job
                        .and_then(|j| step_desc(j.state()).1)
                        .or_else(|| live.and_then(|l| l.last_error.clone())),
                    model: core.table.model(leaf),
                    bus: leaf.bus.clone(),
                    tags: leaf.tags.clone(),
                    platform: platform.as_ref().and_then(|all| {
                        all.iter()
                            .find(|p| {
                                p.product_key == leaf.id.product_key
                                    && p.device_name == leaf.id.device_name
                            })
                            .map(|p| DevicePlatform {
                                state: p.state,
                                last_error: p.last_error.clone(),
                                parked: p.parked,
                                held: p.held,
                            })
                    }),
                }
            })
            .collect()
    }

    fn campaigns(&self) -> Vec<crate::rollout::CampaignView> {
        let core = &self.0;
        core.campaigns
            .all()
            .iter()
            .map(|c| core.campaign_view(c))
            .collect()
    }

    fn campaign(&self, id: &str) -> Option<crate::rollout::CampaignView> {
        let core = &self.0;
        core.campaigns.get(id).map(|c| core.campaign_view(&c))
    }

    fn create_campaign(
        &self,
        req: crate::rollout::CampaignRequest,
    ) -> Reply<crate::rollout::CampaignView> {
        let core = self.0.clone();
        Box::pin(async move { core.create_campaign(req).await.map_err(api_error) })
    }

    fn campaign_verb(
        &self,
        id: String,
        verb: crate::rollout::Verb,
        reason: Option<String>,
    ) -> Reply<crate::rollout::CampaignView> {
        let core = self.0.clone();
        Box::pin(async move {
            core.campaign_verb(&id, verb, reason)
                .await
                .map_err(api_error)
        })
    }

    fn upload_image(&self, bytes: bytes::Bytes) -> Reply<crate::rollout::UploadedImage> {
        let core = self.0.clone();
        Box::pin(async move { core.upload_image(bytes).await.map_err(api_error) })
    }

    fn max_upload(&self) -> usize {
        usize::try_from(self.0.limits.max_image_bytes).unwrap_or(usize::MAX)
    }

    fn cache(&self) -> crate::api::CacheStatus {
        let core = &self.0;
        // Which leaves' current or last job is which image.
        let mut users: std::collections::HashMap<String, (Vec<String>, Vec<String>)> =
            Default::default();
        for l in core.table.snapshot().values() {
            let n = &l.record.notice;
            if let Ok(d) = crate::cache::Digest::from_sign(n.sign_method.wire_name(), &n.sign) {
                let (devices, versions) = users.entry(d.to_string()).or_default();
                devices.push(l.record.leaf.to_string());
                if !versions.contains(&n.version) {
                    versions.push(n.version.clone());
                }
            }
        }
        let list = core.cache.list();
        let (bytes, _) = core.cache.usage();
        crate::api::CacheStatus {
            cap_bytes: core.cache.cap(),
            bytes,
            images: list
                .into_iter()
                .map(|i| {
                    let key = i.digest.to_string();
                    // An uploaded image is found by its SHA-256 as well.
                    let (mut devices, mut versions) = users.remove(&key).unwrap_or_default();
                    if let Some(sha) = &i.sha256
                        && sha.to_string() != key
                        && let Some((d, v)) = users.remove(&sha.to_string())
                    {
                        devices.extend(d);
                        versions.extend(v);
                    }
                    devices.sort();
                    devices.dedup();
                    crate::api::CachedImageStatus {
                        digest: key,
                        size: i.size,
                        sha256: i.sha256.map(|d| d.hex().to_string()),
                        md5: i.md5.map(|d| d.hex().to_string()),
                        url: crate::rollout::without_query(&i.url),
                        state: match i.state {
                            crate::cache::ImageState::Complete => "complete",
                            _ => "partial",
                        }
                        .into(),
                        last_use_ms: i.last_use_ms,
                        pins: i.pins,
                        downloading: i.downloading,
                        devices,
                        versions,
                    }
                })
                .collect(),
        }
    }

    fn outbox(&self) -> crate::api::OutboxStatus {
        let (depth, oldest_since_ms) = self.0.publisher.outbox();
        crate::api::OutboxStatus {
            depth,
            oldest_since_ms,
        }
    }

    fn metrics(&self) -> String {
        let core = &self.0;
        let devices = self.devices();
        let (cache_bytes, cache_images) = core.cache.usage();
        let (outbox_messages, oldest) = core.publisher.outbox();
        let plugins = self.plugins();
        let g = crate::metrics::Gauges {
            leaves: devices.into_iter().map(|d| (d.family, d.state)).collect(),
            cache_bytes,
            cache_images,
            cache_cap_bytes: core.cache.cap(),
            upstream_connected: super::lock(&core.upstream_status).connected,
            outbox_messages,
            outbox_oldest_seconds: oldest
                .map(|since| core.table.now_ms().saturating_sub(since) as f64 / 1000.0),
            plugins_loaded: plugins.loaded.len(),
            plugins_broken: plugins.broken.len(),
            campaigns: core
                .campaigns
                .all()
                .iter()
                .map(|c| c.state.name().to_string())
                .collect(),
        };
        core.metrics.render(&g)
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.0.table.watch())
    }

    fn ready(&self) -> Vec<crate::api::Check> {
        let core = &self.0;
        let families = core.plugins.families();
        let broken = core.plugins.broken().len();
        let upstream = super::lock(&core.upstream_status).clone();
        vec![
            match core.table.store_ok() {
                Ok(()) => crate::api::Check {
                    name: "store".into(),
                    ok: true,
                    detail: "open".into(),
                },
                Err(e) => crate::api::Check {
                    name: "store".into(),
                    ok: false,
                    detail: e.to_string(),
                },
            },
            crate::api::Check {
                name: "plugins".into(),
                ok: !families.is_empty(),
                detail: format!(
                    "{} loaded, {broken} broken{}",
                    families.len(),
                    if families.is_empty() {
                        ": copy the device families' .wasm files into the plugins directory"
                    } else {
                        ""
                    }
                ),
            },
            crate::api::Check {
                name: "upstream".into(),
                ok: upstream.connected,
                detail: if upstream.connected {
                    "connected".into()
                } else {
                    format!(
                        "not connected{}",
                        upstream
                            .last_error
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    )
                },
            },
        ]
    }

    fn jobs(&self) -> Vec<JobStatus> {
        self.0
            .table
            .snapshot()
            .values()
            .map(|l| {
                let job = &l.record.job;
                let (step, desc) = step_desc(job.state());
                JobStatus {
                    product_key: l.record.leaf.product_key.clone(),
                    device_name: l.record.leaf.device_name.clone(),
                    device: l.record.leaf.to_string(),
                    module: l.record.module.clone(),
                    target_version: job.version().to_string(),
                    state: JobTable::shown_state(l).to_string(),
                    progress: job.furthest_percent(),
                    step,
                    desc,
                    updated_ms: job.history().last().map_or(0, |t| t.at_ms),
                }
            })
            .collect()
    }
}
