//! [`Error`]: why `verify`, `flash` or `identify` failed, one case per case
//! of the contract's `flash-error`, and the step code each one becomes.
//!
//! The gateway reports each case as an upstream OTA step code:
//!
//! | case | step | meaning |
//! |---|---|---|
//! | [`Error::Verify`] | -3 | the image failed the family's checks |
//! | [`Error::Transfer`] | -4 | the protocol failed (retries, bad answers, the link) |
//! | [`Error::Device`] | -4 | the device refused or reported an error |
//! | [`Error::Timeout`] | -4 | the device stopped answering |
//! | [`Error::Unsupported`] | -1 | the family cannot do this (when it matters) |
//! | [`Error::Options`] | -1 | a configuration error: retrying cannot help |
//! | [`Error::Other`] | -1 | anything else |
//!
//! Messages start with the phase or command that failed and name what it was
//! about (block, address, option), e.g. `transfer: block 7 (offset 6144): ...`.

use crate::port::LinkFault;
use crate::schema::Problem;

/// Why `verify`, `flash` or `identify` failed (the contract's `flash-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The image failed the family's checks (format, digest, signature, size).
    #[error("verify: {0}")]
    Verify(String),
    /// The transfer failed: retries exhausted, garbled answers, the link broke.
    #[error("transfer: {0}")]
    Transfer(String),
    /// The device refused the image or reported an error of its own.
    #[error("device: {0}")]
    Device(String),
    /// The device stopped answering.
    #[error("timeout: {0}")]
    Timeout(String),
    /// The family cannot do this (e.g. `identify` without a way to ask).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The device's options do not work, in a way only the job revealed (or
    /// they failed the family's checks); the message names the option.
    #[error("options: {0}")]
    Options(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// The problems of a device's options as one [`Error::Options`]: their
    /// messages, each naming its option, joined with `; `.
    pub fn options(problems: &[Problem]) -> Error {
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        Error::Options(messages.join("; "))
    }

    /// Whether this is a link that closed ([`LinkFault::Closed`] passed on
    /// with `?`): the device went away (it reset, or left radio range), and
    /// after [`Port::reopen`](crate::Port::reopen) the link may work again.
    pub fn is_link_closed(&self) -> bool {
        matches!(self, Error::Transfer(m) if m.starts_with("link closed: "))
    }
}

/// A link call that failed where the protocol has nothing better to say: a
/// transfer error with the link's words.
impl From<LinkFault> for Error {
    fn from(f: LinkFault) -> Self {
        Error::Transfer(f.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_case() {
        assert_eq!(
            Error::Timeout("handshake: no 'C'".into()).to_string(),
            "timeout: handshake: no 'C'"
        );
        assert_eq!(
            Error::from(LinkFault::Closed("peer hung up".into())),
            Error::Transfer("link closed: peer hung up".into())
        );
        assert!(Error::from(LinkFault::Closed("peer hung up".into())).is_link_closed());
        assert!(!Error::from(LinkFault::Timeout("no answer".into())).is_link_closed());
        assert!(!Error::Device("link closed: said the device".into()).is_link_closed());
        let problems = [
            Problem::new(Some("a"), "option `a` = \"x\": no"),
            Problem::new(None, "`a` and `b` together: no"),
        ];
        assert_eq!(
            Error::options(&problems).to_string(),
            "options: option `a` = \"x\": no; `a` and `b` together: no"
        );
    }
}
