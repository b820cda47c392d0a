//! A device family for the tests of contract 0.2's link calls, built with the
//! SDK: a miniature of Nordic Secure DFU over two GATT characteristics, and a
//! reset that makes the device go away and come back (`link.reopen`).
//!
//! The protocol ("probe DFU"), as the fake peripheral of `tests/e2e/gatt.rs`
//! implements it:
//! - control point [`CONTROL`]: written with response; answers by indication
//!   `[0x60, opcode, 0x01]` (success), plus for `CHECK` the received byte
//!   count and byte sum, both u32 little-endian;
//! - opcodes: `0x01 size:u32` starts an object, `0x03` asks for the check,
//!   `0x04` executes (the device resets and disconnects);
//! - packet [`PACKET`]: image bytes, written without response in pieces of at
//!   most `link.mtu()`;
//! - firmware revision `2a26`: read for `identify`.
//!
//! Option `uuid_style` (`lower`, `upper`) names the control point in lower
//! or upper case, so the tests see values come back tagged exactly as
//! subscribed. Option `reopen_ms` (default 0, off): after execute, reopen the
//! link within that time and read the revision again.
//!
//! Option `mode = "reset"` speaks lines on a byte stream instead: it writes
//! `reset\n`, reopens the link (the device drops its port and brings it
//! back), writes `version\n` and reports the line that comes back.
//!
//! What it is not: DFU. No init packet, no signatures, no objects.

use otagw_plugin_sdk::schema::{OptionSpec, Options, Problem};
use otagw_plugin_sdk::{
    DeviceInfo, Error, Family, FlashReport, GattDefaults, GattDelivery, GattWriteMode, Info,
    JobMeta, LinkFault, LinkFeature, LinkKind, Phase, Port, Source,
};

/// The control point, 128-bit form.
pub const CONTROL: &str = "8ec90001-f315-4f60-9fb8-838830daea50";
/// The same in upper case: the same characteristic to the host.
pub const CONTROL_UPPER: &str = "8EC90001-F315-4F60-9FB8-838830DAEA50";
/// The packet characteristic.
pub const PACKET: &str = "8ec90002-f315-4f60-9fb8-838830daea50";
/// The Device Information service's Firmware Revision String.
pub const REVISION: &str = "2a26";

pub struct Probe;

pub struct Settings {
    reset_mode: bool,
    control: &'static str,
    reopen_ms: u64,
}

fn link(e: LinkFault) -> Error {
    Error::Transfer(e.to_string())
}

/// Wait for the control point's answer to `opcode`.
fn answer(port: &mut dyn Port, control: &str, opcode: u8) -> Result<Vec<u8>, Error> {
    let value = port
        .gatt_receive(5000)
        .map_err(link)?
        .ok_or_else(|| Error::Timeout(format!("no indication for opcode {opcode:#04x}")))?;
    if value.characteristic != control {
        return Err(Error::Device(format!(
            "indication tagged {:?}, subscribed as {control:?}",
            value.characteristic
        )));
    }
    match value.data.as_slice() {
        [0x60, op, 0x01, rest @ ..] if *op == opcode => Ok(rest.to_vec()),
        other => Err(Error::Device(format!(
            "control point answered {other:02x?}"
        ))),
    }
}

fn revision(port: &mut dyn Port) -> Result<String, Error> {
    let raw = port.gatt_read(REVISION).map_err(link)?;
    String::from_utf8(raw).map_err(|_| Error::Device("the revision is not UTF-8".into()))
}

impl Family for Probe {
    type Settings = Settings;

    fn info() -> Info {
        Info {
            name: "gatt-probe".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "test family: GATT and reopen through contract 0.2".into(),
            transports: vec![LinkKind::Ble, LinkKind::Serial],
            default_serial: None,
            // Required of a family that lists BLE: what plain reads and
            // writes would use (this probe uses only the gatt-* calls).
            default_gatt: Some(GattDefaults {
                service: "fe59".into(),
                write: PACKET.into(),
                write_mode: GattWriteMode::WithoutResponse,
                notify: CONTROL.into(),
            }),
            options: vec![
                OptionSpec::choice(
                    "mode",
                    &[("dfu", &[], "GATT"), ("reset", &[], "lines and reopen")],
                    "what flash does",
                )
                .default_choice("dfu"),
                OptionSpec::choice(
                    "uuid_style",
                    &[("lower", &[], "lower case"), ("upper", &[], "upper case")],
                    "how the control point is named",
                )
                .default_choice("lower"),
                OptionSpec::duration("reopen_ms", 0, 60_000, "reopen after execute (0: no)")
                    .default_duration_ms(0),
            ],
        }
    }

    fn settings(options: &Options) -> Result<Settings, Vec<Problem>> {
        Ok(Settings {
            reset_mode: options.choice("mode") == Some("reset"),
            control: match options.choice("uuid_style") {
                Some("upper") => CONTROL_UPPER,
                _ => CONTROL,
            },
            reopen_ms: options.duration_ms("reopen_ms").unwrap_or(0),
        })
    }

    fn flash(
        port: &mut dyn Port,
        image: &mut dyn Source,
        s: &Settings,
        _meta: &JobMeta,
    ) -> Result<FlashReport, Error> {
        if s.reset_mode {
            return reset(port, s.reopen_ms);
        }
        if !port.supports(LinkFeature::Gatt) {
            // Try anyway: the tests check the host's own refusal.
            port.gatt_subscribe(s.control, GattDelivery::Indication)
                .map_err(|e| Error::Unsupported(e.to_string()))?;
        }
        port.gatt_subscribe(s.control, GattDelivery::Indication)
            .map_err(link)?;
        let size = image.size();
        let mut start = vec![0x01];
        start.extend_from_slice(&(size as u32).to_le_bytes());
        port.gatt_write(s.control, &start, GattWriteMode::WithResponse)
            .map_err(link)?;
        answer(port, s.control, 0x01)?;
        let mtu = port.mtu().max(1);
        let mut sent = 0u64;
        let mut sum = 0u32;
        while sent < size {
            let piece = image.read_exact(sent, (size - sent).min(u64::from(mtu)) as usize)?;
            port.gatt_write(PACKET, &piece, GattWriteMode::WithoutResponse)
                .map_err(link)?;
            sum = piece.iter().fold(sum, |a, b| a.wrapping_add(u32::from(*b)));
            sent += piece.len() as u64;
            port.progress(sent, size, Phase::Transfer);
        }
        port.gatt_write(s.control, &[0x03], GattWriteMode::WithResponse)
            .map_err(link)?;
        let check = answer(port, s.control, 0x03)?;
        let expected = [(sent as u32).to_le_bytes(), sum.to_le_bytes()].concat();
        if check != expected {
            return Err(Error::Verify(format!(
                "the device counted {check:02x?}, sent {expected:02x?}"
            )));
        }
        port.gatt_write(s.control, &[0x04], GattWriteMode::WithResponse)
            .map_err(link)?;
        let mut summary = format!("{sent} bytes in pieces of {mtu}");
        if s.reopen_ms > 0 {
            // The device resets into the new image: it goes away and comes back.
            port.reopen(s.reopen_ms.min(u64::from(u32::MAX)) as u32)
                .map_err(|e| Error::Timeout(e.to_string()))?;
            summary.push_str(&format!(", back as {}", revision(port)?));
        }
        Ok(FlashReport {
            bytes_sent: sent,
            retries: 0,
            summary,
        })
    }

    fn identify(port: &mut dyn Port, _s: &Settings) -> Result<DeviceInfo, Error> {
        Ok(DeviceInfo {
            hardware_id: Some("probe-1".into()),
            ..DeviceInfo::version(revision(port)?)
        })
    }
}

/// Ask for the version; the line that comes back (within 5 s).
fn version_line(port: &mut dyn Port) -> Result<String, LinkFault> {
    port.write(b"version\n")?;
    let mut line = Vec::new();
    let deadline = port.now_ms() + 5000;
    while !line.ends_with(b"\n") && port.now_ms() < deadline {
        line.extend(port.read(64, 500)?);
    }
    Ok(String::from_utf8_lossy(&line).trim().to_string())
}

/// `reset` mode: make the device go away, wait for it to come back, ask it.
fn reset(port: &mut dyn Port, reopen_ms: u64) -> Result<FlashReport, Error> {
    if !port.supports(LinkFeature::Reopen) {
        return Err(Error::Unsupported("this link cannot be reopened".into()));
    }
    port.write(b"reset\n").map_err(link)?;
    port.reopen(reopen_ms.clamp(1, u64::from(u32::MAX)) as u32)
        .map_err(|e| Error::Timeout(e.to_string()))?;
    // The port may have opened again before the device had gone: then the
    // next call answers `closed`, and reopening again is what the contract
    // says to do.
    let mut attempts = 0;
    let version = loop {
        match version_line(port) {
            Err(LinkFault::Closed(why)) if attempts < 3 => {
                attempts += 1;
                port.log(
                    otagw_plugin_sdk::Level::Info,
                    &format!("reopening again: {why}"),
                );
                port.reopen(reopen_ms.clamp(1, u64::from(u32::MAX)) as u32)
                    .map_err(|e| Error::Timeout(e.to_string()))?;
            }
            other => break other.map_err(link)?,
        }
    };
    Ok(FlashReport {
        bytes_sent: 0,
        retries: 0,
        summary: format!("back as {version}"),
    })
}

otagw_plugin_sdk::export_family!(Probe);
