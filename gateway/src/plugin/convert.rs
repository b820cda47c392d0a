//! Between each contract version's generated types and the host's own: what a
//! plugin describes ([`FamilyInfo`]), the option schema and values (the SDK's
//! [`schema`] types, which `otagw check` and the daemon share with plugins),
//! what `identify` reads ([`DeviceInfo`]) and the plugin's errors
//! ([`FlashError`]). Nothing else in the host touches a generated type of a
//! particular version.

use otagw_plugin_sdk::schema::{self, OptionKind, OptionSpec, OptionValue};

use super::bindings::{Contract, v0_1_0, v0_2_0};
use super::host::serial_from_wit;
use super::{DeviceInfo, FamilyInfo, FlashError, FlashReport, GattDefaults, ImageInfo};
use crate::link::{LinkKind, Parity, SerialConfig, StopBits};

use v0_1_0::otagw::plugin::types as old;
use v0_2_0::otagw::plugin::types as wit;

/// A 0.1 plugin's description: no options schema (its options reach it as
/// the operator wrote them), no GATT.
pub(crate) fn family_from_v0_1(f: old::FamilyInfo) -> FamilyInfo {
    FamilyInfo {
        name: f.name,
        version: f.version,
        contract: Contract::V0_1_0,
        contract_claimed: f.contract,
        description: f.description,
        transports: f
            .transports
            .into_iter()
            .map(|t| match t {
                old::LinkKind::Serial => LinkKind::Serial,
                old::LinkKind::Tcp => LinkKind::Tcp,
                old::LinkKind::Ble => LinkKind::Ble,
            })
            .collect(),
        other_transports: Vec::new(),
        default_serial: f.default_serial.map(|c| SerialConfig {
            baud: c.baud,
            data_bits: c.data_bits,
            parity: match c.parity {
                old::Parity::None => Parity::None,
                old::Parity::Odd => Parity::Odd,
                old::Parity::Even => Parity::Even,
            },
            stop_bits: match c.stop_bits {
                old::StopBits::One => StopBits::One,
                old::StopBits::Two => StopBits::Two,
            },
        }),
        default_gatt: None,
        options: None,
    }
}

pub(crate) fn family_from_v0_2(f: wit::FamilyInfo) -> FamilyInfo {
    let mut transports = Vec::new();
    let mut other_transports = Vec::new();
    for t in f.transports {
        match t {
            wit::LinkKind::Serial => transports.push(LinkKind::Serial),
            wit::LinkKind::Tcp => transports.push(LinkKind::Tcp),
            wit::LinkKind::Ble => transports.push(LinkKind::Ble),
            wit::LinkKind::Other(name) => other_transports.push(name),
        }
    }
    FamilyInfo {
        name: f.name,
        version: f.version,
        contract: Contract::V0_2_0,
        contract_claimed: f.contract,
        description: f.description,
        transports,
        other_transports,
        default_serial: f.default_serial.map(serial_from_wit),
        default_gatt: f.default_gatt.map(|g| GattDefaults {
            service: g.service,
            write: g.write,
            write_with_response: matches!(g.write_mode, wit::GattWriteMode::WithResponse),
            notify: g.notify,
        }),
        options: Some(f.options.into_iter().map(spec_from_wit).collect()),
    }
}

fn spec_from_wit(s: wit::OptionSpec) -> OptionSpec {
    OptionSpec {
        name: s.name,
        kind: match s.kind {
            wit::OptionKind::Text(r) => OptionKind::Text {
                max_length: r.max_length,
                syntax: r.syntax,
            },
            wit::OptionKind::Boolean => OptionKind::Boolean,
            wit::OptionKind::Integer(r) => OptionKind::Integer {
                min: r.min,
                max: r.max,
            },
            wit::OptionKind::Bytes(r) => OptionKind::Bytes {
                encoding: match r.encoding {
                    wit::BytesEncoding::Escaped => schema::BytesEncoding::Escaped,
                    wit::BytesEncoding::Hex => schema::BytesEncoding::Hex,
                },
                max_length: r.max_length,
            },
            wit::OptionKind::Choice(values) => OptionKind::Choice(
                values
                    .into_iter()
                    .map(|c| schema::ChoiceValue {
                        value: c.value,
                        aliases: c.aliases,
                        doc: c.doc,
                    })
                    .collect(),
            ),
            wit::OptionKind::Duration(r) => OptionKind::Duration {
                min_ms: r.min_ms,
                max_ms: r.max_ms,
            },
            wit::OptionKind::Size(r) => OptionKind::Size {
                min: r.min,
                max: r.max,
            },
        },
        default: s.default.map(value_from_wit),
        required: s.required,
        secret: s.secret,
        doc: s.doc,
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

pub(crate) fn value_to_wit(v: OptionValue) -> wit::OptionValue {
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

pub(crate) fn options_to_wit(options: schema::Options) -> wit::Options {
    options
        .into_vec()
        .into_iter()
        .map(|(k, v)| (k, value_to_wit(v)))
        .collect()
}

pub(crate) fn device_from_v0_1(d: old::DeviceInfo) -> DeviceInfo {
    DeviceInfo {
        version: d.version,
        model: d.model,
        hardware_id: None,
        serial_number: None,
        attributes: Vec::new(),
    }
}

pub(crate) fn device_from_v0_2(d: wit::DeviceInfo) -> DeviceInfo {
    DeviceInfo {
        version: d.version,
        model: d.model,
        hardware_id: d.hardware_id,
        serial_number: d.serial_number,
        attributes: d.attributes,
    }
}

impl From<old::FlashError> for FlashError {
    fn from(e: old::FlashError) -> Self {
        match e {
            old::FlashError::Verify(s) => FlashError::Verify(s),
            old::FlashError::Transfer(s) => FlashError::Transfer(s),
            old::FlashError::Device(s) => FlashError::Device(s),
            old::FlashError::Timeout(s) => FlashError::Timeout(s),
            old::FlashError::Unsupported(s) => FlashError::Unsupported(s),
            old::FlashError::Other(s) => FlashError::Other(s),
        }
    }
}

impl From<wit::FlashError> for FlashError {
    fn from(e: wit::FlashError) -> Self {
        match e {
            wit::FlashError::Verify(s) => FlashError::Verify(s),
            wit::FlashError::Transfer(s) => FlashError::Transfer(s),
            wit::FlashError::Device(s) => FlashError::Device(s),
            wit::FlashError::Timeout(s) => FlashError::Timeout(s),
            wit::FlashError::Unsupported(s) => FlashError::Unsupported(s),
            wit::FlashError::Options(s) => FlashError::Options(s),
            wit::FlashError::Other(s) => FlashError::Other(s),
        }
    }
}

/// `image-info` and `flash-report` have the same fields in every version.
macro_rules! same_record {
    ($host:ident { $($field:ident),* } from $version:ident) => {
        impl From<$version::$host> for $host {
            fn from(r: $version::$host) -> Self {
                $host { $($field: r.$field),* }
            }
        }
    };
}

same_record!(ImageInfo { version, payload_size, summary } from old);
same_record!(ImageInfo { version, payload_size, summary } from wit);
same_record!(FlashReport { bytes_sent, retries, summary } from old);
same_record!(FlashReport { bytes_sent, retries, summary } from wit);
