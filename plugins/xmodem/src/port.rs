//! The two small traits the protocol code is written against, so it runs the
//! same against the gateway's `link`/`image` resources (`guest.rs`) and against
//! the simulated receivers of the unit tests.

use crate::LinkFault;

/// Severity of a log line (mirrors the WIT `log-level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
}

/// The byte pipe to the receiver plus the host's clock, progress and log.
pub trait Port {
    /// Write all of `data`.
    fn write(&mut self, data: &[u8]) -> Result<(), LinkFault>;
    /// Read at most `max` bytes, waiting at most `timeout_ms` for the first;
    /// empty when the time ran out.
    fn read(&mut self, max: u32, timeout_ms: u32) -> Result<Vec<u8>, LinkFault>;
    /// Discard pending input; returns how many bytes were thrown away.
    fn drain(&mut self) -> Result<u32, LinkFault>;
    /// Milliseconds on a monotonic clock.
    fn now_ms(&mut self) -> u64;
    /// Wait `ms` milliseconds.
    fn sleep(&mut self, ms: u32);
    /// `done` of `total` payload bytes acknowledged.
    fn progress(&mut self, done: u64, total: u64);
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
