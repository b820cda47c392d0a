//! The `xmodem` family as its next release would be: the same protocol code
//! (`otagw-plugin-xmodem` as a library), describing itself as version 0.1.1.
//! What the plugin update tests deliver by notice while xmodem 0.1.0 runs.
//!
//! Built by `tests/artifacts` in a cargo run of its own (with
//! `otagw-test-plugin-xmodem-trap`): in a run with the xmodem plugin, cargo
//! would build the xmodem crate once, with its export.

use otagw_plugin_sdk::schema::{Options, Problem};
use otagw_plugin_sdk::{
    DeviceInfo, Error, Family, FlashReport, ImageInfo, Info, JobMeta, Port, Source,
};
use otagw_plugin_xmodem::{Settings, Xmodem};

#[cfg(target_arch = "wasm32")]
const _: () = assert!(
    !otagw_plugin_xmodem::EXPORTS_COMPONENT,
    "otagw-plugin-xmodem was built with `component`: build this plugin in a cargo run of its own"
);

/// XMODEM, one release later.
pub struct XmodemNext;

impl Family for XmodemNext {
    type Settings = Settings;

    fn info() -> Info {
        Info {
            version: env!("CARGO_PKG_VERSION").into(),
            ..Xmodem::info()
        }
    }

    fn settings(options: &Options) -> Result<Settings, Vec<Problem>> {
        Xmodem::settings(options)
    }

    fn verify(image: &mut dyn Source, s: &Settings, meta: &JobMeta) -> Result<ImageInfo, Error> {
        Xmodem::verify(image, s, meta)
    }

    fn flash(
        port: &mut dyn Port,
        image: &mut dyn Source,
        s: &Settings,
        meta: &JobMeta,
    ) -> Result<FlashReport, Error> {
        Xmodem::flash(port, image, s, meta)
    }

    fn identify(port: &mut dyn Port, s: &Settings) -> Result<DeviceInfo, Error> {
        Xmodem::identify(port, s)
    }
}

otagw_plugin_sdk::export_family!(XmodemNext);
