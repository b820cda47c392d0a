//! The one error type of this crate; `guest.rs` maps each case onto the WIT
//! `flash-error` case of the same name (`Options` becomes `other`).
//!
//! Messages name the step that failed (`verify`, the SMP command, `reset`,
//! `confirm`) and, for device errors, the command and its return code.

/// Why `verify`, `flash` or `identify` failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The device stopped answering (every attempt of a request timed out, or
    /// it did not come back after a reset).
    #[error("timeout: {0}")]
    Timeout(String),
    /// The transfer failed: the link broke, answers made no sense, the upload
    /// made no progress.
    #[error("transfer: {0}")]
    Transfer(String),
    /// The device reported an error (`rc` != 0) or did not run the new image.
    #[error("device: {0}")]
    Device(String),
    /// The image failed the MCUboot checks, or is not newer than the running
    /// one under `require_newer`.
    #[error("verify: {0}")]
    Verify(String),
    /// The family cannot do this.
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

impl From<LinkFault> for Error {
    fn from(f: LinkFault) -> Self {
        Error::Transfer(f.to_string())
    }
}

impl From<otagw_plugin_sdk::OptionError> for Error {
    fn from(e: otagw_plugin_sdk::OptionError) -> Self {
        Error::Options(e.0)
    }
}
