//! A strict double of the Alibaba Cloud IoT platform for ONE gateway and its
//! leaves ("sub-devices"), for end-to-end tests of `auth = "aliyun"`.
//!
//! [`AliyunPlatform`] is an MQTT client inside the test process, connected to
//! a real mosquitto started with [`crate::Mosquitto::start_with_log_topic`].
//! The gateway under test connects to the same broker. The double answers the
//! gateway's sub-device requests the way the platform does, keeps the
//! platform's state (topology, online leaves, disabled leaves, pending
//! packages), and records every rule the gateway breaks as a [`Violation`]
//! instead of failing at once, so a test can assert on all of them at the end.
//! Everything it sees and does goes into one ordered log ([`PlatformEvent`]).
//!
//! # The rules enforced, and where they come from
//!
//! From `shared/protocol.md` ("Connecting to the platform", "Gateway and
//! sub-devices") and the platform's "Connect or disconnect sub-devices" and
//! "Manage topological relationships" documents:
//!
//! 1. **Topology** (`/sys/{gwPk}/{gwDn}/thing/topo/add`, answered on
//!    `…/topo/add_reply`). Each entry is `{productKey, deviceName, clientId,
//!    timestamp, signmethod, sign}` with `sign` = hex HMAC-SHA256(leaf
//!    secret, `clientId{cid}deviceName{dn}productKey{pk}timestamp{ts}`).
//!    1–30 entries. A leaf the double was not told about → 6100 "device not
//!    found"; a wrong sign → 6287 "invalid sign"; malformed, empty or more
//!    than 30 → 460 "request parameter error". A request is all-or-nothing:
//!    on an error nothing is added and `data` lists the offending devices. The
//!    topology takes effect when the reply is sent
//!    ([`PlatformOptions::topo_reply_delay`] later), and it survives the
//!    gateway's connections, as on the platform.
//! 2. **Login** (`/ext/session/{gwPk}/{gwDn}/combine/batch_login`, answered
//!    on `…/batch_login_reply` at QoS 0, as the platform's login is QoS 0 both
//!    ways). A request at QoS 1 or 2 is a violation (and still processed).
//!    1–50 entries (else 460), `signMethod` in `params`, `cleanSession`
//!    optional (`"true"`/`"false"`). All-or-nothing; `data` of a failure
//!    lists the devices that failed with the code reported.
//!    [`PlatformOptions::lose_first_logins`] drops the first N requests
//!    silently (no reply, nobody online), as a QoS 0 message can be lost;
//!    [`PlatformOptions::login_reply_delay`] makes a login take effect (and be
//!    answered) that much later, so a gateway that publishes for a leaf after
//!    sending its login but before the reply is caught.
//! 3. **Logout / delete**: `combine/batch_logout` (`params` a list of
//!    `{productKey, deviceName}`) takes them offline (200; 520 "device no
//!    session" if none of them was online); `thing/topo/delete` removes them
//!    from the topology and takes them offline (200).
//! 4. **Offline on disconnect**: every leaf goes offline when the gateway's
//!    connection ends, when a new connection of the gateway's client id
//!    begins, and when the double's own connection to the broker drops (a
//!    broker restart). See "Ordering" below.
//! 5. **Publishes for leaves that are not online are dropped**: anything the
//!    gateway publishes on a configured leaf's own topics (`/ota/device/
//!    {kind}/{pk}/{dn}`, `/sys/{pk}/{dn}/…`, `/ext/{kind}/{pk}/{dn}/…`,
//!    `/{pk}/{dn}/user/…`) while the leaf is not online is a violation naming
//!    the leaf's state, and is not accepted. A publish on those forms of
//!    topic for a device that is neither the gateway nor a configured leaf is
//!    a violation too (the platform does not let a connection speak for
//!    strangers). The gateway's own topics, and topics of no such form, are
//!    always accepted.
//! 6. **Platform-initiated**: [`AliyunPlatform::topo_change`] publishes
//!    `thing/topo/change` and applies it; [`AliyunPlatform::force_offline`]
//!    publishes a notice on `/ext/error/{gwPk}/{gwDn}` and takes the leaf
//!    offline.
//! 7. **Upgrades**: [`AliyunPlatform::notify_upgrade`] pushes a notice to an
//!    online device only; `…/thing/ota/firmware/get` from the gateway or an
//!    online leaf is answered with the pending package
//!    ([`AliyunPlatform::set_pending`]) or `"data":{}`.
//!
//! Besides, the gateway's CONNECT as mosquitto logs it is checked: client id
//! `{prefix}securemode=N,signmethod=…[,timestamp=…]|` (when the prefix ends
//! with `|`), username `{gwDn}&{gwPk}`, keep-alive 30–1200 s; and any publish
//! at QoS 2 is a violation (the platform supports QoS 0 and 1 only).
//!
//! # Decisions where the documents are silent or disagree
//!
//! - `thing/topo/change` `status`: 0 = created (added to the topology), 1 =
//!   deleted (removed, offline). For 2 and 8 one version of the document says
//!   2 = disabled / 8 = enabled, another 2 = enabled / 8 = disabled. The
//!   double uses **8 = disabled** (offline; login then fails with 522 "device
//!   forbidden") and **2 = enabled**. Other statuses are published with no
//!   effect on the state.
//! - The payload of the `/ext/error/{gwPk}/{gwDn}` notice that takes a leaf
//!   offline is not fully documented; the double sends
//!   `{"id":"…","code":C,"message":"…","data":{"productKey","deviceName"}}`.
//!   [`AliyunPlatform::force_offline`] changes nothing but the online state
//!   (use `topo_change` for the topology).
//! - When several leaves of one request fail for different reasons, the code
//!   is the first in this order: 460, 6100 (unknown), 6287 (sign), 6401
//!   (not in the topology), 522 (disabled); `data` lists the leaves that
//!   failed with that code. For 460 caused by the number of entries, `data`
//!   is empty.
//! - Signatures: only `hmacSha256` (any case) is implemented (what otagw
//!   sends); another method is answered 460. The hex `sign` is compared
//!   without regard to case (the platform's own sample is upper case).
//!   `timestamp` may be a string or a number; its age is not checked.
//! - Replies: `id` is echoed as a string (a number is accepted);
//!   `firmware/get_reply` echoes the request's `id` as it came.
//! - `thing/topo/delete` of a leaf not in the topology is answered 200.
//! - [`AliyunPlatform::notify_upgrade`] also makes the notice the pending
//!   package of that device (as a platform upgrade task would).
//! - QoS of what the double publishes: 0 for `combine/…_reply`, 1 otherwise.
//!
//! Not enforced: the 2,000-online and 200-logins-a-second limits, the
//! gateway's CONNECT password (mosquitto does not show it), single
//! `combine/login`/`logout` (accepted, not answered).
//!
//! # Ordering (what makes the offline rule race-free)
//!
//! The double subscribes to `#` and `$SYS/broker/log/#` at QoS 2 (so a
//! message reaches it at the QoS the gateway published it with) on one
//! connection, and handles what arrives strictly in order. It relies on:
//!
//! - mosquitto (single-threaded) logging `New client connected … as <id>` while
//!   it handles that client's CONNECT, and routing the log line to
//!   subscribers at once, before it reads any PUBLISH of that client; and
//!   logging `Client <id> closed its connection.` (and the other endings)
//!   after the last PUBLISH it read from that connection;
//! - mosquitto sending a subscriber its messages in the order it routed them.
//!   With an inflight window, a QoS 0 message could overtake QoS 1/2
//!   messages waiting behind a full window: `start_with_log_topic` sets
//!   `max_inflight_messages 0` so there is no window;
//! - on a takeover (a second connection with the same client id) mosquitto
//!   logging `Client <id> already connected, closing old connection.` before
//!   the new `New client connected`, and nothing later for the old one (true
//!   of 2.0.11). A disconnect line for a client id other than the current
//!   gateway connection's is ignored (an older connection with another
//!   timestamp in its id, which the platform would have kicked).
//!
//! The tests `the_connect_line_precedes_the_first_publish_of_a_connection`
//! and `qos0_and_qos1_publishes_are_seen_in_the_order_they_were_sent` check
//! the first two (the second fails with mosquitto's default window of 20),
//! `a_new_gateway_connection_takes_every_leaf_offline` the third, and
//! `mosquitto_2_0_11_lines_track_the_gateway_connection` the log lines as
//! mosquitto 2.0.11 writes them. Messages the double publishes come back to it (it
//! subscribes to `#`); it recognises them by topic and payload and ignores
//! them. Anything else published on the broker counts as the gateway's: do
//! not publish on it from a test except as the gateway.
//!
//! After a broker restart the double's session (persistent) keeps its
//! subscriptions, so it also sees the gateway's new connection if the gateway
//! is faster than the double to reconnect. After [`crate::Mosquitto::kill`]
//! the session is gone: the double subscribes again and misses what happens
//! before its SUBACK. A QoS 1 message that mosquitto redelivers after a
//! restart (the double's PUBACK died with the broker) is recognised as a
//! byte-identical copy of a leaf message already accepted and logged as
//! `Redelivered`, not judged again: the gateway's messages carry unique ids,
//! so an identical one is the same message.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::Message;

/// At most this many leaves in one `topo/add`.
pub const TOPO_ADD_MAX: usize = 30;
/// At most this many leaves in one `combine/batch_login` (or logout).
pub const LOGIN_MAX: usize = 50;

/// The topic mosquitto publishes its log under (`log_dest topic`).
const LOG_TOPIC: &str = "$SYS/broker/log/";

/// `(productKey, deviceName)`.
type Key = (String, String);

/// A device the platform knows: product key, device name, device secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub product_key: String,
    pub device_name: String,
    pub secret: String,
}

impl Identity {
    pub fn new(product_key: &str, device_name: &str, secret: &str) -> Identity {
        Identity {
            product_key: product_key.into(),
            device_name: device_name.into(),
            secret: secret.into(),
        }
    }

    fn key(&self) -> Key {
        (self.product_key.clone(), self.device_name.clone())
    }
}

/// What the double knows and how it misbehaves on purpose.
#[derive(Debug, Clone)]
pub struct PlatformOptions {
    /// The gateway (its secret is not checked: mosquitto does not show the
    /// CONNECT password).
    pub gateway: Identity,
    /// The leaves registered on the platform; any other leaf is "not found".
    pub leaves: Vec<Identity>,
    /// How long a valid `topo/add` takes: the topology changes and the reply
    /// goes out this much later (0: at once).
    pub topo_reply_delay: Duration,
    /// Drop this many `batch_login` requests first (no reply, no effect).
    pub lose_first_logins: usize,
    /// How long a `batch_login` takes: the leaves come online, and the reply
    /// goes out, this much later (0: at once), and only if the gateway's
    /// connection is still the one that asked. Anything the gateway publishes
    /// for those leaves in between is a violation: a gateway must wait for
    /// the reply, not only send the request.
    pub login_reply_delay: Duration,
    /// `(productKey, deviceName)` already in the gateway's topology.
    pub already_in_topology: Vec<(String, String)>,
    /// The start of the gateway's MQTT client id; default `{gwPk}.{gwDn}|`.
    pub gateway_client_prefix: Option<String>,
}

impl PlatformOptions {
    pub fn new(gateway: Identity, leaves: Vec<Identity>) -> PlatformOptions {
        PlatformOptions {
            gateway,
            leaves,
            topo_reply_delay: Duration::ZERO,
            lose_first_logins: 0,
            login_reply_delay: Duration::ZERO,
            already_in_topology: Vec::new(),
            gateway_client_prefix: None,
        }
    }
}

/// A rule the gateway broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Index of this violation in [`AliyunPlatform::log`].
    pub at: usize,
    /// The topic concerned (empty for a CONNECT).
    pub topic: String,
    /// The payload (or the mosquitto log line of a CONNECT), lossy UTF-8.
    pub payload: String,
    /// What was wrong, with the leaf's state where there is one.
    pub what: String,
}

/// One entry of the double's log, in the order things happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlatformEvent {
    /// The gateway's `n`-th MQTT connection (counting from 1) began.
    GatewayConnected {
        n: usize,
        client_id: String,
    },
    /// The gateway's current connection ended (`line`: mosquitto's notice).
    GatewayDisconnected {
        client_id: String,
        line: String,
    },
    /// The double's own connection to the broker dropped.
    BrokerLost,
    /// The double is connected to the broker again.
    BrokerBack {
        session_present: bool,
    },
    /// A publish of the gateway the platform took in (requests included).
    Accepted {
        message: Message,
        qos: u8,
    },
    /// A second copy of a message already accepted, redelivered by mosquitto
    /// to the double's persistent session after a broker restart (the
    /// double's PUBACK was lost with the broker): not judged again.
    Redelivered {
        message: Message,
    },
    /// A `batch_login` dropped on purpose ([`PlatformOptions::lose_first_logins`]).
    Lost {
        message: Message,
    },
    /// A message the double published (a reply or a notice).
    Sent {
        message: Message,
    },
    TopologyAdded {
        product_key: String,
        device_name: String,
    },
    TopologyRemoved {
        product_key: String,
        device_name: String,
    },
    Disabled {
        product_key: String,
        device_name: String,
    },
    Enabled {
        product_key: String,
        device_name: String,
    },
    Online {
        product_key: String,
        device_name: String,
    },
    Offline {
        product_key: String,
        device_name: String,
        why: String,
    },
    Violation(Violation),
}

impl PlatformEvent {
    /// The message of an `Accepted`, `Lost`, `Redelivered` or `Sent` event.
    pub fn message(&self) -> Option<&Message> {
        match self {
            PlatformEvent::Accepted { message, .. }
            | PlatformEvent::Lost { message }
            | PlatformEvent::Redelivered { message }
            | PlatformEvent::Sent { message } => Some(message),
            _ => None,
        }
    }
}

impl fmt::Display for PlatformEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use PlatformEvent as E;
        match self {
            E::GatewayConnected { n, client_id } => write!(f, "gateway connect #{n} ({client_id})"),
            E::GatewayDisconnected { line, .. } => write!(f, "gateway disconnect: {line}"),
            E::BrokerLost => write!(f, "platform lost the broker"),
            E::BrokerBack { session_present } => {
                write!(f, "platform back on the broker (session {session_present})")
            }
            E::Accepted { message, qos } => {
                write!(f, "accepted q{qos} {} {}", message.topic, message.text())
            }
            E::Lost { message } => write!(f, "lost {} {}", message.topic, message.text()),
            E::Redelivered { message } => {
                write!(f, "redelivered {} {}", message.topic, message.text())
            }
            E::Sent { message } => write!(f, "sent {} {}", message.topic, message.text()),
            E::TopologyAdded {
                product_key,
                device_name,
            } => {
                write!(f, "topology + {product_key}/{device_name}")
            }
            E::TopologyRemoved {
                product_key,
                device_name,
            } => {
                write!(f, "topology - {product_key}/{device_name}")
            }
            E::Disabled {
                product_key,
                device_name,
            } => {
                write!(f, "disabled {product_key}/{device_name}")
            }
            E::Enabled {
                product_key,
                device_name,
            } => {
                write!(f, "enabled {product_key}/{device_name}")
            }
            E::Online {
                product_key,
                device_name,
            } => {
                write!(f, "online {product_key}/{device_name}")
            }
            E::Offline {
                product_key,
                device_name,
                why,
            } => {
                write!(f, "offline {product_key}/{device_name} ({why})")
            }
            E::Violation(v) => write!(f, "VIOLATION {}: {} {}", v.what, v.topic, v.payload),
        }
    }
}

/// Lowercase hex HMAC-SHA256(secret, `clientId{cid}deviceName{dn}productKey{pk}timestamp{ts}`):
/// a leaf's `sign` in `topo/add` and `batch_login` (and a CONNECT password).
pub fn sign(
    secret: &str,
    client_id: &str,
    device_name: &str,
    product_key: &str,
    ts: &str,
) -> String {
    hmac_sha256_hex(
        secret.as_bytes(),
        format!("clientId{client_id}deviceName{device_name}productKey{product_key}timestamp{ts}")
            .as_bytes(),
    )
}

fn hmac_sha256_hex(key: &[u8], data: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}

/// A publish the double is to make.
#[derive(Debug)]
struct Out {
    topic: String,
    qos: QoS,
    payload: Vec<u8>,
}

/// What handling a publish asks the I/O side to do.
#[derive(Debug)]
enum Effect {
    Send(Out),
    /// Apply a valid `topo/add` (and reply) after the configured delay.
    TopoAddLater {
        id: String,
        devices: Vec<Key>,
    },
    /// Apply a `batch_login` (and reply) after the configured delay, if the
    /// gateway's connection `connection` is still the live one.
    LoginLater {
        id: String,
        request: Value,
        connection: usize,
    },
}

/// The platform's state and rules, without I/O.
struct Core {
    gw: Key,
    prefix: String,
    secrets: HashMap<Key, String>,
    topo_delay: Duration,
    login_delay: Duration,
    topology: BTreeSet<Key>,
    disabled: BTreeSet<Key>,
    online: BTreeSet<Key>,
    pending: HashMap<Key, Value>,
    logins_to_lose: usize,
    connects: usize,
    /// The client id of the gateway's live connection.
    gateway_client: Option<String>,
    /// What the double published and has not seen come back yet.
    echoes: Vec<(String, Vec<u8>)>,
    /// Leaf messages accepted so far: an identical one again is a
    /// redelivery, not a new publish of the gateway.
    accepted_leaf: std::collections::HashSet<(String, Vec<u8>)>,
    next_id: u64,
    log: Vec<PlatformEvent>,
    /// A client id whose connect line proves the broker log arrives.
    log_check: String,
    log_checked: bool,
}

/// A failed request: code, message, offending devices.
type Failure = (i64, &'static str, Vec<Key>);

fn param_error(bad: Vec<Key>) -> Failure {
    (460, "request parameter error", bad)
}

fn device_json(k: &Key) -> Value {
    json!({"productKey": k.0, "deviceName": k.1})
}

/// The request's `id` as a string (a number is accepted).
fn request_id(v: &Value) -> Option<String> {
    match v.get("id") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

/// `{productKey, deviceName}` of a list entry.
fn entry_key(v: &Value) -> Option<Key> {
    Some((
        str_field(v, "productKey")?.to_string(),
        str_field(v, "deviceName")?.to_string(),
    ))
}

/// A signed entry of `topo/add` or `batch_login`.
struct Signed {
    key: Key,
    client_id: String,
    timestamp: String,
    sign: String,
}

fn signed_entry(v: &Value) -> Option<Signed> {
    let timestamp = match v.get("timestamp") {
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.clone()
        }
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        _ => return None,
    };
    Some(Signed {
        key: entry_key(v)?,
        client_id: str_field(v, "clientId")?.to_string(),
        timestamp,
        sign: str_field(v, "sign")?.to_string(),
    })
}

fn is_hmac_sha256(v: Option<&str>) -> bool {
    v.is_some_and(|m| m.eq_ignore_ascii_case("hmacsha256"))
}

/// The device a topic is about, by the platform's topic forms.
fn device_of(topic: &str) -> Option<Key> {
    let s: Vec<&str> = topic.split('/').collect();
    let key = |a: usize, b: usize| Some((s.get(a)?.to_string(), s.get(b)?.to_string()));
    if s.first() != Some(&"") {
        return None;
    }
    match s.get(1).copied()? {
        "sys" if s.len() >= 4 => key(2, 3),
        "ota" if s.len() >= 6 && s[2] == "device" => key(4, 5),
        "ext" if s.len() >= 5 => key(3, 4),
        _ if s.len() >= 4 && s[3] == "user" => key(1, 2),
        _ => None,
    }
}

/// `[<time>: ]<message>` of a mosquitto log line.
fn log_message(line: &str) -> &str {
    match line.split_once(": ") {
        Some((time, msg)) if !time.is_empty() && time.bytes().all(|b| b.is_ascii_digit()) => msg,
        _ => line,
    }
}

impl Core {
    fn new(opts: &PlatformOptions, log_check: String) -> Core {
        let gw = opts.gateway.key();
        Core {
            prefix: opts
                .gateway_client_prefix
                .clone()
                .unwrap_or_else(|| format!("{}.{}|", gw.0, gw.1)),
            gw,
            secrets: opts
                .leaves
                .iter()
                .map(|l| (l.key(), l.secret.clone()))
                .collect(),
            topo_delay: opts.topo_reply_delay,
            login_delay: opts.login_reply_delay,
            topology: opts.already_in_topology.iter().cloned().collect(),
            disabled: BTreeSet::new(),
            online: BTreeSet::new(),
            pending: HashMap::new(),
            logins_to_lose: opts.lose_first_logins,
            connects: 0,
            gateway_client: None,
            echoes: Vec::new(),
            accepted_leaf: std::collections::HashSet::new(),
            next_id: 1000,
            log: Vec::new(),
            log_check,
            log_checked: false,
        }
    }

    fn gw_topic(&self, form: &str) -> String {
        form.replace("{gw}", &format!("{}/{}", self.gw.0, self.gw.1))
    }

    fn push(&mut self, e: PlatformEvent) {
        self.log.push(e);
    }

    fn violate(&mut self, topic: &str, payload: &str, what: String) {
        let at = self.log.len();
        self.push(PlatformEvent::Violation(Violation {
            at,
            topic: topic.into(),
            payload: payload.into(),
            what,
        }));
    }

    /// What the platform thinks of a leaf, for messages.
    fn state(&self, k: &Key) -> &'static str {
        if !self.secrets.contains_key(k) && *k != self.gw {
            "unknown to the platform"
        } else if self.online.contains(k) {
            "online"
        } else if !self.topology.contains(k) {
            "not in the topology"
        } else if self.disabled.contains(k) {
            "in the topology but disabled (offline)"
        } else {
            "in the topology but offline"
        }
    }

    fn go_online(&mut self, k: &Key) {
        if self.online.insert(k.clone()) {
            self.push(PlatformEvent::Online {
                product_key: k.0.clone(),
                device_name: k.1.clone(),
            });
        }
    }

    fn go_offline(&mut self, k: &Key, why: &str) {
        if self.online.remove(k) {
            self.push(PlatformEvent::Offline {
                product_key: k.0.clone(),
                device_name: k.1.clone(),
                why: why.into(),
            });
        }
    }

    fn all_offline(&mut self, why: &str) {
        for k in self.online.clone() {
            self.go_offline(&k, why);
        }
    }

    fn add_to_topology(&mut self, k: &Key) {
        if self.topology.insert(k.clone()) {
            self.push(PlatformEvent::TopologyAdded {
                product_key: k.0.clone(),
                device_name: k.1.clone(),
            });
        }
    }

    fn remove_from_topology(&mut self, k: &Key, why: &str) {
        self.go_offline(k, why);
        if self.topology.remove(k) {
            self.push(PlatformEvent::TopologyRemoved {
                product_key: k.0.clone(),
                device_name: k.1.clone(),
            });
        }
    }

    /// Record and remember a publish of the double.
    fn send(&mut self, topic: String, qos: QoS, body: &Value) -> Out {
        let payload = body.to_string().into_bytes();
        self.echoes.push((topic.clone(), payload.clone()));
        if self.echoes.len() > 4096 {
            self.echoes.remove(0);
        }
        self.push(PlatformEvent::Sent {
            message: Message {
                topic: topic.clone(),
                payload: payload.clone(),
            },
        });
        Out {
            topic,
            qos,
            payload,
        }
    }

    fn reply(
        &mut self,
        topic: String,
        qos: QoS,
        id: &str,
        result: Result<Vec<Key>, Failure>,
    ) -> Effect {
        let body = match result {
            Ok(devices) => json!({
                "id": id, "code": 200, "message": "success",
                "data": devices.iter().map(device_json).collect::<Vec<_>>(),
            }),
            Err((code, message, bad)) => json!({
                "id": id, "code": code, "message": message,
                "data": bad.iter().map(device_json).collect::<Vec<_>>(),
            }),
        };
        Effect::Send(self.send(topic, qos, &body))
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    // ---- what arrives -------------------------------------------------

    /// A line of mosquitto's log.
    fn on_log(&mut self, line: &str) {
        let msg = log_message(line);
        if !self.log_checked && msg.contains(&self.log_check) {
            self.log_checked = true;
        }
        if let Some(rest) = msg.strip_prefix("New client connected from ") {
            let Some((_, tail)) = rest.split_once(" as ") else {
                return;
            };
            if !tail.starts_with(&self.prefix) {
                return;
            }
            let client_id = tail.split(' ').next().unwrap_or_default().to_string();
            self.connects += 1;
            let n = self.connects;
            self.gateway_client = Some(client_id.clone());
            self.push(PlatformEvent::GatewayConnected {
                n,
                client_id: client_id.clone(),
            });
            self.all_offline(&format!("gateway connection #{n} began"));
            self.check_connect(&client_id, &tail[client_id.len()..], msg);
            return;
        }
        // The endings of a connection in mosquitto 2.0.11 (and 1.x's
        // "Socket error on client <id>, disconnecting.").
        let rest = [
            "Client ",
            "Bad socket read/write on client ",
            "Socket error on client ",
            "Bad client ",
        ]
        .iter()
        .find_map(|p| msg.strip_prefix(p).map(|r| (*p, r)));
        let Some((how, rest)) = rest else { return };
        if !rest.starts_with(&self.prefix) {
            return;
        }
        let client_id = rest
            .split(' ')
            .next()
            .unwrap_or_default()
            .trim_end_matches([':', ','])
            .to_string();
        let tail = rest[client_id.len()..]
            .trim_start_matches([':', ','])
            .trim_start();
        let ends = how != "Client "
            || [
                "disconnected",
                "closed its connection",
                "has exceeded timeout",
                "been disconnected",
                "already connected, closing old connection",
            ]
            .iter()
            .any(|t| tail.starts_with(t));
        if !ends || self.gateway_client.as_deref() != Some(client_id.as_str()) {
            return;
        }
        self.gateway_client = None;
        self.push(PlatformEvent::GatewayDisconnected {
            client_id,
            line: msg.to_string(),
        });
        self.all_offline("the gateway's connection ended");
    }

    /// The form of the gateway's CONNECT: `tail` is ` (p2, c1, k60, u'dn&pk').`
    fn check_connect(&mut self, client_id: &str, tail: &str, line: &str) {
        let mut problems = Vec::new();
        if self.prefix.ends_with('|') {
            let rest = client_id.get(self.prefix.len()..).unwrap_or_default();
            match rest.strip_suffix('|') {
                None => problems.push(format!("client id {client_id:?} does not end with '|'")),
                Some(params) => {
                    let kv: HashMap<&str, &str> = params
                        .split(',')
                        .filter_map(|p| p.split_once('='))
                        .collect();
                    if !matches!(kv.get("securemode"), Some(&("2" | "3"))) {
                        problems.push(format!(
                            "client id {client_id:?}: securemode must be 2 or 3"
                        ));
                    }
                    if !matches!(
                        kv.get("signmethod"),
                        Some(&("hmacsha256" | "hmacsha1" | "hmacmd5"))
                    ) {
                        problems.push(format!(
                            "client id {client_id:?}: signmethod must be hmacsha256, hmacsha1 or hmacmd5"
                        ));
                    }
                    if let Some(ts) = kv.get("timestamp")
                        && (ts.is_empty() || !ts.bytes().all(|b| b.is_ascii_digit()))
                    {
                        problems.push(format!(
                            "client id {client_id:?}: timestamp is not a number"
                        ));
                    }
                }
            }
        }
        let fields: Vec<&str> = tail
            .trim()
            .trim_start_matches('(')
            .trim_end_matches('.')
            .trim_end_matches(')')
            .split(", ")
            .collect();
        let keepalive = fields
            .iter()
            .find_map(|f| f.strip_prefix('k').and_then(|k| k.parse::<u64>().ok()));
        match keepalive {
            Some(k) if (30..=1200).contains(&k) => {}
            other => problems.push(format!("keep-alive {other:?} s is outside 30..=1200")),
        }
        let want = format!("{}&{}", self.gw.1, self.gw.0);
        let user = fields
            .iter()
            .find_map(|f| f.strip_prefix("u'").map(|u| u.trim_end_matches('\'')));
        if user != Some(want.as_str()) {
            problems.push(format!("username {user:?}, expected {want:?}"));
        }
        for p in problems {
            self.violate("", line, format!("gateway CONNECT: {p}"));
        }
    }

    /// The double's own connection dropped.
    fn on_broker_lost(&mut self) {
        self.gateway_client = None;
        self.push(PlatformEvent::BrokerLost);
        self.all_offline("the platform lost the broker");
    }

    /// A publish seen on the broker (not the log).
    fn on_publish(&mut self, topic: &str, payload: &[u8], qos: u8) -> Vec<Effect> {
        // Kept after a match: a QoS 1 message of the double can come back
        // twice (mosquitto redelivers it to the double's persistent session
        // after a broker restart).
        if self.echoes.iter().any(|(t, p)| t == topic && p == payload) {
            return Vec::new();
        }
        let text = String::from_utf8_lossy(payload).into_owned();
        if qos > 1 {
            self.violate(
                topic,
                &text,
                format!("QoS {qos} publish: the platform supports QoS 0 and 1 only"),
            );
        }
        let message = Message {
            topic: topic.into(),
            payload: payload.to_vec(),
        };
        let Some(device) = device_of(topic) else {
            self.push(PlatformEvent::Accepted { message, qos });
            return Vec::new();
        };
        if device == self.gw {
            return self.gateway_publish(message, qos, &text);
        }
        if !self.secrets.contains_key(&device) {
            self.violate(
                topic,
                &text,
                format!(
                    "published on a topic of {}/{}, neither this gateway nor one of its leaves",
                    device.0, device.1
                ),
            );
            return Vec::new();
        }
        if self
            .accepted_leaf
            .contains(&(topic.to_owned(), payload.to_vec()))
        {
            self.push(PlatformEvent::Redelivered { message });
            return Vec::new();
        }
        if !self.online.contains(&device) {
            let what = format!(
                "published for leaf {}/{} while it is {} (the platform drops it)",
                device.0,
                device.1,
                self.state(&device)
            );
            self.violate(topic, &text, what);
            return Vec::new();
        }
        self.accepted_leaf
            .insert((topic.to_owned(), payload.to_vec()));
        self.push(PlatformEvent::Accepted { message, qos });
        self.maybe_firmware_get(&device, topic, payload)
    }

    /// `…/thing/ota/firmware/get` of an online device: answer it.
    fn maybe_firmware_get(&mut self, device: &Key, topic: &str, payload: &[u8]) -> Vec<Effect> {
        if topic != format!("/sys/{}/{}/thing/ota/firmware/get", device.0, device.1) {
            return Vec::new();
        }
        let reply_topic = format!("{topic}_reply");
        let body = match serde_json::from_slice::<Value>(payload) {
            Ok(v) if matches!(v.get("id"), Some(Value::String(_) | Value::Number(_))) => json!({
                "id": v["id"],
                "code": 200,
                "data": self.pending.get(device).cloned().unwrap_or_else(|| json!({})),
            }),
            _ => json!({"id": "", "code": 460, "message": "request parameter error", "data": {}}),
        };
        vec![Effect::Send(self.send(
            reply_topic,
            QoS::AtLeastOnce,
            &body,
        ))]
    }

    fn gateway_publish(&mut self, message: Message, qos: u8, text: &str) -> Vec<Effect> {
        let topic = message.topic.clone();
        let is = |form: &str| topic == self.gw_topic(form);
        let (add, delete, login, logout) = (
            is("/sys/{gw}/thing/topo/add"),
            is("/sys/{gw}/thing/topo/delete"),
            is("/ext/session/{gw}/combine/batch_login"),
            is("/ext/session/{gw}/combine/batch_logout"),
        );
        if login && qos != 0 {
            self.violate(
                &topic,
                text,
                format!("batch_login published at QoS {qos}: the platform takes it at QoS 0 only"),
            );
        }
        if login && self.logins_to_lose > 0 {
            self.logins_to_lose -= 1;
            self.push(PlatformEvent::Lost { message });
            return Vec::new();
        }
        let payload = message.payload.clone();
        self.push(PlatformEvent::Accepted { message, qos });
        let v: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
        let id = request_id(&v);
        let reply_topic = format!("{topic}_reply");
        let id_text = id.clone().unwrap_or_default();
        if add {
            let result = id
                .ok_or_else(|| param_error(vec![]))
                .and_then(|_| self.check_topo_add(&v));
            return match result {
                Ok(devices) if !self.topo_delay.is_zero() => vec![Effect::TopoAddLater {
                    id: id_text,
                    devices,
                }],
                Ok(devices) => vec![self.apply_topo_add(&id_text, devices)],
                Err(f) => vec![self.reply(reply_topic, QoS::AtLeastOnce, &id_text, Err(f))],
            };
        }
        if login {
            if !self.login_delay.is_zero() && id.is_some() {
                return vec![Effect::LoginLater {
                    id: id_text,
                    request: v,
                    connection: self.connects,
                }];
            }
            let result = id
                .ok_or_else(|| param_error(vec![]))
                .and_then(|_| self.login(&v));
            return vec![self.reply(reply_topic, QoS::AtMostOnce, &id_text, result)];
        }
        if logout {
            let result = id
                .ok_or_else(|| param_error(vec![]))
                .and_then(|_| self.logout(&v));
            return vec![self.reply(reply_topic, QoS::AtMostOnce, &id_text, result)];
        }
        if delete {
            let result = id
                .ok_or_else(|| param_error(vec![]))
                .and_then(|_| self.topo_delete(&v));
            return vec![self.reply(reply_topic, QoS::AtLeastOnce, &id_text, result)];
        }
        let gw = self.gw.clone();
        self.maybe_firmware_get(&gw, &topic, &payload)
    }

    /// Unknown leaves (6100), then wrong signs (6287).
    fn check_signed(&self, entries: &[Signed]) -> Result<(), Failure> {
        let unknown: Vec<Key> = entries
            .iter()
            .filter(|e| !self.secrets.contains_key(&e.key))
            .map(|e| e.key.clone())
            .collect();
        if !unknown.is_empty() {
            return Err((6100, "device not found", unknown));
        }
        let bad: Vec<Key> = entries
            .iter()
            .filter(|e| {
                let want = sign(
                    &self.secrets[&e.key],
                    &e.client_id,
                    &e.key.1,
                    &e.key.0,
                    &e.timestamp,
                );
                !want.eq_ignore_ascii_case(&e.sign)
            })
            .map(|e| e.key.clone())
            .collect();
        if bad.is_empty() {
            Ok(())
        } else {
            Err((6287, "invalid sign", bad))
        }
    }

    /// Parse a list of signed entries; 460 naming the malformed ones.
    fn signed_list(
        list: Option<&Value>,
        max: usize,
        method: impl Fn(&Value) -> bool,
    ) -> Result<Vec<Signed>, Failure> {
        let list = list
            .and_then(Value::as_array)
            .ok_or_else(|| param_error(vec![]))?;
        if list.is_empty() || list.len() > max {
            return Err(param_error(vec![]));
        }
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for e in list {
            match signed_entry(e) {
                Some(s) if method(e) => out.push(s),
                Some(s) => bad.push(s.key),
                None => bad.extend(entry_key(e)),
            }
        }
        if bad.is_empty() && out.len() == list.len() {
            Ok(out)
        } else {
            Err(param_error(bad))
        }
    }

    fn check_topo_add(&self, v: &Value) -> Result<Vec<Key>, Failure> {
        if v.get("method").is_some_and(|m| m != "thing.topo.add") {
            return Err(param_error(vec![]));
        }
        let entries = Self::signed_list(v.get("params"), TOPO_ADD_MAX, |e| {
            is_hmac_sha256(str_field(e, "signmethod"))
        })?;
        self.check_signed(&entries)?;
        Ok(entries.into_iter().map(|e| e.key).collect())
    }

    fn apply_topo_add(&mut self, id: &str, devices: Vec<Key>) -> Effect {
        for k in &devices {
            self.add_to_topology(k);
        }
        let topic = self.gw_topic("/sys/{gw}/thing/topo/add_reply");
        self.reply(topic, QoS::AtLeastOnce, id, Ok(devices))
    }

    fn login(&mut self, v: &Value) -> Result<Vec<Key>, Failure> {
        let params = v.get("params").ok_or_else(|| param_error(vec![]))?;
        if !is_hmac_sha256(str_field(params, "signMethod")) {
            return Err(param_error(vec![]));
        }
        let entries = Self::signed_list(params.get("deviceList"), LOGIN_MAX, |e| {
            matches!(e.get("cleanSession"), None | Some(Value::String(_)))
                && str_field(e, "cleanSession").is_none_or(|c| c == "true" || c == "false")
        })?;
        self.check_signed(&entries)?;
        let keys: Vec<Key> = entries.into_iter().map(|e| e.key).collect();
        let outside: Vec<Key> = keys
            .iter()
            .filter(|k| !self.topology.contains(*k))
            .cloned()
            .collect();
        if !outside.is_empty() {
            return Err((6401, "topo relation not exist", outside));
        }
        let disabled: Vec<Key> = keys
            .iter()
            .filter(|k| self.disabled.contains(*k))
            .cloned()
            .collect();
        if !disabled.is_empty() {
            return Err((522, "device forbidden", disabled));
        }
        for k in &keys {
            self.go_online(k);
        }
        Ok(keys)
    }

    /// A delayed `batch_login` ([`PlatformOptions::login_reply_delay`]): judged
    /// now, on the state now; dropped (no reply) if the connection that sent
    /// it is gone, as the platform drops a session's requests.
    fn apply_login_later(&mut self, id: &str, v: &Value, connection: usize) -> Option<Effect> {
        if self.connects != connection || self.gateway_client.is_none() {
            return None;
        }
        let result = self.login(v);
        let topic = self.gw_topic("/ext/session/{gw}/combine/batch_login_reply");
        Some(self.reply(topic, QoS::AtMostOnce, id, result))
    }

    /// `[{productKey, deviceName}…]`, 1..=max, all known.
    fn plain_list(&self, list: Option<&Value>, max: usize) -> Result<Vec<Key>, Failure> {
        let list = list
            .and_then(Value::as_array)
            .ok_or_else(|| param_error(vec![]))?;
        if list.is_empty() || list.len() > max {
            return Err(param_error(vec![]));
        }
        let keys: Vec<Key> = list.iter().filter_map(entry_key).collect();
        if keys.len() != list.len() {
            return Err(param_error(keys));
        }
        let unknown: Vec<Key> = keys
            .iter()
            .filter(|k| !self.secrets.contains_key(*k))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err((6100, "device not found", unknown));
        }
        Ok(keys)
    }

    fn logout(&mut self, v: &Value) -> Result<Vec<Key>, Failure> {
        let keys = self.plain_list(v.get("params"), LOGIN_MAX)?;
        if !keys.iter().any(|k| self.online.contains(k)) {
            return Err((520, "device no session", keys));
        }
        for k in &keys {
            self.go_offline(k, "batch_logout");
        }
        Ok(keys)
    }

    fn topo_delete(&mut self, v: &Value) -> Result<Vec<Key>, Failure> {
        if v.get("method").is_some_and(|m| m != "thing.topo.delete") {
            return Err(param_error(vec![]));
        }
        let keys = self.plain_list(v.get("params"), TOPO_ADD_MAX)?;
        for k in &keys {
            self.remove_from_topology(k, "thing/topo/delete");
        }
        Ok(keys)
    }

    fn describe(&self) -> String {
        let list = |s: &BTreeSet<Key>| {
            s.iter()
                .map(|k| format!("{}/{}", k.0, k.1))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let from = self.log.len().saturating_sub(40);
        let tail: Vec<String> = self.log[from..]
            .iter()
            .enumerate()
            .map(|(i, e)| format!("  {:>4} {e}", from + i))
            .collect();
        format!(
            "online: [{}]; topology: [{}]; disabled: [{}]; gateway connections seen: {} (live: {:?}); log{}:\n{}",
            list(&self.online),
            list(&self.topology),
            list(&self.disabled),
            self.connects,
            self.gateway_client,
            if from > 0 {
                format!(" (last 40 of {})", self.log.len())
            } else {
                String::new()
            },
            tail.join("\n")
        )
    }
}

struct Shared {
    core: Mutex<Core>,
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The platform double. Stops (disconnects) when dropped.
pub struct AliyunPlatform {
    shared: Arc<Shared>,
    client: AsyncClient,
    stop: CancellationToken,
}

impl fmt::Debug for AliyunPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AliyunPlatform").finish_non_exhaustive()
    }
}

impl AliyunPlatform {
    /// Connect to the mosquitto on `127.0.0.1:broker_port` (started with
    /// [`crate::Mosquitto::start_with_log_topic`]), subscribe, and return once
    /// the subscriptions are acknowledged and the broker's log is seen to
    /// arrive (panics otherwise, within 10 s).
    pub async fn start(broker_port: u16, opts: PlatformOptions) -> AliyunPlatform {
        let port_tag = crate::free_port();
        let id = format!("aliyun-platform-{port_tag}");
        let check_id = format!("aliyun-platform-logcheck-{port_tag}");
        let shared = Arc::new(Shared {
            core: Mutex::new(Core::new(&opts, check_id.clone())),
            changed: Notify::new(),
        });
        let mut mqtt = MqttOptions::new(id, "127.0.0.1", broker_port);
        mqtt.set_keep_alive(Duration::from_secs(30));
        mqtt.set_max_packet_size(1 << 20, 1 << 20);
        // Persistent: the subscriptions survive a broker restart (SIGTERM).
        mqtt.set_clean_session(false);
        let (client, el) = AsyncClient::new(mqtt, 256);
        let stop = CancellationToken::new();
        let (subacked_tx, subacked_rx) = tokio::sync::oneshot::channel();
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        tokio::spawn(publisher(client.clone(), out_rx, stop.clone()));
        tokio::spawn(run(
            el,
            client.clone(),
            shared.clone(),
            out_tx,
            stop.clone(),
            subacked_tx,
        ));
        let platform = AliyunPlatform {
            shared,
            client,
            stop,
        };
        tokio::time::timeout(Duration::from_secs(10), subacked_rx)
            .await
            .expect("the platform double's SUBACK within 10 s")
            .expect("the platform double's task is alive");
        // Prove the broker publishes its log: connect a throwaway client and
        // wait for its connect line.
        let mut check = MqttOptions::new(check_id.clone(), "127.0.0.1", broker_port);
        check.set_keep_alive(Duration::from_secs(30));
        let (check_client, mut check_el) = AsyncClient::new(check, 4);
        let shared = platform.shared.clone();
        let seen = async {
            loop {
                let notified = shared.changed.notified();
                if shared.lock().log_checked {
                    return;
                }
                tokio::select! {
                    _ = notified => {}
                    ev = check_el.poll() => { ev.expect("the log-check client connects"); }
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), seen)
            .await
            .is_err()
        {
            panic!(
                "AliyunPlatform: no connect line of {check_id} on {LOG_TOPIC}# within 10 s: \
                 start the broker with Mosquitto::start_with_log_topic()"
            );
        }
        let _ = check_client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while !matches!(
                check_el.poll().await,
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)
            ) {}
        })
        .await;
        platform
    }

    /// Whether the leaf is online (logged in through the gateway).
    pub fn is_online(&self, product_key: &str, device_name: &str) -> bool {
        self.shared
            .lock()
            .online
            .contains(&key(product_key, device_name))
    }

    /// Whether the leaf is in the gateway's topology.
    pub fn in_topology(&self, product_key: &str, device_name: &str) -> bool {
        self.shared
            .lock()
            .topology
            .contains(&key(product_key, device_name))
    }

    /// The gateway connections seen so far.
    pub fn connects(&self) -> usize {
        self.shared.lock().connects
    }

    /// Every rule the gateway broke, in order.
    pub fn violations(&self) -> Vec<Violation> {
        self.shared
            .lock()
            .log
            .iter()
            .filter_map(|e| match e {
                PlatformEvent::Violation(v) => Some(v.clone()),
                _ => None,
            })
            .collect()
    }

    /// What the platform took in from the gateway, in order: its own topics
    /// (requests included) and online leaves' topics. Not: violations on
    /// leaves' topics, lost logins, the double's own messages.
    pub fn accepted(&self) -> Vec<Message> {
        self.shared
            .lock()
            .log
            .iter()
            .filter_map(|e| match e {
                PlatformEvent::Accepted { message, .. } => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    /// Everything, in order.
    pub fn log(&self) -> Vec<PlatformEvent> {
        self.shared.lock().log.clone()
    }

    /// Panics, with the state and the end of the log, if the gateway broke
    /// any rule.
    pub fn assert_no_violations(&self) {
        let core = self.shared.lock();
        if core
            .log
            .iter()
            .any(|e| matches!(e, PlatformEvent::Violation(_)))
        {
            let all: Vec<String> = core
                .log
                .iter()
                .filter(|e| matches!(e, PlatformEvent::Violation(_)))
                .map(ToString::to_string)
                .collect();
            panic!(
                "the gateway broke the platform's rules:\n{}\n{}",
                all.join("\n"),
                core.describe()
            );
        }
    }

    /// Wait until `pred` holds over the log (checked after every change), at
    /// most `limit`; panics naming `what` with the state otherwise. `pred`
    /// runs under the double's lock: do not call the double from it.
    pub async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&[PlatformEvent]) -> bool,
    ) {
        self.wait_core(limit, what, |c| pred(&c.log)).await;
    }

    /// Wait until all these leaves are online.
    pub async fn wait_online(&self, leaves: &[(&str, &str)], limit: Duration) {
        let keys: Vec<Key> = leaves.iter().map(|(p, d)| key(p, d)).collect();
        self.wait_core(limit, &format!("{leaves:?} online"), |c| {
            keys.iter().all(|k| c.online.contains(k))
        })
        .await;
    }

    /// Wait until none of these leaves is online.
    pub async fn wait_offline(&self, leaves: &[(&str, &str)], limit: Duration) {
        let keys: Vec<Key> = leaves.iter().map(|(p, d)| key(p, d)).collect();
        self.wait_core(limit, &format!("{leaves:?} offline"), |c| {
            !keys.iter().any(|k| c.online.contains(k))
        })
        .await;
    }

    async fn wait_core(&self, limit: Duration, what: &str, pred: impl Fn(&Core) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.shared.changed.notified();
            if pred(&self.shared.lock()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "timed out after {limit:?} waiting for {what}; {}",
                    self.shared.lock().describe()
                );
            }
        }
    }

    /// Publish `thing/topo/change` to the gateway and apply it: status 0 =
    /// created (into the topology), 1 = deleted (out of it, offline), 8 =
    /// disabled (offline; login fails 522), 2 = enabled (see the module doc
    /// on 2/8); other statuses change nothing.
    pub async fn topo_change(&self, status: u8, leaves: &[(&str, &str)]) {
        let out = {
            let mut core = self.shared.lock();
            for (p, d) in leaves {
                let k = key(p, d);
                match status {
                    0 => core.add_to_topology(&k),
                    1 => core.remove_from_topology(&k, "thing/topo/change status 1 (deleted)"),
                    8 => {
                        core.go_offline(&k, "thing/topo/change status 8 (disabled)");
                        if core.disabled.insert(k.clone()) {
                            core.push(PlatformEvent::Disabled {
                                product_key: k.0,
                                device_name: k.1,
                            });
                        }
                    }
                    2 if core.disabled.remove(&k) => core.push(PlatformEvent::Enabled {
                        product_key: k.0,
                        device_name: k.1,
                    }),
                    _ => {}
                }
            }
            let id = core.fresh_id().to_string();
            let sub: Vec<Value> = leaves
                .iter()
                .map(|(p, d)| device_json(&key(p, d)))
                .collect();
            let topic = core.gw_topic("/sys/{gw}/thing/topo/change");
            core.send(
                topic,
                QoS::AtLeastOnce,
                &json!({
                    "id": id, "version": "1.0",
                    "params": {"status": status, "subList": sub},
                    "method": "thing.topo.change",
                }),
            )
        };
        self.publish(out).await;
    }

    /// Take a leaf offline with a notice on `/ext/error/{gwPk}/{gwDn}` (code
    /// 521 deleted, 522 forbidden, 6401 no topology, 427 connected
    /// elsewhere, …). Only the online state changes.
    pub async fn force_offline(&self, product_key: &str, device_name: &str, code: i64) {
        let message = match code {
            521 => "device deleted",
            522 => "device forbidden",
            6401 => "topo relation not exist",
            427 => "device connect in elsewhere",
            _ => "device offline",
        };
        let out = {
            let mut core = self.shared.lock();
            let k = key(product_key, device_name);
            core.go_offline(&k, &format!("/ext/error code {code}"));
            let id = core.fresh_id().to_string();
            let topic = core.gw_topic("/ext/error/{gw}");
            core.send(
                topic,
                QoS::AtLeastOnce,
                &json!({"id": id, "code": code, "message": message, "data": device_json(&k)}),
            )
        };
        self.publish(out).await;
    }

    /// Push an upgrade notice (`data` as in protocol.md) to an online leaf
    /// (or to the gateway while it is connected) on
    /// `/ota/device/upgrade/{pk}/{dn}`; it also becomes the pending package
    /// `firmware/get` answers. Err (nothing sent) if the device is offline.
    pub async fn notify_upgrade(
        &self,
        product_key: &str,
        device_name: &str,
        data: Value,
    ) -> Result<(), String> {
        let out = {
            let mut core = self.shared.lock();
            let k = key(product_key, device_name);
            let reachable = if k == core.gw {
                core.gateway_client.is_some()
            } else {
                core.online.contains(&k)
            };
            if !reachable {
                let state = if k == core.gw {
                    "not connected"
                } else {
                    core.state(&k)
                };
                return Err(format!(
                    "{product_key}/{device_name} is {state}: the platform pushes notices to online devices only"
                ));
            }
            core.pending.insert(k, data.clone());
            let id = core.fresh_id();
            core.send(
                format!("/ota/device/upgrade/{product_key}/{device_name}"),
                QoS::AtLeastOnce,
                &json!({"code": "1000", "message": "success", "id": id, "data": data}),
            )
        };
        self.publish(out).await;
        Ok(())
    }

    /// The package `firmware/get` of this device is answered with (`None`:
    /// `"data":{}`).
    pub fn set_pending(&self, product_key: &str, device_name: &str, data: Option<Value>) {
        let mut core = self.shared.lock();
        let k = key(product_key, device_name);
        match data {
            Some(d) => core.pending.insert(k, d),
            None => core.pending.remove(&k),
        };
    }

    async fn publish(&self, out: Out) {
        self.shared.changed.notify_waiters();
        self.client
            .publish(out.topic, out.qos, false, out.payload)
            .await
            .expect("queue the platform's PUBLISH");
    }
}

impl Drop for AliyunPlatform {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn key(product_key: &str, device_name: &str) -> Key {
    (product_key.to_string(), device_name.to_string())
}

/// Publishes what the event loop decided (it cannot await the client itself).
async fn publisher(
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<Out>,
    stop: CancellationToken,
) {
    loop {
        let out = tokio::select! {
            _ = stop.cancelled() => return,
            out = rx.recv() => match out { Some(o) => o, None => return },
        };
        if client
            .publish(out.topic, out.qos, false, out.payload)
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn run(
    mut el: rumqttc::EventLoop,
    client: AsyncClient,
    shared: Arc<Shared>,
    out: mpsc::UnboundedSender<Out>,
    stop: CancellationToken,
    subacked: tokio::sync::oneshot::Sender<()>,
) {
    let mut subacked = Some(subacked);
    let mut connected = false;
    let mut ever_connected = false;
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = el.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let effects = {
                    let mut core = shared.lock();
                    if p.topic.starts_with(LOG_TOPIC) {
                        core.on_log(&String::from_utf8_lossy(&p.payload));
                        Vec::new()
                    } else {
                        core.on_publish(&p.topic, &p.payload, p.qos as u8)
                    }
                };
                for e in effects {
                    match e {
                        Effect::Send(o) => {
                            let _ = out.send(o);
                        }
                        Effect::LoginLater {
                            id,
                            request,
                            connection,
                        } => {
                            let (shared, out, stop) = (shared.clone(), out.clone(), stop.clone());
                            tokio::spawn(async move {
                                let delay = shared.lock().login_delay;
                                tokio::select! {
                                    _ = stop.cancelled() => return,
                                    _ = tokio::time::sleep(delay) => {}
                                }
                                let effect =
                                    shared.lock().apply_login_later(&id, &request, connection);
                                if let Some(Effect::Send(o)) = effect {
                                    let _ = out.send(o);
                                }
                                shared.changed.notify_waiters();
                            });
                        }
                        Effect::TopoAddLater { id, devices } => {
                            let (shared, out, stop) = (shared.clone(), out.clone(), stop.clone());
                            tokio::spawn(async move {
                                let delay = shared.lock().topo_delay;
                                tokio::select! {
                                    _ = stop.cancelled() => return,
                                    _ = tokio::time::sleep(delay) => {}
                                }
                                let effect = shared.lock().apply_topo_add(&id, devices);
                                if let Effect::Send(o) = effect {
                                    let _ = out.send(o);
                                }
                                shared.changed.notify_waiters();
                            });
                        }
                    }
                }
                shared.changed.notify_waiters();
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connected = true;
                if ever_connected {
                    shared.lock().push(PlatformEvent::BrokerBack {
                        session_present: ack.session_present,
                    });
                    shared.changed.notify_waiters();
                }
                ever_connected = true;
                if !ack.session_present {
                    let _ = client.try_subscribe_many([
                        rumqttc::SubscribeFilter::new("#".into(), QoS::ExactlyOnce),
                        rumqttc::SubscribeFilter::new(format!("{LOG_TOPIC}#"), QoS::ExactlyOnce),
                    ]);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                if let Some(tx) = subacked.take() {
                    let _ = tx.send(());
                }
            }
            Ok(_) => {}
            Err(_) => {
                if connected {
                    connected = false;
                    shared.lock().on_broker_lost();
                    shared.changed.notify_waiters();
                }
                // The broker is away (a test restarts it): retry.
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
    if connected {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while !matches!(
                el.poll().await,
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)
            ) {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mosquitto;

    const WAIT: Duration = Duration::from_secs(20);
    const GW: (&str, &str, &str) = ("a1Gw", "gw1", "gw-secret");
    const L1: (&str, &str, &str) = ("a1Leaf", "leaf1", "s1");
    const L2: (&str, &str, &str) = ("a1Leaf", "leaf2", "s2");
    const TS: &str = "1700000000000";

    fn gw_client_id() -> String {
        format!(
            "{}.{}|securemode=3,signmethod=hmacsha256,timestamp={TS}|",
            GW.0, GW.1
        )
    }

    fn options() -> PlatformOptions {
        PlatformOptions::new(
            Identity::new(GW.0, GW.1, GW.2),
            vec![
                Identity::new(L1.0, L1.1, L1.2),
                Identity::new(L2.0, L2.1, L2.2),
            ],
        )
    }

    fn both_in_topology() -> PlatformOptions {
        PlatformOptions {
            already_in_topology: vec![key(L1.0, L1.1), key(L2.0, L2.1)],
            ..options()
        }
    }

    fn t(form: &str) -> String {
        form.replace("{gw}", &format!("{}/{}", GW.0, GW.1))
    }

    /// A signed entry as otagw writes it (clientId `{pk}.{dn}`).
    fn signed(l: (&str, &str, &str), extra: (&str, &str)) -> Value {
        let cid = format!("{}.{}", l.0, l.1);
        let mut e = json!({
            "productKey": l.0, "deviceName": l.1, "clientId": cid, "timestamp": TS,
            "sign": sign(l.2, &cid, l.1, l.0, TS),
        });
        e[extra.0] = extra.1.into();
        e
    }

    fn topo_add(id: &str, leaves: &[(&str, &str, &str)]) -> Value {
        json!({
            "id": id, "version": "1.0", "method": "thing.topo.add",
            "params": leaves.iter().map(|l| signed(*l, ("signmethod", "hmacSha256"))).collect::<Vec<_>>(),
        })
    }

    fn login(id: &str, leaves: &[(&str, &str, &str)]) -> Value {
        json!({"id": id, "params": {
            "signMethod": "hmacSha256",
            "deviceList": leaves.iter().map(|l| signed(*l, ("cleanSession", "true"))).collect::<Vec<_>>(),
        }})
    }

    fn devices(leaves: &[(&str, &str, &str)]) -> Value {
        leaves
            .iter()
            .map(|l| json!({"productKey": l.0, "deviceName": l.1}))
            .collect()
    }

    #[tokio::test]
    async fn with_a_login_delay_a_publish_between_request_and_reply_is_flagged() {
        let (_b, platform, gw) = setup(PlatformOptions {
            login_reply_delay: Duration::from_millis(300),
            ..both_in_topology()
        })
        .await;
        // A gateway that publishes right after its login request, without
        // waiting for the reply.
        gw.publish(
            &t("/ext/session/{gw}/combine/batch_login"),
            QoS::AtMostOnce,
            &login("1", &[L1]),
        )
        .await;
        let (t1, body) = inform(L1);
        gw.publish(&t1, QoS::AtLeastOnce, &body).await;
        let r = gw
            .wait(&t("/ext/session/{gw}/combine/batch_login_reply"), "1")
            .await;
        assert_eq!(r["code"], 200, "{r}");
        assert!(platform.is_online(L1.0, L1.1));
        let v = platform.violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].topic, t1);
        // After the reply, the same publish is accepted.
        gw.publish(&t1, QoS::AtLeastOnce, &body).await;
        platform
            .wait_for(WAIT, "the inform accepted", |l| {
                l.iter().any(|e| is_accepted_on(e, &t1))
            })
            .await;
        assert_eq!(platform.violations().len(), 1);
    }

    fn inform(l: (&str, &str, &str)) -> (String, Value) {
        (
            format!("/ota/device/inform/{}/{}", l.0, l.1),
            json!({"id": "1", "params": {"version": "1.0.0"}}),
        )
    }

    /// A raw MQTT client playing the gateway (well or badly), recording what
    /// it receives.
    struct FakeGateway {
        client: AsyncClient,
        seen: Arc<Mutex<Vec<Message>>>,
        changed: Arc<Notify>,
        stop: CancellationToken,
        disconnected: Arc<Notify>,
    }

    impl FakeGateway {
        async fn connect(port: u16) -> FakeGateway {
            Self::connect_with(port, |_| {}).await
        }

        /// Connect with the gateway's client id and username (persistent
        /// session, subscribed to `#`); `before` may queue publishes, which
        /// go out right after the CONNECT.
        async fn connect_with(port: u16, before: impl FnOnce(&AsyncClient)) -> FakeGateway {
            let mut o = MqttOptions::new(gw_client_id(), "127.0.0.1", port);
            o.set_credentials(format!("{}&{}", GW.1, GW.0), "password-not-checked");
            o.set_keep_alive(Duration::from_secs(60));
            o.set_clean_session(false);
            let (client, mut el) = AsyncClient::new(o, 512);
            before(&client);
            let seen = Arc::new(Mutex::new(Vec::new()));
            let changed = Arc::new(Notify::new());
            let disconnected = Arc::new(Notify::new());
            let stop = CancellationToken::new();
            let (tx, rx) = tokio::sync::oneshot::channel();
            {
                let (client, seen, changed, stop, disconnected) = (
                    client.clone(),
                    seen.clone(),
                    changed.clone(),
                    stop.clone(),
                    disconnected.clone(),
                );
                tokio::spawn(async move {
                    let mut tx = Some(tx);
                    loop {
                        let ev = tokio::select! {
                            _ = stop.cancelled() => return,
                            ev = el.poll() => ev,
                        };
                        match ev {
                            Ok(Event::Incoming(Packet::Publish(p))) => {
                                seen.lock().unwrap().push(Message {
                                    topic: p.topic.clone(),
                                    payload: p.payload.to_vec(),
                                });
                                changed.notify_waiters();
                            }
                            Ok(Event::Incoming(Packet::ConnAck(a))) => {
                                if !a.session_present {
                                    let _ = client.try_subscribe("#", QoS::AtLeastOnce);
                                } else if let Some(tx) = tx.take() {
                                    let _ = tx.send(());
                                }
                            }
                            Ok(Event::Incoming(Packet::SubAck(_))) => {
                                if let Some(tx) = tx.take() {
                                    let _ = tx.send(());
                                }
                            }
                            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                                disconnected.notify_one();
                                return;
                            }
                            Ok(_) => {}
                            Err(_) => {
                                // Never reconnect: a kicked connection
                                // must not kick its successor.
                                return;
                            }
                        }
                    }
                });
            }
            tokio::time::timeout(WAIT, rx)
                .await
                .expect("fake gateway connected and subscribed")
                .expect("fake gateway task");
            FakeGateway {
                client,
                seen,
                changed,
                stop,
                disconnected,
            }
        }

        async fn publish(&self, topic: &str, qos: QoS, body: &Value) {
            self.client
                .publish(topic, qos, false, body.to_string())
                .await
                .unwrap();
        }

        /// A clean DISCONNECT, waited for.
        async fn disconnect(self) {
            let sent = self.disconnected.notified();
            self.client.disconnect().await.unwrap();
            tokio::time::timeout(WAIT, sent)
                .await
                .expect("DISCONNECT sent");
        }

        fn received(&self, topic: &str) -> Vec<Value> {
            self.seen
                .lock()
                .unwrap()
                .iter()
                .filter(|m| m.topic == topic)
                .map(|m| serde_json::from_slice(&m.payload).unwrap())
                .collect()
        }

        /// The first message on `topic` with this `id` (string or number).
        async fn wait(&self, topic: &str, id: &str) -> Value {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let notified = self.changed.notified();
                let found = self
                    .received(topic)
                    .into_iter()
                    .find(|v| request_id(v).as_deref() == Some(id));
                if let Some(v) = found {
                    return v;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    panic!(
                        "no {topic} with id {id}; received: {:?}",
                        self.seen.lock().unwrap()
                    );
                }
            }
        }

        /// Log in these leaves and expect 200.
        async fn log_in(&self, id: &str, leaves: &[(&str, &str, &str)]) {
            self.publish(
                &t("/ext/session/{gw}/combine/batch_login"),
                QoS::AtMostOnce,
                &login(id, leaves),
            )
            .await;
            let r = self
                .wait(&t("/ext/session/{gw}/combine/batch_login_reply"), id)
                .await;
            assert_eq!(r["code"], 200, "{r}");
        }
    }

    impl Drop for FakeGateway {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    async fn setup(opts: PlatformOptions) -> (Mosquitto, AliyunPlatform, FakeGateway) {
        let broker = Mosquitto::start_with_log_topic().await;
        let platform = AliyunPlatform::start(broker.port(), opts).await;
        let gw = FakeGateway::connect(broker.port()).await;
        platform
            .wait_for(WAIT, "the gateway's connection", |l| {
                l.iter()
                    .any(|e| matches!(e, PlatformEvent::GatewayConnected { .. }))
            })
            .await;
        (broker, platform, gw)
    }

    fn is_accepted_on(e: &PlatformEvent, topic: &str) -> bool {
        matches!(e, PlatformEvent::Accepted { message, .. } if message.topic == topic)
    }

    fn violation_on(e: &PlatformEvent, topic: &str) -> bool {
        matches!(e, PlatformEvent::Violation(v) if v.topic == topic)
    }

    // ---- with a broker ---------------------------------------------------

    #[tokio::test]
    async fn topo_add_then_login_brings_leaves_online_after_the_delayed_topo_reply() {
        let delay = Duration::from_secs(1);
        let (_b, platform, gw) = setup(PlatformOptions {
            topo_reply_delay: delay,
            ..options()
        })
        .await;
        let asked = tokio::time::Instant::now();
        gw.publish(
            &t("/sys/{gw}/thing/topo/add"),
            QoS::AtLeastOnce,
            &topo_add("7", &[L1, L2]),
        )
        .await;
        let add = t("/sys/{gw}/thing/topo/add");
        platform
            .wait_for(WAIT, "topo/add taken in", |l| {
                l.iter().any(|e| is_accepted_on(e, &add))
            })
            .await;
        assert!(
            !platform.in_topology(L1.0, L1.1),
            "the topology waits for the reply"
        );
        // A login before the reply: the relation does not exist yet.
        gw.publish(
            &t("/ext/session/{gw}/combine/batch_login"),
            QoS::AtMostOnce,
            &login("8", &[L1, L2]),
        )
        .await;
        let early = gw
            .wait(&t("/ext/session/{gw}/combine/batch_login_reply"), "8")
            .await;
        assert_eq!(early["code"], 6401, "{early}");
        let reply = gw.wait(&t("/sys/{gw}/thing/topo/add_reply"), "7").await;
        assert!(
            asked.elapsed() >= delay,
            "the reply came after {:?}",
            asked.elapsed()
        );
        assert_eq!(
            reply,
            json!({"id": "7", "code": 200, "message": "success", "data": devices(&[L1, L2])})
        );
        assert!(platform.in_topology(L1.0, L1.1) && platform.in_topology(L2.0, L2.1));
        gw.log_in("9", &[L1, L2]).await;
        platform
            .wait_online(&[(L1.0, L1.1), (L2.0, L2.1)], WAIT)
            .await;
        let r = gw.received(&t("/ext/session/{gw}/combine/batch_login_reply"));
        assert_eq!(
            r[1],
            json!({"id": "9", "code": 200, "message": "success", "data": devices(&[L1, L2])})
        );
        platform.assert_no_violations();
    }

    #[tokio::test]
    async fn a_login_before_the_topology_fails_6401_and_brings_nobody_online() {
        let (_b, platform, gw) = setup(PlatformOptions {
            already_in_topology: vec![key(L1.0, L1.1)],
            ..options()
        })
        .await;
        gw.publish(
            &t("/ext/session/{gw}/combine/batch_login"),
            QoS::AtMostOnce,
            &login("3", &[L1, L2]),
        )
        .await;
        let r = gw
            .wait(&t("/ext/session/{gw}/combine/batch_login_reply"), "3")
            .await;
        assert_eq!(
            r,
            json!({"id": "3", "code": 6401, "message": "topo relation not exist", "data": devices(&[L2])})
        );
        assert!(
            !platform.is_online(L1.0, L1.1),
            "a batch login is all-or-nothing"
        );
        assert!(!platform.is_online(L2.0, L2.1));
        assert!(
            !platform
                .log()
                .iter()
                .any(|e| matches!(e, PlatformEvent::Online { .. }))
        );
    }

    #[tokio::test]
    async fn a_lost_login_is_not_answered_and_brings_nobody_online() {
        let (_b, platform, gw) = setup(PlatformOptions {
            lose_first_logins: 1,
            ..both_in_topology()
        })
        .await;
        gw.publish(
            &t("/ext/session/{gw}/combine/batch_login"),
            QoS::AtMostOnce,
            &login("1", &[L1, L2]),
        )
        .await;
        platform
            .wait_for(WAIT, "the first login lost", |l| {
                l.iter().any(|e| matches!(e, PlatformEvent::Lost { .. }))
            })
            .await;
        assert!(!platform.is_online(L1.0, L1.1) && !platform.is_online(L2.0, L2.1));
        gw.log_in("2", &[L1, L2]).await;
        // Replies go out in order: had "1" been answered, it would be here.
        let replies = gw.received(&t("/ext/session/{gw}/combine/batch_login_reply"));
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(replies[0]["id"], "2");
        assert!(platform.is_online(L1.0, L1.1) && platform.is_online(L2.0, L2.1));
        assert!(
            !platform
                .accepted()
                .iter()
                .any(|m| m.text().contains("\"id\":\"1\""))
        );
    }

    #[tokio::test]
    async fn a_wrong_sign_fails_6287_naming_the_leaf() {
        let (_b, platform, gw) = setup(options()).await;
        let forged = (L2.0, L2.1, "not-the-secret");
        gw.publish(
            &t("/sys/{gw}/thing/topo/add"),
            QoS::AtLeastOnce,
            &topo_add("1", &[L1, forged]),
        )
        .await;
        let r = gw.wait(&t("/sys/{gw}/thing/topo/add_reply"), "1").await;
        assert_eq!(
            r,
            json!({"id": "1", "code": 6287, "message": "invalid sign", "data": devices(&[L2])})
        );
        assert!(
            !platform.in_topology(L1.0, L1.1),
            "nothing is added on an error"
        );
        // A leaf the platform does not know.
        let stranger = ("a1Leaf", "nobody", "x");
        gw.publish(
            &t("/sys/{gw}/thing/topo/add"),
            QoS::AtLeastOnce,
            &topo_add("2", &[L1, stranger]),
        )
        .await;
        let r = gw.wait(&t("/sys/{gw}/thing/topo/add_reply"), "2").await;
        assert_eq!(r["code"], 6100);
        assert_eq!(r["data"], devices(&[stranger]));
        gw.publish(
            &t("/sys/{gw}/thing/topo/add"),
            QoS::AtLeastOnce,
            &topo_add("3", &[L1, L2]),
        )
        .await;
        assert_eq!(
            gw.wait(&t("/sys/{gw}/thing/topo/add_reply"), "3").await["code"],
            200
        );
        // The same at login.
        gw.publish(
            &t("/ext/session/{gw}/combine/batch_login"),
            QoS::AtMostOnce,
            &login("4", &[L1, forged]),
        )
        .await;
        let r = gw
            .wait(&t("/ext/session/{gw}/combine/batch_login_reply"), "4")
            .await;
        assert_eq!(r["code"], 6287, "{r}");
        assert_eq!(r["data"], devices(&[L2]));
        assert!(!platform.is_online(L1.0, L1.1));
    }

    #[tokio::test]
    async fn publishes_for_a_leaf_count_only_while_it_is_online() {
        let (_b, platform, gw) = setup(PlatformOptions {
            already_in_topology: vec![key(L1.0, L1.1)],
            ..options()
        })
        .await;
        let (t1, body) = inform(L1);
        let (t2, _) = inform(L2);
        gw.publish(&t1, QoS::AtLeastOnce, &body).await;
        gw.publish(&t2, QoS::AtLeastOnce, &body).await;
        platform
            .wait_for(WAIT, "two violations", |l| {
                l.iter().any(|e| violation_on(e, &t1)) && l.iter().any(|e| violation_on(e, &t2))
            })
            .await;
        let v = platform.violations();
        assert!(v[0].what.contains("in the topology but offline"), "{v:?}");
        assert!(v[1].what.contains("not in the topology"), "{v:?}");
        assert_eq!(v[0].payload, body.to_string());
        assert!(matches!(&platform.log()[v[0].at], PlatformEvent::Violation(x) if *x == v[0]));
        gw.log_in("5", &[L1]).await;
        gw.publish(&t1, QoS::AtLeastOnce, &body).await;
        let progress = format!("/ota/device/progress/{}/{}", L1.0, L1.1);
        gw.publish(
            &progress,
            QoS::AtLeastOnce,
            &json!({"id":"2","params":{"step":"50","desc":""}}),
        )
        .await;
        platform
            .wait_for(WAIT, "the progress", |l| {
                l.iter().any(|e| is_accepted_on(e, &progress))
            })
            .await;
        let leaf_msgs: Vec<String> = platform
            .accepted()
            .into_iter()
            .filter(|m| m.topic.contains(L1.1))
            .map(|m| m.topic)
            .collect();
        assert_eq!(leaf_msgs, vec![t1.clone(), progress]);
        assert_eq!(platform.violations().len(), 2);
    }

    #[tokio::test]
    async fn a_new_gateway_connection_takes_every_leaf_offline() {
        let (b, platform, gw) = setup(both_in_topology()).await;
        gw.log_in("1", &[L1, L2]).await;
        gw.disconnect().await;
        platform
            .wait_offline(&[(L1.0, L1.1), (L2.0, L2.1)], WAIT)
            .await;
        assert!(platform.log().iter().any(|e| matches!(
            e, PlatformEvent::GatewayDisconnected { line, .. } if line.ends_with("disconnected.")
        )));
        let (t1, body) = inform(L1);
        // Reconnect and publish before logging in again.
        let gw2 = FakeGateway::connect(b.port()).await;
        gw2.publish(&t1, QoS::AtLeastOnce, &body).await;
        platform
            .wait_for(WAIT, "the early inform flagged", |l| {
                l.iter().any(|e| violation_on(e, &t1))
            })
            .await;
        assert_eq!(platform.connects(), 2);
        let log = platform.log();
        let second = log
            .iter()
            .position(|e| matches!(e, PlatformEvent::GatewayConnected { n: 2, .. }))
            .unwrap();
        let flagged = log.iter().position(|e| violation_on(e, &t1)).unwrap();
        assert!(second < flagged);
        gw2.log_in("2", &[L1, L2]).await;
        gw2.publish(&t1, QoS::AtLeastOnce, &body).await;
        platform
            .wait_for(WAIT, "the inform accepted", |l| {
                l.iter().any(|e| is_accepted_on(e, &t1))
            })
            .await;
        // A takeover: the same client id again while gw2 is connected.
        let gw3 = FakeGateway::connect(b.port()).await;
        platform
            .wait_for(WAIT, "the third connection", |l| {
                l.iter()
                    .any(|e| matches!(e, PlatformEvent::GatewayConnected { n: 3, .. }))
            })
            .await;
        assert!(!platform.is_online(L1.0, L1.1) && !platform.is_online(L2.0, L2.1));
        assert!(platform.log().iter().any(|e| matches!(
            e, PlatformEvent::GatewayDisconnected { line, .. } if line.contains("already connected")
        )));
        drop(gw2);
        gw3.log_in("3", &[L1]).await;
        assert!(platform.is_online(L1.0, L1.1) && !platform.is_online(L2.0, L2.1));
        assert_eq!(
            platform.violations().len(),
            1,
            "{:?}",
            platform.violations()
        );
    }

    #[tokio::test]
    async fn the_connect_line_precedes_the_first_publish_of_a_connection() {
        let (b, platform, gw) = setup(both_in_topology()).await;
        let (t1, body) = inform(L1);
        let mut current = gw;
        for round in 0..5 {
            current.log_in(&format!("{round}"), &[L1]).await;
            // Take over with an inform queued before the CONNECT is even sent:
            // it reaches the broker right behind it.
            let next = FakeGateway::connect_with(b.port(), |c| {
                c.try_publish(&t1, QoS::AtLeastOnce, false, body.to_string())
                    .unwrap();
            })
            .await;
            let want = round + 1;
            platform
                .wait_for(WAIT, "the queued inform flagged", |l| {
                    l.iter().filter(|e| violation_on(e, &t1)).count() == want
                })
                .await;
            assert!(!platform.log().iter().any(|e| is_accepted_on(e, &t1)));
            current = next;
        }
    }

    #[tokio::test]
    async fn qos0_and_qos1_publishes_are_seen_in_the_order_they_were_sent() {
        let (_b, platform, gw) = setup(options()).await;
        let topic = t("/sys/{gw}/thing/event/property/post");
        for i in 0..300 {
            let qos = if i % 3 == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            gw.publish(&topic, qos, &json!({"id": i.to_string()})).await;
        }
        platform
            .wait_for(WAIT, "300 messages", |l| {
                l.iter().filter(|e| is_accepted_on(e, &topic)).count() == 300
            })
            .await;
        let ids: Vec<String> = platform
            .accepted()
            .iter()
            .map(|m| {
                serde_json::from_slice::<Value>(&m.payload).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let want: Vec<String> = (0..300).map(|i| i.to_string()).collect();
        assert_eq!(ids, want);
    }

    #[tokio::test]
    async fn a_broker_restart_takes_every_leaf_offline() {
        let (mut b, platform, gw) = setup(both_in_topology()).await;
        gw.log_in("1", &[L1, L2]).await;
        b.restart().await;
        // The fake gateway does not reconnect: only the double's own loss of
        // the broker can take them offline.
        platform
            .wait_offline(&[(L1.0, L1.1), (L2.0, L2.1)], WAIT)
            .await;
        let log = platform.log();
        let lost = log.iter().position(|e| *e == PlatformEvent::BrokerLost);
        assert!(lost.is_some(), "{log:?}");
        assert!(log.iter().any(|e| matches!(
            e, PlatformEvent::Offline { why, .. } if why.contains("lost the broker")
        )));
        // The double's session (and so its subscriptions) survived.
        platform
            .wait_for(WAIT, "the double back on the broker", |l| {
                l.contains(&PlatformEvent::BrokerBack {
                    session_present: true,
                })
            })
            .await;
        drop(gw);
        let gw2 = FakeGateway::connect(b.port()).await;
        platform
            .wait_for(WAIT, "the gateway back", |l| {
                l.iter()
                    .any(|e| matches!(e, PlatformEvent::GatewayConnected { n: 2, .. }))
            })
            .await;
        let (t1, body) = inform(L1);
        gw2.publish(&t1, QoS::AtLeastOnce, &body).await;
        platform
            .wait_for(WAIT, "the inform flagged", |l| {
                l.iter().any(|e| violation_on(e, &t1))
            })
            .await;
        gw2.log_in("2", &[L1, L2]).await;
        assert!(platform.is_online(L1.0, L1.1));
        assert_eq!(platform.violations().len(), 1);
    }

    #[tokio::test]
    async fn topo_changes_delete_disable_and_enable_leaves() {
        let (_b, platform, gw) = setup(both_in_topology()).await;
        gw.log_in("1", &[L1, L2]).await;
        platform.topo_change(1, &[(L1.0, L1.1)]).await;
        assert!(!platform.is_online(L1.0, L1.1) && !platform.in_topology(L1.0, L1.1));
        assert!(platform.is_online(L2.0, L2.1));
        let change = t("/sys/{gw}/thing/topo/change");
        let deadline = tokio::time::Instant::now() + WAIT;
        while gw.received(&change).is_empty() {
            let n = gw.changed.notified();
            if gw.received(&change).is_empty() {
                tokio::time::timeout_at(deadline, n)
                    .await
                    .expect("topo/change received");
            }
        }
        let c = &gw.received(&change)[0];
        assert_eq!(c["method"], "thing.topo.change");
        assert_eq!(c["params"], json!({"status": 1, "subList": devices(&[L1])}));
        let login_topic = t("/ext/session/{gw}/combine/batch_login");
        let reply_topic = t("/ext/session/{gw}/combine/batch_login_reply");
        gw.publish(&login_topic, QoS::AtMostOnce, &login("2", &[L1]))
            .await;
        assert_eq!(gw.wait(&reply_topic, "2").await["code"], 6401);
        platform.topo_change(8, &[(L2.0, L2.1)]).await;
        assert!(!platform.is_online(L2.0, L2.1) && platform.in_topology(L2.0, L2.1));
        gw.publish(&login_topic, QoS::AtMostOnce, &login("3", &[L2]))
            .await;
        let r = gw.wait(&reply_topic, "3").await;
        assert_eq!(r["code"], 522);
        assert_eq!(r["data"], devices(&[L2]));
        platform.topo_change(2, &[(L2.0, L2.1)]).await;
        gw.log_in("4", &[L2]).await;
        platform.topo_change(0, &[(L1.0, L1.1)]).await;
        gw.log_in("5", &[L1]).await;
        platform.assert_no_violations();
    }

    #[tokio::test]
    async fn batch_login_at_qos1_is_flagged_and_still_processed() {
        let (_b, platform, gw) = setup(both_in_topology()).await;
        gw.publish(
            &t("/ext/session/{gw}/combine/batch_login"),
            QoS::AtLeastOnce,
            &login("1", &[L1]),
        )
        .await;
        let r = gw
            .wait(&t("/ext/session/{gw}/combine/batch_login_reply"), "1")
            .await;
        assert_eq!(r["code"], 200);
        assert!(platform.is_online(L1.0, L1.1));
        let v = platform.violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].what.contains("QoS 1"), "{v:?}");
    }

    #[tokio::test]
    async fn logout_and_topo_delete_are_the_inverses() {
        let (_b, platform, gw) = setup(both_in_topology()).await;
        gw.log_in("1", &[L1, L2]).await;
        let logout = t("/ext/session/{gw}/combine/batch_logout");
        let body = json!({"id": "2", "params": devices(&[L1])});
        gw.publish(&logout, QoS::AtMostOnce, &body).await;
        assert_eq!(gw.wait(&format!("{logout}_reply"), "2").await["code"], 200);
        assert!(!platform.is_online(L1.0, L1.1) && platform.in_topology(L1.0, L1.1));
        let body = json!({"id": "3", "params": devices(&[L1])});
        gw.publish(&logout, QoS::AtMostOnce, &body).await;
        assert_eq!(gw.wait(&format!("{logout}_reply"), "3").await["code"], 520);
        let delete = t("/sys/{gw}/thing/topo/delete");
        let body = json!({"id": "4", "version": "1.0", "params": devices(&[L2]), "method": "thing.topo.delete"});
        gw.publish(&delete, QoS::AtLeastOnce, &body).await;
        assert_eq!(gw.wait(&format!("{delete}_reply"), "4").await["code"], 200);
        assert!(!platform.is_online(L2.0, L2.1) && !platform.in_topology(L2.0, L2.1));
        platform.assert_no_violations();
    }

    #[tokio::test]
    async fn upgrade_notices_reach_online_devices_and_firmware_get_answers_the_pending_one() {
        let (_b, platform, gw) = setup(both_in_topology()).await;
        let data = json!({"size": 10, "version": "2.0.0", "url": "http://x/fw", "md5": "00", "sign": "00", "signMethod": "Md5"});
        let err = platform
            .notify_upgrade(L1.0, L1.1, data.clone())
            .await
            .unwrap_err();
        assert!(err.contains("offline"), "{err}");
        gw.log_in("1", &[L1]).await;
        platform
            .notify_upgrade(L1.0, L1.1, data.clone())
            .await
            .unwrap();
        let upgrade = format!("/ota/device/upgrade/{}/{}", L1.0, L1.1);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let n = gw.changed.notified();
            if !gw.received(&upgrade).is_empty() {
                break;
            }
            tokio::time::timeout_at(deadline, n)
                .await
                .expect("the notice");
        }
        let notice = &gw.received(&upgrade)[0];
        assert_eq!(notice["code"], "1000");
        assert_eq!(notice["message"], "success");
        assert!(notice["id"].is_u64());
        assert_eq!(notice["data"], data);
        let get = format!("/sys/{}/{}/thing/ota/firmware/get", L1.0, L1.1);
        gw.publish(&get, QoS::AtLeastOnce, &json!({"id": "5", "params": {}}))
            .await;
        assert_eq!(
            gw.wait(&format!("{get}_reply"), "5").await,
            json!({"id": "5", "code": 200, "data": data})
        );
        platform.set_pending(L1.0, L1.1, None);
        gw.publish(&get, QoS::AtLeastOnce, &json!({"id": 6, "params": {}}))
            .await;
        assert_eq!(
            gw.wait(&format!("{get}_reply"), "6").await,
            json!({"id": 6, "code": 200, "data": {}})
        );
        // From an offline leaf: a violation, no answer.
        let get2 = format!("/sys/{}/{}/thing/ota/firmware/get", L2.0, L2.1);
        gw.publish(&get2, QoS::AtLeastOnce, &json!({"id": "7", "params": {}}))
            .await;
        platform
            .wait_for(WAIT, "the offline get flagged", |l| {
                l.iter().any(|e| violation_on(e, &get2))
            })
            .await;
        assert!(gw.received(&format!("{get2}_reply")).is_empty());
        // The double's own messages never count as the gateway's.
        assert!(
            platform
                .accepted()
                .iter()
                .all(|m| m.topic != upgrade && !m.topic.ends_with("_reply"))
        );
    }

    #[tokio::test]
    async fn force_offline_notifies_the_gateway_and_takes_the_leaf_offline() {
        let (_b, platform, gw) = setup(both_in_topology()).await;
        gw.log_in("1", &[L1, L2]).await;
        platform.force_offline(L1.0, L1.1, 522).await;
        assert!(!platform.is_online(L1.0, L1.1) && platform.is_online(L2.0, L2.1));
        let topic = t("/ext/error/{gw}");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let n = gw.changed.notified();
            if !gw.received(&topic).is_empty() {
                break;
            }
            tokio::time::timeout_at(deadline, n)
                .await
                .expect("the /ext/error notice");
        }
        let e = &gw.received(&topic)[0];
        assert_eq!(e["code"], 522);
        assert_eq!(e["data"], json!({"productKey": L1.0, "deviceName": L1.1}));
        platform.assert_no_violations();
    }

    #[tokio::test]
    #[should_panic(expected = "start_with_log_topic")]
    async fn start_refuses_a_broker_without_its_log_topic() {
        let broker = Mosquitto::start().await;
        let _ = AliyunPlatform::start(broker.port(), options()).await;
    }

    // ---- the rules, without a broker -------------------------------------

    fn core(opts: &PlatformOptions) -> Core {
        Core::new(opts, "check".into())
    }

    fn reply_of(effects: &[Effect]) -> Value {
        match effects {
            [Effect::Send(o)] => serde_json::from_slice(&o.payload).unwrap(),
            other => panic!("one reply expected: {other:?}"),
        }
    }

    #[test]
    fn sign_is_hmac_sha256_of_the_sorted_pairs() {
        // RFC 4231, test case 2.
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // python3: hmac.new(b"s1", b"clientIda1Leaf.leaf1deviceNameleaf1productKeya1Leaftimestamp1700000000000", "sha256")
        assert_eq!(
            sign("s1", "a1Leaf.leaf1", "leaf1", "a1Leaf", TS),
            "2ca4151127ca18d4ab3305c0eb0eda6686fa6bc61eca947e69ea3a9cb6a5ce88"
        );
    }

    #[test]
    fn topics_name_their_device() {
        let k = |a: &str, b: &str| Some(key(a, b));
        assert_eq!(device_of("/ota/device/inform/p/d"), k("p", "d"));
        assert_eq!(device_of("/sys/p/d/thing/ota/firmware/get"), k("p", "d"));
        assert_eq!(
            device_of("/ext/session/p/d/combine/batch_login"),
            k("p", "d")
        );
        assert_eq!(device_of("/ext/error/p/d"), k("p", "d"));
        assert_eq!(device_of("/p/d/user/get"), k("p", "d"));
        assert_eq!(device_of("/p/d/other"), None);
        assert_eq!(device_of("a/b/c/d"), None);
    }

    #[test]
    fn mosquitto_2_0_11_lines_track_the_gateway_connection() {
        let mut c = core(&both_in_topology());
        let id = gw_client_id();
        let other = format!(
            "{}.{}|securemode=3,signmethod=hmacsha256,timestamp=1|",
            GW.0, GW.1
        );
        let connect = |cid: &str| {
            format!(
                "1796179982: New client connected from 127.0.0.1:47670 as {cid} (p2, c1, k60, u'gw1&a1Gw')."
            )
        };
        c.on_log("1796179982: New connection from 127.0.0.1:47670 on port 38381.");
        c.on_log(&connect(&id));
        assert_eq!(c.connects, 1);
        c.online.insert(key(L1.0, L1.1));
        // Another client, and an older connection of the gateway: no effect.
        c.on_log("Client probe-1 disconnected.");
        c.on_log(&format!("Client {other} closed its connection."));
        assert!(c.online.contains(&key(L1.0, L1.1)));
        for ending in [
            format!("Client {id} disconnected."),
            format!("Client {id} closed its connection."),
            format!("Client {id} has exceeded timeout, disconnecting."),
            format!("Client {id} disconnected due to protocol error."),
            format!("Bad socket read/write on client {id}: Connection reset by peer"),
            format!("Socket error on client {id}, disconnecting."),
            format!("Client {id} already connected, closing old connection."),
        ] {
            c.on_log(&connect(&id));
            c.online.insert(key(L1.0, L1.1));
            c.on_log(&format!("1796179983: {ending}"));
            assert!(c.online.is_empty(), "{ending}");
            assert!(c.gateway_client.is_none(), "{ending}");
        }
        c.online.insert(key(L1.0, L1.1));
        c.on_log(&connect(&other));
        assert!(
            c.online.is_empty(),
            "a new connection takes every leaf offline"
        );
        assert!(
            c.log
                .iter()
                .all(|e| !matches!(e, PlatformEvent::Violation(_)))
        );
    }

    #[test]
    fn a_bad_connect_is_flagged() {
        let mut c = core(&options());
        c.on_log(&format!(
            "New client connected from 127.0.0.1:1 as {}.{}|securemode=9| (p2, c1, k10, u'a1Gw&gw1').",
            GW.0, GW.1
        ));
        let what: Vec<String> = c
            .log
            .iter()
            .filter_map(|e| match e {
                PlatformEvent::Violation(v) => Some(v.what.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(what.len(), 4, "{what:?}");
        assert!(what[0].contains("securemode"));
        assert!(what[1].contains("signmethod"));
        assert!(what[2].contains("keep-alive"));
        assert!(what[3].contains("username"));
    }

    #[test]
    fn oversized_and_malformed_requests_are_460() {
        let mut many = options();
        let leaves: Vec<(String, String, String)> = (0..51)
            .map(|i| ("a1Leaf".into(), format!("l{i}"), format!("s{i}")))
            .collect();
        many.leaves = leaves
            .iter()
            .map(|l| Identity::new(&l.0, &l.1, &l.2))
            .collect();
        many.already_in_topology = leaves.iter().map(|l| key(&l.0, &l.1)).collect();
        let mut c = core(&many);
        let refs: Vec<(&str, &str, &str)> = leaves.iter().map(|l| (&*l.0, &*l.1, &*l.2)).collect();
        let add = t("/sys/{gw}/thing/topo/add");
        let login_t = t("/ext/session/{gw}/combine/batch_login");
        let ask = |c: &mut Core, topic: &str, body: Value| {
            reply_of(&c.on_publish(topic, body.to_string().as_bytes(), 0))
        };
        assert_eq!(ask(&mut c, &add, topo_add("1", &refs[..31]))["code"], 460);
        assert_eq!(ask(&mut c, &add, topo_add("2", &refs[..30]))["code"], 200);
        assert_eq!(ask(&mut c, &login_t, login("3", &refs[..51]))["code"], 460);
        let mut sha1 = login("4", &refs[..1]);
        sha1["params"]["signMethod"] = "hmacSha1".into();
        assert_eq!(ask(&mut c, &login_t, sha1)["code"], 460);
        let mut no_sign = topo_add("5", &refs[..2]);
        no_sign["params"][1].as_object_mut().unwrap().remove("sign");
        let r = ask(&mut c, &add, no_sign);
        assert_eq!(r["code"], 460);
        assert_eq!(
            r["data"],
            json!([{"productKey": "a1Leaf", "deviceName": "l1"}])
        );
        assert_eq!(ask(&mut c, &add, json!("not an object"))["code"], 460);
        assert_eq!(ask(&mut c, &login_t, login("6", &refs[..50]))["code"], 200);
        assert_eq!(c.online.len(), 50);
    }

    #[test]
    fn a_redelivered_copy_of_an_accepted_message_is_not_judged_again() {
        let mut c = core(&both_in_topology());
        let login_t = t("/ext/session/{gw}/combine/batch_login");
        let r = reply_of(&c.on_publish(&login_t, login("1", &[L1]).to_string().as_bytes(), 0));
        assert_eq!(r["code"], 200);
        let (t1, body) = inform(L1);
        let bytes = body.to_string().into_bytes();
        c.on_publish(&t1, &bytes, 1);
        // The broker restarts: offline; mosquitto hands the double the same
        // message again.
        c.on_broker_lost();
        c.on_publish(&t1, &bytes, 1);
        assert!(matches!(
            c.log.last(),
            Some(PlatformEvent::Redelivered { .. })
        ));
        assert!(
            c.log
                .iter()
                .all(|e| !matches!(e, PlatformEvent::Violation(_)))
        );
        // A new message for the offline leaf is still a violation.
        c.on_publish(&t1, b"{\"id\":\"2\",\"params\":{\"version\":\"1.0.0\"}}", 1);
        assert!(matches!(c.log.last(), Some(PlatformEvent::Violation(_))));
    }

    #[test]
    fn the_double_ignores_its_own_messages_coming_back() {
        let mut c = core(&both_in_topology());
        let out = c.send(
            format!("/ota/device/upgrade/{}/{}", L1.0, L1.1),
            QoS::AtLeastOnce,
            &json!({"x": 1}),
        );
        assert!(c.on_publish(&out.topic, &out.payload, 1).is_empty());
        assert!(
            c.log
                .iter()
                .all(|e| !matches!(e, PlatformEvent::Violation(_)))
        );
        // The same message again is a redelivery (after a broker restart,
        // to the double's persistent session): still the double's own.
        assert!(c.on_publish(&out.topic, &out.payload, 1).is_empty());
        assert!(
            c.log
                .iter()
                .all(|e| !matches!(e, PlatformEvent::Violation(_)))
        );
        // Another payload on that topic is the gateway's: a leaf offline.
        c.on_publish(&out.topic, b"{\"x\":2}", 1);
        assert!(matches!(c.log.last(), Some(PlatformEvent::Violation(_))));
    }
}
