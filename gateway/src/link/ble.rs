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
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bt_hci_serial::SerialTransport;
use embassy_futures::select::{Either, select};
use embassy_sync::blocking_mutex::raw::NoopRawMutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use trouble_host::prelude::{
    Address, Central, Characteristic, ConnectConfig, Connection, DefaultPacketPool,
    ExternalController, GattClient, HostResources, ScanConfig, Stack, Uuid as BtUuid,
};

use super::gatt::{GattError, GattFuture, GattLink, GattValue, Uuid};
use super::{Link, LinkError, LinkKind, Transport};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

/// What a connection task hands back once the link is ready.
struct Connected {
    mtu: u32,
    requests: mpsc::UnboundedSender<ConnRequest>,
    stream: mpsc::UnboundedReceiver<Vec<u8>>,
    values: mpsc::UnboundedReceiver<GattValue>,
}

/// A request to one connection's task.
enum ConnRequest {
    /// A piece of the default characteristic's byte stream.
    Write(Vec<u8>),
    GattWrite {
        uuid: Uuid,
        data: Vec<u8>,
        with_response: bool,
        reply: oneshot::Sender<Result<(), GattError>>,
    },
    GattRead {
        uuid: Uuid,
        reply: oneshot::Sender<Result<Vec<u8>, GattError>>,
    },
    Subscribe {
        uuid: Uuid,
        indicate: bool,
        reply: oneshot::Sender<Result<(), GattError>>,
    },
    Unsubscribe {
        uuid: Uuid,
        reply: oneshot::Sender<Result<(), GattError>>,
    },
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

    /// Connect to the peripheral `url` names and make a link of it.
    pub async fn open(
        &self,
        url: &str,
        plan: GattPlan,
        timeout: Duration,
    ) -> Result<Link, LinkError> {
        let parsed = BleUrl::parse(url)?;
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
        let transport = self
            .connect(url, &parsed, &plan, timeout, permit.clone())
            .await?;
        let mtu = transport.mtu;
        let adapter = self.clone();
        let name = url.to_string();
        let reopener: super::Reopener = Box::new(move || {
            let adapter = adapter.clone();
            let name = name.clone();
            let parsed = parsed.clone();
            let plan = plan.clone();
            let permit = permit.clone();
            Box::pin(async move {
                adapter
                    .connect(&name, &parsed, &plan, timeout, permit)
                    .await
                    .map(|t| Box::new(t) as Box<dyn Transport>)
                    .map_err(|e| e.to_string())
            })
        });
        Ok(
            Link::new(url.to_string(), LinkKind::Ble, mtu, Box::new(transport))
                .with_reopener(reopener),
        )
    }

    async fn connect(
        &self,
        link: &str,
        url: &BleUrl,
        plan: &GattPlan,
        timeout: Duration,
        permit: Permit,
    ) -> Result<BleTransport, LinkError> {
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
        Ok(BleTransport {
            mtu: connected.mtu,
            requests: connected.requests,
            stream: connected.stream,
            values: connected.values,
            unread: Vec::new(),
        })
    }
}

/// The gateway's side of one connection.
struct BleTransport {
    mtu: u32,
    requests: mpsc::UnboundedSender<ConnRequest>,
    stream: mpsc::UnboundedReceiver<Vec<u8>>,
    values: mpsc::UnboundedReceiver<GattValue>,
    /// The rest of a notification a read did not take.
    unread: Vec<u8>,
}

impl AsyncRead for BleTransport {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.unread.is_empty() {
            match self.stream.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                // Disconnected: end of stream.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(v)) => self.unread = v,
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        self.unread.drain(..n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for BleTransport {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = buf.len().min(self.mtu as usize);
        match self.requests.send(ConnRequest::Write(buf[..n].to_vec())) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Transport for BleTransport {
    fn gatt(&mut self) -> Option<&mut dyn GattLink> {
        Some(self)
    }
}

impl BleTransport {
    fn ask<'a, T: Send + 'a>(
        &'a mut self,
        make: impl FnOnce(oneshot::Sender<Result<T, GattError>>) -> ConnRequest,
    ) -> GattFuture<'a, T> {
        let (reply, answer) = oneshot::channel();
        let sent = self.requests.send(make(reply));
        Box::pin(async move {
            sent.map_err(|_| GattError::Closed)?;
            answer.await.map_err(|_| GattError::Closed)?
        })
    }
}

impl GattLink for BleTransport {
    fn write<'a>(
        &'a mut self,
        characteristic: Uuid,
        data: &'a [u8],
        with_response: bool,
    ) -> GattFuture<'a, ()> {
        let data = data.to_vec();
        self.ask(move |reply| ConnRequest::GattWrite {
            uuid: characteristic,
            data,
            with_response,
            reply,
        })
    }

    fn read(&mut self, characteristic: Uuid) -> GattFuture<'_, Vec<u8>> {
        self.ask(move |reply| ConnRequest::GattRead {
            uuid: characteristic,
            reply,
        })
    }

    fn subscribe(&mut self, characteristic: Uuid, indicate: bool) -> GattFuture<'_, ()> {
        self.ask(move |reply| ConnRequest::Subscribe {
            uuid: characteristic,
            indicate,
            reply,
        })
    }

    fn unsubscribe(&mut self, characteristic: Uuid) -> GattFuture<'_, ()> {
        self.ask(move |reply| ConnRequest::Unsubscribe {
            uuid: characteristic,
            reply,
        })
    }

    fn receive(&mut self, timeout: Duration) -> GattFuture<'_, Option<GattValue>> {
        Box::pin(async move {
            match tokio::time::timeout(timeout, self.values.recv()).await {
                Err(_) => Ok(None),
                Ok(Some(v)) => Ok(Some(v)),
                Ok(None) => Err(GattError::Closed),
            }
        })
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
        let _ = ready.send(Ok(()));
        let served = select(runner.run(), serve(stack, central, requests)).await;
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
    mut requests: mpsc::UnboundedReceiver<Request>,
) {
    while let Some(Request::Connect {
        url,
        plan,
        timeout,
        permit,
        reply,
    }) = requests.recv().await
    {
        let accept = url.accept_list();
        let config = ConnectConfig {
            connect_params: Default::default(),
            scan_config: ScanConfig {
                filter_accept_list: &accept,
                ..Default::default()
            },
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let conn = loop {
            match tokio::time::timeout_at(deadline, central.connect(&config)).await {
                Err(_) => {
                    break Err(format!(
                        "not found: nothing with this address advertised within {} ms",
                        timeout.as_millis()
                    ));
                }
                // trouble-host 0.8 marks a cancelled attempt done when it sends
                // LE Create Connection Cancel; the controller's LE Connection
                // Complete for it (status Unknown Connection Identifier) comes
                // after, and ends the next attempt as a timeout. Try again.
                Ok(Err(trouble_host::BleHostError::BleHost(trouble_host::Error::Timeout))) => {
                    tracing::debug!("BLE connect ended by a stale completion; trying again");
                }
                Ok(Err(e)) => break Err(format!("connecting failed: {e:?}")),
                Ok(Ok(conn)) => break Ok(conn),
            }
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                let _ = reply.send(Err(e));
                continue;
            }
        };
        tokio::task::spawn_local(async move {
            connection(stack, conn, plan, reply).await;
            drop(permit);
        });
    }
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
        // Subscribe (writes the CCCD); notifications are taken from the
        // catch-all listener below, by handle.
        drop(
            client
                .subscribe(&notify, false)
                .await
                .map_err(|e| format!("subscribing to {}: {e:?}", plan.notify))?,
        );
        Ok::<_, String>((service, write, notify))
    };
    let run = async {
        let (service, write, notify) = match setup.await {
            Ok(s) => s,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let Ok(mut listener) = client.listen_all() else {
            let _ = reply.send(Err("no notification listener left".into()));
            return;
        };
        let (req_tx, mut req_rx) = mpsc::unbounded_channel();
        let (stream_tx, stream_rx) = mpsc::unbounded_channel();
        let (values_tx, values_rx) = mpsc::unbounded_channel();
        let mtu = u32::from(conn.att_mtu().saturating_sub(ATT_HEADER));
        if reply
            .send(Ok(Connected {
                mtu,
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
        let mut subscribed: HashMap<u16, Uuid> = HashMap::new();
        loop {
            // A disconnection ends `client.task()`, and with it this loop.
            match select(listener.next(), req_rx.recv()).await {
                Either::First(n) => {
                    let data = n.as_ref().to_vec();
                    if n.handle() == notify.handle {
                        let _ = stream_tx.send(data);
                    } else if let Some(uuid) = subscribed.get(&n.handle()) {
                        let _ = values_tx.send(GattValue {
                            characteristic: *uuid,
                            data,
                        });
                    }
                }
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
                    handle(
                        client,
                        &service,
                        &write,
                        &plan,
                        &mut known,
                        &mut subscribed,
                        r,
                    )
                    .await;
                }
            }
        }
    };
    let _ = select(client.task(), run).await;
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
    subscribed: &mut HashMap<u16, Uuid>,
    r: ConnRequest,
) {
    let io = |e: &dyn std::fmt::Debug| GattError::Io(format!("{e:?}"));
    match r {
        ConnRequest::Write(data) => {
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
        ConnRequest::GattWrite {
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
        ConnRequest::GattRead { uuid, reply } => {
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
        ConnRequest::Subscribe {
            uuid,
            indicate,
            reply,
        } => {
            let r = async {
                let c = find(client, service, known, uuid).await?;
                drop(client.subscribe(&c, indicate).await.map_err(|e| io(&e))?);
                subscribed.insert(c.handle, uuid);
                Ok(())
            }
            .await;
            let _ = reply.send(r);
        }
        ConnRequest::Unsubscribe { uuid, reply } => {
            let r = async {
                let c = find(client, service, known, uuid).await?;
                client.unsubscribe(&c).await.map_err(|e| io(&e))?;
                subscribed.remove(&c.handle);
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
