//! The two small traits the protocol code is written against, so it runs the
//! same against the gateway's `link`/`image` resources (`guest.rs`) and against
//! the simulated SMP device of the unit tests.

use crate::LinkFault;

/// Severity of a log line (mirrors the WIT `log-level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
}

/// The phase a progress report belongs to (the WIT `phase` cases this family uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the device's state and parameters.
    Prepare,
    /// Uploading the image.
    Transfer,
    /// Test, reset, reconnect, confirm.
    Finish,
}

/// The physical kind of the link (mirrors the WIT `link-kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// A UART: SMP packets travel in the serial framing (`serial` module).
    Serial,
    /// A raw TCP stream to a serial device server: the same serial framing.
    Tcp,
    /// Bluetooth LE: raw SMP packets, fragmented to the link's MTU.
    Ble,
}

/// The byte pipe to the device plus the host's clock, progress and log.
pub trait Port {
    /// Write all of `data`.
    fn write(&mut self, data: &[u8]) -> Result<(), LinkFault>;
    /// Read at most `max` bytes, waiting at most `timeout_ms` for the first;
    /// empty when the time ran out.
    fn read(&mut self, max: u32, timeout_ms: u32) -> Result<Vec<u8>, LinkFault>;
    /// Discard pending input; returns how many bytes were thrown away.
    fn drain(&mut self) -> Result<u32, LinkFault>;
    /// The largest write the link carries in one piece.
    fn mtu(&mut self) -> u32;
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
