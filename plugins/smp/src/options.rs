//! The device options this family understands, parsed and checked once.
//!
//! What it is: the typed form of the `options` list from the gateway's device
//! configuration (key/value strings), with defaults and ranges. Keys are
//! matched case-insensitively and `-` is the same as `_` (`timeout-ms` ==
//! `timeout_ms`).
//!
//! What it is not: it does no I/O. Unknown keys are not errors (the gateway may
//! keep its own keys in the same list); they are returned so the caller can log
//! them.

use crate::Error;
use crate::keys::PublicKey;
use otagw_plugin_sdk::{OptionError, parse_bool, parse_u32};

/// Every setting of the family, with its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `timeout_ms`: how long to wait for the answer to one SMP request (default 5000).
    pub timeout_ms: u32,
    /// `erase_timeout_ms`: the same for requests that may make the device erase
    /// its secondary slot first: the upload chunk at offset 0 and `erase`
    /// (default 30000).
    pub erase_timeout_ms: u32,
    /// `retries`: re-sends allowed per request after a timeout (default 5).
    pub retries: u32,
    /// `reset_wait_ms`: how long the device may take to answer again after a
    /// reset, MCUboot's swap included (default 10000).
    pub reset_wait_ms: u32,
    /// `public_key`: the key images must be signed with (default none: the
    /// signature is not checked). Hex of a raw key (32-byte Ed25519, 33- or
    /// 65-byte SEC1 P-256 point) or of a SubjectPublicKeyInfo DER, base64 or
    /// PEM of the DER, or `imgtool getpub` C output.
    pub public_key: Option<PublicKey>,
    /// `require_newer`: refuse an image whose version is not newer than the
    /// one running in slot 0 (default false; checked at the start of `flash`).
    pub require_newer: bool,
    /// `image`: the image number on multi-image devices (default 0).
    pub image: u32,
    /// `buf_size`: the device's SMP buffer in bytes, when it cannot report it
    /// with the MCUmgr parameters command (default: ask; 512 if it cannot say).
    pub buf_size: Option<u32>,
    /// `max_chunk`: most image bytes per upload request (default: as many as
    /// the device's buffer takes).
    pub max_chunk: Option<u32>,
    /// `erase`: erase the secondary slot before uploading (default false; this
    /// throws away a partial upload the device could resume).
    pub erase: bool,
    /// `model_format`: the OS-info format letters `identify` asks for the model
    /// (default `i`, the hardware platform; empty: do not ask).
    pub model_format: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            timeout_ms: 5000,
            erase_timeout_ms: 30_000,
            retries: 5,
            reset_wait_ms: 10_000,
            public_key: None,
            require_newer: false,
            image: 0,
            buf_size: None,
            max_chunk: None,
            erase: false,
            model_format: "i".to_string(),
        }
    }
}

/// Longest timeout accepted for any `*_ms` option: one hour.
const MAX_MS: u32 = 3_600_000;

impl Settings {
    /// Parse the device options. Returns the settings and the keys this family
    /// does not know (as given), or `Error::Options` naming the bad option.
    pub fn parse(options: &[(String, String)]) -> Result<(Settings, Vec<String>), Error> {
        let mut s = Settings::default();
        let mut unknown = Vec::new();
        for (raw_key, value) in options {
            let key = raw_key.trim().to_ascii_lowercase().replace('-', "_");
            let v = value.trim();
            match key.as_str() {
                "timeout_ms" => s.timeout_ms = parse_u32(&key, v, 10, MAX_MS)?,
                "erase_timeout_ms" => s.erase_timeout_ms = parse_u32(&key, v, 10, MAX_MS)?,
                "retries" => s.retries = parse_u32(&key, v, 0, 1000)?,
                "reset_wait_ms" => s.reset_wait_ms = parse_u32(&key, v, 10, MAX_MS)?,
                "public_key" => {
                    s.public_key = if v.is_empty() {
                        None
                    } else {
                        Some(PublicKey::parse(v).map_err(|why| bad(&key, v, &why))?)
                    }
                }
                "require_newer" => s.require_newer = parse_bool(&key, v)?,
                "image" => s.image = parse_u32(&key, v, 0, 255)?,
                "buf_size" => s.buf_size = Some(parse_u32(&key, v, 64, 65_535)?),
                "max_chunk" => s.max_chunk = Some(parse_u32(&key, v, 16, 65_535)?),
                "erase" => s.erase = parse_bool(&key, v)?,
                "model_format" => {
                    if !v.chars().all(|c| c.is_ascii_alphabetic()) {
                        return Err(bad(&key, v, "expected OS-info format letters, e.g. `i`"));
                    }
                    s.model_format = v.to_string();
                }
                _ => unknown.push(raw_key.clone()),
            }
        }
        Ok((s, unknown))
    }
}

fn bad(key: &str, value: &str, why: &str) -> Error {
    OptionError::new(key, value, why).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_value_of_any_option_panics_the_parser() {
        let keys = [
            "timeout_ms",
            "erase_timeout_ms",
            "retries",
            "reset_wait_ms",
            "public_key",
            "require_newer",
            "image",
            "buf_size",
            "max_chunk",
            "erase",
            "model_format",
        ];
        otagw_plugin_sdk::assert_no_option_value_panics(&keys, Settings::parse);
    }

    fn opts(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults() {
        let (s, unknown) = Settings::parse(&[]).unwrap();
        assert_eq!(s, Settings::default());
        assert!(unknown.is_empty());
        assert_eq!(s.timeout_ms, 5000);
        assert_eq!(s.retries, 5);
        assert_eq!(s.reset_wait_ms, 10_000);
        assert!(!s.require_newer);
    }

    #[test]
    fn parses_every_option() {
        let key = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
        let (s, unknown) = Settings::parse(&opts(&[
            ("Timeout-Ms", "100"),
            ("erase_timeout_ms", "200"),
            ("retries", "2"),
            ("reset-wait-ms", "300"),
            ("public_key", key),
            ("require_newer", "yes"),
            ("image", "1"),
            ("buf_size", "1024"),
            ("max_chunk", "256"),
            ("erase", "true"),
            ("model_format", "im"),
            ("colour", "blue"),
        ]))
        .unwrap();
        assert_eq!(s.timeout_ms, 100);
        assert_eq!(s.erase_timeout_ms, 200);
        assert_eq!(s.retries, 2);
        assert_eq!(s.reset_wait_ms, 300);
        assert!(s.public_key.is_some());
        assert!(s.require_newer);
        assert_eq!(s.image, 1);
        assert_eq!(s.buf_size, Some(1024));
        assert_eq!(s.max_chunk, Some(256));
        assert!(s.erase);
        assert_eq!(s.model_format, "im");
        assert_eq!(unknown, vec!["colour".to_string()]);
    }

    #[test]
    fn bad_values_name_the_option() {
        for (k, v, needle) in [
            ("timeout_ms", "0", "`timeout_ms`"),
            ("retries", "-1", "`retries`"),
            ("retries", "5000", "between 0 and 1000"),
            ("require_newer", "maybe", "`require_newer`"),
            ("public_key", "abcd", "`public_key`"),
            ("public_key", "zz!!", "`public_key`"),
            ("buf_size", "10", "between 64"),
            ("model_format", "i m", "`model_format`"),
        ] {
            let err = Settings::parse(&opts(&[(k, v)])).unwrap_err();
            let Error::Options(msg) = &err else {
                panic!("{k}: expected an options error, got {err:?}")
            };
            assert!(msg.contains(needle), "{k}={v}: {msg}");
        }
    }
}
