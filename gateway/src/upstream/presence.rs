//! The platform's view of each leaf in aliyun mode, sans-I/O.
//!
//! On Alibaba Cloud IoT a gateway may publish on a leaf's topics only while
//! the leaf is in the gateway's topology (`thing/topo/add` answered 200) and
//! logged in (`combine/batch_login` answered 200); the platform drops what
//! arrives for an offline leaf, and every leaf goes offline when the
//! gateway's connection drops (protocol.md "Gateway and sub-devices").
//! [`Presence`] keeps, per configured leaf:
//!
//! ```text
//!  NotInTopology ──topo/add──▶ Adding ──200──▶ InTopology ──batch_login──▶ LoggingIn ──200──▶ Online
//!        ▲                       │ error/timeout     ▲   ▲                    │ error/timeout     │
//!        └───────────────────────┘ (retry, backoff)  │   └────────────────────┘                   │
//!        ▲  6401 on login ───────────────────────────┘        disconnect, platform offline ◀────┘
//! ```
//!
//! - Requests wait for their reply; no reply within [`Timing::reply_timeout`]
//!   (a QoS-0 login or its reply lost), or a transient refusal (460, 429,
//!   500, anything unknown), retries that batch after a backoff
//!   ([`Timing::retry_initial`] doubling to [`Timing::retry_max`]), logged
//!   with the attempt count; retries never stop while connected.
//! - A login refused with 6401 ("topo relation not exist") sends `topo/add`
//!   again for the leaves it names (all of the batch if it names none) and
//!   logs the others in again at once.
//! - A refusal that is about one leaf (6287 invalid sign, 6100 not found,
//!   521 deleted, 522/6204 disabled, 6402) *parks* the leaves it names: they
//!   stay offline, with the reason in the log and the status API, and are not
//!   tried again until the gateway restarts (or, for a console change, the
//!   platform says the leaf is back). A batch is all-or-nothing: when the
//!   refusal names no leaf, each leaf of the batch is tried alone, so one bad
//!   secret never keeps the others offline.
//! - `topo/change` (deleted or disabled in the console) and `/ext/error`
//!   notices take leaves offline; a deleted or disabled leaf is parked until
//!   the platform reports it created or enabled again.
//!
//! Messages for a leaf that is not online are *held* here, in order, and go
//! out once it is ([`Presence::take_held`]): best-effort ones in memory
//! (consecutive progress reports on one topic coalesced, at most
//! [`MAX_HELD`] kept), durable ones as a reference to their outbox entry.
//! Held messages are dropped at a disconnect (the daemon informs again at
//! every connect, and durable ones stay in the outbox); what the outbox holds
//! for a leaf from before it went offline (`offline_since_seq`) is sent
//! first at its login, then what was held, so a leaf's messages reach the
//! platform in the order they were published.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::SubDevice;
use super::auth;
use super::subdevices::{self, Reply, SignedLeaf, SubDeviceRequest, TopoChange, TopoStatus};

/// Held messages kept per leaf; beyond it the oldest best-effort one goes.
pub const MAX_HELD: usize = 1000;

/// How long to wait for replies and how to space retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub reply_timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            reply_timeout: Duration::from_secs(5),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// Where a leaf stands with the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlatformState {
    /// Not (known to be) in the gateway's topology.
    NotInTopology,
    /// `topo/add` sent, waiting for its reply.
    Adding,
    /// In the topology, not logged in.
    InTopology,
    /// `batch_login` sent, waiting for its reply.
    LoggingIn,
    /// Logged in: its messages go out.
    Online,
}

impl PlatformState {
    pub fn as_str(self) -> &'static str {
        match self {
            PlatformState::NotInTopology => "not in topology",
            PlatformState::Adding => "adding to topology",
            PlatformState::InTopology => "in topology, offline",
            PlatformState::LoggingIn => "logging in",
            PlatformState::Online => "online",
        }
    }
}

/// One leaf's platform state, for the status API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeafPlatform {
    pub product_key: String,
    pub device_name: String,
    pub state: PlatformState,
    /// The last refusal or missing reply, until the next success.
    pub last_error: Option<String>,
    /// Not tried again until the gateway restarts (or the console changes
    /// the leaf back): a wrong secret, a deleted or disabled leaf.
    pub parked: bool,
    /// Messages waiting for it to be online.
    pub held: usize,
}

/// A message waiting for its leaf to be online.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    Message {
        topic: String,
        payload: Bytes,
    },
    /// An outbox entry, by sequence number.
    Durable(u64),
}

/// What [`Presence::admit`] decided about a message for a leaf.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// The leaf is online: send it now.
    Send(Held),
    /// Kept until the leaf is online.
    Held,
    /// Best effort while disconnected: refused, as for any best-effort
    /// publish.
    NotConnected,
}

/// What the session must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Publish a request (QoS 0 for logins and logouts, else 1).
    Send {
        request: SubDeviceRequest,
        topic: String,
        payload: Bytes,
    },
    /// Answer a `topo/change` (QoS 0).
    Answer { topic: String, payload: Bytes },
    /// These leaves are now online: send what the outbox holds for them
    /// from before `offline_since_seq`, then [`Presence::take_held`] until
    /// it is empty.
    Online(Vec<usize>),
    /// These leaves are in the topology (remember them, to log them out
    /// and delete them once they leave the configuration).
    Added(Vec<(String, String)>),
    /// These leaves, no longer configured, have been logged out (and
    /// deleted from the topology when asked): forget them.
    Retired(Vec<(String, String)>),
}

#[derive(Debug)]
struct Leaf {
    id: SubDevice,
    state: PlatformState,
    last_error: Option<String>,
    parked: Option<Park>,
    /// Consecutive failures, for the backoff.
    failures: u32,
    /// No request for it before this.
    not_before: Option<Instant>,
    /// Sent alone: a batch with it was refused for a reason that named no
    /// leaf.
    solo: bool,
    held: VecDeque<Held>,
    /// Online, but what was held is still going out: new messages are held
    /// behind it.
    flushing: bool,
    /// Outbox entries before this sequence number were published while it
    /// was online (or before this run): at its login they go out first.
    offline_since_seq: u64,
}

/// Why a leaf is not tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Park {
    /// The platform refused it (wrong secret, unknown): until a restart.
    Refused,
    /// Deleted or disabled in the console: until the platform says
    /// otherwise.
    Console,
}

#[derive(Debug)]
struct Pending {
    request: SubDeviceRequest,
    leaves: Vec<usize>,
    retired: Vec<(String, String)>,
    deadline: Instant,
}

/// Every configured leaf's platform state (see the module doc).
#[derive(Debug)]
pub struct Presence {
    gw_pk: String,
    gw_dn: String,
    leaves: Vec<Leaf>,
    index: HashMap<(String, String), usize>,
    pending: HashMap<String, Pending>,
    next_id: u64,
    connected: bool,
    timing: Timing,
    /// Added in an earlier run, no longer configured.
    retired: Vec<(String, String)>,
    delete_retired: bool,
    retire_sent: bool,
}

impl Presence {
    /// Every leaf starts not in the topology (this run has not added it);
    /// `outbox_next` is the outbox's next sequence number: what it holds
    /// goes out at each leaf's first login.
    pub fn new(
        gateway: (&str, &str),
        leaves: &[SubDevice],
        timing: Timing,
        outbox_next: u64,
    ) -> Presence {
        let leaves: Vec<Leaf> = leaves
            .iter()
            .map(|id| Leaf {
                id: id.clone(),
                state: PlatformState::NotInTopology,
                last_error: None,
                parked: None,
                failures: 0,
                not_before: None,
                solo: false,
                held: VecDeque::new(),
                flushing: false,
                offline_since_seq: outbox_next,
            })
            .collect();
        let index = leaves
            .iter()
            .enumerate()
            .map(|(i, l)| ((l.id.product_key.clone(), l.id.device_name.clone()), i))
            .collect();
        Presence {
            gw_pk: gateway.0.to_owned(),
            gw_dn: gateway.1.to_owned(),
            leaves,
            index,
            pending: HashMap::new(),
            next_id: 1,
            connected: false,
            timing,
            retired: Vec::new(),
            delete_retired: false,
            retire_sent: false,
        }
    }

    /// Leaves an earlier run added that are no longer configured: logged
    /// out at the next connect, and deleted from the topology when `delete`.
    pub fn retire(&mut self, leaves: Vec<(String, String)>, delete: bool) {
        self.retired = leaves
            .into_iter()
            .filter(|k| !self.index.contains_key(k))
            .collect();
        self.delete_retired = delete;
    }

    /// The configured leaf a topic belongs to: `/ota/device/{kind}/{pk}/{dn}`
    /// or `/sys/{pk}/{dn}/…`.
    pub fn leaf_of_topic(&self, topic: &str) -> Option<usize> {
        let mut parts = topic.strip_prefix('/')?.split('/');
        let (pk, dn) = match parts.next()? {
            "ota" => {
                parts.next().filter(|p| *p == "device")?;
                parts.next()?;
                (parts.next()?, parts.next()?)
            }
            "sys" => (parts.next()?, parts.next()?),
            _ => return None,
        };
        self.index.get(&(pk.to_owned(), dn.to_owned())).copied()
    }

    /// The outbox entries before this sequence number go out at the leaf's
    /// login (before what is held).
    pub fn offline_since_seq(&self, leaf: usize) -> u64 {
        self.leaves[leaf].offline_since_seq
    }

    /// The leaf's `(pk, dn)`.
    pub fn identity(&self, leaf: usize) -> (&str, &str) {
        let id = &self.leaves[leaf].id;
        (&id.product_key, &id.device_name)
    }

    pub fn snapshot(&self) -> Vec<LeafPlatform> {
        self.leaves
            .iter()
            .map(|l| LeafPlatform {
                product_key: l.id.product_key.clone(),
                device_name: l.id.device_name.clone(),
                state: l.state,
                last_error: l.last_error.clone(),
                parked: l.parked.is_some(),
                held: l.held.len(),
            })
            .collect()
    }

    /// How many leaves are online, of how many.
    pub fn online_count(&self) -> (usize, usize) {
        let online = self
            .leaves
            .iter()
            .filter(|l| l.state == PlatformState::Online)
            .count();
        (online, self.leaves.len())
    }

    /// A message for `leaf`: send it now (online, nothing held before it),
    /// or hold it.
    pub fn admit(&mut self, leaf: usize, msg: Held) -> Admit {
        let connected = self.connected;
        let l = &mut self.leaves[leaf];
        if connected && l.state == PlatformState::Online && !l.flushing {
            return Admit::Send(msg);
        }
        if !connected && matches!(msg, Held::Message { .. }) {
            return Admit::NotConnected;
        }
        hold(l, msg);
        Admit::Held
    }

    /// What is held for an online leaf, in order; empty once nothing is left,
    /// and from then on its messages go out directly.
    pub fn take_held(&mut self, leaf: usize) -> Vec<Held> {
        let l = &mut self.leaves[leaf];
        if l.state != PlatformState::Online || !self.connected {
            l.flushing = false;
            return Vec::new();
        }
        let out: Vec<Held> = l.held.drain(..).collect();
        if out.is_empty() {
            l.flushing = false;
        }
        out
    }

    /// The connection is up: start adding and logging in.
    pub fn on_connected(&mut self, now: Instant) -> Vec<Action> {
        self.connected = true;
        self.pending.clear();
        self.retire_sent = false;
        self.plan(now)
    }

    /// The connection is gone: every leaf is offline for the platform.
    pub fn on_disconnected(&mut self, outbox_next: u64) {
        self.connected = false;
        self.pending.clear();
        for l in &mut self.leaves {
            l.state = match l.state {
                PlatformState::NotInTopology | PlatformState::Adding => {
                    PlatformState::NotInTopology
                }
                _ => PlatformState::InTopology,
            };
            l.held.clear();
            l.flushing = false;
            l.offline_since_seq = outbox_next;
            l.failures = 0;
            l.not_before = None;
        }
    }

    /// A reply on one of the sub-device `_reply` topics.
    pub fn on_reply(
        &mut self,
        request: SubDeviceRequest,
        reply: &Reply,
        now: Instant,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let pending = reply
            .id
            .as_ref()
            .and_then(|id| self.pending.remove(id))
            .filter(|p| p.request == request);
        let Some(p) = pending else {
            // A logout reply we did not ask for: the platform took leaves
            // offline on its own ("sub-device automatically goes offline").
            if request == SubDeviceRequest::BatchLogout && !reply.is_ok() {
                return self.on_platform_error(reply, now, None);
            }
            tracing::debug!(request = request.name(), id = ?reply.id, code = reply.code, "reply to no pending request");
            return out;
        };
        match request {
            SubDeviceRequest::TopoAdd | SubDeviceRequest::BatchLogin if reply.is_ok() => {
                let (leaves, parked): (Vec<usize>, Vec<usize>) = p
                    .leaves
                    .iter()
                    .partition(|&&i| self.leaves[i].parked.is_none());
                // Parked while the request was out: not taken.
                for i in parked {
                    let l = &mut self.leaves[i];
                    l.state = match l.state {
                        PlatformState::Adding => PlatformState::NotInTopology,
                        PlatformState::LoggingIn => PlatformState::InTopology,
                        s => s,
                    };
                }
                for &i in &leaves {
                    let l = &mut self.leaves[i];
                    l.failures = 0;
                    l.not_before = None;
                    l.last_error = None;
                    l.solo = false;
                    if request == SubDeviceRequest::TopoAdd {
                        l.state = PlatformState::InTopology;
                    } else {
                        l.state = PlatformState::Online;
                        l.flushing = true;
                    }
                }
                if request == SubDeviceRequest::TopoAdd {
                    tracing::info!(leaves = %self.names(&leaves), "in the gateway's topology");
                    out.push(Action::Added(leaves.iter().map(|&i| self.key(i)).collect()));
                } else {
                    let (online, total) = self.online_count();
                    tracing::info!(leaves = %self.names(&leaves), online, total, "leaves online at the platform");
                    out.push(Action::Online(leaves));
                }
            }
            SubDeviceRequest::TopoAdd | SubDeviceRequest::BatchLogin => {
                self.refused(p, reply, now);
            }
            SubDeviceRequest::TopoDelete => {
                // 6401: the relation is already gone.
                if reply.is_ok() || reply.code == 6401 {
                    tracing::info!(leaves = ?p.retired, "removed from the gateway's topology");
                    out.push(Action::Retired(p.retired));
                } else {
                    tracing::warn!(
                        leaves = ?p.retired, code = reply.code, message = %reply.message,
                        "the platform refused to remove leaves from the topology; tried again at the next start"
                    );
                }
            }
            SubDeviceRequest::BatchLogout => {
                tracing::info!(
                    leaves = ?p.retired, code = reply.code, message = %reply.message,
                    "logged out (520: was not online)"
                );
            }
        }
        out.extend(self.plan(now));
        out
    }

    /// A refused `topo/add` or `batch_login` (see the module doc).
    fn refused(&mut self, p: Pending, reply: &Reply, now: Instant) {
        let back = if p.request == SubDeviceRequest::TopoAdd {
            PlatformState::NotInTopology
        } else {
            PlatformState::InTopology
        };
        let named: Vec<usize> = reply
            .devices
            .iter()
            .filter_map(|k| self.index.get(k).copied())
            .filter(|i| p.leaves.contains(i))
            .collect();
        let why = format!(
            "{} refused: {} {}",
            p.request.name(),
            reply.code,
            reply.message
        )
        .trim_end()
        .to_owned();
        for &i in &p.leaves {
            self.leaves[i].state = back;
        }
        match reply.code {
            6401 if p.request == SubDeviceRequest::BatchLogin => {
                let targets = if named.is_empty() {
                    p.leaves.clone()
                } else {
                    named
                };
                tracing::warn!(leaves = %self.names(&targets), "{why}: adding them to the topology again");
                for &i in &p.leaves {
                    let l = &mut self.leaves[i];
                    if targets.contains(&i) {
                        l.state = PlatformState::NotInTopology;
                        l.last_error = Some(why.clone());
                        l.failures += 1;
                        // The first time at once, then with the backoff (a
                        // platform that keeps saying 6401 after a 200 to
                        // topo/add must not be asked in a tight loop).
                        l.not_before =
                            (l.failures > 1).then(|| now + backoff(&self.timing, l.failures - 1));
                    } else {
                        l.not_before = None;
                    }
                }
            }
            6287 | 6100 | 521 | 522 | 6204 | 6402 => {
                let targets = if !named.is_empty() {
                    named
                } else if p.leaves.len() == 1 {
                    p.leaves.clone()
                } else {
                    tracing::warn!(
                        leaves = %self.names(&p.leaves),
                        "{why} (naming no leaf): trying each leaf of the batch alone"
                    );
                    for &i in &p.leaves {
                        let l = &mut self.leaves[i];
                        l.solo = true;
                        l.not_before = None;
                        l.last_error = Some(why.clone());
                    }
                    return;
                };
                for &i in &p.leaves {
                    let l = &mut self.leaves[i];
                    if targets.contains(&i) {
                        l.parked = Some(Park::Refused);
                        l.last_error = Some(format!("{why}: {}", hint(reply.code)));
                        tracing::error!(
                            leaf = %format!("{}/{}", l.id.product_key, l.id.device_name),
                            "{why}: {}; it stays offline (the other leaves are not affected)",
                            hint(reply.code)
                        );
                    } else {
                        l.not_before = None;
                    }
                }
            }
            _ => {
                for &i in &p.leaves {
                    let l = &mut self.leaves[i];
                    l.failures += 1;
                    let wait = backoff(&self.timing, l.failures);
                    l.not_before = Some(now + wait);
                    l.last_error = Some(why.clone());
                }
                let attempt = p.leaves.first().map_or(0, |&i| self.leaves[i].failures);
                tracing::warn!(
                    leaves = %self.names(&p.leaves), attempt,
                    retry_in = ?backoff(&self.timing, attempt),
                    "{why}"
                );
            }
        }
    }

    /// `topo/change` from the platform.
    pub fn on_topo_change(
        &mut self,
        change: &TopoChange,
        message_id: Option<&str>,
        now: Instant,
        outbox_next: u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        for k in &change.leaves {
            let Some(&i) = self.index.get(k) else {
                tracing::info!(leaf = %format!("{}/{}", k.0, k.1), status = ?change.status, "topo/change for a leaf otagw does not manage");
                continue;
            };
            let name = format!("{}/{}", k.0, k.1);
            match change.status {
                TopoStatus::Deleted => {
                    self.offline(i, outbox_next);
                    let l = &mut self.leaves[i];
                    l.state = PlatformState::NotInTopology;
                    l.parked = Some(Park::Console);
                    l.last_error =
                        Some("removed from the gateway's topology in the console".into());
                    tracing::error!(
                        leaf = %name,
                        "removed from the gateway's topology in the console: offline; otagw adds it \
                         again only at its next start (remove it from otagw.toml if it is gone)"
                    );
                }
                TopoStatus::Disabled => {
                    self.offline(i, outbox_next);
                    let l = &mut self.leaves[i];
                    l.parked = Some(Park::Console);
                    l.last_error = Some("disabled in the console".into());
                    tracing::error!(
                        leaf = %name,
                        "disabled in the console: offline until it is enabled there"
                    );
                }
                TopoStatus::Created | TopoStatus::Enabled => {
                    let l = &mut self.leaves[i];
                    if l.parked == Some(Park::Console) {
                        l.parked = None;
                        l.failures = 0;
                        l.not_before = None;
                        l.last_error = None;
                    }
                    tracing::info!(leaf = %name, status = ?change.status, "the console added or enabled the leaf");
                }
                TopoStatus::Other(n) => {
                    tracing::info!(leaf = %name, status = n, "topo/change with an unknown status: ignored");
                }
            }
        }
        if let Some(id) = message_id {
            out.push(Action::Answer {
                topic: format!(
                    "{}_reply",
                    subdevices::topo_change_topic(&self.gw_pk, &self.gw_dn)
                ),
                payload:
                    serde_json::json!({"id": id, "code": 200, "message": "success", "data": {}})
                        .to_string()
                        .into(),
            });
        }
        out.extend(self.plan(now));
        out
    }

    /// An `/ext/error` notice (or an unasked logout reply): the platform
    /// took leaves offline, or dropped a message of a leaf it has offline.
    pub fn on_platform_error(
        &mut self,
        reply: &Reply,
        now: Instant,
        outbox_next: Option<u64>,
    ) -> Vec<Action> {
        let named: Vec<usize> = reply
            .devices
            .iter()
            .filter_map(|k| self.index.get(k).copied())
            .collect();
        if named.is_empty() {
            tracing::warn!(code = reply.code, message = %reply.message, "platform error notice naming no managed leaf");
            return Vec::new();
        }
        for i in named {
            let seq = outbox_next.unwrap_or(self.leaves[i].offline_since_seq);
            self.offline(i, seq);
            let why = format!(
                "the platform took it offline: {} {}",
                reply.code, reply.message
            )
            .trim_end()
            .to_owned();
            let l = &mut self.leaves[i];
            let name = format!("{}/{}", l.id.product_key, l.id.device_name);
            match reply.code {
                521 | 6401 => {
                    l.state = PlatformState::NotInTopology;
                    l.parked = Some(Park::Console);
                    tracing::error!(leaf = %name, "{why}: deleted or removed from the topology; otagw adds it again only at its next start");
                }
                522 | 6204 => {
                    l.parked = Some(Park::Console);
                    tracing::error!(leaf = %name, "{why}: disabled in the console; offline until it is enabled there");
                }
                _ => {
                    // 427 (logged in elsewhere), 520 (no session) and the
                    // rest: log in again, with the backoff.
                    l.failures += 1;
                    let wait = backoff(&self.timing, l.failures);
                    l.not_before = Some(now + wait);
                    tracing::warn!(leaf = %name, retry_in = ?wait, "{why}: logging it in again");
                }
            }
            self.leaves[i].last_error = Some(why);
        }
        self.plan(now)
    }

    /// Replies that did not come in time, and retries that are due.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        let expired: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            let p = self.pending.remove(&id).expect("listed");
            if p.request == SubDeviceRequest::BatchLogout {
                // QoS 0 both ways; nothing waits for it.
                tracing::debug!(id, "no reply to batch_logout");
                continue;
            }
            if p.leaves.is_empty() {
                tracing::warn!(
                    request = p.request.name(),
                    id,
                    "no reply; tried again at the next start"
                );
                continue;
            }
            let back = if p.request == SubDeviceRequest::TopoAdd {
                PlatformState::NotInTopology
            } else {
                PlatformState::InTopology
            };
            let why = format!(
                "no reply to {} within {:?}",
                p.request.name(),
                self.timing.reply_timeout
            );
            let mut attempt = 0;
            for &i in &p.leaves {
                let l = &mut self.leaves[i];
                l.state = back;
                l.failures += 1;
                attempt = attempt.max(l.failures);
                l.not_before = Some(now + backoff(&self.timing, l.failures));
                l.last_error = Some(why.clone());
            }
            tracing::warn!(
                id, leaves = %self.names(&p.leaves), attempt,
                retry_in = ?backoff(&self.timing, attempt),
                "{why}: trying again"
            );
        }
        self.plan(now)
    }

    /// When [`Presence::on_tick`] has something to do next.
    pub fn next_wakeup(&self) -> Option<Instant> {
        if !self.connected {
            return None;
        }
        let deadlines = self.pending.values().map(|p| p.deadline);
        let retries = self
            .leaves
            .iter()
            .filter(|l| {
                l.parked.is_none()
                    && matches!(
                        l.state,
                        PlatformState::NotInTopology | PlatformState::InTopology
                    )
            })
            .filter_map(|l| l.not_before);
        deadlines.chain(retries).min()
    }

    /// The requests due now.
    fn plan(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.connected {
            return out;
        }
        if !self.retired.is_empty() && !self.retire_sent {
            self.retire_sent = true;
            let retired = self.retired.clone();
            tracing::info!(leaves = ?retired, delete = self.delete_retired, "logging out leaves no longer configured");
            // The logout is tracked only to read its reply (520 "no session"
            // is the usual answer: a fresh connection has nobody online).
            out.extend(self.retire_requests(SubDeviceRequest::BatchLogout, &retired, now));
            if self.delete_retired {
                out.extend(self.retire_requests(SubDeviceRequest::TopoDelete, &retired, now));
            } else {
                out.push(Action::Retired(retired));
            }
        }
        for (state, request, batch) in [
            (
                PlatformState::NotInTopology,
                SubDeviceRequest::TopoAdd,
                subdevices::TOPO_ADD_BATCH,
            ),
            (
                PlatformState::InTopology,
                SubDeviceRequest::BatchLogin,
                subdevices::LOGIN_BATCH,
            ),
        ] {
            let due: Vec<usize> = (0..self.leaves.len())
                .filter(|&i| {
                    let l = &self.leaves[i];
                    l.state == state && l.parked.is_none() && l.not_before.is_none_or(|t| t <= now)
                })
                .collect();
            let (solo, together): (Vec<usize>, Vec<usize>) =
                due.into_iter().partition(|&i| self.leaves[i].solo);
            let batches = together
                .chunks(batch)
                .map(<[usize]>::to_vec)
                .chain(solo.into_iter().map(|i| vec![i]))
                .collect::<Vec<_>>();
            for leaves in batches {
                out.push(self.request(request, leaves, now));
            }
        }
        out
    }

    /// `batch_logout` or `topo/delete` requests for leaves no longer
    /// configured, each awaiting its reply.
    fn retire_requests(
        &mut self,
        request: SubDeviceRequest,
        retired: &[(String, String)],
        now: Instant,
    ) -> Vec<Action> {
        let topic = request.topic(&self.gw_pk, &self.gw_dn);
        let mut out = Vec::new();
        for chunk in retired.chunks(subdevices::LOGOUT_BATCH) {
            let first = self.take_ids(1);
            let payloads = if request == SubDeviceRequest::TopoDelete {
                subdevices::topo_delete_payloads(chunk, first)
            } else {
                subdevices::batch_logout_payloads(chunk, first)
            };
            for (id, body) in payloads {
                self.pending.insert(
                    id,
                    Pending {
                        request,
                        leaves: Vec::new(),
                        retired: chunk.to_vec(),
                        deadline: now + self.timing.reply_timeout,
                    },
                );
                out.push(Action::Send {
                    request,
                    topic: topic.clone(),
                    payload: body.into(),
                });
            }
        }
        out
    }

    /// One `topo/add` or `batch_login` for `leaves` (signed now).
    fn request(&mut self, request: SubDeviceRequest, leaves: Vec<usize>, now: Instant) -> Action {
        let first = self.take_ids(1);
        let ts = auth::now_ms();
        let signed: Vec<SignedLeaf<'_>> = leaves
            .iter()
            .filter_map(|&i| SignedLeaf::of(&self.leaves[i].id))
            .collect();
        let (id, body) = if request == SubDeviceRequest::TopoAdd {
            subdevices::topo_add_payloads(&signed, ts, first)
        } else {
            subdevices::batch_login_payloads(&signed, ts, first)
        }
        .into_iter()
        .next()
        .expect("one batch");
        let next = if request == SubDeviceRequest::TopoAdd {
            PlatformState::Adding
        } else {
            PlatformState::LoggingIn
        };
        for &i in &leaves {
            self.leaves[i].state = next;
            self.leaves[i].not_before = None;
        }
        tracing::info!(id, request = request.name(), leaves = %self.names(&leaves), "asking the platform");
        self.pending.insert(
            id,
            Pending {
                request,
                leaves,
                retired: Vec::new(),
                deadline: now + self.timing.reply_timeout,
            },
        );
        Action::Send {
            request,
            topic: request.topic(&self.gw_pk, &self.gw_dn),
            payload: body.into(),
        }
    }

    fn take_ids(&mut self, n: usize) -> u64 {
        let first = self.next_id;
        self.next_id += n as u64;
        first
    }

    /// Take a leaf offline (connection still up): what is held is dropped
    /// (durable messages stay in the outbox and go out at its next login).
    fn offline(&mut self, i: usize, outbox_next: u64) {
        let l = &mut self.leaves[i];
        if matches!(l.state, PlatformState::Online | PlatformState::LoggingIn) {
            l.state = PlatformState::InTopology;
        }
        l.held.clear();
        l.flushing = false;
        l.offline_since_seq = outbox_next;
    }

    fn key(&self, i: usize) -> (String, String) {
        let id = &self.leaves[i].id;
        (id.product_key.clone(), id.device_name.clone())
    }

    fn names(&self, leaves: &[usize]) -> String {
        leaves
            .iter()
            .map(|&i| self.leaves[i].id.device_name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Keep `msg` for later: a progress report replaces the one right before it
/// on the same topic; beyond [`MAX_HELD`] the oldest best-effort message goes.
fn hold(l: &mut Leaf, msg: Held) {
    if let Held::Message { topic, .. } = &msg
        && topic.starts_with("/ota/device/progress/")
        && let Some(Held::Message { topic: last, .. }) = l.held.back()
        && last == topic
    {
        l.held.pop_back();
    }
    l.held.push_back(msg);
    if l.held.len() > MAX_HELD
        && let Some(pos) = l
            .held
            .iter()
            .position(|h| matches!(h, Held::Message { .. }))
    {
        l.held.remove(pos);
    }
}

fn backoff(t: &Timing, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    (t.retry_initial * 2u32.pow(exp)).min(t.retry_max)
}

/// What an operator does about a refusal that names a leaf.
fn hint(code: i64) -> &'static str {
    match code {
        6287 => {
            "the leaf's device_secret in otagw.toml does not match the platform's; correct it and restart otagw"
        }
        6100 => {
            "the platform has no such device; check product_key and device_name in otagw.toml against the console"
        }
        521 => "the device was deleted in the console",
        522 | 6204 => "the device is disabled in the console; enable it there and restart otagw",
        6402 => "a gateway cannot be its own sub-device; remove it from [[device]]",
        _ => "see the platform's error codes",
    }
}

#[cfg(test)]
mod tests;
