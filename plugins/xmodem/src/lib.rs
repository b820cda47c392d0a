//! # otagw-plugin-xmodem
//!
//! The otagw device-family plugin for XMODEM bootloaders: the **sender** side
//! of XMODEM-CRC, XMODEM-1K, original checksum XMODEM and YMODEM batch (one
//! file), as found in Silicon Labs Gecko, TI boot ROMs and STM32Cube IAP.
//! Built for `wasm32-wasip2` it is a component of the `device-family` world of
//! `wit/v0.1.0`; built natively it is a library whose protocol code is unit
//! tested against simulated receivers.
//!
//! What it is not: a receiver, ZMODEM, or an image-format checker. It cannot
//! read a version from a bootloader; `identify` only works when the running
//! firmware answers a text command (`version_command`).
//!
//! # Layout
//! - [`options`]: the device options, parsed and checked ([`Settings`]).
//! - [`port`]: the [`Port`] and [`Source`] traits the protocol is written against.
//! - [`sender`]: the protocol (handshake, blocks, fallbacks, EOT, YMODEM batch).
//! - [`verify`](mod@verify): pre-flight checks of the image.
//! - [`version`]: `identify` through a version command.
//! - [`error`]: [`Error`] and [`LinkFault`].
//! - `fuzzing` (hidden, not for wasm): what one input of the `xmodem_session`
//!   fuzz target in `fuzz/` does, shared with the test that replays its corpus.
//! - `guest` (wasm32 only): the WIT bindings and the adapters from the host's
//!   `link` / `image` resources to [`Port`] / [`Source`].

pub mod error;
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod options;
pub mod port;
pub mod sender;
pub mod verify;
pub mod version;

#[cfg(target_arch = "wasm32")]
mod guest;

pub use error::{Error, LinkFault};
pub use options::{Protocol, Settings};
pub use port::{Level, Port, Source};
