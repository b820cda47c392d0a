//! Bluetooth LE links through the host's BlueZ: `bluetoothd` over D-Bus, with
//! the `bluer` crate. The second BLE backend, built with the `bluez` feature,
//! for gateways whose radio the kernel already drives (a Raspberry Pi's, a
//! USB dongle on `hci0`).
//!
//! - [`BluezAdapter`] is one adapter BlueZ manages: `bluez://hci0`, or
//!   `bluez://` for BlueZ's default one. Starting it opens a D-Bus session,
//!   finds the adapter and powers it on.
//! - [`BluezAdapter::open`] finds one peripheral (`ble://AA:BB:..`) by
//!   discovery, connects, waits for BlueZ to resolve its services, subscribes
//!   to the family's notify characteristic and returns a [`Link`] of the same
//!   shape as [`BleAdapter`](super::ble::BleAdapter)'s: its byte stream is the
//!   default characteristic (a write of at most `mtu()` bytes is one GATT
//!   write; notifications arrive in order through `read`), its [`GattLink`]
//!   reaches the others, and it can be reopened (the peripheral is connected
//!   again after it reset into a new image).
//! - [`BluezAdapter::scan`] lists the LE devices heard for a while.
//!
//! What it is not: a host stack (BlueZ is one, shared with everything else on
//! the host), or pairing and bonding (BlueZ's agents do that). What BlueZ does
//! not tell or let choose, and what this does instead:
//! - whether an advertiser is connectable: [`Advertiser::connectable`] is
//!   always true; nor whether its name is the shortened one
//!   ([`Advertiser::name_shortened`] is always false);
//! - the ATT MTU exactly: `bluer` reports the characteristic's MTU less 5 (a
//!   margin for a BlueZ quirk), used as the link's MTU, never below 20;
//! - notifications or indications: `indicate` is checked against the
//!   characteristic's flags, but BlueZ picks (notifications when it offers
//!   both);
//! - an address type by URL alone: BlueZ names a device by its address and
//!   learns its type from its advertisements; `addr_type` in the URL, when
//!   given, is checked against that;
//! - whether a new image changed the GATT table: a reopen makes BlueZ forget
//!   the device first (unless it is bonded), so its services are discovered
//!   anew.
//!
//! It cannot be tested on a machine without Bluetooth (no `bluetoothd`, no
//! adapter): CI only compile-checks it (`--features bluez`); its tests cover
//! what runs without a radio.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bluer::gatt::WriteOp;
use bluer::gatt::remote::{Characteristic, CharacteristicWriteRequest, Service};
use bluer::{
    AdapterEvent, AdapterProperty, Address, AddressType, Device, DeviceEvent, DeviceProperty,
    DiscoveryFilter, DiscoveryTransport,
};
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::{OwnedMutexGuard, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::ble::{AddrKind, Advertiser, BleUrl, GattPlan};
use super::gatt::{Channel, GattError, GattValue, Request as GattRequest, Uuid};
use super::{Link, LinkError};

/// Connections one adapter holds at once, at most (as `ble.rs`).
const MAX_CONNECTIONS: usize = 4;
/// How long a dropped link's connection stays up for the device to hang up
/// itself (it was told to reset) before the gateway does (as `ble.rs`).
const LINGER: Duration = Duration::from_secs(1);
/// The payload every LE link carries (ATT MTU 23 - 3): the link's MTU when
/// BlueZ does not tell the characteristic's (before BlueZ 5.62).
const MIN_MTU: u32 = 20;

/// A link's share of its adapter's connections, held across reopens and by
/// each connection's task until that connection is down.
type Permit = Arc<tokio::sync::OwnedSemaphorePermit>;

/// Held by a connection's task while its peripheral is connected.
type PeerLock = Arc<tokio::sync::Mutex<()>>;

/// A notification stream of one characteristic.
type Notifications = Pin<Box<dyn Stream<Item = Vec<u8>> + Send>>;

/// Read `bluez://hci0` (that adapter) or `bluez://` (BlueZ's default one:
/// `hci0` when there is one).
pub fn parse_spec(spec: &str) -> Result<Option<String>, LinkError> {
    let bad = |reason: String| LinkError::BadUrl {
        url: spec.to_string(),
        reason: format!(
            "{reason} (a BlueZ adapter is bluez://hci0, or bluez:// for BlueZ's default adapter)"
        ),
    };
    let rest = spec
        .strip_prefix("bluez://")
        .ok_or_else(|| bad("not a bluez:// adapter".into()))?;
    if rest.contains(['?', '#']) {
        return Err(bad("a BlueZ adapter takes no settings".into()));
    }
    let name = rest.strip_suffix('/').unwrap_or(rest);
    if name.is_empty() {
        return Ok(None);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(bad(format!("{name:?} is not an adapter name like hci0")));
    }
    Ok(Some(name.to_string()))
}

/// One Bluetooth adapter of the host's BlueZ.
#[derive(Debug, Clone)]
pub struct BluezAdapter {
    spec: String,
    adapter: bluer::Adapter,
    /// Cleared when the adapter went away or was powered off, or discovery
    /// could not start: the caller starts the adapter again.
    running: Arc<AtomicBool>,
    /// Connections the adapter may hold at once (`[ble] max_connections`),
    /// as in `ble.rs`: a link takes one when it opens and keeps it across
    /// reopens; it is given back when both the link and its last connection
    /// are gone.
    connections: Arc<Semaphore>,
    /// One lock per peripheral, held by its connection's task until the
    /// connection is down. BlueZ has one device, and one connection, per
    /// address: a reopen must not find the old connection still lingering.
    peers: Arc<std::sync::Mutex<HashMap<[u8; 6], PeerLock>>>,
    /// Dropped with the last clone of the adapter: ends its watcher.
    _watcher: Arc<oneshot::Sender<()>>,
}

impl BluezAdapter {
    /// Reach BlueZ, find the adapter `spec` names and power it on; at most
    /// `max_connections` links (1 to 4) are connected at once, the others
    /// wait. Fails, saying what to check, when there is no system D-Bus, no
    /// `bluetoothd` or no such adapter.
    pub async fn start(spec: &str, max_connections: usize) -> Result<BluezAdapter, LinkError> {
        let wanted = parse_spec(spec)?;
        let fail = |reason: String| LinkError::Open {
            link: spec.to_string(),
            source: std::io::Error::other(reason),
        };
        let session = bluer::Session::new().await.map_err(|e| {
            fail(format!(
                "cannot reach the system D-Bus ({e}): is dbus running, and may this user \
                 talk to BlueZ on it? `systemctl status dbus`"
            ))
        })?;
        let names = session.adapter_names().await.map_err(|e| {
            fail(format!(
                "BlueZ does not answer on D-Bus ({e}): is bluetoothd running? \
                 `systemctl status bluetooth`"
            ))
        })?;
        let adapter = match &wanted {
            Some(name) if names.contains(name) => session.adapter(name),
            Some(name) => {
                let has = if names.is_empty() {
                    "it has none".to_string()
                } else {
                    format!("it has {}", names.join(", "))
                };
                return Err(fail(format!(
                    "BlueZ has no adapter {name} ({has}): `bluetoothctl list` names them"
                )));
            }
            None => session.default_adapter().await,
        }
        .map_err(|e| {
            fail(format!(
                "no Bluetooth adapter ({e}): is one plugged in and not blocked? \
                 `bluetoothctl list`, `rfkill list`"
            ))
        })?;
        let name = adapter.name().to_string();
        let powered = adapter.is_powered().await.map_err(|e| {
            fail(format!(
                "BlueZ does not tell whether {name} is on ({e}): `bluetoothctl show`"
            ))
        })?;
        if !powered {
            adapter.set_powered(true).await.map_err(|e| {
                fail(format!(
                    "cannot power {name} on ({e}): is it blocked? `rfkill unblock bluetooth`"
                ))
            })?;
        }
        // LE only: a classic inquiry would take turns with the LE scan.
        let filter = DiscoveryFilter {
            transport: DiscoveryTransport::Le,
            ..Default::default()
        };
        if let Err(e) = adapter.set_discovery_filter(filter).await {
            tracing::warn!("BlueZ adapter {name}: no LE-only discovery filter: {e}");
        }
        let events = adapter
            .events()
            .await
            .map_err(|e| fail(format!("cannot follow {name}'s events ({e})")))?;
        let running = Arc::new(AtomicBool::new(true));
        let (watcher, stop) = oneshot::channel();
        tokio::spawn(watch(events, stop, running.clone(), name));
        Ok(BluezAdapter {
            spec: spec.to_string(),
            adapter,
            running,
            connections: Arc::new(Semaphore::new(max_connections.clamp(1, MAX_CONNECTIONS))),
            peers: Default::default(),
            _watcher: Arc::new(watcher),
        })
    }

    /// Whether the adapter is still there and powered, as far as BlueZ said.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Connect to the peripheral `url` names and make a link of it; finding
    /// it, connecting and discovering take at most `timeout`.
    pub async fn open(
        &self,
        url: &str,
        plan: GattPlan,
        timeout: Duration,
    ) -> Result<Link, LinkError> {
        let parsed = BleUrl::parse(url)?;
        let permit: Permit = Arc::new(self.connections.clone().acquire_owned().await.map_err(
            |_| LinkError::Open {
                link: url.to_string(),
                source: std::io::Error::other(format!("the BlueZ adapter {} stopped", self.spec)),
            },
        )?);
        let transport = self
            .connect(url, &parsed, &plan, timeout, permit.clone(), false)
            .await?;
        let adapter = self.clone();
        let name = url.to_string();
        Ok(super::gatt::ble_link(url, transport, move || {
            let (adapter, name, parsed) = (adapter.clone(), name.clone(), parsed.clone());
            let (plan, permit) = (plan.clone(), permit.clone());
            async move {
                adapter
                    .connect(&name, &parsed, &plan, timeout, permit, true)
                    .await
            }
        }))
    }

    /// Listen for `duration` and list the LE devices heard, strongest first.
    pub async fn scan(&self, duration: Duration) -> Result<Vec<Advertiser>, LinkError> {
        let events = self
            .adapter
            .discover_devices_with_changes()
            .await
            .map_err(|e| {
                self.running.store(false, Ordering::Relaxed);
                LinkError::Open {
                    link: self.spec.clone(),
                    source: std::io::Error::other(format!(
                        "cannot start discovery on {} ({e})",
                        self.adapter.name()
                    )),
                }
            })?;
        // Boxed, not pinned in place: dropping it ends the discovery.
        let mut events = Box::pin(events);
        let deadline = Instant::now() + duration;
        // Every change of a device's properties comes as `DeviceAdded`; one
        // with an RSSI was heard during this discovery (BlueZ clears it when
        // a discovery ends).
        let mut heard: HashMap<Address, i16> = HashMap::new();
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.next()).await {
            let AdapterEvent::DeviceAdded(address) = event else {
                continue;
            };
            let Ok(device) = self.adapter.device(address) else {
                continue;
            };
            if let Ok(Some(rssi)) = device.rssi().await {
                let best = heard.entry(address).or_insert(rssi);
                *best = (*best).max(rssi);
            }
        }
        drop(events);
        let mut found = Vec::with_capacity(heard.len());
        for (address, rssi) in heard {
            let Ok(device) = self.adapter.device(address) else {
                continue;
            };
            let addr_type = match device.address_type().await {
                Ok(AddressType::LePublic) => AddrKind::Public,
                Ok(AddressType::LeRandom) => AddrKind::Random,
                // Classic (BR/EDR), or gone since.
                _ => continue,
            };
            let mut services: Vec<Uuid> = device
                .uuids()
                .await
                .ok()
                .flatten()
                .unwrap_or_default()
                .into_iter()
                .collect();
            services.sort();
            found.push(Advertiser {
                address: address.to_string(),
                addr_type: addr_type.as_str(),
                name: device.name().await.ok().flatten(),
                // BlueZ keeps a shortened name only until it hears the
                // complete one, and does not tell which it has.
                name_shortened: false,
                rssi: i8::try_from(rssi.clamp(i8::MIN.into(), i8::MAX.into())).unwrap_or(i8::MIN),
                services,
                // BlueZ does not tell (see the module's doc).
                connectable: true,
            });
        }
        found.sort_by(|a, b| b.rssi.cmp(&a.rssi).then_with(|| a.address.cmp(&b.address)));
        Ok(found)
    }

    /// The lock of one peripheral's connections.
    fn peer(&self, address: [u8; 6]) -> PeerLock {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.entry(address).or_default().clone()
    }

    /// Find, connect, discover, subscribe; then the connection runs as a
    /// task of its own. `again`: a reopen (the device reset into a new
    /// image, which may have another GATT table).
    async fn connect(
        &self,
        link: &str,
        url: &BleUrl,
        plan: &GattPlan,
        timeout: Duration,
        permit: Permit,
        again: bool,
    ) -> Result<Channel, LinkError> {
        let fail = |reason: String| LinkError::Open {
            link: link.to_string(),
            source: std::io::Error::other(reason),
        };
        let ms = timeout.as_millis();
        let deadline = Instant::now() + timeout;
        let address = Address::new(url.address);
        let peer = tokio::time::timeout_at(deadline, self.peer(url.address).lock_owned())
            .await
            .map_err(|_| {
                fail(format!(
                    "the previous connection to {address} did not end within {ms} ms"
                ))
            })?;
        let device = self
            .adapter
            .device(address)
            .map_err(|e| fail(e.to_string()))?;
        let connected = device.is_connected().await.unwrap_or(false);
        if again && !connected && !device.is_paired().await.unwrap_or(true) {
            // Forget what BlueZ cached of the old image's GATT table (a
            // device that is not bonded may not say it changed).
            let _ = self.adapter.remove_device(address).await;
        }
        // A device already connected (another program on the host, or an
        // attempt of ours given up) does not advertise: use its connection.
        if !connected {
            match tokio::time::timeout_at(deadline, self.discover(address)).await {
                Err(_) => {
                    return Err(fail(format!(
                        "not found: nothing with this address advertised within {ms} ms"
                    )));
                }
                Ok(Err(e)) => return Err(fail(e)),
                Ok(Ok(())) => {}
            }
        }
        if let Some(kind) = url.kind {
            let heard = match device.address_type().await {
                Ok(AddressType::LePublic) => Some(AddrKind::Public),
                Ok(AddressType::LeRandom) => Some(AddrKind::Random),
                _ => None,
            };
            if let Some(heard) = heard.filter(|h| *h != kind) {
                return Err(fail(format!(
                    "not found: {address} advertises a {} address, the link says addr_type={}",
                    heard.as_str(),
                    kind.as_str()
                )));
            }
        }
        let ready = match tokio::time::timeout_at(deadline, setup(&device, plan)).await {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => {
                let _ = device.disconnect().await;
                return Err(fail(e));
            }
            Err(_) => {
                // Also cancels a connection attempt still under way.
                let _ = device.disconnect().await;
                return Err(fail(format!(
                    "connecting and discovering the device's services took over {ms} ms"
                )));
            }
        };
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        let (stream_tx, stream_rx) = mpsc::unbounded_channel();
        let (values_tx, values_rx) = mpsc::unbounded_channel();
        let mtu = ready.mtu;
        let conn = Conn {
            device,
            service: ready.service,
            write: ready.write,
            notify: ready.notify,
            with_response: plan.write_with_response,
            known: HashMap::new(),
            subscriptions: HashMap::new(),
            values: values_tx,
        };
        tokio::spawn(connection(
            conn,
            ready.notifications,
            ready.events,
            req_rx,
            stream_tx,
            permit,
            peer,
        ));
        Ok(Channel {
            mtu,
            requests: req_tx,
            stream: stream_rx,
            values: values_rx,
            unread: Vec::new(),
        })
    }

    /// Discover until `address` is heard.
    async fn discover(&self, address: Address) -> Result<(), String> {
        let name = self.adapter.name();
        let events = self
            .adapter
            .discover_devices_with_changes()
            .await
            .map_err(|e| {
                // Powered off or gone: have the adapter started again.
                self.running.store(false, Ordering::Relaxed);
                format!("cannot start discovery on {name} ({e})")
            })?;
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            if let AdapterEvent::DeviceAdded(a) = event
                && a == address
                && let Ok(device) = self.adapter.device(address)
                && matches!(device.rssi().await, Ok(Some(_)))
            {
                return Ok(());
            }
        }
        self.running.store(false, Ordering::Relaxed);
        Err(format!(
            "discovery on {name} stopped (was the adapter powered off?)"
        ))
    }
}

/// Follow the adapter: gone or powered off, it stops running. Ends with
/// the last clone of the adapter (`stop`).
async fn watch(
    events: impl Stream<Item = AdapterEvent>,
    mut stop: oneshot::Receiver<()>,
    running: Arc<AtomicBool>,
    name: String,
) {
    let mut events = std::pin::pin!(events);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            event = events.next() => match event {
                None => {
                    tracing::warn!("the BlueZ adapter {name} went away");
                    break;
                }
                Some(AdapterEvent::PropertyChanged(AdapterProperty::Powered(false))) => {
                    tracing::warn!("the BlueZ adapter {name} was powered off");
                    break;
                }
                Some(_) => {}
            },
        }
    }
    running.store(false, Ordering::Relaxed);
}

/// A connected device, its services resolved and the default
/// characteristics found.
struct Ready {
    service: Service,
    write: Characteristic,
    notify: Characteristic,
    notifications: Notifications,
    events: Pin<Box<dyn Stream<Item = DeviceEvent> + Send>>,
    mtu: u32,
}

async fn setup(device: &Device, plan: &GattPlan) -> Result<Ready, String> {
    // Followed from before connecting, so no disconnection goes unseen.
    let events = device
        .events()
        .await
        .map_err(|e| format!("cannot follow the device's events: {e}"))?;
    if !device.is_connected().await.unwrap_or(false) {
        device
            .connect()
            .await
            .map_err(|e| format!("connecting failed: {e}"))?;
    }
    // Waits until BlueZ has resolved the services.
    let services = device
        .services()
        .await
        .map_err(|e| format!("discovering services: {e}"))?;
    let mut service = None;
    for s in services {
        if s.uuid().await.ok() == Some(plan.service) {
            service = Some(s);
            break;
        }
    }
    let service =
        service.ok_or_else(|| format!("not found: the device has no service {}", plan.service))?;
    let write = characteristic(&service, plan.write)
        .await
        .map_err(|e| format!("discovering characteristics: {e}"))?
        .ok_or_else(|| format!("not found: characteristic {}", plan.write))?;
    let notify = characteristic(&service, plan.notify)
        .await
        .map_err(|e| format!("discovering characteristics: {e}"))?
        .ok_or_else(|| format!("not found: characteristic {}", plan.notify))?;
    let notifications = notify
        .notify()
        .await
        .map_err(|e| format!("subscribing to {}: {e}", plan.notify))?;
    let mtu = write
        .mtu()
        .await
        .ok()
        .and_then(|m| u32::try_from(m).ok())
        .map_or(MIN_MTU, |m| m.max(MIN_MTU));
    if !device.is_connected().await.unwrap_or(false) {
        return Err("the device hung up while being set up".into());
    }
    Ok(Ready {
        service,
        write,
        notify,
        notifications: Box::pin(notifications),
        events: Box::pin(events),
        mtu,
    })
}

/// The characteristic `uuid` of `service`, if it has one.
async fn characteristic(service: &Service, uuid: Uuid) -> bluer::Result<Option<Characteristic>> {
    for c in service.characteristics().await? {
        if c.uuid().await? == uuid {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

fn write_request(with_response: bool) -> CharacteristicWriteRequest {
    CharacteristicWriteRequest {
        op_type: if with_response {
            WriteOp::Request
        } else {
            WriteOp::Command
        },
        ..Default::default()
    }
}

/// BlueZ's error in the contract's terms.
fn gatt_error(e: bluer::Error) -> GattError {
    use bluer::ErrorKind as K;
    match e.kind {
        // The device's objects went with its connection.
        K::NotFound | K::ServicesUnresolved | K::NotificationSessionStopped => GattError::Closed,
        K::NotPermitted
        | K::NotSupported
        | K::NotAuthorized
        | K::InvalidLength
        | K::InvalidArguments
        | K::InvalidOffset => GattError::Invalid(e.to_string()),
        _ => GattError::Io(e.to_string()),
    }
}

/// One connection's state, in its task.
struct Conn {
    device: Device,
    service: Service,
    write: Characteristic,
    notify: Characteristic,
    with_response: bool,
    /// Characteristics found by UUID so far.
    known: HashMap<Uuid, Characteristic>,
    /// Subscriptions beyond the default one: a task each, forwarding to
    /// `values`; aborting it ends the subscription.
    subscriptions: HashMap<Uuid, tokio::task::JoinHandle<()>>,
    values: mpsc::UnboundedSender<GattValue>,
}

/// One connection: notifications and requests until the peripheral goes
/// away or the link is dropped.
async fn connection(
    mut conn: Conn,
    mut notifications: Notifications,
    mut events: Pin<Box<dyn Stream<Item = DeviceEvent> + Send>>,
    mut requests: mpsc::UnboundedReceiver<GattRequest>,
    stream: mpsc::UnboundedSender<Vec<u8>>,
    permit: Permit,
    peer: OwnedMutexGuard<()>,
) {
    let hung_up = |e: &DeviceEvent| {
        matches!(
            e,
            DeviceEvent::PropertyChanged(DeviceProperty::Connected(false))
        )
    };
    loop {
        tokio::select! {
            // Notifications first: the ones that came before a
            // disconnection are delivered before it ends the stream.
            biased;
            n = notifications.next() => match n {
                Some(data) => {
                    let _ = stream.send(data);
                }
                None => break,
            },
            e = events.next() => match e {
                Some(e) if hung_up(&e) => break,
                Some(_) => {}
                None => break,
            },
            r = requests.recv() => match r {
                Some(r) => conn.handle(r).await,
                None => {
                    // The link was dropped. What was written last may still
                    // be on its way (the command that resets the device,
                    // before `reopen`): give the device LINGER to hang up
                    // itself, then hang up.
                    let gone = async {
                        while let Some(e) = events.next().await {
                            if hung_up(&e) {
                                return;
                            }
                        }
                    };
                    if tokio::time::timeout(LINGER, gone).await.is_err() {
                        let _ = conn.device.disconnect().await;
                    }
                    break;
                }
            },
        }
    }
    while let Some(Some(data)) = notifications.next().now_or_never() {
        let _ = stream.send(data);
    }
    for (_, task) in conn.subscriptions.drain() {
        task.abort();
    }
    drop(peer);
    drop(permit);
}

impl Conn {
    /// The characteristic `uuid`: in the family's service first, then in any.
    async fn find(&mut self, uuid: Uuid) -> Result<Characteristic, GattError> {
        if let Some(c) = self.known.get(&uuid) {
            return Ok(c.clone());
        }
        let mut found = characteristic(&self.service, uuid)
            .await
            .map_err(gatt_error)?;
        if found.is_none() {
            for s in self.device.services().await.map_err(gatt_error)? {
                if s.id() == self.service.id() {
                    continue;
                }
                found = characteristic(&s, uuid).await.map_err(gatt_error)?;
                if found.is_some() {
                    break;
                }
            }
        }
        let c = found.ok_or_else(|| GattError::NotFound(uuid.to_string()))?;
        self.known.insert(uuid, c.clone());
        Ok(c)
    }

    async fn handle(&mut self, r: GattRequest) {
        match r {
            GattRequest::Write(data) => {
                let req = write_request(self.with_response);
                if let Err(e) = self.write.write_ext(&data, &req).await {
                    tracing::warn!("BLE write failed: {e}");
                }
            }
            GattRequest::GattWrite {
                uuid,
                data,
                with_response,
                reply,
            } => {
                let r = async {
                    let c = self.find(uuid).await?;
                    c.write_ext(&data, &write_request(with_response))
                        .await
                        .map_err(gatt_error)
                }
                .await;
                let _ = reply.send(r);
            }
            GattRequest::GattRead { uuid, reply } => {
                let r = async {
                    let c = self.find(uuid).await?;
                    c.read().await.map_err(gatt_error)
                }
                .await;
                let _ = reply.send(r);
            }
            GattRequest::Subscribe {
                uuid,
                indicate,
                reply,
            } => {
                let r = self.subscribe(uuid, indicate).await;
                let _ = reply.send(r);
            }
            GattRequest::Unsubscribe { uuid, reply } => {
                let r = self.find(uuid).await.map(|_| {
                    if let Some(task) = self.subscriptions.remove(&uuid) {
                        task.abort();
                    }
                });
                let _ = reply.send(r);
            }
        }
    }

    async fn subscribe(&mut self, uuid: Uuid, indicate: bool) -> Result<(), GattError> {
        let c = self.find(uuid).await?;
        let flags = c.flags().await.map_err(gatt_error)?;
        let (can, what) = if indicate {
            (flags.indicate, "indications")
        } else {
            (flags.notify, "notifications")
        };
        if !can {
            return Err(GattError::Invalid(format!(
                "characteristic {uuid} sends no {what}"
            )));
        }
        // The default characteristic's values are the link's byte stream,
        // as on the other backend.
        let default = c.service_id() == self.notify.service_id() && c.id() == self.notify.id();
        if default || self.subscriptions.contains_key(&uuid) {
            return Ok(());
        }
        let values = c.notify().await.map_err(gatt_error)?;
        let tx = self.values.clone();
        let task = tokio::spawn(async move {
            let mut values = std::pin::pin!(values);
            while let Some(data) = values.next().await {
                let value = GattValue {
                    characteristic: uuid,
                    data,
                };
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        self.subscriptions.insert(uuid, task);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_specs() {
        assert_eq!(parse_spec("bluez://hci0").unwrap(), Some("hci0".into()));
        assert_eq!(parse_spec("bluez://hci1/").unwrap(), Some("hci1".into()));
        assert_eq!(parse_spec("bluez://").unwrap(), None);
        assert_eq!(parse_spec("bluez:///").unwrap(), None);
        for (bad, needle) in [
            ("bluez://hci0?x=1", "no settings"),
            ("bluez://hci0#x", "no settings"),
            ("bluez://hci0/x", "not an adapter name"),
            ("bluez://../hci0", "not an adapter name"),
            ("bluez://hcié", "not an adapter name"),
            ("hci+tcp://127.0.0.1:9000", "not a bluez://"),
            ("bluez:hci0", "not a bluez://"),
        ] {
            let err = parse_spec(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
            assert!(err.contains("bluez://hci0"), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn a_bad_spec_fails_before_reaching_bluez() {
        let err = BluezAdapter::start("bluez://hci0?x=1", 1)
            .await
            .unwrap_err();
        assert!(matches!(err, LinkError::BadUrl { .. }), "{err}");
    }

    #[test]
    fn write_kinds() {
        assert_eq!(write_request(false).op_type, WriteOp::Command);
        assert_eq!(write_request(true).op_type, WriteOp::Request);
    }

    #[test]
    fn errors_in_the_contracts_terms() {
        let e = |kind| bluer::Error {
            kind,
            message: "m".into(),
        };
        assert_eq!(gatt_error(e(bluer::ErrorKind::NotFound)), GattError::Closed);
        assert!(matches!(
            gatt_error(e(bluer::ErrorKind::NotPermitted)),
            GattError::Invalid(_)
        ));
        assert!(matches!(
            gatt_error(e(bluer::ErrorKind::Failed)),
            GattError::Io(_)
        ));
    }
}
