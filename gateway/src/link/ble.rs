//! Bluetooth LE links: a central on an HCI controller, through a real host
//! stack (`trouble-host`, measured in `../shared/DESIGN.md`).
//!
//! - [`BleAdapter`] is one controller: `hci+tcp://HOST:PORT` (H4 over TCP: a
//!   Zephyr `hci_uart` dongle behind ser2net, or a virtual controller) or
//!   `hci+serial:///dev/ttyACM0?baud=1000000` (an H4 UART). The host stack's
//!   futures are not `Send`, so it runs on a thread of its own with a
//!   current-thread runtime; the gateway talks to it through channels.
//! - [`BleAdapter::open`] connects to one peripheral (`ble://AA:BB:..`),
//!   exchanges the ATT MTU, discovers the family's service and default
//!   characteristics, subscribes, and returns a [`Link`] whose byte stream is
//!   the default characteristic (a write of at most `mtu()` bytes is one GATT
//!   write; notifications arrive in order through `read`) and whose
//!   [`GattLink`] reaches the others. The link can be reopened: the peripheral
//!   is connected again (after it reset into a new image).
//!
//! What it is not: a scanner for people (that is `otagw ble scan`, later), or
//! pairing and bonding.

use std::collections::HashMap;
use std::task::Poll;
use std::time::Duration;

use bt_hci_serial::SerialTransport;
use embassy_futures::select::{Either, select};
use embassy_sync::blocking_mutex::raw::NoopRawMutex;
use tokio::sync::{mpsc, oneshot};
use trouble_host::prelude::{
    Address, Central, Characteristic, ConnectConfig, Connection, DefaultPacketPool,
    ExternalController, GattClient, HostResources, ScanConfig, Stack, Uuid as BtUuid,
};

use super::gatt::{Channel, GattError, GattValue, Request as GattRequest, Uuid};
use super::{Link, LinkError};

/// The ATT MTU the gateway asks for is the packet pool's; what was granted is
/// `link.mtu()` (ATT MTU - 3).
const ATT_HEADER: u16 = 3;
/// Connections one adapter holds at once (the stack's resources).
const MAX_CONNECTIONS: usize = 4;
/// L2CAP channels: signalling and ATT per connection.
const CHANNELS: usize = 2 * MAX_CONNECTIONS;
/// How long a dropped link's connection stays up for the device to hang up
/// itself (it was told to reset) before the gateway does.
const LINGER: Duration = Duration::from_secs(1);
/// Services a GATT client remembers.
const MAX_SERVICES: usize = 16;

/// Where an adapter's controller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterUrl {
    /// H4 over TCP.
    Tcp { host: String, port: u16 },
    /// H4 over a UART.
    Serial { path: String, baud: u32 },
}

impl AdapterUrl {
    /// Parse `hci+tcp://HOST:PORT` or `hci+serial:///dev/ttyACM0?baud=1000000`.
    pub fn parse(s: &str) -> Result<AdapterUrl, LinkError> {
        let bad = |reason: &str| LinkError::BadUrl {
            url: s.to_string(),
            reason: format!(
                "{reason} (a BLE adapter is hci+tcp://HOST:PORT or \
                 hci+serial:///dev/ttyACM0?baud=1000000)"
            ),
        };
        let url = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        match url.scheme() {
            "hci+tcp" => Ok(AdapterUrl::Tcp {
                host: url
                    .host_str()
                    .ok_or_else(|| bad("no host"))?
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                port: url.port().ok_or_else(|| bad("no port"))?,
            }),
            "hci+serial" => {
                let path = url.path().to_string();
                if path.is_empty() || path == "/" {
                    return Err(bad("no device path"));
                }
                let mut baud = 1_000_000;
                for (k, v) in url.query_pairs() {
                    match &*k {
                        "baud" => baud = v.parse().map_err(|_| bad("baud is not a number"))?,
                        other => return Err(bad(&format!("unknown setting {other:?}"))),
                    }
                }
                Ok(AdapterUrl::Serial { path, baud })
            }
            other => Err(bad(&format!("unknown scheme {other:?}"))),
        }
    }
}

/// A peripheral's address as a link URL names it: `ble://AA:BB:CC:DD:EE:FF`,
/// optionally `?addr_type=random|public` (default: random, what Zephyr and
/// most peripherals use as their identity address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BleUrl {
    /// Most significant byte first, as written.
    pub address: [u8; 6],
    pub kind: Option<AddrKind>,
}

/// The type of a BLE device address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrKind {
    Random,
    Public,
}

impl BleUrl {
    pub fn parse(s: &str) -> Result<BleUrl, LinkError> {
        let bad = |reason: String| LinkError::BadUrl {
            url: s.to_string(),
            reason,
        };
        let rest = s
            .strip_prefix("ble://")
            .ok_or_else(|| bad("a BLE link is ble://AA:BB:CC:DD:EE:FF".into()))?;
        let (addr, query) = rest.split_once('?').unwrap_or((rest, ""));
        let parts: Vec<&str> = addr.trim_end_matches('/').split(':').collect();
        let mut address = [0u8; 6];
        let valid = parts.len() == 6
            && parts
                .iter()
                .zip(address.iter_mut())
                .all(|(p, b)| p.len() == 2 && u8::from_str_radix(p, 16).map(|v| *b = v).is_ok());
        if !valid {
            return Err(bad(format!(
                "{addr:?} is not a Bluetooth address like AA:BB:CC:DD:EE:FF"
            )));
        }
        let mut kind = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("addr_type", "random")) => kind = Some(AddrKind::Random),
                Some(("addr_type", "public")) => kind = Some(AddrKind::Public),
                _ => {
                    return Err(bad(format!(
                        "unknown setting {pair:?} (addr_type=random or addr_type=public)"
                    )));
                }
            }
        }
        Ok(BleUrl { address, kind })
    }

    /// The address to connect to, least significant byte first as the
    /// stack takes it. One entry: a controller that initiates by the peer
    /// address of LE Create Connection (Bumble's) ignores the rest of a
    /// filter accept list.
    fn accept_list(&self) -> Vec<Address> {
        let mut le = self.address;
        le.reverse();
        match self.kind {
            Some(AddrKind::Public) => vec![public(le)],
            Some(AddrKind::Random) | None => vec![Address::random(le)],
        }
    }
}

fn public(le: [u8; 6]) -> Address {
    Address {
        kind: bt_hci::param::AddrKind::PUBLIC,
        addr: bt_hci::param::BdAddr::new(le),
    }
}

/// The default characteristics of a family on BLE links (`family-info.default-gatt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GattPlan {
    pub service: Uuid,
    pub write: Uuid,
    pub write_with_response: bool,
    pub notify: Uuid,
}

/// A device heard advertising during a scan (`otagw ble scan`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Advertiser {
    /// `AA:BB:CC:DD:EE:FF`, most significant byte first, as a `ble://` URL
    /// writes it.
    pub address: String,
    /// `random` or `public`.
    pub addr_type: &'static str,
    /// Its complete name, or the shortened one if that is all it sent.
    pub name: Option<String>,
    /// Whether `name` is the shortened one (the complete name, if the
    /// device has one, is in a scan response the controller did not pass on).
    pub name_shortened: bool,
    /// The strongest signal heard, in dBm.
    pub rssi: i8,
    /// Service UUIDs it advertised (16-, 32- and 128-bit, in 128-bit form).
    pub services: Vec<Uuid>,
    /// Whether it accepts connections.
    pub connectable: bool,
}

impl AddrKind {
    /// How a `ble://` URL's `addr_type` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            AddrKind::Random => "random",
            AddrKind::Public => "public",
        }
    }
}

/// A link's share of its adapter's connections.
type Permit = std::sync::Arc<tokio::sync::OwnedSemaphorePermit>;

/// A request to the stack thread.
enum Request {
    Connect {
        url: BleUrl,
        plan: GattPlan,
        timeout: Duration,
        /// The link's share of the adapter's connections, held until the
        /// connection ends.
        permit: Permit,
        reply: oneshot::Sender<Result<Connected, String>>,
    },
    /// Listen to advertisements for a while.
    Scan {
        duration: Duration,
        reply: oneshot::Sender<Result<Vec<Advertiser>, String>>,
    },
}

/// What a connection task hands back once the link is ready.
struct Connected {
    mtu: u32,
    /// The address type the connection was made with.
    kind: AddrKind,
    requests: mpsc::UnboundedSender<GattRequest>,
    stream: mpsc::UnboundedReceiver<Vec<u8>>,
    values: mpsc::UnboundedReceiver<GattValue>,
}

/// One HCI controller and the host stack on it.
#[derive(Debug, Clone)]
pub struct BleAdapter {
    name: String,
    requests: mpsc::UnboundedSender<Request>,
    /// Connections the adapter may hold at once (`[ble] max_connections`).
    /// A link takes one when it opens and keeps it across reopens (a device
    /// that resets must get back in before other links); it is given back
    /// when both the link and its last connection are gone (after a dropped
    /// link's linger), so the limit counts real connections.
    connections: std::sync::Arc<tokio::sync::Semaphore>,
}

impl BleAdapter {
    /// Open the controller and start the host stack on a thread of its own;
    /// at most `max_connections` links (1 to 4) are connected at once, the
    /// others wait. Fails when the controller cannot be reached.
    pub async fn start(spec: &str, max_connections: usize) -> Result<BleAdapter, LinkError> {
        let url = AdapterUrl::parse(spec)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let name = spec.to_string();
        let thread_name = format!("otagw-ble {spec}");
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || stack_thread(url, rx, ready_tx))
            .map_err(|source| LinkError::Open {
                link: name.clone(),
                source,
            })?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(BleAdapter {
                name,
                requests: tx,
                connections: std::sync::Arc::new(tokio::sync::Semaphore::new(
                    max_connections.clamp(1, MAX_CONNECTIONS),
                )),
            }),
            Ok(Err(reason)) => Err(LinkError::Open {
                link: name,
                source: std::io::Error::other(reason),
            }),
            Err(_) => Err(LinkError::Open {
                link: name,
                source: std::io::Error::other("the BLE stack stopped while starting"),
            }),
        }
    }

    /// Whether the host stack still runs (its controller did not go away).
    pub fn is_running(&self) -> bool {
        !self.requests.is_closed()
    }

    /// Listen for `duration` and return every device heard advertising,
    /// strongest signal first. Connections already up are not disturbed.
    pub async fn scan(&self, duration: Duration) -> Result<Vec<Advertiser>, LinkError> {
        let gone = || LinkError::Open {
            link: self.name.clone(),
            source: std::io::Error::other(format!("the BLE adapter {} stopped", self.name)),
        };
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Scan { duration, reply })
            .map_err(|_| gone())?;
        answer
            .await
            .map_err(|_| gone())?
            .map_err(|reason| LinkError::Open {
                link: self.name.clone(),
                source: std::io::Error::other(reason),
            })
    }

    /// Connect to the peripheral `url` names and make a link of it.
    pub async fn open(
        &self,
        url: &str,
        plan: GattPlan,
        timeout: Duration,
    ) -> Result<Link, LinkError> {
        let mut parsed = BleUrl::parse(url)?;
        let permit: Permit = std::sync::Arc::new(
            self.connections
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| LinkError::Open {
                    link: url.to_string(),
                    source: std::io::Error::other(format!("the BLE adapter {} stopped", self.name)),
                })?,
        );
        let (transport, kind) = self
            .connect(url, &parsed, &plan, timeout, permit.clone())
            .await?;
        // Reconnect with the address type it advertised the first time.
        parsed.kind = Some(kind);
        let adapter = self.clone();
        let name = url.to_string();
        Ok(super::gatt::ble_link(url, transport, move || {
            let (adapter, name, parsed) = (adapter.clone(), name.clone(), parsed.clone());
            let (plan, permit) = (plan.clone(), permit.clone());
            async move {
                adapter
                    .connect(&name, &parsed, &plan, timeout, permit)
                    .await
                    .map(|(t, _)| t)
            }
        }))
    }

    async fn connect(
        &self,
        link: &str,
        url: &BleUrl,
        plan: &GattPlan,
        timeout: Duration,
        permit: Permit,
    ) -> Result<(Channel, AddrKind), LinkError> {
        let gone = || LinkError::Open {
            link: link.to_string(),
            source: std::io::Error::other(format!("the BLE adapter {} stopped", self.name)),
        };
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Connect {
                url: url.clone(),
                plan: plan.clone(),
                timeout,
                permit,
                reply,
            })
            .map_err(|_| gone())?;
        let connected = answer
            .await
            .map_err(|_| gone())?
            .map_err(|reason| LinkError::Open {
                link: link.to_string(),
                source: std::io::Error::other(reason),
            })?;
        let channel = Channel {
            mtu: connected.mtu,
            requests: connected.requests,
            stream: connected.stream,
            values: connected.values,
            unread: Vec::new(),
        };
        Ok((channel, connected.kind))
    }
}

type Controller = ExternalController<
    SerialTransport<
        NoopRawMutex,
        embedded_io_adapters::tokio_1::FromTokio<Box<dyn tokio::io::AsyncRead + Unpin>>,
        embedded_io_adapters::tokio_1::FromTokio<Box<dyn tokio::io::AsyncWrite + Unpin>>,
    >,
    10,
>;
type BleStack = Stack<'static, Controller, DefaultPacketPool>;
type Client = GattClient<'static, Controller, DefaultPacketPool, MAX_SERVICES>;

/// The stack thread: open the controller, run the host, serve requests.
fn stack_thread(
    url: AdapterUrl,
    requests: mpsc::UnboundedReceiver<Request>,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("no runtime for the BLE stack: {e}")));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (reader, writer): (
            Box<dyn tokio::io::AsyncRead + Unpin>,
            Box<dyn tokio::io::AsyncWrite + Unpin>,
        ) = match open_controller(&url).await {
            Ok(io) => io,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let driver: SerialTransport<NoopRawMutex, _, _> = SerialTransport::new(
            embedded_io_adapters::tokio_1::FromTokio::new(reader),
            embedded_io_adapters::tokio_1::FromTokio::new(writer),
        );
        let controller: Controller = ExternalController::new(driver);
        // The stack lives as long as the process: its resources are leaked
        // once per adapter so connection tasks can hold it ('static).
        let resources: &'static mut HostResources<DefaultPacketPool, MAX_CONNECTIONS, CHANNELS> =
            Box::leak(Box::new(HostResources::new()));
        let stack: &'static BleStack = Box::leak(Box::new(
            trouble_host::new(controller, resources)
                .set_random_address(Address::random(own_address()))
                .build(),
        ));
        let mut runner = stack.runner();
        let central = stack.central();
        let heard = Heard::default();
        let _ = ready.send(Ok(()));
        let served = select(
            runner.run_with_handler(&heard),
            serve(stack, central, &heard, requests),
        )
        .await;
        if let Either::First(Err(e)) = served {
            tracing::error!("the BLE host stack stopped: {e:?}");
        }
    });
}

/// A random static address for the gateway's side (the top two bits set).
fn own_address() -> [u8; 6] {
    let pid = std::process::id().to_le_bytes();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        .to_le_bytes();
    [t[0], t[1], t[2], pid[0], pid[1], 0xC0 | (pid[2] & 0x3F)]
}

async fn open_controller(
    url: &AdapterUrl,
) -> Result<
    (
        Box<dyn tokio::io::AsyncRead + Unpin>,
        Box<dyn tokio::io::AsyncWrite + Unpin>,
    ),
    String,
> {
    match url {
        AdapterUrl::Tcp { host, port } => {
            let sock = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(|e| format!("cannot reach the HCI controller at {host}:{port}: {e}"))?;
            let _ = sock.set_nodelay(true);
            let (r, w) = tokio::io::split(sock);
            Ok((Box::new(r), Box::new(w)))
        }
        AdapterUrl::Serial { path, baud } => {
            let port = super::serial::open(
                path,
                &super::SerialConfig::eight_bits(*baud, super::Parity::None),
            )
            .map_err(|e| format!("cannot open the HCI controller {path}: {e}"))?;
            let (r, w) = tokio::io::split(port);
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

/// Serve connect requests one after the other (the controller makes one
/// connection at a time); each connection then runs as a task of its own.
async fn serve(
    stack: &'static BleStack,
    mut central: Central<'static, Controller, DefaultPacketPool>,
    heard: &Heard,
    mut requests: mpsc::UnboundedReceiver<Request>,
) {
    while let Some(request) = requests.recv().await {
        let (url, plan, timeout, permit, reply) = match request {
            Request::Scan { duration, reply } => {
                let _ = reply.send(scan(&mut central, heard, duration).await);
                continue;
            }
            Request::Connect {
                url,
                plan,
                timeout,
                permit,
                reply,
            } => (url, plan, timeout, permit, reply),
        };
        // A link that gave up waiting (its reopen's time ran out) frees the
        // controller for the others at once.
        let mut reply = reply;
        let outcome = tokio::select! {
            r = attempt(&mut central, heard, &url, timeout) => r,
            _ = reply.closed() => {
                tracing::debug!("BLE connect abandoned: nobody waits for it any more");
                continue;
            }
        };
        let (conn, kind) = match outcome {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(e));
                continue;
            }
        };
        tokio::task::spawn_local(async move {
            connection(stack, conn, plan, kind, reply).await;
            drop(permit);
        });
    }
}

/// Connection parameters for moving an image: the shortest interval a
/// peripheral may accept first (7.5 ms, the minimum; it may grant up to
/// 30 ms), no peripheral latency, and a 4 s supervision timeout so a device
/// that leaves range is noticed well within a flash's timeouts. The stack's
/// default (80 ms) caps a controller that sends a few packets per
/// connection event at a fraction of the radio's rate.
fn bulk_transfer_params() -> trouble_host::prelude::RequestedConnParams {
    trouble_host::prelude::RequestedConnParams {
        min_connection_interval: embassy_time::Duration::from_micros(7_500),
        max_connection_interval: embassy_time::Duration::from_millis(30),
        max_latency: 0,
        supervision_timeout: embassy_time::Duration::from_secs(4),
        ..Default::default()
    }
}

/// Find the peripheral and connect to it within `timeout`.
async fn attempt(
    central: &mut Central<'static, Controller, DefaultPacketPool>,
    heard: &Heard,
    url: &BleUrl,
    timeout: Duration,
) -> Result<(Connection<'static, DefaultPacketPool>, AddrKind), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let not_found = || {
        format!(
            "not found: nothing with this address advertised within {} ms",
            timeout.as_millis()
        )
    };
    // No address type in the URL: the advertisement says which.
    let kind = match url.kind {
        Some(kind) => kind,
        None => listen_for(central, heard, url.address, deadline)
            .await?
            .ok_or_else(not_found)?,
    };
    let accept = BleUrl {
        address: url.address,
        kind: Some(kind),
    }
    .accept_list();
    let config = ConnectConfig {
        connect_params: bulk_transfer_params(),
        scan_config: ScanConfig {
            filter_accept_list: &accept,
            ..Default::default()
        },
    };
    loop {
        match tokio::time::timeout_at(deadline, central.connect(&config)).await {
            Err(_) => return Err(not_found()),
            // trouble-host 0.8 marks a cancelled attempt done when it sends
            // LE Create Connection Cancel; the controller's LE Connection
            // Complete for it (status Unknown Connection Identifier) comes
            // after, and ends the next attempt as a timeout. Try again.
            Ok(Err(trouble_host::BleHostError::BleHost(trouble_host::Error::Timeout))) => {
                tracing::debug!("BLE connect ended by a stale completion; trying again");
            }
            Ok(Err(e)) => return Err(format!("connecting failed: {e:?}")),
            Ok(Ok(conn)) => return Ok((conn, kind)),
        }
    }
}

/// Who advertised, by address (most significant byte first) and type.
type Heards = HashMap<([u8; 6], AddrKind), Advertiser>;

/// Advertising reports, gathered while the adapter scans.
#[derive(Default)]
struct Heard {
    /// Present while a scan is on: what was heard, by address and type.
    seen: std::cell::RefCell<Option<Heards>>,
    /// Told of every batch of reports.
    changed: tokio::sync::Notify,
}

impl Heard {
    fn start(&self) {
        *self.seen.borrow_mut() = Some(HashMap::new());
    }

    fn stop(&self) -> Vec<Advertiser> {
        let mut all: Vec<Advertiser> = self
            .seen
            .borrow_mut()
            .take()
            .map(|m| m.into_values().collect())
            .unwrap_or_default();
        all.sort_by(|a, b| b.rssi.cmp(&a.rssi).then(a.address.cmp(&b.address)));
        all
    }

    /// The type `address` (most significant byte first) advertised with.
    fn kind_of(&self, address: [u8; 6]) -> Option<AddrKind> {
        let seen = self.seen.borrow();
        let seen = seen.as_ref()?;
        [AddrKind::Random, AddrKind::Public]
            .into_iter()
            .find(|k| seen.get(&(address, *k)).is_some_and(|a| a.connectable))
    }
}

impl trouble_host::prelude::EventHandler for Heard {
    fn on_adv_reports(&self, reports: bt_hci::param::LeAdvReportsIter) {
        use bt_hci::param::LeAdvEventKind;
        for r in reports.flatten() {
            let connectable = matches!(
                r.event_kind,
                LeAdvEventKind::AdvInd | LeAdvEventKind::AdvDirectInd
            );
            self.record(r.addr_kind, &r.addr, r.rssi, connectable, r.data);
        }
        self.changed.notify_waiters();
    }

    /// Some controllers (Bumble's among them) answer even legacy scanning
    /// with extended reports.
    fn on_ext_adv_reports(&self, reports: bt_hci::param::LeExtAdvReportsIter) {
        for r in reports.flatten() {
            let connectable = r.event_kind.connectable();
            self.record(r.addr_kind, &r.addr, r.rssi, connectable, r.data);
        }
        self.changed.notify_waiters();
    }
}

impl Heard {
    /// One advertising report, while a scan is on.
    fn record(
        &self,
        addr_kind: bt_hci::param::AddrKind,
        addr: &bt_hci::param::BdAddr,
        rssi: i8,
        connectable: bool,
        data: &[u8],
    ) {
        use trouble_host::advertise::AdStructure;
        let mut seen = self.seen.borrow_mut();
        let Some(seen) = seen.as_mut() else {
            return;
        };
        let kind = if addr_kind == bt_hci::param::AddrKind::PUBLIC
            || addr_kind == bt_hci::param::AddrKind::RESOLVABLE_PRIVATE_OR_PUBLIC
        {
            AddrKind::Public
        } else {
            AddrKind::Random
        };
        let mut address = [0u8; 6];
        address.copy_from_slice(addr.raw());
        address.reverse();
        let heard = seen.entry((address, kind)).or_insert_with(|| Advertiser {
            address: format_address(address),
            addr_type: kind.as_str(),
            name: None,
            name_shortened: false,
            rssi,
            services: Vec::new(),
            connectable: false,
        });
        // 127: the controller could not tell.
        if rssi != 127 && (heard.rssi == 127 || rssi > heard.rssi) {
            heard.rssi = rssi;
        }
        heard.connectable |= connectable;
        let mut add = |u: Uuid| {
            if !heard.services.contains(&u) {
                heard.services.push(u);
            }
        };
        for ad in AdStructure::decode(data).flatten() {
            match ad {
                AdStructure::CompleteLocalName(n) => {
                    heard.name = Some(String::from_utf8_lossy(n).into_owned());
                    heard.name_shortened = false;
                }
                AdStructure::ShortenedLocalName(n) if heard.name.is_none() => {
                    heard.name = Some(String::from_utf8_lossy(n).into_owned());
                    heard.name_shortened = true;
                }
                AdStructure::IncompleteServiceUuids16(l)
                | AdStructure::CompleteServiceUuids16(l) => {
                    for u in l {
                        add(assigned(u32::from(u16::from_le_bytes(*u))));
                    }
                }
                AdStructure::IncompleteServiceUuids32(l)
                | AdStructure::CompleteServiceUuids32(l) => {
                    for u in l {
                        add(assigned(u32::from_le_bytes(*u)));
                    }
                }
                AdStructure::IncompleteServiceUuids128(l)
                | AdStructure::CompleteServiceUuids128(l) => {
                    for u in l {
                        add(Uuid::from_u128(u128::from_le_bytes(*u)));
                    }
                }
                _ => {}
            }
        }
    }
}

/// `AA:BB:CC:DD:EE:FF` of an address, most significant byte first.
fn format_address(a: [u8; 6]) -> String {
    a.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A 16- or 32-bit assigned number in the Bluetooth base UUID.
fn assigned(n: u32) -> Uuid {
    Uuid::from_u128(BASE | (u128::from(n) << 96))
}

/// Scan (active: names come in scan responses) for `duration`.
async fn scan(
    central: &mut Central<'static, Controller, DefaultPacketPool>,
    heard: &Heard,
    duration: Duration,
) -> Result<Vec<Advertiser>, String> {
    listening(central, heard, true, tokio::time::sleep(duration)).await?;
    Ok(heard.stop())
}

/// Scan until `address` advertises connectably or `deadline` passes; the
/// type it advertised with, if it did.
async fn listen_for(
    central: &mut Central<'static, Controller, DefaultPacketPool>,
    heard: &Heard,
    address: [u8; 6],
    deadline: tokio::time::Instant,
) -> Result<Option<AddrKind>, String> {
    let found = listening(
        central,
        heard,
        false,
        tokio::time::timeout_at(deadline, async {
            loop {
                let changed = heard.changed.notified();
                if let Some(kind) = heard.kind_of(address) {
                    return kind;
                }
                changed.await;
            }
        }),
    )
    .await;
    heard.stop();
    Ok(found?.ok())
}

/// Scan while `until` runs, gathering reports into `heard`; what `until`
/// returned.
async fn listening<T>(
    central: &mut Central<'static, Controller, DefaultPacketPool>,
    heard: &Heard,
    active: bool,
    until: impl std::future::Future<Output = T>,
) -> Result<T, String> {
    let mut scanner = trouble_host::prelude::Scanner::new(central);
    heard.start();
    let session = scanner
        .scan(&ScanConfig {
            active,
            ..Default::default()
        })
        .await
        .map_err(|e| {
            heard.stop();
            format!("the controller refused to scan: {e:?}")
        })?;
    let out = until.await;
    session.stop().await;
    Ok(out)
}

/// The Bluetooth base UUID's bits outside the 32-bit assigned-number field.
const BASE_MASK: u128 = (1 << 96) - 1;
const BASE: u128 = 0x0000_0000_0000_1000_8000_0080_5f9b_34fb;

/// The stack's form of a UUID: an assigned number (in the base UUID) is
/// compared in its 16- or 32-bit form, as devices declare it.
fn bt_uuid(u: &Uuid) -> BtUuid {
    let n = u.as_u128();
    if n & BASE_MASK == BASE {
        let short = (n >> 96) as u32;
        return match u16::try_from(short) {
            Ok(s) => BtUuid::new_short(s),
            Err(_) => BtUuid::from(short),
        };
    }
    BtUuid::from(n)
}

/// One connection: GATT client, discovery, subscription, then requests and
/// notifications until the peripheral goes away.
async fn connection(
    stack: &'static BleStack,
    conn: Connection<'static, DefaultPacketPool>,
    plan: GattPlan,
    kind: AddrKind,
    reply: oneshot::Sender<Result<Connected, String>>,
) {
    let client: Client = match GattClient::new(stack, &conn).await {
        Ok(c) => c,
        Err(e) => {
            let _ = reply.send(Err(format!("GATT client: {e:?}")));
            return;
        }
    };
    let client = &client;
    // Notifications are taken from one catch-all listener, by handle. It is
    // made before anything is subscribed and outlives the connection: what
    // the device sent right before it hung up (the answer to "reset") is
    // still delivered.
    let Ok(mut listener) = client.listen_all() else {
        let _ = reply.send(Err("no notification listener left".into()));
        return;
    };
    let (stream_tx, stream_rx) = mpsc::unbounded_channel();
    let (values_tx, values_rx) = mpsc::unbounded_channel();
    let deliver = Deliver {
        stream: stream_tx,
        values: values_tx,
        notify: std::cell::Cell::new(None),
        subscribed: Default::default(),
    };
    let setup = async {
        let services = client
            .services_by_uuid(&bt_uuid(&plan.service))
            .await
            .map_err(|e| format!("discovering service {}: {e:?}", plan.service))?;
        let service = services
            .first()
            .cloned()
            .ok_or_else(|| format!("not found: the device has no service {}", plan.service))?;
        let write: Characteristic<u8> = client
            .characteristic_by_uuid(&service, &bt_uuid(&plan.write))
            .await
            .map_err(|e| format!("not found: characteristic {}: {e:?}", plan.write))?;
        let notify: Characteristic<u8> = client
            .characteristic_by_uuid(&service, &bt_uuid(&plan.notify))
            .await
            .map_err(|e| format!("not found: characteristic {}: {e:?}", plan.notify))?;
        deliver.notify.set(Some(notify.handle));
        // Subscribe (writes the CCCD); the listener above takes the values.
        drop(
            client
                .subscribe(&notify, false)
                .await
                .map_err(|e| format!("subscribing to {}: {e:?}", plan.notify))?,
        );
        Ok::<_, String>((service, write))
    };
    let listener = &mut listener;
    let run = async {
        let (service, write) = match setup.await {
            Ok(s) => s,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let (req_tx, mut req_rx) = mpsc::unbounded_channel();
        let mtu = u32::from(conn.att_mtu().saturating_sub(ATT_HEADER));
        if reply
            .send(Ok(Connected {
                mtu,
                kind,
                requests: req_tx,
                stream: stream_rx,
                values: values_rx,
            }))
            .is_err()
        {
            conn.disconnect();
            return;
        }
        let mut known: HashMap<Uuid, Characteristic<u8>> = HashMap::new();
        loop {
            // A disconnection ends `client.task()`, and with it this loop.
            match select(listener.next(), req_rx.recv()).await {
                Either::First(n) => deliver.send(&n),
                Either::Second(None) => {
                    // The link was dropped. What was written last may still
                    // be on its way (the command that resets the device,
                    // before `reopen`): a disconnect now could overtake it.
                    // Give the device LINGER to hang up itself (that ends
                    // `client.task()`), then hang up.
                    tokio::time::sleep(LINGER).await;
                    conn.disconnect();
                    return;
                }
                Either::Second(Some(r)) => {
                    handle(client, &service, &write, &plan, &mut known, &deliver, r).await;
                }
            }
        }
    };
    if let Either::First(_) = select(client.task(), run).await {
        // Disconnected: hand on what arrived before (the task queued it in
        // the same turn as it saw the link go).
        while let Poll::Ready(n) = embassy_futures::poll_once(listener.next()) {
            deliver.send(&n);
        }
    }
}

/// Where a connection's notifications go: the default characteristic's to
/// the link's byte stream, other subscribed ones to `receive`.
struct Deliver {
    stream: mpsc::UnboundedSender<Vec<u8>>,
    values: mpsc::UnboundedSender<GattValue>,
    /// The default notify characteristic's handle, once discovered.
    notify: std::cell::Cell<Option<u16>>,
    subscribed: std::cell::RefCell<HashMap<u16, Uuid>>,
}

impl Deliver {
    fn send<const MTU: usize>(&self, n: &trouble_host::prelude::Notification<MTU>) {
        let data = n.as_ref().to_vec();
        if Some(n.handle()) == self.notify.get() {
            let _ = self.stream.send(data);
        } else if let Some(uuid) = self.subscribed.borrow().get(&n.handle()) {
            let _ = self.values.send(GattValue {
                characteristic: *uuid,
                data,
            });
        }
    }
}

async fn find(
    client: &Client,
    service: &trouble_host::prelude::ServiceHandle,
    known: &mut HashMap<Uuid, Characteristic<u8>>,
    uuid: Uuid,
) -> Result<Characteristic<u8>, GattError> {
    if let Some(c) = known.get(&uuid) {
        return Ok(*c);
    }
    let target = bt_uuid(&uuid);
    let mut found = client.characteristic_by_uuid(service, &target).await.ok();
    if found.is_none() {
        let services = client
            .services()
            .await
            .map_err(|e| GattError::Io(format!("discovering services: {e:?}")))?;
        for s in services.iter() {
            if let Ok(c) = client.characteristic_by_uuid(s, &target).await {
                found = Some(c);
                break;
            }
        }
    }
    let c = found.ok_or_else(|| GattError::NotFound(uuid.to_string()))?;
    known.insert(uuid, c);
    Ok(c)
}

async fn handle(
    client: &Client,
    service: &trouble_host::prelude::ServiceHandle,
    write: &Characteristic<u8>,
    plan: &GattPlan,
    known: &mut HashMap<Uuid, Characteristic<u8>>,
    deliver: &Deliver,
    r: GattRequest,
) {
    let io = |e: &dyn std::fmt::Debug| GattError::Io(format!("{e:?}"));
    match r {
        GattRequest::Write(data) => {
            let r = if plan.write_with_response {
                client.write_characteristic(write, &data).await
            } else {
                client
                    .write_characteristic_without_response(write, &data)
                    .await
            };
            if let Err(e) = r {
                tracing::warn!("BLE write failed: {e:?}");
            }
        }
        GattRequest::GattWrite {
            uuid,
            data,
            with_response,
            reply,
        } => {
            let r = async {
                let c = find(client, service, known, uuid).await?;
                if with_response {
                    client.write_characteristic(&c, &data).await
                } else {
                    client
                        .write_characteristic_without_response(&c, &data)
                        .await
                }
                .map_err(|e| io(&e))
            }
            .await;
            let _ = reply.send(r);
        }
        GattRequest::GattRead { uuid, reply } => {
            let r = async {
                let c = find(client, service, known, uuid).await?;
                let mut buf = vec![0u8; 512];
                let n = client
                    .read_characteristic(&c, &mut buf)
                    .await
                    .map_err(|e| io(&e))?;
                buf.truncate(n);
                Ok(buf)
            }
            .await;
            let _ = reply.send(r);
        }
        GattRequest::Subscribe {
            uuid,
            indicate,
            reply,
        } => {
            let r = async {
                let c = find(client, service, known, uuid).await?;
                drop(client.subscribe(&c, indicate).await.map_err(|e| io(&e))?);
                deliver.subscribed.borrow_mut().insert(c.handle, uuid);
                Ok(())
            }
            .await;
            let _ = reply.send(r);
        }
        GattRequest::Unsubscribe { uuid, reply } => {
            let r = async {
                let c = find(client, service, known, uuid).await?;
                client.unsubscribe(&c).await.map_err(|e| io(&e))?;
                deliver.subscribed.borrow_mut().remove(&c.handle);
                Ok(())
            }
            .await;
            let _ = reply.send(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_and_device_urls() {
        assert_eq!(
            AdapterUrl::parse("hci+tcp://127.0.0.1:9000").unwrap(),
            AdapterUrl::Tcp {
                host: "127.0.0.1".into(),
                port: 9000
            }
        );
        assert_eq!(
            AdapterUrl::parse("hci+serial:///dev/ttyACM0?baud=115200").unwrap(),
            AdapterUrl::Serial {
                path: "/dev/ttyACM0".into(),
                baud: 115_200
            }
        );
        for bad in [
            "hci+tcp://h",
            "bluez://hci0",
            "hci+serial://",
            "hci+serial:///d?speed=1",
        ] {
            assert!(AdapterUrl::parse(bad).is_err(), "{bad}");
        }
        let u = BleUrl::parse("ble://C4:11:22:33:44:55?addr_type=random").unwrap();
        assert_eq!(u.address, [0xC4, 0x11, 0x22, 0x33, 0x44, 0x55]);
        assert_eq!(u.kind, Some(AddrKind::Random));
        assert_eq!(u.accept_list().len(), 1);
        let default = BleUrl::parse("ble://c4:11:22:33:44:55")
            .unwrap()
            .accept_list();
        assert_eq!(
            default,
            vec![Address::random([0x55, 0x44, 0x33, 0x22, 0x11, 0xC4])]
        );
        for bad in [
            "ble://C4:11:22:33:44",
            "ble://C4:11:22:33:44:5G",
            "ble://C4:11:22:33:44:55?addr_type=odd",
            "serial:///dev/x",
            "ble://é",
        ] {
            assert!(BleUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
