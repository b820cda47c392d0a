//! A plugin of contract 0.1 (`wit/v0.1.0`), for the tests: the proof that the
//! gateway keeps running plugins built before contract 0.2. It is the family
//! `xmodem-v01`, which flashes over XMODEM with the xmodem family's protocol
//! code (`otagw-plugin-xmodem` as a library, without its 0.2 export), behind
//! bindings and adapters of its own, as a 0.1 plugin was written: options
//! come as text, unchecked, and go through the xmodem schema here (keys it
//! does not know are ignored, as 0.1 families did).
//!
//! Built by `tests/artifacts` in a cargo run of its own: in a run with the
//! xmodem plugin, cargo would build the xmodem crate once, with its export
//! (the assertion below stops such a build).
// The bindings wit-bindgen generates use unsafe code.
#![allow(unsafe_code)]

wit_bindgen::generate!({ path: "../../../wit/v0.1.0", world: "device-family" });

#[cfg(target_arch = "wasm32")]
const _: () = assert!(
    !otagw_plugin_xmodem::EXPORTS_COMPONENT,
    "otagw-plugin-xmodem was built with `component`: build this plugin in a cargo run of its own"
);

use exports::otagw::plugin::plugin::Guest;
use otagw::plugin::host::{self, Image, Link};
use otagw::plugin::types::{
    DeviceInfo, FamilyInfo, FlashError, FlashReport, ImageInfo, JobMeta, LinkError, LinkKind,
    LogLevel, Options, Parity, Phase, SerialConfig, StopBits,
};
use otagw_plugin_sdk::schema::{self, Options as Checked};
use otagw_plugin_sdk::{Error, Family, Level, LinkFault, Port, Source};
use otagw_plugin_xmodem::{Settings, Xmodem};

/// The family name, which also prefixes log lines.
const NAME: &str = "xmodem-v01";

struct LegacyXmodem;

impl Guest for LegacyXmodem {
    fn describe() -> FamilyInfo {
        FamilyInfo {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            contract: "0.1.0".into(),
            description: "XMODEM through contract 0.1 (tests only)".into(),
            transports: vec![LinkKind::Serial, LinkKind::Tcp],
            default_serial: Some(SerialConfig {
                baud: 115_200,
                data_bits: 8,
                parity: Parity::None,
                stop_bits: StopBits::One,
            }),
        }
    }

    fn verify(image: &Image, meta: JobMeta) -> Result<ImageInfo, FlashError> {
        let (settings, meta) = job(meta)?;
        let found = Xmodem::verify(&mut HostImage(image), &settings, &meta).map_err(to_wit)?;
        for warning in &found.warnings {
            host::log(LogLevel::Warn, &format!("{NAME}: {warning}"));
        }
        Ok(ImageInfo {
            version: found.version,
            payload_size: found.payload_size,
            summary: found.summary,
        })
    }

    fn flash(link: &Link, image: &Image, meta: JobMeta) -> Result<FlashReport, FlashError> {
        let (settings, meta) = job(meta)?;
        let report = Xmodem::flash(&mut HostPort(link), &mut HostImage(image), &settings, &meta)
            .map_err(to_wit)?;
        Ok(FlashReport {
            bytes_sent: report.bytes_sent,
            retries: report.retries,
            summary: report.summary,
        })
    }

    fn identify(link: &Link, options: Options) -> Result<DeviceInfo, FlashError> {
        let (settings, _) = settings(&options)?;
        let found = Xmodem::identify(&mut HostPort(link), &settings).map_err(to_wit)?;
        Ok(DeviceInfo {
            version: found.version,
            model: found.model,
        })
    }
}

export!(LegacyXmodem);

/// The settings from text options: the keys the xmodem schema knows, checked
/// by it (others are logged and ignored).
fn settings(options: &Options) -> Result<(Settings, Checked), FlashError> {
    let specs = Xmodem::info().options;
    let (known, unknown): (Vec<_>, Vec<_>) = options
        .iter()
        .cloned()
        .partition(|(k, _)| schema::find(&specs, k).is_some());
    if !unknown.is_empty() {
        let keys: Vec<String> = unknown.into_iter().map(|(k, _)| k).collect();
        let message = format!(
            "{NAME}: ignoring options it does not know: {}",
            keys.join(", ")
        );
        host::log(LogLevel::Debug, &message);
    }
    let checked = schema::check(&specs, &known).map_err(problems)?;
    let settings = Xmodem::settings(&checked).map_err(problems)?;
    Ok((settings, checked))
}

fn job(meta: JobMeta) -> Result<(Settings, otagw_plugin_sdk::JobMeta), FlashError> {
    let (settings, options) = settings(&meta.options)?;
    let meta = otagw_plugin_sdk::JobMeta {
        version: meta.version,
        module: meta.module,
        options,
    };
    Ok((settings, meta))
}

/// Contract 0.1 has no case for bad options: `other`.
fn problems(problems: Vec<schema::Problem>) -> FlashError {
    to_wit(Error::options(&problems))
}

fn to_wit(e: Error) -> FlashError {
    match e {
        Error::Verify(m) => FlashError::Verify(m),
        Error::Transfer(m) => FlashError::Transfer(m),
        Error::Device(m) => FlashError::Device(m),
        Error::Timeout(m) => FlashError::Timeout(m),
        Error::Unsupported(m) => FlashError::Unsupported(m),
        Error::Options(m) | Error::Other(m) => FlashError::Other(m),
    }
}

fn fault(e: LinkError) -> LinkFault {
    match e {
        LinkError::Unsupported(m) => LinkFault::Unsupported(m),
        LinkError::Closed(m) => LinkFault::Closed(m),
        LinkError::Io(m) => LinkFault::Io(m),
    }
}

/// The 0.1 `link` as the SDK's [`Port`]: what XMODEM uses of it.
struct HostPort<'a>(&'a Link);

impl Port for HostPort<'_> {
    fn write(&mut self, data: &[u8]) -> Result<(), LinkFault> {
        self.0.write(data).map_err(fault)
    }

    fn read(&mut self, max: u32, timeout_ms: u32) -> Result<Vec<u8>, LinkFault> {
        self.0.read(max, timeout_ms).map_err(fault)
    }

    fn now_ms(&mut self) -> u64 {
        host::now_ms()
    }

    fn sleep(&mut self, ms: u32) {
        host::sleep(ms)
    }

    fn drain(&mut self) -> Result<u32, LinkFault> {
        self.0.drain().map_err(fault)
    }

    fn progress(&mut self, done: u64, total: u64, _: otagw_plugin_sdk::Phase) {
        host::progress(done, total, Phase::Transfer)
    }

    fn log(&mut self, level: Level, message: &str) {
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        host::log(level, &format!("{NAME}: {message}"))
    }
}

/// The 0.1 `image` as the SDK's [`Source`].
struct HostImage<'a>(&'a Image);

impl Source for HostImage<'_> {
    fn size(&mut self) -> u64 {
        self.0.size()
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.0.read(offset, len)
    }
}
