//! # otagw-plugin-stm32
//!
//! The otagw device-family plugin for the **STM32 ROM bootloader on a USART**
//! (ST application note AN3155): it enters the bootloader with a configurable
//! DTR/RTS sequence (or none), syncs with 0x7F, learns the command set and the
//! part with GET / GET ID, erases exactly the pages the image covers (or the
//! whole flash), writes 256-byte blocks, reads them back and jumps to the
//! image with GO. Built for `wasm32-wasip2` it is a component of the
//! `device-family` world of `wit/v0.1.0`; built natively it is a library whose
//! protocol code is unit tested against a simulated bootloader.
//!
//! What it is not: the I2C/SPI/CAN/USB-DFU variants of the bootloader, option
//! bytes, read/write protection handling, or an Intel HEX / ELF loader (the
//! image is the raw bytes for `address`).
//!
//! # Layout
//! - [`options`]: the device options ([`Settings`]), DTR/RTS sequences, page layouts.
//! - [`parts`]: product IDs → flash size and page layout of common parts.
//! - [`port`]: the [`Port`] and [`Source`] traits the protocol is written against.
//! - [`protocol`]: AN3155 framing, commands, sync, retries.
//! - [`flash`](mod@flash): `verify`, `flash` and `identify`.
//! - [`error`]: [`Error`] and [`LinkFault`].
//! - `fuzzing` (hidden, not for wasm): what one input of the `stm32_session`
//!   fuzz target in `fuzz/` does, shared with the test that replays its corpus.
//! - `testing` (tests only): a simulated bootloader on a virtual clock.
//! - `guest` (wasm32 only): the WIT bindings and the adapters from the host's
//!   `link` / `image` resources to [`Port`] / [`Source`].

pub mod error;
pub mod flash;
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod options;
pub mod parts;
pub mod port;
pub mod protocol;

#[cfg(test)]
pub mod testing;

#[cfg(target_arch = "wasm32")]
mod guest;

pub use error::{Error, LinkFault};
pub use options::Settings;
pub use port::{Level, LinkKind, Parity, Phase, Port, Source};
