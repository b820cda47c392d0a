//! Every `bindgen!` of the plugin contract, in one place (CONVENTIONS 9).
//!
//! The host side of each WIT version lives in its own module; today there is one,
//! `v0_1_0`. A later contract version gets a sibling module and the host converts
//! its types to the latest ones, so behaviour is written once.

pub mod v0_1_0 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "device-family",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "otagw:plugin/host.link": crate::link::Link,
            "otagw:plugin/host.image": crate::plugin::host::ImageHandle,
        },
    });
}

pub use v0_1_0::DeviceFamily;
pub use v0_1_0::DeviceFamilyPre;
pub use v0_1_0::otagw::plugin::types;

/// The contract version this host implements, as plugins report it in `describe`.
pub const CONTRACT_VERSION: &str = "0.1.0";
/// The interface a plugin must export, with its version.
pub const PLUGIN_EXPORT: &str = "otagw:plugin/plugin@0.1.0";
