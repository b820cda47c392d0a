//! The simulated XMODEM / XMODEM-1K / YMODEM leaf device: its settings ([`XmodemSimConfig`],
//! [`Faults`]), what tests can observe ([`SimHandle`], [`Received`]) and the session logic
//! ([`serve`]), which runs over any `AsyncRead + AsyncWrite` link.
//!
//! This is the DEVICE (receiving) side only, byte for byte like a small bootloader. It is not a
//! sender, opens no links itself (see [`crate::transport`]) and knows nothing of the gateway.

mod device;
pub mod frame;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

pub(crate) use device::serve_with as device_serve_with;
pub use device::{SessionEnd, serve};

/// Which protocol the bootloader speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// XMODEM (128-byte and, in [`Mode::Crc`], 1K blocks); the image keeps the pad bytes.
    #[default]
    Xmodem,
    /// YMODEM batch: block 0 names the file and its size; the image is cut to that size.
    Ymodem,
}

/// How the receiver asks for data and which blocks it takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Polls with 'C' (CRC-16) and takes 128-byte (SOH) and 1K (STX) blocks.
    #[default]
    Crc,
    /// Polls with 'C' but NAKs every 1K block, so the sender must fall back to 128 bytes.
    Crc128,
    /// Polls with NAK: 8-bit checksum, 128-byte blocks only (1K blocks are NAKed).
    Checksum,
}

impl Mode {
    pub(crate) fn uses_crc(self) -> bool {
        !matches!(self, Mode::Checksum)
    }
    pub(crate) fn accepts_1k(self) -> bool {
        matches!(self, Mode::Crc)
    }
    pub(crate) fn start_char(self) -> u8 {
        if self.uses_crc() {
            frame::CRC_START
        } else {
            frame::NAK
        }
    }
}

/// Faults to inject. Each names a 1-based data block number k, counted in the order the
/// receiver takes new data blocks (YMODEM block 0 is not counted). Each fault fires once in
/// the life of the device (not once per session), so a retry by the sender can succeed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// `(k, n)`: the first time block k arrives the receiver loses n of its bytes, waits for the
    /// rest, times out and NAKs.
    pub drop_bytes: Option<(u32, usize)>,
    /// Flip a bit of block k's payload on first receipt: check mismatch, NAK.
    pub corrupt: Option<u32>,
    /// NAK block k once although it is valid.
    pub nak: Option<u32>,
    /// After ACKing block k, answer nothing any more until the link closes.
    pub stall_after: Option<u32>,
    /// After ACKing block k, close the link (TCP connection, or the pty master).
    pub disconnect_after: Option<u32>,
    /// Send CAN CAN instead of the ACK of block k and abort.
    pub cancel_after: Option<u32>,
}

/// A malformed `--fault` specification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FaultParseError {
    /// Not of the form `name=value`.
    #[error("fault `{0}`: expected NAME=BLOCK (drop=BLOCK:BYTES)")]
    Syntax(String),
    /// An unknown fault name.
    #[error("fault `{0}`: unknown name (drop, corrupt, nak, stall, disconnect, cancel)")]
    Unknown(String),
    /// A number that does not parse, or a block number of 0.
    #[error("fault `{spec}`: bad number `{value}` (block numbers start at 1)")]
    Number {
        /// The whole specification.
        spec: String,
        /// The part that failed.
        value: String,
    },
}

impl Faults {
    /// Adds one fault from `name=value`: `drop=K:N`, `corrupt=K`, `nak=K`, `stall=K`,
    /// `disconnect=K`, `cancel=K` (the `_after`/`_bytes` suffixes are accepted too).
    pub fn add(&mut self, spec: &str) -> Result<(), FaultParseError> {
        let (name, value) = spec
            .split_once('=')
            .ok_or_else(|| FaultParseError::Syntax(spec.to_owned()))?;
        let number = |v: &str| -> Result<u64, FaultParseError> {
            v.trim().parse().map_err(|_| FaultParseError::Number {
                spec: spec.to_owned(),
                value: v.to_owned(),
            })
        };
        let block = |v: &str| -> Result<u32, FaultParseError> {
            match number(v)? {
                0 => Err(FaultParseError::Number {
                    spec: spec.to_owned(),
                    value: v.to_owned(),
                }),
                k => u32::try_from(k).map_err(|_| FaultParseError::Number {
                    spec: spec.to_owned(),
                    value: v.to_owned(),
                }),
            }
        };
        match name.trim() {
            "drop" | "drop_bytes" => {
                let (k, n) = value
                    .split_once(':')
                    .ok_or_else(|| FaultParseError::Syntax(spec.to_owned()))?;
                let n = usize::try_from(number(n)?).map_err(|_| FaultParseError::Number {
                    spec: spec.to_owned(),
                    value: n.to_owned(),
                })?;
                self.drop_bytes = Some((block(k)?, n));
            }
            "corrupt" => self.corrupt = Some(block(value)?),
            "nak" => self.nak = Some(block(value)?),
            "stall" | "stall_after" => self.stall_after = Some(block(value)?),
            "disconnect" | "disconnect_after" => self.disconnect_after = Some(block(value)?),
            "cancel" | "cancel_after" => self.cancel_after = Some(block(value)?),
            other => return Err(FaultParseError::Unknown(other.to_owned())),
        }
        Ok(())
    }
}

impl FromStr for Faults {
    type Err = FaultParseError;

    /// Parses a comma-separated list of fault specifications (see [`Faults::add`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut faults = Faults::default();
        for spec in s.split(',').filter(|p| !p.trim().is_empty()) {
            faults.add(spec)?;
        }
        Ok(faults)
    }
}

/// Settings of one simulated device.
#[derive(Clone, Debug)]
pub struct XmodemSimConfig {
    /// XMODEM or YMODEM.
    pub protocol: Protocol,
    /// How the receiver asks for data.
    pub mode: Mode,
    /// When set, the device starts in application mode and enters the bootloader only after
    /// these bytes arrive (e.g. `b"update\r"`); when `None` it is always in the bootloader.
    pub enter_command: Option<Vec<u8>>,
    /// The running firmware version.
    pub version: String,
    /// In application mode, these bytes make the device answer `"{version}\r\n"`.
    pub version_command: Option<Vec<u8>>,
    /// How often the receiver sends its start character while waiting for the first block.
    pub poll_interval: Duration,
    /// How long the receiver waits inside a block, or for the next block, before NAKing.
    pub block_timeout: Duration,
    /// Consecutive errors after which the receiver sends CAN CAN CAN and gives up. Also the
    /// number of start polls for a YMODEM data phase or the next batch header.
    pub max_errors: u32,
    /// How long the bootloader polls for the first block before it gives up (and goes back to
    /// application mode); `None` polls for ever.
    pub start_timeout: Option<Duration>,
    /// Faults to inject.
    pub faults: Faults,
    /// Simulated line rate in bits per second (8N1: 10 bits a byte): a block
    /// is acknowledged no sooner than its frame would take on such a wire.
    /// `None`: as fast as the link carries it.
    pub line_rate: Option<u32>,
    /// Hold the ACK of this data block until [`SimHandle::release`] (once):
    /// a test's way to keep a transfer under way while something else
    /// happens. The sender must wait that long (`block_timeout_ms`).
    pub hold_after: Option<u32>,
    /// A bootloader that rejects the image (a wrong product header, say):
    /// every first data block is answered CAN CAN, every time, and the
    /// receiver goes back to polling.
    pub refuse_image: bool,
}

impl Default for XmodemSimConfig {
    fn default() -> Self {
        Self {
            protocol: Protocol::Xmodem,
            mode: Mode::Crc,
            enter_command: None,
            version: "1.0.0".to_owned(),
            version_command: None,
            poll_interval: Duration::from_millis(500),
            block_timeout: Duration::from_secs(1),
            max_errors: 10,
            start_timeout: None,
            faults: Faults::default(),
            line_rate: None,
            hold_after: None,
            refuse_image: false,
        }
    }
}

/// One image the device received completely.
#[derive(Clone, PartialEq, Eq)]
pub struct Received {
    /// The image: for XMODEM everything received including the pad of the last block, for
    /// YMODEM exactly the declared size.
    pub data: Vec<u8>,
    /// YMODEM file name.
    pub name: Option<String>,
    /// YMODEM declared size.
    pub declared_size: Option<u64>,
    /// Data blocks taken (duplicates not counted).
    pub blocks: u32,
    /// NAKs sent for bad, missing or refused blocks (not the start polls nor the NAK of the first EOT).
    pub naks: u32,
}

impl fmt::Debug for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Received")
            .field("len", &self.data.len())
            .field("name", &self.name)
            .field("declared_size", &self.declared_size)
            .field("blocks", &self.blocks)
            .field("naks", &self.naks)
            .finish()
    }
}

/// What tests and the binary observe of a device. Cheap to clone; all clones share one device.
#[derive(Clone, Debug)]
pub struct SimHandle {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: XmodemSimConfig,
    version: Mutex<String>,
    images_tx: mpsc::UnboundedSender<Received>,
    images_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Received>>,
    aborts_tx: mpsc::UnboundedSender<String>,
    aborts_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
    images: AtomicU32,
    aborts: AtomicU32,
    last_abort: Mutex<Option<String>>,
    fired: Mutex<Fired>,
    /// `hold_after`: false until released.
    released: tokio::sync::watch::Sender<bool>,
    /// True while a block's ACK is held.
    holding: tokio::sync::watch::Sender<bool>,
    /// Every transfer: when its first data block came, and when it ended
    /// (booted or aborted).
    transfers: Mutex<Vec<(Instant, Option<Instant>)>>,
}

/// Which one-shot faults have fired.
#[derive(Debug, Default)]
pub(crate) struct Fired {
    pub(crate) drop_bytes: bool,
    pub(crate) corrupt: bool,
    pub(crate) nak: bool,
    pub(crate) stall: bool,
    pub(crate) disconnect: bool,
    pub(crate) cancel: bool,
}

impl SimHandle {
    /// A new device in its initial state.
    pub fn new(config: XmodemSimConfig) -> Self {
        let (images_tx, images_rx) = mpsc::unbounded_channel();
        let (aborts_tx, aborts_rx) = mpsc::unbounded_channel();
        Self {
            inner: Arc::new(Shared {
                version: Mutex::new(config.version.clone()),
                config,
                images_tx,
                images_rx: tokio::sync::Mutex::new(images_rx),
                aborts_tx,
                aborts_rx: tokio::sync::Mutex::new(aborts_rx),
                images: AtomicU32::new(0),
                aborts: AtomicU32::new(0),
                last_abort: Mutex::new(None),
                fired: Mutex::new(Fired::default()),
                released: tokio::sync::watch::Sender::new(false),
                holding: tokio::sync::watch::Sender::new(false),
                transfers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The device's settings.
    pub fn config(&self) -> &XmodemSimConfig {
        &self.inner.config
    }

    /// Waits for the next completed image (images are queued, none is lost).
    pub async fn next_image(&self) -> Received {
        let mut rx = self.inner.images_rx.lock().await;
        match rx.recv().await {
            Some(image) => image,
            // Unreachable: `Shared` holds a sender.
            None => std::future::pending().await,
        }
    }

    /// Waits for the reason of the next aborted transfer (queued like images).
    pub async fn next_abort(&self) -> String {
        let mut rx = self.inner.aborts_rx.lock().await;
        match rx.recv().await {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }

    /// Waits until the receiver holds the ACK of block `hold_after`.
    pub async fn holding(&self) {
        let mut rx = self.inner.holding.subscribe();
        let _ = rx.wait_for(|h| *h).await;
    }

    /// Let a held transfer go on (and never hold again).
    pub fn release(&self) {
        self.inner.released.send_replace(true);
    }

    /// Hold here if block `index` is the one to hold at (device side).
    pub(crate) async fn hold_at(&self, index: u32) {
        if self.inner.config.hold_after != Some(index) || *self.inner.released.borrow() {
            return;
        }
        let mut released = self.inner.released.subscribe();
        self.inner.holding.send_replace(true);
        tracing::info!(block = index, "holding the ACK until released");
        let _ = released.wait_for(|r| *r).await;
        self.inner.holding.send_replace(false);
    }

    /// The running firmware version.
    pub fn version(&self) -> String {
        self.inner
            .version
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many images were received completely.
    pub fn images_received(&self) -> u32 {
        self.inner.images.load(Ordering::Relaxed)
    }

    /// How many transfers were aborted.
    pub fn aborts(&self) -> u32 {
        self.inner.aborts.load(Ordering::Relaxed)
    }

    /// The reason of the last aborted transfer.
    pub fn last_abort(&self) -> Option<String> {
        self.inner
            .last_abort
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every transfer this device took part in, by its own clock: from the
    /// first data block to the boot or abort (`None`: still under way).
    /// Two devices on one bus must never overlap.
    pub fn transfers(&self) -> Vec<(Instant, Option<Instant>)> {
        self.inner
            .transfers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn transfer_started(&self) {
        self.inner
            .transfers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((Instant::now(), None));
    }

    fn transfer_ended(&self) {
        let mut t = self
            .inner
            .transfers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(last) = t.last_mut()
            && last.1.is_none()
        {
            last.1 = Some(Instant::now());
        }
    }

    /// "Boots" a received image (takes its `FWVER:` version) and publishes it.
    pub(crate) fn boot(&self, image: Received) {
        if let Some(version) = frame::find_version(&image.data) {
            tracing::info!(%version, "booted new firmware");
            *self
                .inner
                .version
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = version;
        }
        self.transfer_ended();
        self.inner.images.fetch_add(1, Ordering::Relaxed);
        // The receiver lives in `Shared`, so this cannot fail.
        let _ = self.inner.images_tx.send(image);
    }

    pub(crate) fn record_abort(&self, reason: String) {
        tracing::warn!(%reason, "transfer aborted");
        self.transfer_ended();
        self.inner.aborts.fetch_add(1, Ordering::Relaxed);
        *self
            .inner
            .last_abort
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(reason.clone());
        let _ = self.inner.aborts_tx.send(reason);
    }

    /// Fires a one-shot fault if it is set for `block` and has not fired yet.
    pub(crate) fn fire(
        &self,
        fault: Option<u32>,
        block: u32,
        flag: impl FnOnce(&mut Fired) -> &mut bool,
    ) -> bool {
        if fault != Some(block) {
            return false;
        }
        let mut fired = self
            .inner
            .fired
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let flag = flag(&mut fired);
        !std::mem::replace(flag, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        let f: Faults = "corrupt=3,drop=2:10,nak=1,stall=4,disconnect=5,cancel_after=6"
            .parse()
            .unwrap();
        assert_eq!(
            f,
            Faults {
                drop_bytes: Some((2, 10)),
                corrupt: Some(3),
                nak: Some(1),
                stall_after: Some(4),
                disconnect_after: Some(5),
                cancel_after: Some(6),
            }
        );
        assert!(matches!(
            "corrupt=0".parse::<Faults>(),
            Err(FaultParseError::Number { .. })
        ));
        assert!(matches!(
            "bogus=1".parse::<Faults>(),
            Err(FaultParseError::Unknown(_))
        ));
        assert!(matches!(
            "drop=3".parse::<Faults>(),
            Err(FaultParseError::Syntax(_))
        ));
    }

    #[test]
    fn faults_fire_once() {
        let h = SimHandle::new(XmodemSimConfig {
            faults: Faults {
                nak: Some(2),
                ..Faults::default()
            },
            ..XmodemSimConfig::default()
        });
        let nak = h.config().faults.nak;
        assert!(!h.fire(nak, 1, |f| &mut f.nak));
        assert!(h.fire(nak, 2, |f| &mut f.nak));
        assert!(!h.fire(nak, 2, |f| &mut f.nak));
    }

    #[test]
    fn boot_takes_the_version_marker() {
        let h = SimHandle::new(XmodemSimConfig::default());
        assert_eq!(h.version(), "1.0.0");
        h.boot(Received {
            data: b"\x7fELF...FWVER:2.1.0\0rest".to_vec(),
            name: None,
            declared_size: None,
            blocks: 1,
            naks: 0,
        });
        assert_eq!(h.version(), "2.1.0");
        assert_eq!(h.images_received(), 1);
    }
}
