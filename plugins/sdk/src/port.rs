//! What a family's protocol code is written against: [`Port`] (the link to
//! the device plus the host's clock, progress and log) and [`Source`] (the
//! image), with the plain-Rust mirrors of the contract's link types.
//!
//! What it is: traits and data, no I/O, compiled natively too, so protocol
//! code runs the same against the host (the adapters of `guest`, wasm32
//! only) and against simulators and [`crate::testing::ScriptPort`].
//!
//! What it is not: the generated bindings. Every type here mirrors one of
//! `wit/v0.2.0/plugin.wit`, whose documentation is the reference.

/// A failed link call, as protocol code sees it (the contract's `link-error`).
/// `Unsupported` is often harmless: a pseudo-terminal has no DTR/RTS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkFault {
    /// The link cannot honour this request at all.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The peer closed the connection or the device went away; after a
    /// successful [`Port::reopen`] the link works again.
    #[error("link closed: {0}")]
    Closed(String),
    /// The device did not come back within `reopen`'s time, or did not
    /// acknowledge a GATT write in time.
    #[error("link timeout: {0}")]
    Timeout(String),
    /// The device has no such GATT characteristic (or service).
    #[error("not found: {0}")]
    NotFound(String),
    /// The request itself is wrong (a malformed UUID, a write past the MTU).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Any other I/O failure.
    #[error("link I/O error: {0}")]
    Io(String),
}

impl LinkFault {
    fn unsupported(what: &str) -> LinkFault {
        LinkFault::Unsupported(format!("this link cannot {what}"))
    }
}

/// The physical kind of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    /// A UART, RS-232/485 or USB-CDC port.
    Serial,
    /// A raw TCP byte stream, e.g. to a serial device server.
    Tcp,
    /// A Bluetooth LE connection: plain reads and writes use the family's
    /// default characteristics ([`GattDefaults`]).
    Ble,
    /// A kind the contract has no name for ("can", "usb-dfu").
    Other(String),
}

/// What a link can do, asked with [`Port::supports`] before trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkFeature {
    /// [`Port::configure`].
    Configure,
    /// [`Port::set_lines`].
    ModemLines,
    /// [`Port::reopen`].
    Reopen,
    /// The `gatt_*` calls.
    Gatt,
}

/// Parity bit of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    None,
    Odd,
    Even,
}

/// Stop bits of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopBits {
    One,
    Two,
}

/// Line settings of a serial port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialConfig {
    pub baud: u32,
    /// 5, 6, 7 or 8.
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: StopBits,
}

/// 115200 8N1, what a serial link starts with.
impl Default for SerialConfig {
    fn default() -> Self {
        SerialConfig::eight_bits(115_200, Parity::None)
    }
}

impl SerialConfig {
    /// 8 data bits, `parity`, 1 stop bit at `baud`: what most bootloaders use.
    pub fn eight_bits(baud: u32, parity: Parity) -> SerialConfig {
        SerialConfig {
            baud,
            data_bits: 8,
            parity,
            stop_bits: StopBits::One,
        }
    }
}

/// A Bluetooth UUID as text (the contract's `uuid`).
pub type Uuid = String;

/// How a GATT write is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GattWriteMode {
    /// A Write Request, acknowledged by the peripheral.
    WithResponse,
    /// A Write Command, not acknowledged.
    WithoutResponse,
}

/// How a subscribed characteristic delivers its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GattDelivery {
    Notification,
    Indication,
}

/// The characteristics plain reads and writes use on a BLE link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GattDefaults {
    /// The service that carries them.
    pub service: Uuid,
    /// The characteristic [`Port::write`] writes to.
    pub write: Uuid,
    /// How [`Port::write`] writes to it.
    pub write_mode: GattWriteMode,
    /// The characteristic whose values [`Port::read`] returns.
    pub notify: Uuid,
}

/// A value a subscribed characteristic sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GattValue {
    /// The characteristic, as the plugin subscribed to it.
    pub characteristic: Uuid,
    pub data: Vec<u8>,
}

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// The phase a progress report belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Getting the device ready: entering the bootloader, handshakes.
    Prepare,
    /// Erasing flash.
    Erase,
    /// Sending the image.
    Transfer,
    /// Checking what the device received (read-back, hash).
    Verify,
    /// Committing, rebooting, confirming.
    Finish,
}

/// The link to the one device of a job, plus the host's clock, progress
/// and log: the superset of what families need.
///
/// `write`, `read`, `now_ms` and `sleep` are required. The rest have
/// defaults for links that cannot do them, so a test double implements only
/// what its family uses: the fallible calls answer
/// [`LinkFault::Unsupported`], `supports` answers false, `progress` and `log`
/// drop what they get.
pub trait Port {
    /// Write all of `data` (on BLE: to the default characteristic).
    fn write(&mut self, data: &[u8]) -> Result<(), LinkFault>;
    /// Read at most `max` bytes, waiting at most `timeout_ms` for the first;
    /// empty when the time ran out. The host caps one wait at 60 s.
    fn read(&mut self, max: u32, timeout_ms: u32) -> Result<Vec<u8>, LinkFault>;
    /// Milliseconds on a monotonic clock that started with the job.
    fn now_ms(&mut self) -> u64;
    /// Wait `ms` milliseconds.
    fn sleep(&mut self, ms: u32);

    /// Discard input received and not yet read; returns how many bytes.
    fn drain(&mut self) -> Result<u32, LinkFault> {
        Err(LinkFault::unsupported("drain its input"))
    }
    /// Change the serial line settings.
    fn configure(&mut self, config: SerialConfig) -> Result<(), LinkFault> {
        let _ = config;
        Err(LinkFault::unsupported("change serial settings"))
    }
    /// Set the DTR and RTS modem lines (true = asserted).
    fn set_lines(&mut self, dtr: bool, rts: bool) -> Result<(), LinkFault> {
        let _ = (dtr, rts);
        Err(LinkFault::unsupported("set DTR/RTS"))
    }
    /// The largest write the link carries in one piece (the BLE ATT payload,
    /// or a sensible chunk for byte streams).
    fn mtu(&mut self) -> u32 {
        4096
    }
    /// What kind of link this is.
    fn kind(&mut self) -> LinkKind {
        LinkKind::Serial
    }
    /// Whether the link can do `feature` at all (a hint; the calls still
    /// answer `Unsupported` when they cannot).
    fn supports(&mut self, feature: LinkFeature) -> bool {
        let _ = feature;
        false
    }
    /// Close the link and open it again, waiting up to `timeout_ms` for the
    /// device to come back (see the contract for what survives).
    fn reopen(&mut self, timeout_ms: u32) -> Result<(), LinkFault> {
        let _ = timeout_ms;
        Err(LinkFault::unsupported("be reopened"))
    }
    /// Write `data` to a GATT characteristic (BLE links).
    fn gatt_write(
        &mut self,
        characteristic: &str,
        data: &[u8],
        mode: GattWriteMode,
    ) -> Result<(), LinkFault> {
        let _ = (characteristic, data, mode);
        Err(LinkFault::unsupported("write GATT characteristics"))
    }
    /// Read a GATT characteristic's value (BLE links).
    fn gatt_read(&mut self, characteristic: &str) -> Result<Vec<u8>, LinkFault> {
        let _ = characteristic;
        Err(LinkFault::unsupported("read GATT characteristics"))
    }
    /// Subscribe to a characteristic's values (BLE links).
    fn gatt_subscribe(
        &mut self,
        characteristic: &str,
        delivery: GattDelivery,
    ) -> Result<(), LinkFault> {
        let _ = (characteristic, delivery);
        Err(LinkFault::unsupported("subscribe to GATT characteristics"))
    }
    /// Stop a subscription (BLE links).
    fn gatt_unsubscribe(&mut self, characteristic: &str) -> Result<(), LinkFault> {
        let _ = characteristic;
        Err(LinkFault::unsupported("subscribe to GATT characteristics"))
    }
    /// The next value of a subscribed characteristic, waiting at most
    /// `timeout_ms`; `None` when the time ran out (BLE links).
    fn gatt_receive(&mut self, timeout_ms: u32) -> Result<Option<GattValue>, LinkFault> {
        let _ = timeout_ms;
        Err(LinkFault::unsupported("receive GATT values"))
    }

    /// `done` of `total` units (usually bytes) in `phase`.
    fn progress(&mut self, done: u64, total: u64, phase: Phase) {
        let _ = (done, total, phase);
    }
    /// A line for the job's log. The SDK prefixes it with the family's name.
    fn log(&mut self, level: Level, message: &str) {
        let _ = (level, message);
    }
}

/// The firmware image of a job, read piecewise (the host streams it from its
/// cache; a plugin never needs to hold all of it).
pub trait Source {
    /// Size in bytes.
    fn size(&mut self) -> u64;
    /// Up to `len` bytes at `offset`: fewer only at the end of the image,
    /// none past it. The host caps `len` at 65536.
    fn read(&mut self, offset: u64, len: u32) -> Vec<u8>;

    /// Exactly `len` bytes at `offset`, reading as often as it takes; a
    /// [`crate::Error::Transfer`] naming the offset when the image ends
    /// before (it is shorter than it said).
    fn read_exact(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, crate::Error> {
        let mut data = Vec::with_capacity(len);
        while data.len() < len {
            let at = offset + data.len() as u64;
            let want = u32::try_from(len - data.len()).unwrap_or(u32::MAX);
            let got = self.read(at, want);
            if got.is_empty() {
                return Err(crate::Error::Transfer(format!(
                    "image: read at offset {at} returned nothing, {} bytes short of the size \
                     the image announced",
                    len - data.len()
                )));
            }
            data.extend_from_slice(&got[..got.len().min(len - data.len())]);
        }
        Ok(data)
    }
}

/// Bytes received from a [`Port`] and not yet looked at, for protocols that
/// read byte by byte against a deadline (XMODEM replies, AN3155 ACKs).
#[derive(Debug, Default, Clone)]
pub struct Inbox {
    bytes: std::collections::VecDeque<u8>,
}

/// The host caps one read's wait at 60 s; longer waits loop.
const MAX_READ_MS: u64 = 60_000;

impl Inbox {
    /// The next byte, reading up to `chunk` bytes at a time from `port`, or
    /// `None` once the port's clock has reached `deadline`.
    pub fn next_byte<P: Port + ?Sized>(
        &mut self,
        port: &mut P,
        deadline: u64,
        chunk: u32,
    ) -> Result<Option<u8>, LinkFault> {
        if let Some(b) = self.bytes.pop_front() {
            return Ok(Some(b));
        }
        loop {
            let now = port.now_ms();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).min(MAX_READ_MS) as u32;
            let got = port.read(chunk, wait)?;
            if !got.is_empty() {
                self.bytes.extend(got);
                return Ok(self.bytes.pop_front());
            }
        }
    }

    /// Give `b` back: the next [`Inbox::next_byte`] returns it.
    pub fn unread(&mut self, b: u8) {
        self.bytes.push_front(b);
    }

    /// Forget what was received (before a new request).
    pub fn clear(&mut self) {
        self.bytes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port that has nothing but a clock.
    struct Quiet(u64);

    impl Port for Quiet {
        fn write(&mut self, _: &[u8]) -> Result<(), LinkFault> {
            Ok(())
        }
        fn read(&mut self, _: u32, timeout_ms: u32) -> Result<Vec<u8>, LinkFault> {
            self.0 += u64::from(timeout_ms);
            Ok(Vec::new())
        }
        fn now_ms(&mut self) -> u64 {
            self.0
        }
        fn sleep(&mut self, ms: u32) {
            self.0 += u64::from(ms);
        }
    }

    #[test]
    fn optional_calls_default_to_unsupported() {
        let mut p = Quiet(0);
        assert!(matches!(p.drain(), Err(LinkFault::Unsupported(_))));
        assert!(matches!(
            p.configure(SerialConfig::eight_bits(9600, Parity::Even)),
            Err(LinkFault::Unsupported(_))
        ));
        assert!(matches!(
            p.set_lines(true, false),
            Err(LinkFault::Unsupported(_))
        ));
        assert!(matches!(p.reopen(10), Err(LinkFault::Unsupported(_))));
        assert!(matches!(p.gatt_receive(10), Err(LinkFault::Unsupported(_))));
        assert!(!p.supports(LinkFeature::Reopen));
        assert_eq!(p.kind(), LinkKind::Serial);
    }

    #[test]
    fn inbox_waits_past_the_host_cap_and_gives_bytes_back() {
        let mut p = Quiet(0);
        let mut inbox = Inbox::default();
        assert_eq!(inbox.next_byte(&mut p, 150_000, 16), Ok(None));
        assert_eq!(p.0, 150_000);
        inbox.unread(7);
        assert_eq!(inbox.next_byte(&mut p, 0, 16), Ok(Some(7)));
    }
}
