//! `identify`: the version running in slot 0 (image state list) and, when the
//! device tells, its model (OS info with `model_format`, one try, optional).

use crate::client::{Client, find_slot};
use crate::port::{Level, Port};
use crate::{Error, Settings};

/// (version, model) read from the device.
pub fn identify<P: Port>(port: &mut P, s: &Settings) -> Result<(String, Option<String>), Error> {
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
    Ok((version, model))
}
