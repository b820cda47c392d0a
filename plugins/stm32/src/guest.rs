//! The component glue: WIT bindings (wit-bindgen, `device-family` world of
//! `wit/v0.1.0`), the exported `plugin` interface, and adapters from the host's
//! `link` / `image` resources and functions to [`Port`] / [`Source`].
//!
//! What it is not: protocol logic. Everything here converts types and calls
//! into [`crate::flash`].
#![allow(unsafe_code)] // the generated bindings are unsafe FFI

wit_bindgen::generate!({
    path: "../../wit/v0.1.0",
    world: "device-family",
});

use exports::otagw::plugin::plugin::Guest;
use otagw::plugin::host::{self, Image, Link};
use otagw::plugin::types::{
    DeviceInfo, FamilyInfo, FlashError, FlashReport, ImageInfo, JobMeta, LinkError, LinkKind,
    LogLevel, Options, Parity, Phase, SerialConfig, StopBits,
};

use crate::port::{self, Level, Port, Source};
use crate::{Error, LinkFault, Settings};

/// The contract version this plugin is built against.
const CONTRACT: &str = "0.1.0";

struct Stm32Plugin;

impl Guest for Stm32Plugin {
    fn describe() -> FamilyInfo {
        FamilyInfo {
            name: "stm32".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            contract: CONTRACT.to_string(),
            description: "STM32 ROM bootloader over USART (AN3155): DTR/RTS entry, page erase, \
                          write, read-back verify, GO"
                .to_string(),
            transports: vec![LinkKind::Serial, LinkKind::Tcp],
            default_serial: Some(SerialConfig {
                baud: 115_200,
                data_bits: 8,
                parity: Parity::Even,
                stop_bits: StopBits::One,
            }),
        }
    }

    fn verify(image: &Image, meta: JobMeta) -> Result<ImageInfo, FlashError> {
        let settings = settings(&meta.options)?;
        let mut source = HostImage { image };
        let v = crate::flash::verify(&mut source, &settings).map_err(to_wit)?;
        Ok(ImageInfo {
            version: None,
            payload_size: v.payload_size,
            summary: v.summary,
        })
    }

    fn flash(link: &Link, image: &Image, meta: JobMeta) -> Result<FlashReport, FlashError> {
        let settings = settings(&meta.options)?;
        let mut port = HostPort { link };
        let mut source = HostImage { image };
        let report = crate::flash::flash(&mut port, &mut source, &settings).map_err(to_wit)?;
        Ok(FlashReport {
            bytes_sent: report.bytes_sent,
            retries: report.retries,
            summary: report.summary,
        })
    }

    fn identify(link: &Link, options: Options) -> Result<DeviceInfo, FlashError> {
        let settings = settings(&options)?;
        let mut port = HostPort { link };
        let (version, model) = crate::flash::identify(&mut port, &settings).map_err(to_wit)?;
        Ok(DeviceInfo { version, model })
    }
}

export!(Stm32Plugin);

/// Parse the options; log the keys this family ignores.
fn settings(options: &[(String, String)]) -> Result<Settings, FlashError> {
    let (settings, unknown) = Settings::parse(options).map_err(to_wit)?;
    if !unknown.is_empty() {
        host::log(
            LogLevel::Debug,
            &format!(
                "stm32: ignoring options it does not know: {}",
                unknown.join(", ")
            ),
        );
    }
    Ok(settings)
}

fn to_wit(e: Error) -> FlashError {
    match e {
        Error::Timeout(m) => FlashError::Timeout(m),
        Error::Transfer(m) => FlashError::Transfer(m),
        Error::Device(m) => FlashError::Device(m),
        Error::Verify(m) => FlashError::Verify(m),
        Error::Unsupported(m) => FlashError::Unsupported(m),
        Error::Options(m) => FlashError::Other(m),
    }
}

fn from_wit(e: LinkError) -> LinkFault {
    match e {
        LinkError::Unsupported(m) => LinkFault::Unsupported(m),
        LinkError::Closed(m) => LinkFault::Closed(m),
        LinkError::Io(m) => LinkFault::Io(m),
    }
}

struct HostPort<'a> {
    link: &'a Link,
}

impl Port for HostPort<'_> {
    fn write(&mut self, data: &[u8]) -> Result<(), LinkFault> {
        self.link.write(data).map_err(from_wit)
    }

    fn read(&mut self, max: u32, timeout_ms: u32) -> Result<Vec<u8>, LinkFault> {
        self.link.read(max, timeout_ms).map_err(from_wit)
    }

    fn drain(&mut self) -> Result<u32, LinkFault> {
        self.link.drain().map_err(from_wit)
    }

    fn configure(&mut self, baud: u32, parity: port::Parity) -> Result<(), LinkFault> {
        let parity = match parity {
            port::Parity::Even => Parity::Even,
            port::Parity::None => Parity::None,
        };
        self.link
            .configure(SerialConfig {
                baud,
                data_bits: 8,
                parity,
                stop_bits: StopBits::One,
            })
            .map_err(from_wit)
    }

    fn set_lines(&mut self, dtr: bool, rts: bool) -> Result<(), LinkFault> {
        self.link.set_lines(dtr, rts).map_err(from_wit)
    }

    fn kind(&mut self) -> port::LinkKind {
        match self.link.kind() {
            LinkKind::Serial => port::LinkKind::Serial,
            LinkKind::Tcp => port::LinkKind::Tcp,
            LinkKind::Ble => port::LinkKind::Ble,
        }
    }

    fn now_ms(&mut self) -> u64 {
        host::now_ms()
    }

    fn sleep(&mut self, ms: u32) {
        host::sleep(ms)
    }

    fn progress(&mut self, done: u64, total: u64, phase: port::Phase) {
        let phase = match phase {
            port::Phase::Prepare => Phase::Prepare,
            port::Phase::Erase => Phase::Erase,
            port::Phase::Transfer => Phase::Transfer,
            port::Phase::Verify => Phase::Verify,
            port::Phase::Finish => Phase::Finish,
        };
        host::progress(done, total, phase)
    }

    fn log(&mut self, level: Level, message: &str) {
        let level = match level {
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
        };
        host::log(level, &format!("stm32: {message}"))
    }
}

struct HostImage<'a> {
    image: &'a Image,
}

impl Source for HostImage<'_> {
    fn size(&mut self) -> u64 {
        self.image.size()
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.image.read(offset, len)
    }
}
