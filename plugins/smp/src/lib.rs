//! # otagw-plugin-smp
//!
//! The otagw device-family plugin for MCUboot devices managed with mcumgr's
//! **SMP** (Simple Management Protocol): Zephyr, nRF Connect SDK, NuttX and
//! Mynewt leaves. It checks MCUboot images (header, TLVs, SHA-256, ECDSA P-256
//! and Ed25519 signatures) before touching a device, uploads them with resume,
//! marks them for test, resets, checks that the new image runs and confirms
//! it. It talks SMP over serial links (and TCP serial servers) in the serial
//! framing, and over Bluetooth LE through the SMP characteristic. Built for
//! `wasm32-wasip2` it is a component of contract `otagw:plugin@0.2.0`
//! (`wit/v0.2.0`) through the plugin SDK ([`Smp`] is its [`Family`]); built
//! natively it is a library whose protocol code is unit tested against a
//! simulated SMP device.
//!
//! What it is not: an SMP server, a filesystem/shell/stat client, or a
//! checker of encrypted, RSA or P-384 images.
//!
//! # Layout
//! - [`options`]: the option schema and the typed [`Settings`].
//! - [`smp`]: SMP header, packets, CBOR bodies, return codes (transport-free).
//! - [`serial`]: the serial framing (markers, base64, length, CRC16, 127-byte frames).
//! - [`transport`]: serial framing or raw MTU-sized packets (BLE), per link kind.
//! - [`client`]: requests, answers, timeouts, retries, the commands used.
//! - [`mcuboot`]: image format and `verify`.
//! - [`keys`]: the `public_key` option and signature checks.
//! - [`flash`](mod@flash): upload, resume, test, reset, confirm.
//! - [`identify`](mod@identify): running version, model, slots.
//! - `fuzzing` (hidden, not for wasm): what one input of each SMP fuzz
//!   target in `fuzz/` does, shared with the tests that replay its corpus.
//! - `testing` (tests only): an MCUboot image builder and a simulated device.

pub mod client;
pub mod flash;
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod identify;
pub mod keys;
pub mod mcuboot;
pub mod options;
pub mod serial;
pub mod smp;
pub mod transport;

#[cfg(test)]
pub mod testing;

use otagw_plugin_sdk::schema::{Options, Problem};
use otagw_plugin_sdk::{
    DeviceInfo, Error, Family, FlashReport, GattDefaults, GattWriteMode, ImageInfo, Info, JobMeta,
    LinkKind, Parity, Port, SerialConfig, Source,
};

pub use keys::PublicKey;
pub use options::Settings;

/// The SMP service of mcumgr over Bluetooth LE.
pub const SMP_SERVICE: &str = "8d53dc1d-1db7-4cd3-868b-8a527460aa84";
/// Its one characteristic: requests are written to it (without response),
/// answers come as its notifications.
pub const SMP_CHARACTERISTIC: &str = "da2e7828-fbce-4e01-ae9e-261174997c48";

/// What `describe` says of the family.
const DESCRIPTION: &str = "mcumgr SMP client for MCUboot devices (Zephyr, nRF Connect SDK, NuttX, \
                           Mynewt): verify, upload with resume, test, confirm";

/// The SMP family.
#[derive(Debug)]
pub struct Smp;

impl Family for Smp {
    type Settings = Settings;

    fn info() -> Info {
        Info::new("smp", env!("CARGO_PKG_VERSION"), DESCRIPTION)
            .transports([LinkKind::Serial, LinkKind::Tcp, LinkKind::Ble])
            .serial(SerialConfig::eight_bits(115_200, Parity::None))
            .gatt(GattDefaults {
                service: SMP_SERVICE.to_string(),
                write: SMP_CHARACTERISTIC.to_string(),
                write_mode: GattWriteMode::WithoutResponse,
                notify: SMP_CHARACTERISTIC.to_string(),
            })
            .options(options::schema())
    }

    fn settings(options: &Options) -> Result<Settings, Vec<Problem>> {
        Settings::from_options(options)
    }

    fn verify(image: &mut dyn Source, s: &Settings, meta: &JobMeta) -> Result<ImageInfo, Error> {
        let v = mcuboot::verify(image, s.public_key.as_ref())?;
        let mut warnings = Vec::new();
        if let Some(announced) = &meta.version
            && mcuboot::Version::parse(announced) != Some(v.header.version)
        {
            warnings.push(format!(
                "the notice announces version {announced}, the image header says {}",
                v.header.version
            ));
        }
        Ok(ImageInfo {
            version: Some(v.header.version.to_string()),
            payload_size: v.size,
            summary: v.summary,
            warnings,
        })
    }

    fn flash(
        port: &mut dyn Port,
        image: &mut dyn Source,
        s: &Settings,
        _: &JobMeta,
    ) -> Result<FlashReport, Error> {
        let report = flash::flash(port, image, s)?;
        Ok(FlashReport {
            bytes_sent: report.bytes_sent,
            retries: report.retries,
            summary: report.summary,
        })
    }

    fn identify(port: &mut dyn Port, s: &Settings) -> Result<DeviceInfo, Error> {
        identify::identify(port, s)
    }
}

otagw_plugin_sdk::export_family!(Smp);
