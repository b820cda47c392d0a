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
//! - `GET /api/overview`, `GET /api/cache`: the dashboard's overview and
//!   the firmware cache with the leaves using each image;
//! - `GET /api/events`: server-sent events of every change (see [`events`]);
//! - `GET /metrics`: Prometheus text format; `GET /healthz`, `GET /readyz`;
//! - `GET /`: the dashboard (see [`dashboard`]), `GET /api/session`,
//!   `POST /api/login`, `POST /api/logout`.
//!
//! Every `POST` needs the API token (`Authorization: Bearer TOKEN`, the
//! contents of `[api] token_file`) or a dashboard session: 401 without it,
//! 403 with another one; reads need one when the API listens beyond
//! loopback ([`auth`]). Errors are JSON `{"error": "..."}` saying what to
//! do; an unknown path answers 404 listing the paths.
//!
//! Devices and jobs name a leaf the same way: `product_key`, `device_name`
//! and `device` (`pk/dn`), and `module`.
//! The platform console's upgrading / succeeded / failed views, at the edge.
//!
//! It binds nothing itself (the caller hands it a listener, so tests use
//! port 0).

pub mod auth;
pub mod dashboard;
pub mod events;
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
    /// When its current or last job last changed (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_job_ms: Option<u64>,
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
    #[serde(default)]
    pub description: String,
    /// The kinds of link it works over (serial, tcp, ble).
    #[serde(default)]
    pub transports: Vec<String>,
    /// Its device options' schema (name, kind, default, required, secret,
    /// doc); `null` for a contract 0.1 plugin, which has none.
    #[serde(default)]
    pub options: serde_json::Value,
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

/// The outbox of durable messages for the upstream broker.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OutboxStatus {
    pub depth: usize,
    /// Since when (ms since the epoch) the oldest has waited (since this
    /// start at most).
    pub oldest_since_ms: Option<u64>,
}

/// One image in the firmware cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedImageStatus {
    /// `sha256:HEX` or `md5:HEX`: what the cache keys it by.
    pub digest: String,
    pub size: u64,
    pub sha256: Option<String>,
    pub md5: Option<String>,
    /// Where it came from (the query string, which may hold a signature,
    /// is left out).
    pub url: String,
    /// complete or partial.
    pub state: String,
    pub last_use_ms: u64,
    /// Jobs holding it now.
    pub pins: usize,
    pub downloading: bool,
    /// The leaves whose current or last job is this image (`pk/dn`).
    pub devices: Vec<String>,
    /// The versions notices named it by.
    pub versions: Vec<String>,
}

/// The firmware cache.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CacheStatus {
    pub cap_bytes: u64,
    /// Bytes of complete images.
    pub bytes: u64,
    pub images: Vec<CachedImageStatus>,
}

/// The dashboard's first view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overview {
    pub gateway: GatewayStatus,
    /// How many leaves are in each state.
    pub states: std::collections::BTreeMap<String, usize>,
    pub versions: Vec<VersionCount>,
    pub outbox: OutboxStatus,
    pub cache: CacheUse,
    pub plugins: PluginCounts,
    pub jobs: JobCounts,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheUse {
    pub bytes: u64,
    pub images: usize,
    pub cap_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginCounts {
    pub loaded: usize,
    pub broken: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCounts {
    /// Holding their link: downloading to identifying.
    pub running: usize,
    pub queued: usize,
}

/// One readiness check of `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
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
    fn cache(&self) -> CacheStatus {
        CacheStatus::default()
    }
    fn outbox(&self) -> OutboxStatus {
        OutboxStatus::default()
    }
    /// `/metrics` in Prometheus text format.
    fn metrics(&self) -> String {
        String::new()
    }
    /// Changes on every change of what the API shows (`None`: never).
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
    /// What `/readyz` checks.
    fn ready(&self) -> Vec<Check> {
        Vec::new()
    }
}

/// The overview of `source`'s state.
pub fn overview(source: &dyn StatusSource) -> Overview {
    let devices = source.devices();
    let mut states = std::collections::BTreeMap::new();
    for d in &devices {
        *states.entry(d.state.clone()).or_insert(0) += 1;
    }
    let queued = states.get("queued").copied().unwrap_or(0);
    let running = ["downloading", "verifying", "flashing", "identifying"]
        .iter()
        .map(|s| states.get(*s).copied().unwrap_or(0))
        .sum();
    let cache = source.cache();
    let plugins = source.plugins();
    Overview {
        gateway: source.gateway(),
        versions: versions(&devices),
        states,
        outbox: source.outbox(),
        cache: CacheUse {
            bytes: cache.bytes,
            images: cache
                .images
                .iter()
                .filter(|i| i.state == "complete")
                .count(),
            cap_bytes: cache.cap_bytes,
        },
        plugins: PluginCounts {
            loaded: plugins.loaded.len(),
            broken: plugins.broken.len(),
        },
        jobs: JobCounts { running, queued },
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
const PATHS: &str = "GET / (the dashboard), /api/gateway, /api/overview, /api/devices, \
                     /api/devices/{pk}/{dn}/history, /api/jobs, /api/plugins, /api/cache, \
                     /api/versions, /api/campaigns[/{id}], /api/events, /api/session, /metrics, \
                     /healthz, /readyz; POST /api/campaigns, \
                     /api/campaigns/{id}/{pause|resume|stop|approve|retry}, /api/images, \
                     /api/login, /api/logout";

/// What the API's handlers share.
#[derive(Clone)]
struct Api {
    source: Arc<dyn StatusSource>,
    /// Cancelled at shutdown: event streams end so the server can stop.
    stop: CancellationToken,
    /// Who may read: an event stream ends when its reader may no longer.
    auth: Arc<auth::Auth>,
}

/// The API's routes over a source, behind `auth`; event streams end when
/// `stop` is cancelled.
pub fn router(
    source: Arc<dyn StatusSource>,
    auth: Arc<auth::Auth>,
    stop: CancellationToken,
) -> Router {
    let max = source.max_upload();
    let api = Api {
        source,
        stop,
        auth: auth.clone(),
    };
    let gated = Router::new()
        .route("/api/campaigns", post(create_campaign).get(campaigns))
        .route("/api/campaigns/{id}/{verb}", post(campaign_verb))
        .route(
            "/api/images",
            post(upload_image).layer(axum::extract::DefaultBodyLimit::max(max)),
        )
        .route("/api/gateway", get(gateway))
        .route("/api/overview", get(overview_of))
        .route("/api/devices", get(devices))
        .route("/api/devices/{pk}/{dn}/history", get(history))
        .route("/api/jobs", get(jobs))
        .route("/api/plugins", get(plugins))
        .route("/api/cache", get(cache))
        .route("/api/versions", get(versions_of))
        .route("/api/campaigns/{id}", get(campaign))
        .route("/api/events", get(events::events))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            auth.clone(),
            auth::gate,
        ))
        .with_state(api.clone());
    let open = Router::new()
        .route("/api/session", get(auth::session))
        .route("/api/login", post(auth::login))
        .route("/api/logout", post(auth::logout))
        .with_state(auth);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(api)
        .merge(dashboard::routes())
        .merge(open)
        .merge(gated)
        .fallback(not_found)
        .layer(
            tower_http::set_header::SetResponseHeaderLayer::if_not_present(
                axum::http::header::X_CONTENT_TYPE_OPTIONS,
                axum::http::HeaderValue::from_static("nosniff"),
            ),
        )
        .layer(tower_http::compression::CompressionLayer::new().gzip(true))
}

async fn overview_of(State(api): State<Api>) -> Json<Overview> {
    Json(overview(api.source.as_ref()))
}

async fn cache(State(api): State<Api>) -> Json<CacheStatus> {
    Json(api.source.cache())
}

async fn metrics(State(api): State<Api>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        api.source.metrics(),
    )
        .into_response()
}

/// The process answers: for a supervisor's liveness probe.
async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 when every check passes, 503 naming the ones that fail; the
/// details (an upstream error names the broker) only to who may read.
async fn readyz(State(api): State<Api>, headers: axum::http::HeaderMap) -> Response {
    let mut checks = api.source.ready();
    if !api.auth.may_read(&headers) {
        for c in &mut checks {
            c.detail.clear();
        }
    }
    let ready = checks.iter().all(|c| c.ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({ "ready": ready, "checks": checks })),
    )
        .into_response()
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
    // Reads are open only while nothing beyond this machine can connect.
    let reads_open = listener.local_addr()?.ip().is_loopback();
    let auth = Arc::new(auth::Auth::new(token, reads_open, tls.is_some()));
    let app = router(source, auth, shutdown.clone());
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

/// The shortest API token the gateway accepts (the one it makes has 64).
pub const MIN_TOKEN_CHARS: usize = 16;

/// The API token in `path`, made when the file is missing: 32 random
/// bytes from the kernel, as hex, in a file only its owner can read.
/// Returns whether it was made.
pub fn load_or_create_token(path: &std::path::Path) -> std::io::Result<(String, bool)> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    match read_token(path) {
        Ok(t) if t.chars().count() < MIN_TOKEN_CHARS => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "it holds {} characters, and an API token needs at least {MIN_TOKEN_CHARS} \
                     (anyone who can reach the API could guess a short one): delete the file \
                     and the gateway makes a random one",
                    t.chars().count()
                ),
            ));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_made_once_and_a_short_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/api-token");
        let (made, fresh) = load_or_create_token(&path).unwrap();
        assert!(fresh);
        assert_eq!(made.len(), 64);
        assert_eq!(load_or_create_token(&path).unwrap(), (made, false));
        std::fs::write(&path, "hunter2\n").unwrap();
        let e = load_or_create_token(&path).unwrap_err();
        assert!(e.to_string().contains("at least 16"), "{e}");
    }
}
