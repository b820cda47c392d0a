//! The local HTTP status API: `GET /api/devices`, `GET /api/jobs` and
//! `GET /api/plugins`, JSON.
//! The platform console's upgrading / succeeded / failed views, at the edge.
//!
//! It reads a [`StatusSource`] and changes nothing; it binds nothing itself
//! (the caller hands it a listener, so tests use port 0).

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use crate::upstream::presence::PlatformState;

/// One leaf as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub product_key: String,
    pub device_name: String,
    pub module: String,
    pub family: String,
    pub link: String,
    /// The version last read back from the leaf (or configured).
    pub version: String,
    /// idle, queued, downloading, verifying, flashing, identifying, succeeded, failed.
    pub state: String,
    /// Overall percent of the current or last job.
    pub progress: Option<u8>,
    /// The version the current or last job installs.
    pub target_version: Option<String>,
    /// Why the last job failed.
    pub last_error: Option<String>,
    /// Where the leaf stands with the platform (aliyun mode only: a plain
    /// broker needs no topology or login).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<DevicePlatform>,
}

/// A leaf's sub-device state at the platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePlatform {
    /// not_in_topology, adding, in_topology, logging_in, online.
    pub state: PlatformState,
    /// The last refusal or missing reply, until the next success.
    pub last_error: Option<String>,
    /// Not tried again until otagw restarts (or the console brings the
    /// leaf back): a wrong secret, a deleted or disabled device.
    pub parked: bool,
    /// Messages for it waiting until it is online.
    pub held: usize,
}

/// One job as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub device: String,
    pub module: String,
    pub version: String,
    pub state: String,
    pub progress: u8,
    /// The upstream step code of a failure.
    pub step: Option<i32>,
    pub desc: Option<String>,
    pub updated_ms: u64,
}

/// A plugin in service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginStatus {
    pub family: String,
    pub version: String,
    pub contract: String,
    pub path: String,
    pub sha256: String,
}

/// A plugin file that did not load, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokenPlugin {
    pub path: String,
    pub error: String,
}

/// The plugins directory as the gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PluginsStatus {
    pub loaded: Vec<PluginStatus>,
    pub broken: Vec<BrokenPlugin>,
    /// Remote updates per family: the security floor, the update under way
    /// or on probation, the versions rolled back.
    #[serde(default)]
    pub updates: std::collections::BTreeMap<String, crate::plugin::ledger::FamilyRecord>,
}

/// Where the API gets its answers.
pub trait StatusSource: Send + Sync + 'static {
    fn devices(&self) -> Vec<DeviceStatus>;
    fn jobs(&self) -> Vec<JobStatus>;
    fn plugins(&self) -> PluginsStatus {
        PluginsStatus::default()
    }
}

/// The API's routes over a source.
pub fn router(source: Arc<dyn StatusSource>) -> Router {
    Router::new()
        .route("/api/devices", get(devices))
        .route("/api/jobs", get(jobs))
        .route("/api/plugins", get(plugins))
        .with_state(source)
}

async fn devices(State(s): State<Arc<dyn StatusSource>>) -> Json<Vec<DeviceStatus>> {
    Json(s.devices())
}

async fn jobs(State(s): State<Arc<dyn StatusSource>>) -> Json<Vec<JobStatus>> {
    Json(s.jobs())
}

async fn plugins(State(s): State<Arc<dyn StatusSource>>) -> Json<PluginsStatus> {
    Json(s.plugins())
}

/// Serve the API on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    source: Arc<dyn StatusSource>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(source))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
