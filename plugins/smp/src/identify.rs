//! `identify`: what slot 0 runs (image state list: version, hash, whether it
//! is confirmed, and the version waiting in slot 1) and, when the device
//! tells, its model (OS info with `model_format`, one try, optional).
//!
//! The model with the default `model_format = i` is the hardware platform
//! (Zephyr's board, e.g. `nrf52840dk/nrf52840`), which is also the
//! `hardware_id`. Attributes: `image_hash` (hex of slot 0's image hash),
//! `confirmed` (`true`/`false`), `secondary_version` (when slot 1 holds an
//! image with a version).

use otagw_plugin_sdk::{DeviceInfo, Error, Level, Port};

use crate::Settings;
use crate::client::{Client, find_slot};

/// What the device runs, and what it says about itself.
pub fn identify<P: Port + ?Sized>(port: &mut P, s: &Settings) -> Result<DeviceInfo, Error> {
    let mut c = Client::new(port, s);
    c.drain();
    let slots = c.state_read()?;
    let running = find_slot(&slots, s.image, 0).ok_or_else(|| {
        Error::Device(format!(
            "image state read: the device lists no image {} in slot 0",
            s.image
        ))
    })?;
    if running.version.is_empty() {
        return Err(Error::Device(
            "image state read: the image in slot 0 has no version".into(),
        ));
    }
    let mut attributes = vec![
        ("image_hash".to_string(), hex(&running.hash)),
        ("confirmed".to_string(), running.confirmed.to_string()),
    ];
    if let Some(next) = find_slot(&slots, s.image, 1).filter(|x| !x.version.is_empty()) {
        attributes.push(("secondary_version".to_string(), next.version.clone()));
    }
    let version = running.version.clone();
    let model = if s.model_format.is_empty() {
        None
    } else {
        match c.os_info(&s.model_format) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Ok(_) => None,
            Err(e) => {
                c.port()
                    .log(Level::Debug, &format!("no model from the device: {e}"));
                None
            }
        }
    };
    Ok(DeviceInfo {
        version,
        hardware_id: model.clone().filter(|_| s.model_format == "i"),
        model,
        serial_number: None,
        attributes,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
