//! The gateway's MQTT session to the cloud (or to a plain broker): one rumqttc
//! connection with the three auth modes of protocol.md (`none`, `password`,
//! aliyun HMAC signing), TLS with rustls for `mqtts://`, reconnection with
//! capped exponential backoff, subscriptions renewed after every connect, the
//! aliyun sub-device handshake (`topo/add`, `combine/batch_login`) and a
//! durable outbox in sled for the messages that must not be lost.
//!
//! It knows topics and bytes, not OTA payloads or plugins: `ota/` builds the
//! payloads, the daemon decides what to subscribe and publish.
//!
//! ```text
//! Upstream (Clone handle) ──publish/subscribe──▶ rumqttc AsyncClient ─▶ request channel
//!        │ Durable: outbox.push + flush first       ▲                 │
//!        │ a leaf not online (aliyun): held in       │ control task:   ▼
//!        │ `presence` until its login                │ subscribe, topo/add,   driver task:
//!        ▼                                           │ batch_login, outbox    EventLoop::poll
//!    sled `outbox` ◀── remove on PUBACK ─────────────┼─ replay, held messages ──▶ UpstreamEvent
//!                                                    │ of leaves coming online
//!                                     ConnAck, sub-device replies, topo/change,
//!                                     /ext/error (driver → presence → control);
//!                                     error → reset client state, every leaf offline,
//!                                     backoff, retry
//! ```
//!
//! - [`auth`]: signing (pure functions).
//! - [`outbox`]: the typed `outbox` tree.
//! - [`subdevices`]: `topo/add` / `batch_login` payloads and replies (sans-I/O).
//! - [`presence`]: each leaf's platform state (topology, login, retries) and
//!   the messages held until it is online (sans-I/O).
//! - `transport`: URL and TLS (rustls, ring) setup.
//! - `session`: the driver task.

pub mod auth;
pub mod outbox;
pub mod presence;
mod session;
pub mod subdevices;
mod transport;

#[cfg(test)]
mod testbroker;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::store::Store;
pub use outbox::{Outbox, OutboxEntry};
pub use subdevices::SubDeviceRequest;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `mqtt://host[:1883]` or `mqtts://host[:8883]`.
    pub url: String,
    pub auth: Auth,
    /// The MQTT client id (with aliyun, the `{id}` part of the signed client
    /// id). Default: `{productKey}.{deviceName}` of the gateway.
    pub client_id: Option<String>,
    /// 30..=1200 s (the platform's range); default 60 s.
    pub keep_alive: Duration,
    /// `mqtts://` only: a PEM file of extra CA certificates, trusted in
    /// addition to the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Delay between connection attempts.
    pub backoff: Backoff,
    /// The largest MQTT packet taken or sent, in bytes. A larger incoming
    /// one drops the connection (rumqttc cannot skip it).
    pub max_packet: usize,
    /// Aliyun mode: how long to wait for a sub-device reply, and the retry
    /// backoff.
    pub subdevice_timing: presence::Timing,
    /// Aliyun mode: also remove leaves no longer configured from the
    /// gateway's topology (`topo/delete`), not only log them out.
    pub delete_removed_leaves: bool,
}

impl UpstreamConfig {
    /// A config with the defaults for everything but the URL and auth.
    pub fn new(url: impl Into<String>, auth: Auth) -> UpstreamConfig {
        UpstreamConfig {
            url: url.into(),
            auth,
            client_id: None,
            keep_alive: DEFAULT_KEEP_ALIVE,
            ca_file: None,
            backoff: Backoff::default(),
            max_packet: DEFAULT_MAX_PACKET,
            subdevice_timing: presence::Timing::default(),
            delete_removed_leaves: false,
        }
    }
}

pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Notices carry URLs and extData (the platform's are a few KiB); a broker
/// may hold larger retained messages on our topics.
pub const DEFAULT_MAX_PACKET: usize = 16 << 20;
/// The platform rejects a keep-alive outside this range.
pub const KEEP_ALIVE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(30)..=Duration::from_secs(1200);

/// Reconnection delays: `initial`, doubled after each failure up to `max`,
/// back to `initial` after a connection that stayed up for 30 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// How the gateway authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// Anonymous (a local or test broker).
    None,
    /// Plain MQTT username and password.
    Password { username: String, password: String },
    /// Alibaba Cloud IoT device signing (HMAC-SHA256); also turns on the
    /// sub-device handshake for the leaves.
    Aliyun {
        product_key: String,
        device_name: String,
        device_secret: String,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Password { username, .. } => f
                .debug_struct("Password")
                .field("username", username)
                .finish_non_exhaustive(),
            Auth::Aliyun {
                product_key,
                device_name,
                ..
            } => f
                .debug_struct("Aliyun")
                .field("product_key", product_key)
                .field("device_name", device_name)
                .finish_non_exhaustive(),
        }
    }
}

/// A device identity upstream: the gateway's own, or a leaf's.
#[derive(Clone, PartialEq, Eq)]
pub struct SubDevice {
    pub product_key: String,
    pub device_name: String,
    /// Needed for leaves in aliyun mode only (to sign `topo/add` and login).
    pub device_secret: Option<String>,
}

impl std::fmt::Debug for SubDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubDevice")
            .field("product_key", &self.product_key)
            .field("device_name", &self.device_name)
            .field("device_secret", &self.device_secret.as_ref().map(|_| "…"))
            .finish()
    }
}

/// How hard to try delivering a publish. Both are QoS 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Kept in memory only: refused while disconnected
    /// ([`UpstreamError::NotConnected`]), lost if the connection drops before
    /// the broker's PUBACK. For progress, informs sent on every connect.
    BestEffort,
    /// Stored in the outbox (and flushed to disk) before anything else, sent
    /// now if connected, re-sent after every (re)connect and restart until
    /// PUBACKed. May arrive more than once, never zero times.
    Durable,
}

/// What the session reports, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamEvent {
    /// The broker accepted the connection. Subscriptions and (aliyun) the
    /// sub-device requests were queued before this event, so whatever is
    /// published after it goes out after them.
    Connected { session_present: bool },
    /// The connection was lost, or an attempt failed (e.g. refused: bad
    /// username or password). The next attempt comes after `retry_in`.
    Disconnected { reason: String, retry_in: Duration },
    /// A publish on a subscribed topic (the sub-device `_reply`s,
    /// `topo/change` and `/ext/error` excepted: the session handles those).
    Message { topic: String, payload: Bytes },
    /// The platform's answer to a sub-device request (aliyun mode), after
    /// the session acted on it: `code` 200 is success.
    SubDevices {
        request: SubDeviceRequest,
        code: i64,
        message: String,
    },
}

/// Errors of the upstream session, each naming the phase that failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream config: {0}")]
    Config(String),
    #[error("upstream url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("upstream TLS setup ({phase}): {reason}")]
    Tls { phase: &'static str, reason: String },
    #[error("upstream outbox: cannot {phase}: {source}")]
    Store {
        phase: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("upstream not connected: cannot {0} (best effort)")]
    NotConnected(&'static str),
    #[error("upstream {phase} on {topic:?}: {source}")]
    Client {
        phase: &'static str,
        topic: String,
        #[source]
        source: rumqttc::ClientError,
    },
    #[error("upstream session stopped")]
    Stopped,
}

/// The handle: cheap to clone. The session runs until `shutdown` is
/// cancelled or the last handle is dropped.
#[derive(Clone)]
pub struct Upstream {
    shared: Arc<session::Shared>,
    _stop: Arc<DropGuard>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("connected", &self.is_connected())
            .field("outbox_len", &self.outbox_len())
            .finish()
    }
}

impl Upstream {
    /// Validate the config, open the outbox and start the session (inside a
    /// tokio runtime). Returns at once: connecting happens in the background
    /// and is reported on the event channel.
    ///
    /// `gateway` is the gateway's own identity (used for the sub-device
    /// topics); `leaves` are the devices it speaks for (signed into the
    /// platform in aliyun mode); `subscriptions` are topic filters subscribed
    /// at QoS 1 after every connect.
    pub fn start(
        cfg: UpstreamConfig,
        gateway: SubDevice,
        leaves: Vec<SubDevice>,
        subscriptions: Vec<String>,
        store: &Store,
        shutdown: CancellationToken,
    ) -> Result<(Upstream, mpsc::Receiver<UpstreamEvent>), UpstreamError> {
        let stop = shutdown.child_token();
        let (shared, events) =
            session::spawn(cfg, gateway, leaves, subscriptions, store, stop.clone())?;
        Ok((
            Upstream {
                shared,
                _stop: Arc::new(stop.drop_guard()),
            },
            events,
        ))
    }

    /// Publish at QoS 1. `Durable` returns once the message is on disk;
    /// `BestEffort` once it is handed to the MQTT client.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        delivery: Delivery,
    ) -> Result<(), UpstreamError> {
        self.shared.publish(topic, payload.into(), delivery).await
    }

    /// Add topic filters: subscribed now if connected, and after every
    /// reconnect.
    pub async fn subscribe<I, S>(&self, topics: I) -> Result<(), UpstreamError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.shared
            .subscribe(topics.into_iter().map(Into::into).collect())
            .await
    }

    /// Whether the broker has accepted the current connection.
    pub fn is_connected(&self) -> bool {
        self.shared.is_connected()
    }

    /// Each leaf's platform state (aliyun mode; `None` in the other modes,
    /// where the broker needs no sub-device handshake).
    pub fn platform(&self) -> Option<Vec<presence::LeafPlatform>> {
        self.shared
            .presence
            .as_ref()
            .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).snapshot())
    }

    /// Durable messages not yet acknowledged by the broker.
    pub fn outbox_len(&self) -> usize {
        self.shared.outbox.len()
    }

    /// Since when (Unix ms) the oldest durable message has waited for the
    /// broker.
    pub fn outbox_oldest(&self) -> Option<u64> {
        self.shared.outbox.oldest_since_ms()
    }

    /// Resolves once the session has stopped (shutdown cancelled, or every
    /// handle dropped) and released the store. Holds no handle, so it can
    /// outlive the last one.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        self.shared.done.clone().cancelled_owned()
    }
}
