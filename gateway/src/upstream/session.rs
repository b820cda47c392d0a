//! The driver: one task owns rumqttc's `EventLoop` and polls it forever;
//! handles send requests through a shared `AsyncClient`. A second task, the
//! control task, sends what the session itself must send, in order:
//! subscriptions and the outbox replay after each ConnAck and, in aliyun
//! mode, the sub-device requests [`Presence`] asks for (it also runs their
//! timer) and the held messages of each leaf that comes online. The driver
//! never awaits the control task (an unbounded channel), so it keeps draining
//! rumqttc's request channel while the control task fills it.
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

use super::presence::{Action, Admit, Held, Presence};
use super::subdevices::{self, SubDeviceRequest};
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
    /// Aliyun mode with leaves: each leaf's platform state, and what waits
    /// for it to be online (`presence.rs`). Never held across an await.
    pub(super) presence: Option<Mutex<Presence>>,
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
        if let Some(p) = &self.presence {
            let leaf = lock(p).leaf_of_topic(topic);
            if let Some(leaf) = leaf {
                return self
                    .publish_for_leaf(p, leaf, topic, payload, delivery)
                    .await;
            }
        }
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
                if self.is_connected() {
                    self.send_stored(seq, topic, payload).await;
                }
                Ok(())
            }
        }
    }

    /// Send a just-stored outbox entry unless the on-connect replay (or a
    /// leaf's flush) already sent it on this connection.
    async fn send_stored(&self, seq: u64, topic: &str, payload: Bytes) {
        if self.claim(seq)
            && let Err(e) = self
                .send_publish(topic, QoS::AtLeastOnce, payload, Tag::Durable(seq))
                .await
        {
            tracing::warn!(seq, topic, "durable publish kept for the next connect: {e}");
        }
    }

    /// A message on a leaf's topics (aliyun mode): sent only while the leaf
    /// is online at the platform, else held until it is.
    async fn publish_for_leaf(
        &self,
        presence: &Mutex<Presence>,
        leaf: usize,
        topic: &str,
        payload: Bytes,
        delivery: Delivery,
    ) -> Result<(), UpstreamError> {
        match delivery {
            Delivery::BestEffort => {
                let admit = lock(presence).admit(
                    leaf,
                    Held::Message {
                        topic: topic.to_owned(),
                        payload: payload.clone(),
                    },
                );
                match admit {
                    Admit::Send(_) => {
                        self.send_publish(topic, QoS::AtLeastOnce, payload, Tag::Other)
                            .await
                    }
                    Admit::Held => Ok(()),
                    Admit::NotConnected => Err(UpstreamError::NotConnected("publish")),
                }
            }
            Delivery::Durable => {
                let seq = self.outbox.push(topic, &payload).await?;
                let admit = lock(presence).admit(leaf, Held::Durable(seq));
                if admit == Admit::Send(Held::Durable(seq)) && self.is_connected() {
                    self.send_stored(seq, topic, payload).await;
                }
                Ok(())
            }
        }
    }

    /// Send outbox entry `seq` unless it was acknowledged meanwhile or
    /// already sent on this connection.
    async fn send_entry(&self, seq: u64) {
        if !self.outbox.contains(seq) || !self.claim(seq) {
            return;
        }
        let Some(e) = self.outbox.get(seq) else {
            return;
        };
        if let Err(err) = self
            .send_publish(&e.topic, QoS::AtLeastOnce, e.payload, Tag::Durable(seq))
            .await
        {
            tracing::warn!(seq, "re-sending: {err}");
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

/// What the control task needs besides [`Shared`].
struct Ctx {
    events: mpsc::Sender<UpstreamEvent>,
    /// The leaves this gateway added to its topology, across runs (aliyun
    /// mode): key `{pk}/{dn}`. Lets a later run log out (and delete) leaves
    /// no longer configured.
    known: Option<sled::Tree>,
}

/// The store tree of [`Ctx::known`].
pub const KNOWN_TREE: &str = "subdevices";

/// Work for the control task, in order.
enum Ctl {
    /// A ConnAck: subscribe, start the sub-device handshake, replay the
    /// outbox, then tell the daemon.
    Connected { epoch: u64, session_present: bool },
    /// What the sub-device state asks for after a reply or notice.
    Actions { epoch: u64, actions: Vec<Action> },
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
    reply_topics: Vec<(String, SubDeviceRequest)>,
    /// `topo/change` and `/ext/error` of the gateway (aliyun mode).
    notice_topics: Option<(String, String)>,
    ctl: mpsc::UnboundedSender<Ctl>,
    control: tokio::task::JoinHandle<()>,
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
    let (reply_topics, notice_topics, presence, known) = if aliyun {
        let known = store
            .tree(KNOWN_TREE)
            .map_err(|source| UpstreamError::Store {
                phase: "open the sub-device tree",
                source: Box::new(source),
            })?;
        let mut p = Presence::new(
            (gw.0, gw.1),
            &leaves,
            cfg.subdevice_timing,
            outbox.next_seq(),
        );
        let retired: Vec<(String, String)> = known
            .iter()
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| {
                let (pk, dn) = std::str::from_utf8(&k).ok()?.split_once('/')?;
                Some((pk.to_owned(), dn.to_owned()))
            })
            .collect();
        p.retire(retired, cfg.delete_removed_leaves);
        let replies: Vec<(String, SubDeviceRequest)> = SubDeviceRequest::ALL
            .iter()
            .map(|r| (r.reply_topic(gw.0, gw.1), *r))
            .collect();
        let notices = (
            subdevices::topo_change_topic(gw.0, gw.1),
            subdevices::ext_error_topic(gw.0, gw.1),
        );
        subs.extend(replies.iter().map(|(t, _)| t.clone()));
        subs.push(notices.0.clone());
        subs.push(notices.1.clone());
        (replies, Some(notices), Some(Mutex::new(p)), Some(known))
    } else {
        (Vec::new(), None, None, None)
    };
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
        presence,
        done: CancellationToken::new(),
    });
    let (events, rx) = mpsc::channel(EVENT_CAPACITY);
    let ctx = Arc::new(Ctx { events, known });
    if !shared.outbox.is_empty() {
        tracing::info!(
            pending = shared.outbox.len(),
            "outbox holds messages from a previous run; they go out after connecting"
        );
    }
    let (ctl, ctl_rx) = mpsc::unbounded_channel();
    let control = tokio::spawn(control(shared.clone(), ctx.clone(), ctl_rx));
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
        notice_topics,
        ctl,
        control,
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
                    let _ = self.ctl.send(Ctl::Connected {
                        epoch,
                        session_present: ack.session_present,
                    });
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = p.topic;
                    let reply = self.reply_topics.iter().find(|(t, _)| *t == topic);
                    if let Some(req) = reply.map(|(_, r)| *r) {
                        self.sub_device_reply(req, &p.payload).await;
                    } else if let Some((change, error)) = &self.notice_topics
                        && (topic == *change || topic == *error)
                    {
                        let change = topic == *change;
                        self.platform_notice(change, &p.payload);
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
        // Release the client and the outbox (the store) before saying so:
        // the control task holds them too.
        self.control.abort();
        let _ = (&mut self.control).await;
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
        if let Some(p) = &self.shared.presence {
            // After the epoch: a control task still handling the ConnAck of
            // the lost connection sees the new epoch and leaves the state
            // alone (both under this lock).
            lock(p).on_disconnected(self.shared.outbox.next_seq());
        }
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
        tracing::debug!(request = request.name(), id = ?r.id, code = r.code, message = %r.message, "sub-device reply");
        if let Some(p) = &self.shared.presence {
            let actions = {
                let mut p = lock(p);
                // A reply counts on the connection it arrived on.
                p.on_reply(request, &r, tokio::time::Instant::now())
            };
            self.control(actions);
        }
        self.emit(UpstreamEvent::SubDevices {
            request,
            code: r.code,
            message: r.message,
        })
        .await;
    }

    /// `topo/change` or `/ext/error` from the platform.
    fn platform_notice(&mut self, topo_change: bool, payload: &[u8]) {
        let Some(p) = &self.shared.presence else {
            return;
        };
        let now = tokio::time::Instant::now();
        let next = self.shared.outbox.next_seq();
        let actions = if topo_change {
            let Some(change) = subdevices::parse_topo_change(payload) else {
                tracing::warn!(payload = %String::from_utf8_lossy(payload), "unreadable topo/change: ignored");
                return;
            };
            let id = subdevices::parse_reply(payload).id;
            lock(p).on_topo_change(&change, id.as_deref(), now, next)
        } else {
            let r = subdevices::parse_reply(payload);
            lock(p).on_platform_error(&r, now, Some(next))
        };
        self.control(actions);
    }

    fn control(&self, actions: Vec<Action>) {
        if !actions.is_empty() {
            let epoch = self.shared.epoch.load(Ordering::SeqCst);
            let _ = self.ctl.send(Ctl::Actions { epoch, actions });
        }
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

/// The control task: everything sent on behalf of the session itself, in
/// order (subscriptions, the sub-device requests, the outbox replay, held
/// messages of leaves coming online), plus the sub-device timer. It never
/// blocks the driver, which keeps polling while this task waits for room in
/// rumqttc's request channel.
async fn control(shared: Arc<Shared>, ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<Ctl>) {
    loop {
        let wake = shared.presence.as_ref().and_then(|p| lock(p).next_wakeup());
        let ctl = tokio::select! {
            c = rx.recv() => match c {
                Some(c) => c,
                None => return,
            },
            _ = tokio::time::sleep_until(wake.unwrap_or_else(far_future)), if wake.is_some() => {
                let epoch = shared.epoch.load(Ordering::SeqCst);
                let actions = match &shared.presence {
                    Some(p) => lock(p).on_tick(tokio::time::Instant::now()),
                    None => Vec::new(),
                };
                Ctl::Actions { epoch, actions }
            }
        };
        match ctl {
            Ctl::Connected {
                epoch,
                session_present,
            } => on_connect(&shared, &ctx, epoch, session_present).await,
            Ctl::Actions { epoch, actions } => run_actions(&shared, &ctx, epoch, actions).await,
        }
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}

/// After each ConnAck: subscriptions, the aliyun sub-device handshake, then
/// the outbox; all queued behind each other in rumqttc's request channel.
async fn on_connect(shared: &Shared, ctx: &Ctx, epoch: u64, session_present: bool) {
    let current = || shared.epoch.load(Ordering::SeqCst) == epoch;
    if !current() {
        return;
    }
    if !session_present {
        let topics = lock(&shared.subscriptions).clone();
        if !topics.is_empty()
            && let Err(e) = shared.send_subscribe(topics).await
        {
            tracing::warn!("re-subscribing after connect: {e}");
        }
    }
    if let Some(p) = &shared.presence {
        let actions = {
            let mut p = lock(p);
            // Under the lock, so a disconnect (which bumps the epoch, then
            // takes this lock) cannot be overtaken.
            if !current() {
                return;
            }
            p.on_connected(tokio::time::Instant::now())
        };
        run_actions(shared, ctx, epoch, actions).await;
    }
    // The outbox first: terminal reports of jobs that ended while we were
    // away (or before a restart) must reach the platform before anything the
    // daemon sends on `Connected` (a `firmware/get` answered before a -4 is
    // on its way would bring the failed package back). A leaf's entries wait
    // for its login (aliyun mode).
    replay_outbox(shared, &current).await;
    if !current() {
        return;
    }
    let _ = ctx
        .events
        .send(UpstreamEvent::Connected { session_present })
        .await;
}

/// Carry out what the sub-device state asked for, on connection `epoch`.
async fn run_actions(shared: &Shared, ctx: &Ctx, epoch: u64, actions: Vec<Action>) {
    let current = || shared.epoch.load(Ordering::SeqCst) == epoch;
    for a in actions {
        match a {
            Action::Send {
                request,
                topic,
                payload,
            } => {
                if !current() {
                    return;
                }
                let qos = if request.qos0() {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                if let Err(e) = shared.send_publish(&topic, qos, payload, Tag::Other).await {
                    tracing::warn!("{}: {e}", request.name());
                }
            }
            Action::Answer { topic, payload } => {
                if current()
                    && let Err(e) = shared
                        .send_publish(&topic, QoS::AtMostOnce, payload, Tag::Other)
                        .await
                {
                    tracing::warn!("answer on {topic}: {e}");
                }
            }
            Action::Online(leaves) => {
                for leaf in leaves {
                    flush_leaf(shared, leaf, &current).await;
                }
            }
            Action::Added(keys) => {
                if let Some(t) = &ctx.known {
                    for (pk, dn) in keys {
                        if let Err(e) = t.insert(format!("{pk}/{dn}"), &[]) {
                            tracing::warn!("cannot record {pk}/{dn} as added: {e}");
                        }
                    }
                }
            }
            Action::Retired(keys) => {
                if let Some(t) = &ctx.known {
                    for (pk, dn) in keys {
                        if let Err(e) = t.remove(format!("{pk}/{dn}")) {
                            tracing::warn!("cannot forget {pk}/{dn}: {e}");
                        }
                    }
                }
            }
        }
    }
}

/// A leaf just came online: what the outbox holds for it from before it
/// went offline, then what was held for it, in order; from then on its
/// messages go out directly.
async fn flush_leaf(shared: &Shared, leaf: usize, current: &impl Fn() -> bool) {
    let Some(p) = &shared.presence else {
        return;
    };
    let old: Vec<u64> = match shared.outbox.entries() {
        Ok(entries) => {
            let p = lock(p);
            let since = p.offline_since_seq(leaf);
            entries
                .into_iter()
                .filter(|e| e.seq < since && p.leaf_of_topic(&e.topic) == Some(leaf))
                .map(|e| e.seq)
                .collect()
        }
        Err(e) => {
            tracing::error!("cannot read the outbox to send a leaf's messages: {e}");
            Vec::new()
        }
    };
    let (pk, dn) = {
        let p = lock(p);
        let (pk, dn) = p.identity(leaf);
        (pk.to_owned(), dn.to_owned())
    };
    let mut count = 0usize;
    for seq in old {
        if !current() {
            return;
        }
        shared.send_entry(seq).await;
        count += 1;
    }
    loop {
        let held = lock(p).take_held(leaf);
        if held.is_empty() {
            break;
        }
        for h in held {
            if !current() {
                return;
            }
            count += 1;
            match h {
                Held::Durable(seq) => shared.send_entry(seq).await,
                Held::Message { topic, payload } => {
                    if let Err(e) = shared
                        .send_publish(&topic, QoS::AtLeastOnce, payload, Tag::Other)
                        .await
                    {
                        tracing::warn!(topic, "held message: {e}");
                    }
                }
            }
        }
    }
    if count > 0 {
        tracing::info!(leaf = %format!("{pk}/{dn}"), messages = count, "sent what waited for the leaf to be online");
    }
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
    // A leaf's entries go out at its login (aliyun mode).
    let entries: Vec<_> = match &shared.presence {
        Some(p) => {
            let p = lock(p);
            entries
                .into_iter()
                .filter(|e| p.leaf_of_topic(&e.topic).is_none())
                .collect()
        }
        None => entries,
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
