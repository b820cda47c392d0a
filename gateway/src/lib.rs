//! otagw: an OTA edge gateway. It speaks a cloud's firmware-upgrade protocol on
//! behalf of leaf devices that cannot, and flashes them through device-family
//! plugins: WebAssembly components run in a sandbox.
//!
//! # Layout
//! - [`plugin`]: the wasmtime host: engine, bindings, limits, loader, sessions.
//! - [`link`]: byte pipes to leaf devices (serial, TCP); no device protocol.
//! - [`progress`]: the typed event stream of a running job.
//! - [`flash`]: one job on one leaf (verify, flash, identify), the path both
//!   the CLI and the daemon take.
//! - [`cli`]: one file per `otagw` subcommand.
//! - [`config`]: the typed TOML configuration (binds and opens nothing).
//! - [`store`]: the one sled database, handed out as named trees.
//! - [`broker`]: the embedded MQTT broker (rumqttd), confined.
//! - [`api`]: the local HTTP status API.
//! - [`tls`]: the process's rustls crypto provider.
#![deny(unsafe_code)]

pub mod api;
pub mod broker;
pub mod cli;
pub mod config;
pub mod flash;
pub mod link;
pub mod plugin;
pub mod progress;
pub mod store;
pub mod tls;
