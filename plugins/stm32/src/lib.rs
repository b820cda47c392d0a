//! # otagw-plugin-stm32
//!
//! The otagw device-family plugin for the **STM32 ROM bootloader on a USART**
//! (ST application note AN3155): it enters the bootloader with a configurable
//! DTR/RTS sequence (or none), syncs with 0x7F, learns the command set and the
//! part with GET / GET ID, erases exactly the pages the image covers (or the
//! whole flash), writes 256-byte blocks, reads them back and jumps to the
//! image with GO. Built for `wasm32-wasip2` it is a component of contract
//! `otagw:plugin@0.2.0` (`wit/v0.2.0`) through the plugin SDK ([`Stm32`] is
//! its [`Family`]); built natively it is a library whose protocol code is
//! unit tested against a simulated bootloader.
//!
//! What it is not: the I2C/SPI/CAN/USB-DFU variants of the bootloader, option
//! bytes, read/write protection handling, or an Intel HEX / ELF loader (the
//! image is the raw bytes for `address`).
//!
//! # Layout
//! - [`options`]: the option schema, the typed [`Settings`], DTR/RTS
//!   sequences, page layouts.
//! - [`parts`]: product IDs → flash size and page layout of common parts.
//! - [`protocol`]: AN3155 framing, commands, sync, retries.
//! - [`flash`](mod@flash): `verify`, `flash` and `identify`.
//! - `fuzzing` (hidden, not for wasm): what one input of the `stm32_session`
//!   fuzz target in `fuzz/` does, shared with the test that replays its corpus.
//! - `testing` (tests only): a simulated bootloader on a virtual clock.

pub mod flash;
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod options;
pub mod parts;
pub mod protocol;

#[cfg(test)]
pub mod testing;

use otagw_plugin_sdk::schema::{Options, Problem};
use otagw_plugin_sdk::{
    DeviceInfo, Error, Family, FlashReport, ImageInfo, Info, JobMeta, LinkKind, Parity, Port,
    SerialConfig, Source,
};

pub use options::Settings;

/// What `describe` says of the family.
const DESCRIPTION: &str = "STM32 ROM bootloader over USART (AN3155): DTR/RTS entry, page erase, \
                           write, read-back verify, GO";

/// The STM32 ROM bootloader family.
#[derive(Debug)]
pub struct Stm32;

impl Family for Stm32 {
    type Settings = Settings;

    fn info() -> Info {
        Info::new("stm32", env!("CARGO_PKG_VERSION"), DESCRIPTION)
            .transports([LinkKind::Serial, LinkKind::Tcp])
            .serial(SerialConfig::eight_bits(115_200, Parity::Even))
            .options(options::schema())
    }

    fn settings(options: &Options) -> Result<Settings, Vec<Problem>> {
        Settings::from_options(options)
    }

    fn verify(image: &mut dyn Source, s: &Settings, _: &JobMeta) -> Result<ImageInfo, Error> {
        flash::verify(image, s)
    }

    fn flash(
        port: &mut dyn Port,
        image: &mut dyn Source,
        s: &Settings,
        _: &JobMeta,
    ) -> Result<FlashReport, Error> {
        flash::flash(port, image, s)
    }

    fn identify(port: &mut dyn Port, s: &Settings) -> Result<DeviceInfo, Error> {
        flash::identify(port, s)
    }
}

otagw_plugin_sdk::export_family!(Stm32);
