//! The two small traits the protocol code is written against, so it runs the
//! same against the gateway's `link`/`image` resources (`guest.rs`) and against
//! the simulated bootloader of the unit tests (`testing.rs`).

use crate::LinkFault;

/// Severity of a log line (mirrors the WIT `log-level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
}

/// The phase a progress report belongs to (mirrors the WIT `phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Line settings, reset sequence, sync, GET / GET ID.
    Prepare,
    /// Erasing pages (or the whole flash).
    Erase,
    /// WRITE MEMORY blocks.
    Transfer,
    /// READ MEMORY read-back.
    Verify,
    /// GO, run sequence.
    Finish,
}

/// The physical kind of the link (mirrors the WIT `link-kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// A UART: this plugin sets baud and parity itself.
    Serial,
    /// A raw TCP stream to a serial device server, whose port settings are
    /// configured on the server.
    Tcp,
    /// Bluetooth LE (not a transport of this family).
    Ble,
}

/// Parity of the serial line (the cases this family uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    /// 8E1, what AN3155 requires of a real STM32.
    Even,
    /// 8N1, for simulators on pseudo-terminals.
    None,
}

/// The byte pipe to the bootloader plus the host's clock, progress and log.
pub trait Port {
    /// Write all of `data`.
    fn write(&mut self, data: &[u8]) -> Result<(), LinkFault>;
    /// Read at most `max` bytes, waiting at most `timeout_ms` for the first;
    /// empty when the time ran out.
    fn read(&mut self, max: u32, timeout_ms: u32) -> Result<Vec<u8>, LinkFault>;
    /// Discard pending input; returns how many bytes were thrown away.
    fn drain(&mut self) -> Result<u32, LinkFault>;
    /// Set `baud`, 8 data bits, `parity`, 1 stop bit.
    fn configure(&mut self, baud: u32, parity: Parity) -> Result<(), LinkFault>;
    /// Set the DTR and RTS modem lines (true = asserted).
    fn set_lines(&mut self, dtr: bool, rts: bool) -> Result<(), LinkFault>;
    /// What kind of link this is.
    fn kind(&mut self) -> LinkKind;
    /// Milliseconds on a monotonic clock.
    fn now_ms(&mut self) -> u64;
    /// Wait `ms` milliseconds.
    fn sleep(&mut self, ms: u32);
    /// `done` of `total` units in `phase`.
    fn progress(&mut self, done: u64, total: u64, phase: Phase);
    /// A line for the job's log.
    fn log(&mut self, level: Level, message: &str);
}

/// The firmware image, read piecewise.
pub trait Source {
    /// Size in bytes.
    fn size(&mut self) -> u64;
    /// Up to `len` bytes at `offset`; fewer only at the end of the image.
    fn read(&mut self, offset: u64, len: u32) -> Vec<u8>;
}
