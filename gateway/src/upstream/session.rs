//! The driver: one task owns rumqttc's `EventLoop` and polls it forever;
//! handles send requests through a shared `AsyncClient`.
//!
//! Hazards of rumqttc 0.25 handled here (ARCHITECTURE "Pinned choices"):
//! - It does not re-subscribe after a reconnect without a session: every
//!   ConnAck with `session_present = false` (always, since we connect with a
//!   clean session) subscribes everything registered again.
//! - Unacknowledged publishes live only in memory, and a new session drops
//!   them: durable ones come from the outbox, re-sent after every ConnAck.
//! - A lost session while a publish is stashed (packet-id collision) can wedge
//!   the loop (rumqtt#1056): after every connection error the driver replaces
//!   the client state with a fresh `MqttState` and empties the pending queue
//!   and request channel, so nothing of an old session survives into the next.
//!
//! Mapping PUBACKs to outbox entries: every publish request is paired, in a
//! FIFO, with a tag (`Durable(seq)` or `Other`) pushed under the same lock as
//! the request is sent, so the FIFO and rumqttc's request channel hold the
//! same order. rumqttc handles requests in channel order and reports each
//! publish as exactly one `Outgoing::Publish(pkid)` (or `Outgoing::AwaitAck`
//! on a packet-id collision, followed later by the `Publish` of the stashed
//! packet), which is where the driver learns pkid → seq; `Incoming::PubAck`
//! then removes that seq from the outbox.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, MqttState,
    Outgoing, Packet, QoS, SubscribeReasonCode, Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::subdevices::{self, SignedLeaf, SubDeviceRequest};
use super::transport::{self, Endpoint};
use super::{
    Auth, Delivery, KEEP_ALIVE_RANGE, Outbox, SubDevice, UpstreamConfig, UpstreamError,
    UpstreamEvent, auth,
};
use crate::store::Store;

/// rumqttc's request channel.
const REQUEST_CAPACITY: usize = 64;
/// Publishes in flight (unacknowledged) at once.
const MAX_INFLIGHT: u16 = 100;
/// A connection must stay up this long before a failure starts the backoff
/// from its beginning again: a connection that drops right after its ConnAck
/// (a retained message too large for us, a broker kicking us) must not turn
/// into reconnects as fast as the broker answers.
const STABLE_CONNECTION: Duration = Duration::from_secs(30);
const EVENT_CAPACITY: usize = 1024;
/// How long a graceful DISCONNECT may take at shutdown.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Durable(u64),
    Other,
}

/// State shared by the handles and the driver.
pub(super) struct Shared {
    client: AsyncClient,
    pub(super) outbox: Outbox,
    connected: AtomicBool,
    /// Bumped on every ConnAck and every connection error; an on-connect task
    /// of an older connection stops sending.
    epoch: AtomicU64,
    subscriptions: Mutex<Vec<String>>,
    /// Serialises sends into rumqttc's channel with `tags`.
    sender: tokio::sync::Mutex<()>,
    tags: Mutex<VecDeque<Tag>>,
    /// Outbox entries already sent on the connection of the given epoch:
    /// `publish` and the on-connect replay may both see a new entry, and only
    /// one of them sends it.
    sent: Mutex<(u64, std::collections::HashSet<u64>)>,
    pub(super) done: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(super) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Whether outbox entry `seq` is still to be sent on the current
    /// connection; claims it when it is.
    fn claim(&self, seq: u64) -> bool {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let mut sent = lock(&self.sent);
        if sent.0 != epoch {
            *sent = (epoch, Default::default());
        }
        sent.1.insert(seq)
    }

    pub(super) async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        delivery: Delivery,
    ) -> Result<(), UpstreamError> {
        match delivery {
            Delivery::BestEffort => {
                if !self.is_connected() {
                    return Err(UpstreamError::NotConnected("publish"));
                }
                self.send_publish(topic, QoS::AtLeastOnce, payload, Tag::Other)
                    .await
            }
            Delivery::Durable => {
                if topic.is_empty() || topic.contains(['+', '#']) {
                    return Err(UpstreamError::Config(format!(
                        "cannot publish on {topic:?}: not a topic name"
                    )));
                }
                let seq = self.outbox.push(topic, &payload).await?;
                // Read `connected` after the write: an on-connect replay that
                // started before the write sees `connected` set first, so either
                // it replays this entry or we send it here (or both).
                if self.is_connected()
                    && self.claim(seq)
                    && let Err(e) = self
                        .send_publish(topic, QoS::AtLeastOnce, payload, Tag::Durable(seq))
                        .await
                {
                    tracing::warn!(seq, topic, "durable publish kept for the next connect: {e}");
                }
                Ok(())
            }
        }
    }

    async fn send_publish(
        &self,
        topic: &str,
        qos: QoS,
        payload: Bytes,
        tag: Tag,
    ) -> Result<(), UpstreamError> {
        let _g = self.sender.lock().await;
        lock(&self.tags).push_back(tag);
        if let Err(source) = self.client.publish_bytes(topic, qos, false, payload).await {
            lock(&self.tags).pop_back();
            return Err(UpstreamError::Client {
                phase: "publish",
                topic: topic.to_owned(),
                source,
            });
        }
        Ok(())
    }

    pub(super) async fn subscribe(&self, topics: Vec<String>) -> Result<(), UpstreamError> {
        let new: Vec<String> = {
            let mut subs = lock(&self.subscriptions);
            let new: Vec<String> = topics.into_iter().filter(|t| !subs.contains(t)).collect();
            subs.extend(new.iter().cloned());
            new
        };
        if new.is_empty() || !self.is_connected() {
            return Ok(());
        }
        self.send_subscribe(new).await
    }

    async fn send_subscribe(&self, topics: Vec<String>) -> Result<(), UpstreamError> {
        let first = topics.first().cloned().unwrap_or_default();
        let filters = topics
            .into_iter()
            .map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce));
        let _g = self.sender.lock().await;
        self.client
            .subscribe_many(filters)
            .await
            .map_err(|source| UpstreamError::Client {
                phase: "subscribe",
                topic: first,
                source,
            })
    }
}

/// What the on-connect task needs besides [`Shared`].
struct Ctx {
    gateway: SubDevice,
    aliyun: bool,
    leaves: Vec<SubDevice>,
    events: mpsc::Sender<UpstreamEvent>,
    request_id: AtomicU64,
}

struct Driver {
    eventloop: EventLoop,
    shared: Arc<Shared>,
    ctx: Arc<Ctx>,
    cfg: UpstreamConfig,
    endpoint: Endpoint,
    client_id: String,
    stop: CancellationToken,
    /// pkid → outbox seq of durable publishes in flight.
    inflight: HashMap<u16, u64>,
    /// The tag of a publish stashed on a packet-id collision.
    collided: Option<(u16, Tag)>,
    reply_topics: [(String, SubDeviceRequest); 2],
}

pub(super) fn spawn(
    cfg: UpstreamConfig,
    gateway: SubDevice,
    leaves: Vec<SubDevice>,
    subscriptions: Vec<String>,
    store: &Store,
    stop: CancellationToken,
) -> Result<(Arc<Shared>, mpsc::Receiver<UpstreamEvent>), UpstreamError> {
    if !KEEP_ALIVE_RANGE.contains(&cfg.keep_alive) {
        return Err(UpstreamError::Config(format!(
            "keep_alive {:?} is outside 30..=1200 s",
            cfg.keep_alive
        )));
    }
    if cfg.backoff.initial.is_zero() || cfg.backoff.max < cfg.backoff.initial {
        return Err(UpstreamError::Config(format!(
            "backoff {:?}: initial must be > 0 and <= max",
            cfg.backoff
        )));
    }
    let endpoint = transport::parse_url(&cfg.url)?;
    let aliyun = match &cfg.auth {
        Auth::Aliyun {
            product_key,
            device_name,
            ..
        } => {
            if *product_key != gateway.product_key || *device_name != gateway.device_name {
                return Err(UpstreamError::Config(format!(
                    "aliyun auth is for {product_key}/{device_name} but the gateway is {}/{}",
                    gateway.product_key, gateway.device_name
                )));
            }
            if let Some(l) = leaves.iter().find(|l| l.device_secret.is_none()) {
                return Err(UpstreamError::Config(format!(
                    "leaf {}/{} has no device_secret: aliyun mode signs every leaf into the \
                     gateway's topology",
                    l.product_key, l.device_name
                )));
            }
            true
        }
        Auth::None | Auth::Password { .. } => false,
    };
    let client_id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("{}.{}", gateway.product_key, gateway.device_name));
    let mut options = MqttOptions::new(client_id.clone(), endpoint.host.clone(), endpoint.port);
    options
        .set_keep_alive(cfg.keep_alive)
        .set_clean_session(true)
        .set_inflight(MAX_INFLIGHT)
        .set_max_packet_size(cfg.max_packet, cfg.max_packet);
    if endpoint.tls {
        let tls = transport::client_config(cfg.ca_file.as_deref())?;
        options.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    let outbox = Outbox::open(store)?;
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);

    let mut subs: Vec<String> = Vec::new();
    let gw = (&gateway.product_key, &gateway.device_name);
    let reply_topics = [
        (
            SubDeviceRequest::TopoAdd.reply_topic(gw.0, gw.1),
            SubDeviceRequest::TopoAdd,
        ),
        (
            SubDeviceRequest::BatchLogin.reply_topic(gw.0, gw.1),
            SubDeviceRequest::BatchLogin,
        ),
    ];
    if aliyun && !leaves.is_empty() {
        subs.extend(reply_topics.iter().map(|(t, _)| t.clone()));
    }
    for s in subscriptions {
        if !subs.contains(&s) {
            subs.push(s);
        }
    }
    let shared = Arc::new(Shared {
        client,
        outbox,
        connected: AtomicBool::new(false),
        epoch: AtomicU64::new(0),
        subscriptions: Mutex::new(subs),
        sender: tokio::sync::Mutex::new(()),
        tags: Mutex::new(VecDeque::new()),
        sent: Mutex::new((0, Default::default())),
        done: CancellationToken::new(),
    });
    let (events, rx) = mpsc::channel(EVENT_CAPACITY);
    let ctx = Arc::new(Ctx {
        gateway,
        aliyun,
        leaves,
        events,
        request_id: AtomicU64::new(1),
    });
    if !shared.outbox.is_empty() {
        tracing::info!(
            pending = shared.outbox.len(),
            "outbox holds messages from a previous run; they go out after connecting"
        );
    }
    let driver = Driver {
        eventloop,
        shared: shared.clone(),
        ctx,
        cfg,
        endpoint,
        client_id,
        stop,
        inflight: HashMap::new(),
        collided: None,
        reply_topics,
    };
    tokio::spawn(driver.run());
    Ok((shared, rx))
}

impl Driver {
    async fn run(mut self) {
        let mut backoff = self.cfg.backoff.initial;
        let mut connected_at: Option<tokio::time::Instant> = None;
        tracing::info!(
            host = %self.endpoint.host, port = self.endpoint.port, tls = self.endpoint.tls,
            client_id = %self.client_id, "upstream session starting"
        );
        loop {
            if self.eventloop.network.is_none() {
                self.set_credentials();
            }
            let polled = tokio::select! {
                _ = self.stop.cancelled() => break,
                r = self.eventloop.poll() => r,
            };
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    connected_at = Some(tokio::time::Instant::now());
                    let epoch = self.shared.epoch.fetch_add(1, Ordering::SeqCst) + 1;
                    self.shared.connected.store(true, Ordering::SeqCst);
                    tracing::info!(session_present = ack.session_present, "upstream connected");
                    tokio::spawn(on_connect(
                        self.shared.clone(),
                        self.ctx.clone(),
                        epoch,
                        ack.session_present,
                    ));
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = p.topic;
                    let reply = self.reply_topics.iter().find(|(t, _)| *t == topic);
                    if let Some(req) = reply.map(|(_, r)| *r) {
                        self.sub_device_reply(req, &p.payload).await;
                    } else {
                        self.emit(UpstreamEvent::Message {
                            topic,
                            payload: p.payload,
                        })
                        .await;
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(seq) = self.inflight.remove(&ack.pkid) {
                        match self.shared.outbox.remove(seq) {
                            Ok(_) => tracing::debug!(seq, "outbox entry acknowledged"),
                            Err(e) => tracing::error!(seq, "{e}"),
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        tracing::error!(
                            codes = ?ack.return_codes,
                            "the broker refused a subscription"
                        );
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let tag = match self.collided {
                        Some((p, tag)) if p == pkid => {
                            self.collided = None;
                            Some(tag)
                        }
                        _ => lock(&self.shared.tags).pop_front(),
                    };
                    match tag {
                        Some(Tag::Durable(seq)) if pkid != 0 => {
                            self.inflight.insert(pkid, seq);
                        }
                        Some(_) => {
                            self.inflight.remove(&pkid);
                        }
                        None => tracing::error!(pkid, "a publish without a tag (bug)"),
                    }
                }
                Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => {
                    let tag = lock(&self.shared.tags).pop_front().unwrap_or(Tag::Other);
                    self.collided = Some((pkid, tag));
                }
                Ok(_) => {}
                Err(e) => {
                    if connected_at
                        .take()
                        .is_some_and(|t| t.elapsed() >= STABLE_CONNECTION)
                    {
                        backoff = self.cfg.backoff.initial;
                    }
                    let reason = describe(&e, self.cfg.max_packet);
                    self.reset().await;
                    tracing::warn!(retry_in = ?backoff, "upstream connection: {reason}");
                    self.emit(UpstreamEvent::Disconnected {
                        reason,
                        retry_in: backoff,
                    })
                    .await;
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.cfg.backoff.max);
                }
            }
        }
        self.shutdown().await;
        // Release the client and the outbox (the store) before saying so.
        let done = self.shared.done.clone();
        drop(self);
        done.cancel();
    }

    /// Fresh aliyun credentials (new timestamp) for each connection attempt.
    fn set_credentials(&mut self) {
        let opts = &mut self.eventloop.mqtt_options;
        match &self.cfg.auth {
            Auth::None => {}
            Auth::Password { username, password } => {
                opts.set_credentials(username.clone(), password.clone());
            }
            Auth::Aliyun {
                product_key,
                device_name,
                device_secret,
            } => {
                let c = auth::connect_credentials(
                    product_key,
                    device_name,
                    device_secret,
                    &self.client_id,
                    auth::now_ms(),
                    self.endpoint.tls,
                );
                opts.set_client_id(c.client_id);
                opts.set_credentials(c.username, c.password);
            }
        }
    }

    /// After a connection error: nothing of the old session may leak into the
    /// next one (see the module doc).
    async fn reset(&mut self) {
        self.shared.connected.store(false, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        // A sender may hold the lock while blocked on a full request channel:
        // drain the channel until it lets go.
        let _g = loop {
            self.eventloop.clean();
            if let Ok(g) =
                tokio::time::timeout(Duration::from_millis(20), self.shared.sender.lock()).await
            {
                break g;
            }
        };
        self.eventloop.clean();
        self.eventloop.pending.clear();
        self.eventloop.state = MqttState::new(MAX_INFLIGHT, false);
        lock(&self.shared.tags).clear();
        self.inflight.clear();
        self.collided = None;
    }

    async fn emit(&mut self, ev: UpstreamEvent) {
        // A dropped receiver only means nobody listens any more.
        let _ = self.ctx.events.send(ev).await;
    }

    async fn sub_device_reply(&mut self, request: SubDeviceRequest, payload: &[u8]) {
        let r = subdevices::parse_reply(payload);
        if r.is_ok() {
            tracing::info!(?request, id = ?r.id, "sub-device request accepted");
        } else {
            tracing::error!(
                ?request, id = ?r.id, code = r.code, message = %r.message,
                "the platform refused a sub-device request"
            );
        }
        self.emit(UpstreamEvent::SubDevices {
            request,
            code: r.code,
            message: r.message,
        })
        .await;
    }

    /// Best-effort DISCONNECT so the broker does not wait for the keep-alive.
    async fn shutdown(&mut self) {
        self.shared.connected.store(false, Ordering::SeqCst);
        if self.eventloop.network.is_none() || self.shared.client.try_disconnect().is_err() {
            return;
        }
        let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
            loop {
                match self.eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        tracing::info!("upstream session stopped");
    }
}

/// After each ConnAck: subscriptions, the aliyun sub-device handshake, then
/// the outbox; all queued behind each other in rumqttc's request channel.
async fn on_connect(shared: Arc<Shared>, ctx: Arc<Ctx>, epoch: u64, session_present: bool) {
    let current = || shared.epoch.load(Ordering::SeqCst) == epoch;
    if !session_present {
        let topics = lock(&shared.subscriptions).clone();
        if !topics.is_empty()
            && let Err(e) = shared.send_subscribe(topics).await
        {
            tracing::warn!("re-subscribing after connect: {e}");
        }
    }
    if ctx.aliyun && !ctx.leaves.is_empty() && current() {
        let (pk, dn) = (&ctx.gateway.product_key, &ctx.gateway.device_name);
        let signed: Vec<SignedLeaf<'_>> = ctx.leaves.iter().filter_map(SignedLeaf::of).collect();
        let ts = auth::now_ms();
        let n_topo = signed.len().div_ceil(subdevices::TOPO_ADD_BATCH) as u64;
        let first = ctx.request_id.fetch_add(n_topo, Ordering::SeqCst);
        let topic = SubDeviceRequest::TopoAdd.topic(pk, dn);
        for (id, body) in subdevices::topo_add_payloads(&signed, ts, first) {
            if !current() {
                return;
            }
            tracing::info!(id, leaves = signed.len(), "adding leaves to the topology");
            if let Err(e) = shared
                .send_publish(&topic, QoS::AtLeastOnce, body.into(), Tag::Other)
                .await
            {
                tracing::warn!("topo/add: {e}");
            }
        }
        let n_login = signed.len().div_ceil(subdevices::LOGIN_BATCH) as u64;
        let first = ctx.request_id.fetch_add(n_login, Ordering::SeqCst);
        let topic = SubDeviceRequest::BatchLogin.topic(pk, dn);
        for (id, body) in subdevices::batch_login_payloads(&signed, ts, first) {
            if !current() {
                return;
            }
            tracing::info!(id, "logging leaves in");
            // The platform takes batch_login at QoS 0 only.
            if let Err(e) = shared
                .send_publish(&topic, QoS::AtMostOnce, body.into(), Tag::Other)
                .await
            {
                tracing::warn!("batch_login: {e}");
            }
        }
    }
    // The outbox first: terminal reports of jobs that ended while we were
    // away (or before a restart) must reach the platform before anything the
    // daemon sends on `Connected` (a `firmware/get` answered before a -4 is
    // on its way would bring the failed package back).
    replay_outbox(&shared, &current).await;
    if !current() {
        return;
    }
    let _ = ctx
        .events
        .send(UpstreamEvent::Connected { session_present })
        .await;
}

/// Send every outbox entry not yet sent on this connection.
async fn replay_outbox(shared: &Shared, current: &impl Fn() -> bool) {
    if !current() {
        return;
    }
    let entries = match shared.outbox.entries() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("cannot read the outbox to re-send it: {e}");
            return;
        }
    };
    if !entries.is_empty() {
        tracing::info!(count = entries.len(), "re-sending the outbox");
    }
    for e in entries {
        if !current() {
            return;
        }
        // Acknowledged meanwhile, or sent by `publish` on this connection?
        if !shared.outbox.contains(e.seq) || !shared.claim(e.seq) {
            continue;
        }
        if let Err(err) = shared
            .send_publish(&e.topic, QoS::AtLeastOnce, e.payload, Tag::Durable(e.seq))
            .await
        {
            tracing::warn!(seq = e.seq, "re-sending: {err}");
        }
    }
}

/// A connection error in words an operator can act on.
fn describe(e: &ConnectionError, max_packet: usize) -> String {
    match e {
        ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size),
        )) => format!(
            "the broker sent a message of {size} bytes, more than [upstream] max_message_kib \
             ({} KiB) allows; a retained message on a subscribed topic comes back at every \
             connect: remove it on the broker, or raise max_message_kib",
            max_packet >> 10
        ),
        ConnectionError::ConnectionRefused(code) => {
            let why = match code {
                ConnectReturnCode::BadUserNamePassword => {
                    "bad username or password (check auth, or the aliyun device secret)"
                }
                ConnectReturnCode::NotAuthorized => {
                    "not authorized (check auth, or the aliyun device secret and clock)"
                }
                ConnectReturnCode::BadClientId => "client id rejected",
                ConnectReturnCode::ServiceUnavailable => "service unavailable",
                ConnectReturnCode::RefusedProtocolVersion => "protocol version refused",
                ConnectReturnCode::Success => "success code in a refusal (broker bug)",
            };
            format!("the broker refused the connection: {why}")
        }
        ConnectionError::Tls(t) => format!("TLS handshake failed: {t}"),
        ConnectionError::Io(io) => format!("network: {io}"),
        ConnectionError::NetworkTimeout => "connect timed out".into(),
        ConnectionError::FlushTimeout => "write timed out".into(),
        ConnectionError::MqttState(s) => format!("connection lost: {s}"),
        other => other.to_string(),
    }
}
