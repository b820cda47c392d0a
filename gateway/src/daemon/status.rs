//! The daemon's answers to the status API.

use std::sync::Arc;

use super::Core;
use super::table::JobTable;
use crate::api::{DevicePlatform, DeviceStatus, JobStatus, StatusSource};
use crate::ota::job::State;

pub(super) struct Status(pub Arc<Core>);

fn step_desc(state: &State) -> (Option<i32>, Option<String>) {
    match state {
        State::Failed { step, desc } => (Some(step.code()), Some(desc.clone())),
        _ => (None, None),
    }
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

    fn devices(&self) -> Vec<DeviceStatus> {
        let core = &self.0;
        let jobs = core.table.snapshot();
        let platform = core.publisher.platform();
        core.devices
            .all()
            .iter()
            .map(|leaf| {
                let live = jobs.get(&(leaf.id.clone(), leaf.module.clone()));
                let job = live.map(|l| &l.record.job);
                DeviceStatus {
                    product_key: leaf.id.product_key.clone(),
                    device_name: leaf.id.device_name.clone(),
                    module: leaf.module.clone(),
                    family: leaf.family.clone(),
                    link: leaf.link.clone(),
                    version: core.table.version(leaf),
                    state: live.map_or("idle", JobTable::shown_state).to_string(),
                    progress: job.and_then(|j| match j.state() {
                        State::Succeeded { .. } => Some(100),
                        _ => j.percent(),
                    }),
                    target_version: job.map(|j| j.version().to_string()),
                    last_error: job
                        .and_then(|j| step_desc(j.state()).1)
                        .or_else(|| live.and_then(|l| l.last_error.clone())),
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

    fn jobs(&self) -> Vec<JobStatus> {
        self.0
            .table
            .snapshot()
            .values()
            .map(|l| {
                let job = &l.record.job;
                let (step, desc) = step_desc(job.state());
                JobStatus {
                    device: l.record.leaf.to_string(),
                    module: l.record.module.clone(),
                    version: job.version().to_string(),
                    state: JobTable::shown_state(l).to_string(),
                    progress: match job.state() {
                        State::Succeeded { .. } => 100,
                        s => crate::ota::job::overall_percent(s).unwrap_or(0),
                    },
                    step,
                    desc,
                    updated_ms: job.history().last().map_or(0, |t| t.at_ms),
                }
            })
            .collect()
    }
}
