//! The local HTTP API, JSON:
//!
//! - `GET /api/gateway`: the gateway's identity, version and upstream
//!   connection;
//! - `GET /api/devices`: every leaf; `version` is what it runs,
//!   `target_version` what its current or last job installs;
//! - `GET /api/devices/{pk}/{dn}/history`: its last ended jobs and refused
//!   notices, per module, oldest first;
//! - `GET /api/jobs`: every job (the last per leaf and module);
//! - `GET /api/plugins`: plugins loaded and broken, remote updates;
//! - `GET /api/versions`: how many leaves run which version, per family,
//!   model and module (the console's version distribution);
//! - `GET /api/campaigns`, `GET /api/campaigns/{id}`: rollouts and their
//!   members' progress;
//! - `POST /api/campaigns` (a [`crate::rollout::CampaignRequest`]),
//!   `POST /api/campaigns/{id}/{pause|resume|stop|approve|retry}` and
//!   `POST /api/images` (an image's bytes, kept in the cache for a campaign).
//!
//! Every `POST` needs the API token (`Authorization: Bearer TOKEN`, the
//! contents of `[api] token_file`): 401 without it, 403 with another one.
//! Errors are JSON `{"error": "..."}` saying what to do; an unknown path
//! answers 404 listing the paths.
//!
//! Devices and jobs name a leaf the same way: `product_key`, `device_name`
//! and `device` (`pk/dn`), and `module`.
//! The platform console's upgrading / succeeded / failed views, at the edge.
//!
//! It binds nothing itself (the caller hands it a listener, so tests use
//! port 0).

pub mod tls;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use crate::rollout::Verb;
use crate::rollout::{CampaignRequest, CampaignView, UploadedImage, VerbRequest, VersionCount};

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
    /// The hardware id (else model) `identify` last read from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Its bus (`[[bus]]` name, `ble`, or its own link).
    #[serde(default)]
    pub bus: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
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
    /// Every campaign, oldest first.
    fn campaigns(&self) -> Vec<CampaignView> {
        Vec::new()
    }
    fn campaign(&self, _id: &str) -> Option<CampaignView> {
        None
    }
    /// Start a campaign.
    fn create_campaign(&self, _req: CampaignRequest) -> Reply<CampaignView> {
        unavailable()
    }
    /// A verb on a campaign, with the operator's reason.
    fn campaign_verb(
        &self,
        _id: String,
        _verb: Verb,
        _reason: Option<String>,
    ) -> Reply<CampaignView> {
        unavailable()
    }
    /// Keep an uploaded image in the cache.
    fn upload_image(&self, _bytes: bytes::Bytes) -> Reply<UploadedImage> {
        unavailable()
    }
    /// The largest image `POST /api/images` takes.
    fn max_upload(&self) -> usize {
        0
    }
}

/// An answer that takes work (and may be refused).
pub type Reply<T> = futures_util::future::BoxFuture<'static, Result<T, ApiError>>;

/// A refused request: its status and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: axum::http::StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: axum::http::StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        error(self.status, self.message)
    }
}

fn unavailable<T: Send + 'static>() -> Reply<T> {
    Box::pin(async {
        Err(ApiError::new(
            axum::http::StatusCode::NOT_IMPLEMENTED,
            "not available here",
        ))
    })
}

/// The version distribution of `devices`.
pub fn versions(devices: &[DeviceStatus]) -> Vec<VersionCount> {
    let mut by: std::collections::BTreeMap<(String, Option<String>, String, String), Vec<String>> =
        Default::default();
    for d in devices {
        by.entry((
            d.family.clone(),
            d.model.clone(),
            d.module.clone(),
            d.version.clone(),
        ))
        .or_default()
        .push(d.device.clone());
    }
    by.into_iter()
        .map(|((family, model, module, version), devices)| VersionCount {
            family,
            model,
            module,
            version,
            count: devices.len(),
            devices,
        })
        .collect()
}

/// The API's paths, for the 404 answer.
const PATHS: &str = "GET /api/gateway, /api/devices, /api/devices/{pk}/{dn}/history, /api/jobs, \
                     /api/plugins, /api/versions, /api/campaigns[/{id}]; POST /api/campaigns, \
                     /api/campaigns/{id}/{pause|resume|stop|approve|retry}, /api/images";

/// What the API's handlers share.
#[derive(Clone)]
struct Api {
    source: Arc<dyn StatusSource>,
    /// What `POST` requests must carry; `None`: every `POST` is refused.
    token: Option<Arc<str>>,
}

/// The API's routes over a source; changing requests need `token`.
pub fn router(source: Arc<dyn StatusSource>, token: Option<String>) -> Router {
    let max = source.max_upload();
    let api = Api {
        source,
        token: token.map(Arc::from),
    };
    let changing = Router::new()
        .route("/api/campaigns", post(create_campaign))
        .route("/api/campaigns/{id}/{verb}", post(campaign_verb))
        .route(
            "/api/images",
            post(upload_image).layer(axum::extract::DefaultBodyLimit::max(max)),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            api.clone(),
            require_token,
        ));
    Router::new()
        .route("/api/gateway", get(gateway))
        .route("/api/devices", get(devices))
        .route("/api/devices/{pk}/{dn}/history", get(history))
        .route("/api/jobs", get(jobs))
        .route("/api/plugins", get(plugins))
        .route("/api/versions", get(versions_of))
        .route("/api/campaigns", get(campaigns))
        .route("/api/campaigns/{id}", get(campaign))
        .merge(changing)
        .fallback(not_found)
        .with_state(api)
}

/// Compare without an early exit (the token's length is not secret).
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(
    State(api): State<Api>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = &api.token else {
        return error(
            StatusCode::FORBIDDEN,
            "this API has no token configured: changing requests are refused".into(),
        );
    };
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110 11.1).
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        });
    match given {
        None => error(
            StatusCode::UNAUTHORIZED,
            "this request needs the API token: send `Authorization: Bearer TOKEN` with the \
             contents of [api] token_file (otagw upgrade and otagw campaign read it)"
                .into(),
        ),
        Some(t) if same_token(t.trim().as_bytes(), token.as_bytes()) => next.run(req).await,
        Some(_) => error(
            StatusCode::FORBIDDEN,
            "wrong API token: use the contents of [api] token_file of this gateway".into(),
        ),
    }
}

async fn versions_of(State(api): State<Api>) -> Json<Vec<VersionCount>> {
    Json(versions(&api.source.devices()))
}

async fn campaigns(State(api): State<Api>) -> Json<Vec<CampaignView>> {
    Json(api.source.campaigns())
}

async fn campaign(State(api): State<Api>, Path(id): Path<String>) -> Response {
    match api.source.campaign(&id) {
        Some(c) => Json(c).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no campaign {id} (GET /api/campaigns lists them)"),
        ),
    }
}

/// A JSON body, or a 400 saying what is wrong with it.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the request body is not a valid request: {e}"),
        )
    })
}

async fn create_campaign(State(api): State<Api>, body: bytes::Bytes) -> Response {
    let req: CampaignRequest = match json_body(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match api.source.create_campaign(req).await {
        Ok(c) => (StatusCode::CREATED, Json(c)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn campaign_verb(
    State(api): State<Api>,
    Path((id, verb)): Path<(String, String)>,
    body: bytes::Bytes,
) -> Response {
    let Some(v) = Verb::parse(&verb) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no verb {verb:?}: use pause, resume, stop, approve or retry"),
        );
    };
    let req: VerbRequest = if body.is_empty() {
        VerbRequest::default()
    } else {
        match json_body(&body) {
            Ok(r) => r,
            Err(e) => return e.into_response(),
        }
    };
    match api.source.campaign_verb(id, v, req.reason).await {
        Ok(c) => Json(c).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn upload_image(State(api): State<Api>, body: bytes::Bytes) -> Response {
    match api.source.upload_image(body).await {
        Ok(i) => (StatusCode::CREATED, Json(i)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}; the API has {PATHS}", uri.path()),
    )
}

async fn gateway(State(api): State<Api>) -> Json<GatewayStatus> {
    Json(api.source.gateway())
}

async fn history(State(api): State<Api>, Path((pk, dn)): Path<(String, String)>) -> Response {
    match api.source.history(&pk, &dn) {
        Some(h) => Json(h).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no device {pk}/{dn} on this gateway (GET /api/devices lists them)"),
        ),
    }
}

async fn devices(State(api): State<Api>) -> Json<Vec<DeviceStatus>> {
    Json(api.source.devices())
}

async fn jobs(State(api): State<Api>) -> Json<Vec<JobStatus>> {
    Json(api.source.jobs())
}

async fn plugins(State(api): State<Api>) -> Json<PluginsStatus> {
    Json(api.source.plugins())
}

/// Serve the API on `listener` (over TLS with `tls`) until `shutdown` is
/// cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    source: Arc<dyn StatusSource>,
    token: Option<String>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(source, token);
    let stop = shutdown.clone();
    let stopped = async move { stop.cancelled().await };
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
        }
        Some(config) => {
            let listener = tls::TlsListener::new(listener, config, shutdown)?;
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
        }
    }
}

/// The API token in `path`, trimmed.
pub fn read_token(path: &std::path::Path) -> std::io::Result<String> {
    let t = std::fs::read_to_string(path)?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(t)
}

/// The API token in `path`, made when the file is missing: 32 random
/// bytes from the kernel, as hex, in a file only its owner can read.
/// Returns whether it was made.
pub fn load_or_create_token(path: &std::path::Path) -> std::io::Result<(String, bool)> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    match read_token(path) {
        Ok(t) => return Ok((t, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    let token = hex::encode(raw);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(format!("{token}\n").as_bytes())?;
    f.sync_all()?;
    Ok((token, true))
}
