//! The one error type of this crate; `guest.rs` maps each case onto the WIT
//! `flash-error` case of the same name (`Options` becomes `other`).
//!
//! Messages name the AN3155 command and the address it was about
//! (`write memory at 0x08004100: NACK after 4 attempts`), or the option that
//! is wrong.

/// Why `verify`, `flash` or `identify` failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The bootloader stopped answering (no ACK/NACK within the wait).
    #[error("timeout: {0}")]
    Timeout(String),
    /// The link failed, or the answers made no sense (garbled bytes).
    #[error("transfer: {0}")]
    Transfer(String),
    /// The bootloader refused (NACK) or its flash does not hold what was written.
    #[error("device: {0}")]
    Device(String),
    /// The image does not fit the part, or fails the header check.
    #[error("verify: {0}")]
    Verify(String),
    /// The family cannot do this (identify without `version_address`).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A device option is malformed or cannot be honoured on this link; the
    /// message names the option.
    #[error("options: {0}")]
    Options(String),
}

/// A failed host link call, as the protocol code sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkFault {
    /// The link cannot do this (parity or DTR/RTS on a pseudo-terminal, serial
    /// settings on TCP).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The peer closed the connection or the device went away.
    #[error("link closed: {0}")]
    Closed(String),
    /// Any other I/O failure.
    #[error("link I/O error: {0}")]
    Io(String),
}

impl From<otagw_plugin_sdk::OptionError> for Error {
    fn from(e: otagw_plugin_sdk::OptionError) -> Self {
        Error::Options(e.0)
    }
}
