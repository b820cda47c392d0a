//! A broken release of the `xmodem` family (0.1.2): it verifies and
//! identifies as xmodem does, and traps (panics) in every flash before it
//! touches the device. What a plugin update's probation must roll back.
//!
//! Built by `tests/artifacts` together with `otagw-test-plugin-xmodem-next`.

use otagw_plugin_sdk::schema::{Options, Problem};
use otagw_plugin_sdk::{
    DeviceInfo, Error, Family, FlashReport, ImageInfo, Info, JobMeta, Port, Source,
};
use otagw_plugin_xmodem::{Settings, Xmodem};

/// XMODEM with a bug in its flash.
pub struct XmodemTrap;

impl Family for XmodemTrap {
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
        _: &mut dyn Port,
        _: &mut dyn Source,
        _: &Settings,
        _: &JobMeta,
    ) -> Result<FlashReport, Error> {
        panic!("index out of bounds in the new block encoder (a test plugin's bug)")
    }

    fn identify(port: &mut dyn Port, s: &Settings) -> Result<DeviceInfo, Error> {
        Xmodem::identify(port, s)
    }
}

otagw_plugin_sdk::export_family!(XmodemTrap);
