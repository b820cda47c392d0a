//! The one error type of this crate; `guest.rs` maps each case onto the WIT
//! `flash-error` case of the same name (`Options` becomes `other`).
//!
//! Messages start with the phase that failed (`handshake`, `block 0`,
//! `transfer`, `EOT`, `identify`, `verify`, option names) and name the block.

/// Why `verify`, `flash` or `identify` failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The receiver never answered (no start character, no reply to any attempt).
    #[error("timeout: {0}")]
    Timeout(String),
    /// Retries exhausted, the receiver cancelled, or the link failed mid-transfer.
    #[error("transfer: {0}")]
    Transfer(String),
    /// The device reported a problem of its own.
    #[error("device: {0}")]
    Device(String),
    /// The image cannot be sent (empty, too large).
    #[error("verify: {0}")]
    Verify(String),
    /// The family cannot do this (identify without `version_command`).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A device option is malformed; the message names it.
    #[error("options: {0}")]
    Options(String),
}

/// A failed host link call, as the protocol code sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkFault {
    /// The link cannot do this (often harmless: `drain` on an odd link).
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
