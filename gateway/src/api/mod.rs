//! The local HTTP status API, JSON:
//!
//! - `GET /api/gateway`: the gateway's identity, version and upstream
//!   connection;
//! - `GET /api/devices`: every leaf; `version` is what it runs,
//!   `target_version` what its current or last job installs;
//! - `GET /api/devices/{pk}/{dn}/history`: its last ended jobs and refused
//!   notices, per module, oldest first;
//! - `GET /api/jobs`: every job (the last per leaf and module);
//! - `GET /api/plugins`: plugins loaded and broken, remote updates.
//!
//! Devices and jobs name a leaf the same way: `product_key`, `device_name`
//! and `device` (`pk/dn`), and `module`. An unknown path answers 404 with a
//! JSON `error` listing these.
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
    /// `product_key/device_name`.
    #[serde(default)]
    pub device: String,
    pub module: String,
    pub family: String,
    pub link: String,
    /// The version last read back from the leaf (or configured).
    pub version: String,
    /// idle, queued, downloading, verifying, flashing, identifying, succeeded, failed.
    pub state: String,
    /// Overall percent of the current or last job (how far a failed one
    /// got).
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
    pub product_key: String,
    pub device_name: String,
    /// `product_key/device_name`.
    pub device: String,
    pub module: String,
    /// The version the job installs.
    pub target_version: String,
    pub state: String,
    /// Overall percent (how far a failed job got).
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

/// The gateway itself.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub product_key: String,
    pub device_name: String,
    /// otagw's version.
    pub version: String,
    pub upstream: UpstreamStatus,
}

/// The upstream MQTT session.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub connected: bool,
    /// Since when it is connected or disconnected (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Why the last connection ended.
    pub last_error: Option<String>,
}

/// One module's history of a leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleHistory {
    pub module: String,
    pub entries: Vec<crate::ota::journal::HistoryEntry>,
}

/// Where the API gets its answers.
pub trait StatusSource: Send + Sync + 'static {
    fn devices(&self) -> Vec<DeviceStatus>;
    fn jobs(&self) -> Vec<JobStatus>;
    fn plugins(&self) -> PluginsStatus {
        PluginsStatus::default()
    }
    fn gateway(&self) -> GatewayStatus {
        GatewayStatus::default()
    }
    /// The history of the leaf `pk/dn`; `None` when there is no such leaf.
    fn history(&self, _pk: &str, _dn: &str) -> Option<Vec<ModuleHistory>> {
        None
    }
}

/// The API's paths, for the 404 answer.
const PATHS: &str = "/api/gateway, /api/devices, /api/devices/{pk}/{dn}/history, /api/jobs, \
                     /api/plugins";

/// The API's routes over a source.
pub fn router(source: Arc<dyn StatusSource>) -> Router {
    Router::new()
        .route("/api/gateway", get(gateway))
        .route("/api/devices", get(devices))
        .route("/api/devices/{pk}/{dn}/history", get(history))
        .route("/api/jobs", get(jobs))
        .route("/api/plugins", get(plugins))
        .fallback(not_found)
        .with_state(source)
}

fn error(status: axum::http::StatusCode, message: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    error(
        axum::http::StatusCode::NOT_FOUND,
        format!("no such endpoint: {}; the API has {PATHS}", uri.path()),
    )
}

async fn gateway(State(s): State<Arc<dyn StatusSource>>) -> Json<GatewayStatus> {
    Json(s.gateway())
}

async fn history(
    State(s): State<Arc<dyn StatusSource>>,
    axum::extract::Path((pk, dn)): axum::extract::Path<(String, String)>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match s.history(&pk, &dn) {
        Some(h) => Json(h).into_response(),
        None => error(
            axum::http::StatusCode::NOT_FOUND,
            format!("no device {pk}/{dn} on this gateway (GET /api/devices lists them)"),
        ),
    }
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
