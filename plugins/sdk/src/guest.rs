//! The component side (wasm32 only): the bindings of `wit/v0.2.0`, generated
//! once for every family, the exported `plugin` interface implemented for
//! any [`Family`] ([`Plugin`]), and the adapters between the host's types
//! and the SDK's: the `link` and `image` resources as [`Port`] and
//! [`Source`], options and values, link faults and flash errors.
//!
//! What it is not: public API. Families use [`crate::export_family!`], which
//! names [`Plugin`] and the bindings' export macro.

use std::marker::PhantomData;

use crate::family::{DeviceInfo, Family, FlashReport, ImageInfo, Info, JobMeta};
use crate::port::{
    GattDefaults, GattDelivery, GattValue, GattWriteMode, Level, LinkFault, LinkFeature, LinkKind,
    Parity, Phase, Port, SerialConfig, Source, StopBits,
};
use crate::schema::{self, BytesEncoding, OptionKind, OptionSpec, OptionValue, Options, Problem};
use crate::{CONTRACT, Error};

/// The generated bindings of the `device-family` world (unsafe FFI inside).
#[allow(unsafe_code)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/v0.2.0",
        world: "device-family",
        // Exported from the family's crate by `export_family!`.
        pub_export_macro: true,
        default_bindings_module: "otagw_plugin_sdk::guest::bindings",
    });
}

use bindings::exports::otagw::plugin::plugin::Guest;
use bindings::otagw::plugin::host::{self, Image, Link};
use bindings::otagw::plugin::types as wit;

/// The exported `plugin` interface of the family `F`.
pub struct Plugin<F>(PhantomData<F>);

impl<F: Family> Guest for Plugin<F> {
    fn describe() -> wit::FamilyInfo {
        family_info(F::info())
    }

    fn check_options(options: wit::Options) -> Result<(), Vec<wit::OptionProblem>> {
        F::settings(&options_from_wit(options))
            .map(drop)
            .map_err(|problems| problems.into_iter().map(problem_to_wit).collect())
    }

    fn verify(image: &Image, meta: wit::JobMeta) -> Result<wit::ImageInfo, wit::FlashError> {
        let name = F::info().name;
        let meta = job_meta(meta);
        let settings = settings::<F>(&meta.options)?;
        let found = F::verify(&mut HostImage(image), &settings, &meta).map_err(error_to_wit)?;
        for warning in &found.warnings {
            host::log(wit::LogLevel::Warn, &format!("{name}: {warning}"));
        }
        Ok(image_info(found))
    }

    fn flash(
        link: &Link,
        image: &Image,
        meta: wit::JobMeta,
    ) -> Result<wit::FlashReport, wit::FlashError> {
        let meta = job_meta(meta);
        let settings = settings::<F>(&meta.options)?;
        let mut port = HostPort::new(link, F::info().name);
        let report =
            F::flash(&mut port, &mut HostImage(image), &settings, &meta).map_err(error_to_wit)?;
        Ok(flash_report(report))
    }

    fn identify(link: &Link, options: wit::Options) -> Result<wit::DeviceInfo, wit::FlashError> {
        let settings = settings::<F>(&options_from_wit(options))?;
        let mut port = HostPort::new(link, F::info().name);
        F::identify(&mut port, &settings)
            .map(device_info)
            .map_err(error_to_wit)
    }
}

/// The family's settings; their problems as one `options` error.
fn settings<F: Family>(options: &Options) -> Result<F::Settings, wit::FlashError> {
    F::settings(options).map_err(|problems| error_to_wit(Error::options(&problems)))
}

// ---------------------------------------------------------------------------
// The host's link and image.

/// The host's `link` resource (and its clock, progress and log) as a [`Port`].
struct HostPort<'a> {
    link: &'a Link,
    /// The family's name, which prefixes its log lines.
    name: String,
}

impl<'a> HostPort<'a> {
    fn new(link: &'a Link, name: String) -> HostPort<'a> {
        HostPort { link, name }
    }
}

impl Port for HostPort<'_> {
    fn write(&mut self, data: &[u8]) -> Result<(), LinkFault> {
        self.link.write(data).map_err(fault)
    }

    fn read(&mut self, max: u32, timeout_ms: u32) -> Result<Vec<u8>, LinkFault> {
        self.link.read(max, timeout_ms).map_err(fault)
    }

    fn now_ms(&mut self) -> u64 {
        host::now_ms()
    }

    fn sleep(&mut self, ms: u32) {
        host::sleep(ms)
    }

    fn drain(&mut self) -> Result<u32, LinkFault> {
        self.link.drain().map_err(fault)
    }

    fn configure(&mut self, config: SerialConfig) -> Result<(), LinkFault> {
        self.link.configure(serial_config(config)).map_err(fault)
    }

    fn set_lines(&mut self, dtr: bool, rts: bool) -> Result<(), LinkFault> {
        self.link.set_lines(dtr, rts).map_err(fault)
    }

    fn mtu(&mut self) -> u32 {
        self.link.mtu()
    }

    fn kind(&mut self) -> LinkKind {
        match self.link.kind() {
            wit::LinkKind::Serial => LinkKind::Serial,
            wit::LinkKind::Tcp => LinkKind::Tcp,
            wit::LinkKind::Ble => LinkKind::Ble,
            wit::LinkKind::Other(name) => LinkKind::Other(name),
        }
    }

    fn supports(&mut self, feature: LinkFeature) -> bool {
        self.link.supports(match feature {
            LinkFeature::Configure => wit::LinkFeature::Configure,
            LinkFeature::ModemLines => wit::LinkFeature::ModemLines,
            LinkFeature::Reopen => wit::LinkFeature::Reopen,
            LinkFeature::Gatt => wit::LinkFeature::Gatt,
        })
    }

    fn reopen(&mut self, timeout_ms: u32) -> Result<(), LinkFault> {
        self.link.reopen(timeout_ms).map_err(fault)
    }

    fn gatt_write(
        &mut self,
        characteristic: &str,
        data: &[u8],
        mode: GattWriteMode,
    ) -> Result<(), LinkFault> {
        self.link
            .gatt_write(characteristic, data, write_mode(mode))
            .map_err(fault)
    }

    fn gatt_read(&mut self, characteristic: &str) -> Result<Vec<u8>, LinkFault> {
        self.link.gatt_read(characteristic).map_err(fault)
    }

    fn gatt_subscribe(
        &mut self,
        characteristic: &str,
        delivery: GattDelivery,
    ) -> Result<(), LinkFault> {
        let delivery = match delivery {
            GattDelivery::Notification => wit::GattDelivery::Notification,
            GattDelivery::Indication => wit::GattDelivery::Indication,
        };
        self.link
            .gatt_subscribe(characteristic, delivery)
            .map_err(fault)
    }

    fn gatt_unsubscribe(&mut self, characteristic: &str) -> Result<(), LinkFault> {
        self.link.gatt_unsubscribe(characteristic).map_err(fault)
    }

    fn gatt_receive(&mut self, timeout_ms: u32) -> Result<Option<GattValue>, LinkFault> {
        let value = self.link.gatt_receive(timeout_ms).map_err(fault)?;
        Ok(value.map(|v| GattValue {
            characteristic: v.characteristic,
            data: v.data,
        }))
    }

    fn progress(&mut self, done: u64, total: u64, phase: Phase) {
        let phase = match phase {
            Phase::Prepare => wit::Phase::Prepare,
            Phase::Erase => wit::Phase::Erase,
            Phase::Transfer => wit::Phase::Transfer,
            Phase::Verify => wit::Phase::Verify,
            Phase::Finish => wit::Phase::Finish,
        };
        host::progress(done, total, phase)
    }

    fn log(&mut self, level: Level, message: &str) {
        let level = match level {
            Level::Trace => wit::LogLevel::Trace,
            Level::Debug => wit::LogLevel::Debug,
            Level::Info => wit::LogLevel::Info,
            Level::Warn => wit::LogLevel::Warn,
            Level::Error => wit::LogLevel::Error,
        };
        host::log(level, &format!("{}: {message}", self.name))
    }
}

/// The host's `image` resource as a [`Source`].
struct HostImage<'a>(&'a Image);

impl Source for HostImage<'_> {
    fn size(&mut self) -> u64 {
        self.0.size()
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.0.read(offset, len)
    }
}

fn fault(e: wit::LinkError) -> LinkFault {
    match e {
        wit::LinkError::Unsupported(m) => LinkFault::Unsupported(m),
        wit::LinkError::Closed(m) => LinkFault::Closed(m),
        wit::LinkError::Timeout(m) => LinkFault::Timeout(m),
        wit::LinkError::NotFound(m) => LinkFault::NotFound(m),
        wit::LinkError::Invalid(m) => LinkFault::Invalid(m),
        wit::LinkError::Io(m) => LinkFault::Io(m),
    }
}

// ---------------------------------------------------------------------------
// What the family answers, as the contract's types.

fn family_info(info: Info) -> wit::FamilyInfo {
    wit::FamilyInfo {
        name: info.name,
        version: info.version,
        contract: CONTRACT.to_string(),
        description: info.description,
        transports: info
            .transports
            .into_iter()
            .map(|k| match k {
                LinkKind::Serial => wit::LinkKind::Serial,
                LinkKind::Tcp => wit::LinkKind::Tcp,
                LinkKind::Ble => wit::LinkKind::Ble,
                LinkKind::Other(name) => wit::LinkKind::Other(name),
            })
            .collect(),
        default_serial: info.default_serial.map(serial_config),
        default_gatt: info.default_gatt.map(gatt_defaults),
        options: info.options.into_iter().map(spec_to_wit).collect(),
    }
}

fn serial_config(c: SerialConfig) -> wit::SerialConfig {
    wit::SerialConfig {
        baud: c.baud,
        data_bits: c.data_bits,
        parity: match c.parity {
            Parity::None => wit::Parity::None,
            Parity::Odd => wit::Parity::Odd,
            Parity::Even => wit::Parity::Even,
        },
        stop_bits: match c.stop_bits {
            StopBits::One => wit::StopBits::One,
            StopBits::Two => wit::StopBits::Two,
        },
    }
}

fn write_mode(mode: GattWriteMode) -> wit::GattWriteMode {
    match mode {
        GattWriteMode::WithResponse => wit::GattWriteMode::WithResponse,
        GattWriteMode::WithoutResponse => wit::GattWriteMode::WithoutResponse,
    }
}

fn gatt_defaults(g: GattDefaults) -> wit::GattDefaults {
    wit::GattDefaults {
        service: g.service,
        write: g.write,
        write_mode: write_mode(g.write_mode),
        notify: g.notify,
    }
}

fn spec_to_wit(s: OptionSpec) -> wit::OptionSpec {
    wit::OptionSpec {
        name: s.name,
        kind: match s.kind {
            OptionKind::Text { max_length, syntax } => {
                wit::OptionKind::Text(wit::TextRules { max_length, syntax })
            }
            OptionKind::Boolean => wit::OptionKind::Boolean,
            OptionKind::Integer { min, max } => {
                wit::OptionKind::Integer(wit::IntegerRange { min, max })
            }
            OptionKind::Bytes {
                encoding,
                max_length,
            } => wit::OptionKind::Bytes(wit::BytesRules {
                encoding: match encoding {
                    BytesEncoding::Escaped => wit::BytesEncoding::Escaped,
                    BytesEncoding::Hex => wit::BytesEncoding::Hex,
                },
                max_length,
            }),
            OptionKind::Choice(values) => wit::OptionKind::Choice(
                values
                    .into_iter()
                    .map(|c| wit::ChoiceValue {
                        value: c.value,
                        aliases: c.aliases,
                        doc: c.doc,
                    })
                    .collect(),
            ),
            OptionKind::Duration { min_ms, max_ms } => {
                wit::OptionKind::Duration(wit::DurationRange { min_ms, max_ms })
            }
            OptionKind::Size { min, max } => wit::OptionKind::Size(wit::SizeRange { min, max }),
        },
        default: s.default.map(value_to_wit),
        required: s.required,
        secret: s.secret,
        doc: s.doc,
    }
}

fn value_to_wit(v: OptionValue) -> wit::OptionValue {
    match v {
        OptionValue::Text(s) => wit::OptionValue::Text(s),
        OptionValue::Boolean(b) => wit::OptionValue::Boolean(b),
        OptionValue::Integer(n) => wit::OptionValue::Integer(n),
        OptionValue::Bytes(b) => wit::OptionValue::Bytes(b),
        OptionValue::Choice(c) => wit::OptionValue::Choice(c),
        OptionValue::Duration(ms) => wit::OptionValue::Duration(ms),
        OptionValue::Size(n) => wit::OptionValue::Size(n),
    }
}

fn value_from_wit(v: wit::OptionValue) -> OptionValue {
    match v {
        wit::OptionValue::Text(s) => OptionValue::Text(s),
        wit::OptionValue::Boolean(b) => OptionValue::Boolean(b),
        wit::OptionValue::Integer(n) => OptionValue::Integer(n),
        wit::OptionValue::Bytes(b) => OptionValue::Bytes(b),
        wit::OptionValue::Choice(c) => OptionValue::Choice(c),
        wit::OptionValue::Duration(ms) => OptionValue::Duration(ms),
        wit::OptionValue::Size(n) => OptionValue::Size(n),
    }
}

/// The options as the host hands them: checked against the schema already.
fn options_from_wit(options: wit::Options) -> Options {
    schema::Options::new(
        options
            .into_iter()
            .map(|(k, v)| (k, value_from_wit(v)))
            .collect(),
    )
}

fn job_meta(meta: wit::JobMeta) -> JobMeta {
    JobMeta {
        version: meta.version,
        module: meta.module,
        options: options_from_wit(meta.options),
    }
}

fn problem_to_wit(p: Problem) -> wit::OptionProblem {
    wit::OptionProblem {
        name: p.option,
        message: p.message,
    }
}

fn error_to_wit(e: Error) -> wit::FlashError {
    match e {
        Error::Verify(m) => wit::FlashError::Verify(m),
        Error::Transfer(m) => wit::FlashError::Transfer(m),
        Error::Device(m) => wit::FlashError::Device(m),
        Error::Timeout(m) => wit::FlashError::Timeout(m),
        Error::Unsupported(m) => wit::FlashError::Unsupported(m),
        Error::Options(m) => wit::FlashError::Options(m),
        Error::Other(m) => wit::FlashError::Other(m),
    }
}

fn image_info(i: ImageInfo) -> wit::ImageInfo {
    wit::ImageInfo {
        version: i.version,
        payload_size: i.payload_size,
        summary: i.summary,
    }
}

fn flash_report(r: FlashReport) -> wit::FlashReport {
    wit::FlashReport {
        bytes_sent: r.bytes_sent,
        retries: r.retries,
        summary: r.summary,
    }
}

fn device_info(d: DeviceInfo) -> wit::DeviceInfo {
    wit::DeviceInfo {
        version: d.version,
        model: d.model,
        hardware_id: d.hardware_id,
        serial_number: d.serial_number,
        attributes: d.attributes,
    }
}
