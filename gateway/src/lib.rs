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
//! - [`ota`]: the upstream OTA protocol (topics, payloads), the job state
//!   machine and the notice queue, sans-I/O; its `journal` persists jobs, the
//!   versions leaves reported and report marks in sled.
//! - [`daemon`]: `otagw run`: the job table (queue, live jobs, journal behind
//!   one API), supervised job tasks (the runner), intake of notices, on-connect
//!   informs, the summary, the status API's view; its ports (publisher, clock)
//!   are traits so its rules are unit-tested without sockets.
//! - [`devices`]: the leaf registry from the configuration (identity, family,
//!   link, options).
//! - [`cli`]: one file per `otagw` subcommand.
//! - [`config`]: the typed TOML configuration (binds and opens nothing).
//! - [`store`]: the one sled database, handed out as named trees.
//! - [`broker`]: the embedded MQTT broker (rumqttd), confined.
//! - [`api`]: the local HTTP API and the dashboard it serves.
//! - [`metrics`]: the Prometheus metrics behind `/metrics`.
//! - [`tls`]: the process's rustls crypto provider.
//! - [`cache`]: firmware images in files, their metadata in sled: content-addressed, one resumable,
//!   verified download per image, LRU eviction that spares images in use.
//! - [`upstream`]: the MQTT session to the cloud: auth modes, TLS, reconnects,
//!   subscriptions, the aliyun sub-device handshake, the durable outbox.
//! - `fuzzing` (hidden): what one input of the notice and config fuzz targets
//!   in `fuzz/` does, shared with the tests that replay their corpus.
#![deny(unsafe_code)]

pub mod api;
pub mod broker;
pub mod cache;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod devices;
pub mod flash;
#[doc(hidden)]
pub mod fuzzing;
pub mod link;
pub mod metrics;
pub mod ota;
pub mod plugin;
pub mod progress;
pub mod rollout;
pub mod store;
pub mod tls;
pub mod upstream;
