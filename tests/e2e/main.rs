//! otagw's end-to-end tests: one binary, one harness (`harness.rs`).

mod aliyun;
mod ble;
mod cli;
mod contract;
mod daemon;
mod dashboard;
mod deploy;
mod links;
mod operator;
mod plugin_host;
mod plugin_update;
mod reload;
mod resilience;
mod rollout;
mod signing;
mod smp;
mod stm32;
mod xmodem;
