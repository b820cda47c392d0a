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
            updates: self.0.updates.snapshot().families,
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
