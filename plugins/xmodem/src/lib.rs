//! # otagw-plugin-xmodem
//!
//! The otagw device-family plugin for XMODEM bootloaders: the **sender** side
//! of XMODEM-CRC, XMODEM-1K, original checksum XMODEM and YMODEM batch (one
//! file), as found in Silicon Labs Gecko, TI boot ROMs and STM32Cube IAP.
//! Built for `wasm32-wasip2` it is a component of contract `otagw:plugin@0.2.0`
//! (`wit/v0.2.0`) through the plugin SDK ([`Xmodem`] is its [`Family`]);
//! built natively it is a library whose protocol code is unit tested against
//! simulated receivers.
//!
//! What it is not: a receiver, ZMODEM, or an image-format checker. It cannot
//! read a version from a bootloader; `identify` only works when the running
//! firmware answers a text command (`version_command`).
//!
//! # Layout
//! - [`options`]: the option schema and the typed [`Settings`].
//! - [`sender`]: the protocol (handshake, blocks, fallbacks, EOT, YMODEM batch).
//! - [`verify`](mod@verify): pre-flight checks of the image.
//! - [`version`]: `identify` through a version command.
//! - `fuzzing` (hidden, not for wasm): what one input of the `xmodem_session`
//!   fuzz target in `fuzz/` does, shared with the test that replays its corpus.
//!
//! # Features
//! - `component` (default): export [`Xmodem`] as the component's `plugin`
//!   interface. Off for crates that reuse this protocol code in a component
//!   of their own (`tests/plugins/legacy-v01`), whose exports it would add to.

#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod options;
pub mod sender;
pub mod verify;
pub mod version;

use otagw_plugin_sdk::schema::{Options, Problem};
use otagw_plugin_sdk::{
    DeviceInfo, Error, Family, FlashReport, ImageInfo, Info, JobMeta, LinkKind, Parity, Port,
    SerialConfig, Source,
};

pub use options::{Protocol, Settings};

/// Whether this build exports the `xmodem` component (feature `component`).
pub const EXPORTS_COMPONENT: bool = cfg!(feature = "component");

/// What `describe` says of the family.
const DESCRIPTION: &str =
    "XMODEM-CRC/1K and YMODEM sender for serial bootloaders (Gecko, TI boot ROMs, STM32 IAP)";

/// The XMODEM family.
#[derive(Debug)]
pub struct Xmodem;

impl Family for Xmodem {
    type Settings = Settings;

    fn info() -> Info {
        Info::new("xmodem", env!("CARGO_PKG_VERSION"), DESCRIPTION)
            .transports([LinkKind::Serial, LinkKind::Tcp])
            .serial(SerialConfig::eight_bits(115_200, Parity::None))
            .options(options::schema())
    }

    fn settings(options: &Options) -> Result<Settings, Vec<Problem>> {
        Settings::from_options(options)
    }

    fn verify(image: &mut dyn Source, s: &Settings, _: &JobMeta) -> Result<ImageInfo, Error> {
        verify::verify(image.size(), s)
    }

    fn flash(
        port: &mut dyn Port,
        image: &mut dyn Source,
        s: &Settings,
        _: &JobMeta,
    ) -> Result<FlashReport, Error> {
        sender::flash(port, image, s)
    }

    fn identify(port: &mut dyn Port, s: &Settings) -> Result<DeviceInfo, Error> {
        version::identify(port, s).map(DeviceInfo::version)
    }
}

#[cfg(feature = "component")]
otagw_plugin_sdk::export_family!(Xmodem);
