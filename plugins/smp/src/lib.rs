//! # otagw-plugin-smp
//!
//! The otagw device-family plugin for MCUboot devices managed with mcumgr's
//! **SMP** (Simple Management Protocol): Zephyr, nRF Connect SDK, NuttX and
//! Mynewt leaves. It checks MCUboot images (header, TLVs, SHA-256, ECDSA P-256
//! and Ed25519 signatures) before touching a device, uploads them with resume,
//! marks them for test, resets, checks that the new image runs and confirms
//! it. Built for `wasm32-wasip2` it is a component of the `device-family`
//! world of `wit/v0.1.0`; built natively it is a library whose protocol code
//! is unit tested against a simulated SMP device.
//!
//! What it is not: an SMP server, a filesystem/shell/stat client, or a
//! checker of encrypted, RSA or P-384 images.
//!
//! # Layout
//! - [`options`]: the device options, parsed and checked ([`Settings`]).
//! - [`port`]: the [`Port`] and [`Source`] traits the protocol is written against.
//! - [`smp`]: SMP header, packets, CBOR bodies, return codes (transport-free).
//! - [`serial`]: the serial framing (markers, base64, length, CRC16, 127-byte frames).
//! - [`transport`]: serial framing or raw MTU-sized packets (BLE), per link kind.
//! - [`client`]: requests, answers, timeouts, retries, the commands used.
//! - [`mcuboot`]: image format and `verify`.
//! - [`keys`]: the `public_key` option and signature checks.
//! - [`flash`](mod@flash): upload, resume, test, reset, confirm.
//! - [`identify`](mod@identify): running version and model.
//! - [`error`]: [`Error`] and [`LinkFault`].
//! - `fuzzing` (hidden, not for wasm): what one input of each SMP fuzz
//!   target in `fuzz/` does, shared with the tests that replay its corpus.
//! - `guest` (wasm32 only): the WIT bindings and the adapters from the host's
//!   `link` / `image` resources to [`Port`] / [`Source`].

pub mod client;
pub mod error;
pub mod flash;
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod identify;
pub mod keys;
pub mod mcuboot;
pub mod options;
pub mod port;
pub mod serial;
pub mod smp;
pub mod transport;

#[cfg(test)]
pub mod testing;

#[cfg(target_arch = "wasm32")]
mod guest;

pub use error::{Error, LinkFault};
pub use keys::PublicKey;
pub use options::Settings;
pub use port::{Level, LinkKind, Phase, Port, Source};
