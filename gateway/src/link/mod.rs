//! Links: the byte pipes between the gateway and its leaf devices.
//!
//! A [`Link`] is opened from a URL (`serial:///dev/ttyUSB0?baud=115200`,
//! `tcp://10.0.0.7:4001`) and offers what the plugin contract's `link` resource
//! offers: write, read with a timeout, drain, serial settings, modem lines. It
//! knows no device protocol. A transport that cannot honour a setting answers
//! [`LinkError::Unsupported`], never a panic: plugins decide whether that matters.
//!
//! Each transport implements [`Transport`]; a Bluetooth LE transport (or a fake
//! of one, where no radio exists) plugs in behind the same trait and offers
//! its other characteristics through [`gatt::GattLink`]. A link opened from a
//! URL can be [reopened](Link::reopen) (a device that re-enumerates or reboots
//! into a new image); a link built from a transport can be given a way to.

pub mod ble;
#[cfg(feature = "bluez")]
pub mod bluez;
pub mod gatt;
mod serial;
mod tcp;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The physical kind of a link, as the contract names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    Serial,
    Tcp,
    Ble,
}

// The line settings are the plugin SDK's types: one definition for what a
// plugin asks for and what a link applies.
pub use otagw_plugin_sdk::port::{Parity, SerialConfig, StopBits};

/// Why a link could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("bad link URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot open {link}: {source}")]
    Open {
        link: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{link}: {what} is not supported on this link ({reason})")]
    Unsupported {
        link: String,
        what: String,
        reason: String,
    },
    #[error("{link}: connection closed by the device")]
    Closed { link: String },
    /// The job was stopped (reads fail; writes still go out).
    #[error("{link}: {}", otagw_plugin_sdk::STOPPED_BY_OPERATOR)]
    Stopped { link: String },
    #[error("{link}: {what}")]
    Timeout { link: String, what: String },
    #[error("{link}: {what}")]
    NotFound { link: String, what: String },
    #[error("{link}: {what}")]
    Invalid { link: String, what: String },
    #[error("{link}: {op} failed: {source}")]
    Io {
        link: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// One transport's side of a link: a byte stream plus the line controls it has.
///
/// Implementations must not block in `configure`/`set_lines` for long; they are
/// `ioctl`s on a serial port and refusals elsewhere.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// Apply serial settings. Default: not a serial port.
    fn configure(&mut self, _config: &SerialConfig) -> Result<(), String> {
        Err("not a serial port".into())
    }
    /// Set the DTR and RTS lines. Default: there are none.
    fn set_lines(&mut self, _dtr: bool, _rts: bool) -> Result<(), String> {
        Err("the link has no modem lines".into())
    }
    /// The device's GATT characteristics, on a BLE link. Default: none.
    fn gatt(&mut self) -> Option<&mut dyn gatt::GattLink> {
        None
    }
}

/// Opens a link's transport again (see [`Link::reopen`]): one attempt, which
/// fails at once when the device is not there (yet).
pub type Reopener = Box<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Box<dyn Transport>, String>> + Send>>
        + Send
        + Sync,
>;

/// How often [`Link::reopen`] tries again while the device is away.
const REOPEN_POLL: Duration = Duration::from_millis(50);

/// The transport of a link that is closed (between a failed reopen and the
/// next): every read and write answers that the device went away.
struct Gone;

impl tokio::io::AsyncRead for Gone {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()))
    }
}

impl tokio::io::AsyncWrite for Gone {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()))
    }
    fn poll_flush(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()))
    }
    fn poll_shutdown(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl Transport for Gone {}

/// What a link can do, asked before trying (the contract's `link-feature`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkFeature {
    Configure,
    ModemLines,
    Reopen,
    Gatt,
}

/// A link to one leaf device.
pub struct Link {
    name: String,
    kind: LinkKind,
    mtu: u32,
    io: Box<dyn Transport>,
    /// Bytes read from the transport and not yet handed out.
    pending: Vec<u8>,
    /// Settings from the URL: these win over a plugin's defaults.
    url_serial: Option<PartialSerial>,
    /// The serial settings last applied, applied again after a reopen.
    applied: Option<SerialConfig>,
    /// How to open the transport again, when the link can be reopened.
    reopener: Option<Reopener>,
    /// Characteristics subscribed through [`Link::gatt_subscribe`], with the
    /// text the plugin named each by (its values come back tagged with it).
    subscribed: Vec<(gatt::Uuid, String)>,
    /// Cancelled when the operator stops the job: reads answer
    /// [`LinkError::Stopped`] from then on.
    stop: Option<tokio_util::sync::CancellationToken>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Serial settings named in a link URL; each absent one falls back to the
/// plugin's default and then to 115200 8N1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartialSerial {
    pub baud: Option<u32>,
    pub data_bits: Option<u8>,
    pub parity: Option<Parity>,
    pub stop_bits: Option<StopBits>,
}

impl PartialSerial {
    /// Fill the gaps from `base`.
    pub fn over(&self, base: SerialConfig) -> SerialConfig {
        SerialConfig {
            baud: self.baud.unwrap_or(base.baud),
            data_bits: self.data_bits.unwrap_or(base.data_bits),
            parity: self.parity.unwrap_or(base.parity),
            stop_bits: self.stop_bits.unwrap_or(base.stop_bits),
        }
    }
}

/// A parsed link URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkUrl {
    Serial {
        path: String,
        settings: PartialSerial,
    },
    Tcp {
        host: String,
        port: u16,
    },
}

/// How long opening a BLE link may take (scan, connect, discover) unless the
/// configuration says otherwise.
pub const BLE_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens links by URL with what some kinds of link need beyond their URL: a
/// BLE link needs the adapter to reach it through and the characteristics of
/// the family's protocol.
#[derive(Debug, Clone)]
pub struct Opener {
    ble: Option<BleSource>,
    ble_timeout: Duration,
}

/// The configured BLE adapter, started on first use and again after it
/// stopped (its controller went away), so one bad adapter fails only the
/// BLE links, each with the reason, and heals when the controller is back.
#[derive(Debug, Clone)]
struct BleSource {
    spec: String,
    max_connections: usize,
    adapter: std::sync::Arc<tokio::sync::Mutex<Option<Adapter>>>,
}

/// A BLE adapter, whichever host stack drives it: an HCI controller of the
/// gateway's own (`hci+tcp://`, `hci+serial://`), or the host's BlueZ
/// (`bluez://hci0`, with the cargo feature `bluez`).
#[derive(Debug, Clone)]
enum Adapter {
    Hci(ble::BleAdapter),
    #[cfg(feature = "bluez")]
    Bluez(bluez::BluezAdapter),
}

/// Whether `spec` names a BLE adapter this build can use, without opening it.
pub fn check_ble_adapter(spec: &str) -> Result<(), LinkError> {
    if spec.starts_with("bluez:") {
        #[cfg(feature = "bluez")]
        return bluez::parse_spec(spec).map(|_| ());
        #[cfg(not(feature = "bluez"))]
        return Err(LinkError::BadUrl {
            url: spec.to_string(),
            reason: "this otagw was built without BlueZ support (cargo feature `bluez`); \
                     use an HCI controller (hci+tcp://HOST:PORT or \
                     hci+serial:///dev/ttyACM0) or a build with --features bluez"
                .into(),
        });
    }
    ble::AdapterUrl::parse(spec).map(|_| ())
}

impl Adapter {
    async fn start(spec: &str, max_connections: usize) -> Result<Adapter, LinkError> {
        check_ble_adapter(spec)?;
        #[cfg(feature = "bluez")]
        if spec.starts_with("bluez:") {
            return Ok(Adapter::Bluez(
                bluez::BluezAdapter::start(spec, max_connections).await?,
            ));
        }
        Ok(Adapter::Hci(
            ble::BleAdapter::start(spec, max_connections).await?,
        ))
    }

    fn is_running(&self) -> bool {
        match self {
            Adapter::Hci(a) => a.is_running(),
            #[cfg(feature = "bluez")]
            Adapter::Bluez(a) => a.is_running(),
        }
    }

    async fn open(
        &self,
        url: &str,
        plan: ble::GattPlan,
        timeout: Duration,
    ) -> Result<Link, LinkError> {
        match self {
            Adapter::Hci(a) => a.open(url, plan, timeout).await,
            #[cfg(feature = "bluez")]
            Adapter::Bluez(a) => a.open(url, plan, timeout).await,
        }
    }

    async fn scan(&self, duration: Duration) -> Result<Vec<ble::Advertiser>, LinkError> {
        match self {
            Adapter::Hci(a) => a.scan(duration).await,
            #[cfg(feature = "bluez")]
            Adapter::Bluez(a) => a.scan(duration).await,
        }
    }
}

impl Default for Opener {
    fn default() -> Self {
        Opener {
            ble: None,
            ble_timeout: BLE_CONNECT_TIMEOUT,
        }
    }
}

impl Opener {
    /// An opener that reaches `ble://` links through the adapter `spec`
    /// (`hci+tcp://...`, `hci+serial://...`), connecting at most
    /// `max_connections` at once, each within `timeout`.
    pub fn with_ble(spec: &str, max_connections: usize, timeout: Duration) -> Opener {
        Opener {
            ble: Some(BleSource {
                spec: spec.to_string(),
                max_connections,
                adapter: Default::default(),
            }),
            ble_timeout: timeout,
        }
    }

    /// Open `url`; `gatt` is the family's default characteristics (its
    /// `default-gatt`), needed for `ble://` links.
    pub async fn open(&self, url: &str, gatt: Option<&ble::GattPlan>) -> Result<Link, LinkError> {
        if !url.starts_with("ble://") {
            return Link::open(url).await;
        }
        let Some(source) = &self.ble else {
            return Err(LinkError::BadUrl {
                url: url.to_string(),
                reason: "a ble:// link needs a BLE adapter: set `[ble] adapter` in the \
                         configuration, or --ble-adapter / OTAGW_BLE_ADAPTER \
                         (hci+tcp://HOST:PORT or hci+serial:///dev/ttyACM0)"
                    .into(),
            });
        };
        let Some(plan) = gatt else {
            return Err(LinkError::BadUrl {
                url: url.to_string(),
                reason: "the device's family declares no default GATT characteristics, so it \
                         cannot work over BLE (its plugin's transports say which links it takes)"
                    .into(),
            });
        };
        source
            .adapter()
            .await?
            .open(url, plan.clone(), self.ble_timeout)
            .await
    }

    /// Listen on the BLE adapter for `duration` and list who advertised
    /// (`otagw ble scan`).
    pub async fn scan(&self, duration: Duration) -> Result<Vec<ble::Advertiser>, LinkError> {
        let Some(source) = &self.ble else {
            return Err(LinkError::BadUrl {
                url: "ble scan".into(),
                reason: "scanning needs a BLE adapter: --ble-adapter / OTAGW_BLE_ADAPTER \
                         (hci+tcp://HOST:PORT or hci+serial:///dev/ttyACM0)"
                    .into(),
            });
        };
        source.adapter().await?.scan(duration).await
    }
}

impl BleSource {
    /// The running adapter, started now if it never was or it stopped.
    async fn adapter(&self) -> Result<Adapter, LinkError> {
        let mut slot = self.adapter.lock().await;
        match slot.as_ref().filter(|a| a.is_running()) {
            Some(a) => Ok(a.clone()),
            None => {
                let a = Adapter::start(&self.spec, self.max_connections).await?;
                *slot = Some(a.clone());
                Ok(a)
            }
        }
    }
}

/// The largest chunk handed to a byte-stream transport in one write.
const STREAM_MTU: u32 = 4096;
/// The largest read the contract allows in one call.
pub const MAX_READ: usize = 65_536;

impl LinkUrl {
    /// Parse `serial:///dev/ttyUSB0?baud=115200&parity=even&data_bits=8&stop_bits=1`
    /// or `tcp://host:port`.
    pub fn parse(s: &str) -> Result<Self, LinkError> {
        let bad = |reason: String| LinkError::BadUrl {
            url: s.to_string(),
            reason,
        };
        let url = url::Url::parse(s).map_err(|e| {
            if s.starts_with('/') {
                bad(format!("a link is a URL: write serial://{s}"))
            } else if e == url::ParseError::RelativeUrlWithoutBase {
                bad(
                    "a link is a URL: serial:///dev/ttyUSB0, tcp://HOST:PORT or ble://ADDRESS"
                        .into(),
                )
            } else {
                bad(e.to_string())
            }
        })?;
        match url.scheme() {
            "serial" => {
                let path = url.path().to_string();
                if path.is_empty() || path == "/" {
                    return Err(bad("no device path (serial:///dev/ttyUSB0)".into()));
                }
                let mut settings = PartialSerial::default();
                for (k, v) in url.query_pairs() {
                    match &*k {
                        "baud" => {
                            settings.baud = Some(v.parse().map_err(|_| {
                                bad(format!("baud {v:?} is not a number of bits per second"))
                            })?)
                        }
                        "data_bits" => {
                            settings.data_bits = Some(match &*v {
                                "5" => 5,
                                "6" => 6,
                                "7" => 7,
                                "8" => 8,
                                _ => return Err(bad(format!("data_bits {v:?} is not 5..8"))),
                            })
                        }
                        "parity" => {
                            settings.parity = Some(match &*v {
                                "none" | "n" | "N" => Parity::None,
                                "odd" | "o" | "O" => Parity::Odd,
                                "even" | "e" | "E" => Parity::Even,
                                _ => {
                                    return Err(bad(format!(
                                        "parity {v:?} is not none, odd or even"
                                    )));
                                }
                            })
                        }
                        "stop_bits" => {
                            settings.stop_bits = Some(match &*v {
                                "1" => StopBits::One,
                                "2" => StopBits::Two,
                                _ => return Err(bad(format!("stop_bits {v:?} is not 1 or 2"))),
                            })
                        }
                        other => {
                            return Err(bad(format!(
                                "unknown setting {other:?} (baud, data_bits, parity, stop_bits)"
                            )));
                        }
                    }
                }
                Ok(LinkUrl::Serial { path, settings })
            }
            "tcp" => {
                let host = url
                    .host_str()
                    .ok_or_else(|| bad("no host (tcp://host:port)".into()))?
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string();
                let port = url
                    .port()
                    .ok_or_else(|| bad("no port (tcp://host:port)".into()))?;
                if url.query().is_some() || !matches!(url.path(), "" | "/") {
                    return Err(bad("a tcp link takes no path or settings".into()));
                }
                Ok(LinkUrl::Tcp { host, port })
            }
            other => Err(bad(format!(
                "unknown scheme {other:?} (serial:// or tcp://)"
            ))),
        }
    }
}

impl Link {
    /// Open the link a URL names.
    pub async fn open(url: &str) -> Result<Link, LinkError> {
        match LinkUrl::parse(url)? {
            LinkUrl::Serial { path, settings } => {
                let initial = settings.over(SerialConfig::default());
                let t = serial::open(&path, &initial).map_err(|source| LinkError::Open {
                    link: url.to_string(),
                    source,
                })?;
                let mut link =
                    Link::new(url.to_string(), LinkKind::Serial, STREAM_MTU, Box::new(t));
                link.url_serial = Some(settings);
                link.reopener = Some(Box::new(move || {
                    let path = path.clone();
                    Box::pin(async move {
                        serial::open(&path, &initial)
                            .map(|t| Box::new(t) as Box<dyn Transport>)
                            .map_err(|e| e.to_string())
                    })
                }));
                Ok(link)
            }
            LinkUrl::Tcp { host, port } => {
                let t = tcp::connect(&host, port)
                    .await
                    .map_err(|source| LinkError::Open {
                        link: url.to_string(),
                        source,
                    })?;
                let mut link = Link::new(url.to_string(), LinkKind::Tcp, STREAM_MTU, Box::new(t));
                link.reopener = Some(Box::new(move || {
                    let host = host.clone();
                    Box::pin(async move {
                        tcp::connect(&host, port)
                            .await
                            .map(|t| Box::new(t) as Box<dyn Transport>)
                            .map_err(|e| e.to_string())
                    })
                }));
                Ok(link)
            }
        }
    }

    /// Wrap a transport (also how tests and a BLE adapter build links).
    pub fn new(name: String, kind: LinkKind, mtu: u32, io: Box<dyn Transport>) -> Link {
        Link {
            name,
            kind,
            mtu,
            io,
            pending: Vec::new(),
            url_serial: None,
            applied: None,
            reopener: None,
            subscribed: Vec::new(),
            stop: None,
        }
    }

    /// Let [`Link::reopen`] open the transport again with `reopener`.
    pub fn with_reopener(mut self, reopener: Reopener) -> Link {
        self.reopener = Some(reopener);
        self
    }

    /// Whether this link can do `feature` at all, without touching the device.
    pub fn supports(&mut self, feature: LinkFeature) -> bool {
        match feature {
            LinkFeature::Configure | LinkFeature::ModemLines => self.kind == LinkKind::Serial,
            LinkFeature::Reopen => self.reopener.is_some(),
            LinkFeature::Gatt => self.io.gatt().is_some(),
        }
    }

    /// Close the link and open the same one again, waiting up to `timeout` for
    /// the device to come back. Unread input and GATT subscriptions made
    /// through [`Link::gatt_subscribe`] are gone; the serial settings last
    /// applied are applied again. When the device does not come back in time
    /// the link stays closed (reads and writes answer [`LinkError::Closed`])
    /// and may be reopened again.
    pub async fn reopen(&mut self, timeout: Duration) -> Result<(), LinkError> {
        self.stopped()?;
        let Some(reopener) = &self.reopener else {
            return Err(LinkError::Unsupported {
                link: self.name.clone(),
                what: "reopening".into(),
                reason: "this link cannot be opened again".into(),
            });
        };
        // Close first: a USB device re-enumerates only once its port is free.
        self.io = Box::new(Gone);
        self.pending.clear();
        self.subscribed.clear();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last;
        loop {
            match tokio::time::timeout_at(deadline, reopener()).await {
                Ok(Ok(io)) => {
                    self.io = io;
                    if let Some(config) = self.applied {
                        self.configure(&config)?;
                    }
                    return Ok(());
                }
                Ok(Err(e)) => last = e,
                Err(_) => last = "still not there when the time ran out".into(),
            }
            if tokio::time::Instant::now() + REOPEN_POLL >= deadline {
                return Err(LinkError::Timeout {
                    link: self.name.clone(),
                    what: format!(
                        "the device did not come back within {} ms ({last})",
                        timeout.as_millis()
                    ),
                });
            }
            tokio::time::sleep(REOPEN_POLL).await;
        }
    }

    fn gatt_link(&mut self) -> Result<&mut dyn gatt::GattLink, LinkError> {
        let name = self.name.clone();
        self.io.gatt().ok_or(LinkError::Unsupported {
            link: name,
            what: "GATT access".into(),
            reason: "only Bluetooth LE links have characteristics".into(),
        })
    }

    fn gatt_uuid(&self, text: &str) -> Result<gatt::Uuid, LinkError> {
        gatt::parse_uuid(text).map_err(|what| LinkError::Invalid {
            link: self.name.clone(),
            what,
        })
    }

    fn gatt_error(&self, e: gatt::GattError) -> LinkError {
        let link = self.name.clone();
        match e {
            gatt::GattError::NotFound(what) => LinkError::NotFound {
                link,
                what: format!("no characteristic {what}"),
            },
            gatt::GattError::Invalid(what) => LinkError::Invalid { link, what },
            gatt::GattError::Timeout(what) => LinkError::Timeout { link, what },
            gatt::GattError::Closed => LinkError::Closed { link },
            gatt::GattError::Io(reason) => LinkError::Io {
                link,
                op: "GATT",
                source: std::io::Error::other(reason),
            },
        }
    }

    /// Write to a characteristic named as the contract writes UUIDs.
    pub async fn gatt_write(
        &mut self,
        characteristic: &str,
        data: &[u8],
        with_response: bool,
    ) -> Result<(), LinkError> {
        let uuid = self.gatt_uuid(characteristic)?;
        if data.len() > self.mtu as usize {
            return Err(LinkError::Invalid {
                link: self.name.clone(),
                what: format!(
                    "a GATT write of {} bytes is longer than the link's MTU of {}",
                    data.len(),
                    self.mtu
                ),
            });
        }
        let r = self.gatt_link()?.write(uuid, data, with_response).await;
        r.map_err(|e| self.gatt_error(e))
    }

    /// Read a characteristic's current value.
    pub async fn gatt_read(&mut self, characteristic: &str) -> Result<Vec<u8>, LinkError> {
        let uuid = self.gatt_uuid(characteristic)?;
        let r = self.gatt_link()?.read(uuid).await;
        r.map_err(|e| self.gatt_error(e))
    }

    /// Subscribe to a characteristic; its values are tagged with
    /// `characteristic` exactly as given here.
    pub async fn gatt_subscribe(
        &mut self,
        characteristic: &str,
        indicate: bool,
    ) -> Result<(), LinkError> {
        let uuid = self.gatt_uuid(characteristic)?;
        let r = self.gatt_link()?.subscribe(uuid, indicate).await;
        r.map_err(|e| self.gatt_error(e))?;
        self.subscribed.retain(|(u, _)| *u != uuid);
        self.subscribed.push((uuid, characteristic.to_string()));
        Ok(())
    }

    /// Stop a subscription made with [`Link::gatt_subscribe`].
    pub async fn gatt_unsubscribe(&mut self, characteristic: &str) -> Result<(), LinkError> {
        let uuid = self.gatt_uuid(characteristic)?;
        let r = self.gatt_link()?.unsubscribe(uuid).await;
        r.map_err(|e| self.gatt_error(e))?;
        self.subscribed.retain(|(u, _)| *u != uuid);
        Ok(())
    }

    /// The next value of a subscribed characteristic, tagged with the text
    /// it was subscribed by.
    pub async fn gatt_receive(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<(String, Vec<u8>)>, LinkError> {
        let r = self.gatt_link()?.receive(timeout).await;
        let value = r.map_err(|e| self.gatt_error(e))?;
        Ok(value.map(|v| {
            let name = self
                .subscribed
                .iter()
                .find(|(u, _)| *u == v.characteristic)
                .map(|(_, n)| n.clone())
                .unwrap_or_else(|| v.characteristic.to_string());
            (name, v.data)
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> LinkKind {
        self.kind
    }

    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// Apply a plugin's default serial settings, with the URL's settings winning.
    /// A no-op on links that are not serial ports.
    /// A plugin's own `configure`: what the link's URL says wins here too
    /// (one rule for every family: a setting written in the URL is never
    /// changed by the plugin; one left out is the plugin's to choose).
    pub fn configure_for_plugin(&mut self, asked: &SerialConfig) -> Result<(), LinkError> {
        let applied = match self.url_serial {
            Some(url) => url.over(*asked),
            None => *asked,
        };
        if applied != *asked {
            tracing::debug!(link = %self.name, ?asked, ?applied, "the link URL's serial settings win over the plugin's");
        }
        self.configure(&applied)
    }

    pub fn apply_defaults(&mut self, defaults: SerialConfig) -> Result<(), LinkError> {
        match self.url_serial {
            Some(url) => self.configure(&url.over(defaults)),
            None => Ok(()),
        }
    }

    pub async fn write(&mut self, data: &[u8]) -> Result<(), LinkError> {
        let r = async {
            self.io.write_all(data).await?;
            self.io.flush().await
        }
        .await;
        r.map_err(|e| self.io_error("write", e))
    }

    /// Stop the link when `token` is cancelled: reads then fail with
    /// [`LinkError::Stopped`] (a read waiting returns at once); writes still
    /// go out, so the plugin can tell the device it gives up.
    pub fn stop_on(&mut self, token: tokio_util::sync::CancellationToken) {
        self.stop = Some(token);
    }

    fn stopped(&self) -> Result<(), LinkError> {
        match &self.stop {
            Some(t) if t.is_cancelled() => Err(LinkError::Stopped {
                link: self.name.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Read at most `max` bytes, waiting at most `timeout` for the first.
    /// Empty when nothing arrived in time.
    pub async fn read(&mut self, max: usize, timeout: Duration) -> Result<Vec<u8>, LinkError> {
        self.stopped()?;
        let max = max.clamp(1, MAX_READ);
        if self.pending.is_empty() {
            let mut buf = vec![0u8; max];
            let stop = self.stop.clone().unwrap_or_default();
            let read = tokio::select! {
                r = tokio::time::timeout(timeout, self.io.read(&mut buf)) => r,
                () = stop.cancelled() => {
                    return Err(LinkError::Stopped { link: self.name.clone() });
                }
            };
            match read {
                Err(_elapsed) => return Ok(Vec::new()),
                Ok(Ok(0)) => {
                    return Err(LinkError::Closed {
                        link: self.name.clone(),
                    });
                }
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Ok(Err(e)) => return Err(self.io_error("read", e)),
            }
        }
        let n = max.min(self.pending.len());
        Ok(self.pending.drain(..n).collect())
    }

    /// Discard every byte received and not yet read; returns how many.
    pub async fn drain(&mut self) -> Result<u32, LinkError> {
        self.stopped()?;
        let mut dropped = self.pending.len();
        self.pending.clear();
        let mut buf = vec![0u8; 4096];
        loop {
            // Whatever is already buffered by the OS is returned at once; a short
            // grace lets bytes in flight on a fast line land too.
            match tokio::time::timeout(Duration::from_millis(5), self.io.read(&mut buf)).await {
                Err(_) => break,
                Ok(Ok(0)) => {
                    return Err(LinkError::Closed {
                        link: self.name.clone(),
                    });
                }
                Ok(Ok(n)) => dropped += n,
                Ok(Err(e)) => return Err(self.io_error("drain", e)),
            }
        }
        Ok(u32::try_from(dropped).unwrap_or(u32::MAX))
    }

    pub fn configure(&mut self, config: &SerialConfig) -> Result<(), LinkError> {
        self.io
            .configure(config)
            .inspect(|()| self.applied = Some(*config))
            .map_err(|reason| LinkError::Unsupported {
                link: self.name.clone(),
                what: format!(
                    "serial settings {} {}{}{}",
                    config.baud,
                    config.data_bits,
                    match config.parity {
                        Parity::None => 'N',
                        Parity::Odd => 'O',
                        Parity::Even => 'E',
                    },
                    match config.stop_bits {
                        StopBits::One => '1',
                        StopBits::Two => '2',
                    }
                ),
                reason,
            })
    }

    pub fn set_lines(&mut self, dtr: bool, rts: bool) -> Result<(), LinkError> {
        self.io
            .set_lines(dtr, rts)
            .map_err(|reason| LinkError::Unsupported {
                link: self.name.clone(),
                what: format!("DTR={} RTS={}", dtr as u8, rts as u8),
                reason,
            })
    }

    fn io_error(&self, op: &'static str, e: std::io::Error) -> LinkError {
        use std::io::ErrorKind::*;
        // A pty whose other side went away answers EIO; sockets say reset/broken pipe.
        let gone = matches!(
            e.kind(),
            BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof | NotConnected
        ) || e.raw_os_error() == Some(5);
        if gone {
            LinkError::Closed {
                link: self.name.clone(),
            }
        } else {
            LinkError::Io {
                link: self.name.clone(),
                op,
                source: e,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_serial_urls_with_settings() {
        let u = LinkUrl::parse("serial:///dev/ttyUSB0?baud=57600&parity=even&stop_bits=2").unwrap();
        assert_eq!(
            u,
            LinkUrl::Serial {
                path: "/dev/ttyUSB0".into(),
                settings: PartialSerial {
                    baud: Some(57600),
                    data_bits: None,
                    parity: Some(Parity::Even),
                    stop_bits: Some(StopBits::Two),
                }
            }
        );
        let LinkUrl::Serial { settings, .. } = u else {
            unreachable!()
        };
        let full = settings.over(SerialConfig::default());
        assert_eq!(full.data_bits, 8);
        assert_eq!(full.baud, 57600);
    }

    /// A transport that records the serial settings applied to it.
    struct Recorder {
        io: tokio::io::DuplexStream,
        seen: std::sync::Arc<std::sync::Mutex<Vec<SerialConfig>>>,
    }

    impl tokio::io::AsyncRead for Recorder {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    impl Transport for Recorder {
        fn configure(&mut self, config: &SerialConfig) -> Result<(), String> {
            self.seen.lock().unwrap().push(*config);
            Ok(())
        }
    }

    #[test]
    fn settings_in_the_url_win_over_the_plugins_defaults_and_its_own_configure() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (io, _peer) = tokio::io::duplex(64);
        let t = Recorder {
            io,
            seen: seen.clone(),
        };
        let mut link = Link::new(
            "serial:///dev/x?parity=none".into(),
            LinkKind::Serial,
            64,
            Box::new(t),
        );
        let LinkUrl::Serial { settings, .. } =
            LinkUrl::parse("serial:///dev/x?parity=none").unwrap()
        else {
            unreachable!()
        };
        link.url_serial = Some(settings);
        // AN3155 wants 8E1; the operator wrote parity=none.
        let even = SerialConfig {
            baud: 57_600,
            data_bits: 8,
            parity: Parity::Even,
            stop_bits: StopBits::One,
        };
        link.apply_defaults(even).unwrap();
        link.configure_for_plugin(&SerialConfig {
            baud: 115_200,
            ..even
        })
        .unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert!(seen.iter().all(|c| c.parity == Parity::None), "{seen:?}");
        // What the URL leaves out is the plugin's to choose.
        assert_eq!((seen[0].baud, seen[1].baud), (57_600, 115_200));
    }

    #[test]
    fn parses_tcp_urls() {
        assert_eq!(
            LinkUrl::parse("tcp://127.0.0.1:4001").unwrap(),
            LinkUrl::Tcp {
                host: "127.0.0.1".into(),
                port: 4001
            }
        );
        assert_eq!(
            LinkUrl::parse("tcp://[::1]:23").unwrap(),
            LinkUrl::Tcp {
                host: "::1".into(),
                port: 23
            }
        );
    }

    #[test]
    fn rejects_bad_urls_with_a_reason() {
        for (url, needle) in [
            ("serial:///dev/ttyS0?baud=fast", "baud"),
            ("serial:///dev/ttyS0?parity=mark", "parity"),
            ("serial:///dev/ttyS0?flow=hw", "unknown setting"),
            ("serial://", "no device path"),
            ("tcp://host", "no port"),
            ("ble://aa-bb-cc", "unknown scheme"),
            ("/dev/ttyUSB0", "bad link URL"),
        ] {
            let err = LinkUrl::parse(url).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }
}
