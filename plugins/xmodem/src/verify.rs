//! `verify`: the checks this family can make before any device is touched.
//!
//! What it is: the image must not be empty and must fit `max_size` when that
//! option is set; for plain XMODEM (which carries no size) it reports how many
//! pad bytes the receiver will get after the image.
//!
//! What it is not: a format check. XMODEM moves opaque bytes; a family that
//! knows its image format (GBL, Intel HEX, signed headers) needs its own plugin.

use otagw_plugin_sdk::{Error, ImageInfo};

use crate::options::{Protocol, Settings};
use crate::sender::pad_bytes;

/// Check an image of `size` bytes against the device's settings. The payload
/// is the image (padding not included).
pub fn verify(size: u64, s: &Settings) -> Result<ImageInfo, Error> {
    if size == 0 {
        return Err(Error::Verify("the image is empty: nothing to send".into()));
    }
    if let Some(max) = s.max_size
        && size > max
    {
        return Err(Error::Verify(format!(
            "the image is {size} bytes, larger than max_size = {max} bytes"
        )));
    }
    let mut warnings = Vec::new();
    let summary = match s.protocol {
        Protocol::Xmodem => {
            let pad = pad_bytes(size, s.block_size, s.small_tail);
            if pad > 0 {
                warnings.push(format!(
                    "XMODEM carries no size: the receiver will get {pad} pad bytes (0x{:02X}) \
                     after the {size} image bytes (more if it forces 128-byte or checksum mode)",
                    s.pad_byte
                ));
            }
            format!("{size} bytes, XMODEM, {} pad bytes", pad)
        }
        Protocol::Ymodem => format!("{size} bytes, YMODEM as {:?}", s.filename),
    };
    Ok(ImageInfo {
        version: None,
        payload_size: size,
        summary,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_image_fails() {
        let err = verify(0, &Settings::default()).unwrap_err();
        assert!(matches!(err, Error::Verify(m) if m.contains("empty")));
    }

    #[test]
    fn max_size() {
        let s = Settings {
            max_size: Some(1000),
            ..Settings::default()
        };
        assert!(verify(1000, &s).is_ok());
        let err = verify(1001, &s).unwrap_err();
        assert_eq!(
            err,
            Error::Verify("the image is 1001 bytes, larger than max_size = 1000 bytes".into())
        );
    }

    #[test]
    fn xmodem_warns_about_padding() {
        let v = verify(1024 * 3, &Settings::default()).unwrap();
        assert!(v.warnings.is_empty());
        assert_eq!(v.payload_size, 3072);
        // 100-byte tail goes in one 128-byte block: 28 pad bytes.
        let v = verify(1024 + 100, &Settings::default()).unwrap();
        assert!(v.warnings[0].contains("28 pad bytes (0x1A)"));
        // 1000-byte tail goes in one 1K block: 24 pad bytes.
        let v = verify(1000, &Settings::default()).unwrap();
        assert!(v.warnings[0].contains("24 pad bytes"));
    }

    #[test]
    fn ymodem_does_not_warn() {
        let s = Settings {
            protocol: Protocol::Ymodem,
            ..Settings::default()
        };
        let v = verify(1, &s).unwrap();
        assert!(v.warnings.is_empty());
        assert_eq!(v.summary, "1 bytes, YMODEM as \"firmware.bin\"");
    }
}
