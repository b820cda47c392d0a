//! The device options this family understands: their [`schema`] (names,
//! kinds, ranges, defaults, one line each for operators) and the typed
//! [`Settings`] built from options checked against it.
//!
//! What it is: what can be a setting is a setting. The gateway checks and
//! types the options by the schema before the plugin sees them (the SDK does
//! the same natively, [`otagw_plugin_sdk::Family::settings_from_text`]);
//! [`Settings::from_options`] adds what the schema cannot say: the syntax of
//! `public_key` and `model_format`.
//!
//! What it is not: it does no I/O.

use otagw_plugin_sdk::schema::{OptionSpec, Options, Problem};
use otagw_plugin_sdk::{Family, Fields};

use crate::keys::PublicKey;

/// Every setting of the family; the defaults are the schema's.
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

/// Longest timeout accepted for any `*_ms` option: one hour.
const MAX_MS: u64 = 3_600_000;

/// The options of the family, in the order operators see them.
pub fn schema() -> Vec<OptionSpec> {
    vec![
        OptionSpec::duration(
            "timeout_ms",
            10,
            MAX_MS,
            "how long to wait for the answer to one SMP request",
        )
        .default_duration_ms(5000),
        OptionSpec::duration(
            "erase_timeout_ms",
            10,
            MAX_MS,
            "the same for requests that may erase the secondary slot first",
        )
        .default_duration_ms(30_000),
        OptionSpec::integer(
            "retries",
            0,
            1000,
            "re-sends allowed per request after a timeout",
        )
        .default_int(5),
        OptionSpec::duration(
            "reset_wait_ms",
            10,
            MAX_MS,
            "how long the device may take to answer after a reset (MCUboot's swap included)",
        )
        .default_duration_ms(10_000),
        OptionSpec::text(
            "public_key",
            "the key images must be signed with (default: not checked)",
        )
        .syntax(
            "hex of a raw Ed25519 or P-256 key or of its DER, base64 or PEM of the DER, \
                 or `imgtool getpub` output",
        ),
        OptionSpec::boolean(
            "require_newer",
            "refuse an image not newer than the one running in slot 0",
        )
        .default_bool(false),
        OptionSpec::integer("image", 0, 255, "the image number on multi-image devices")
            .default_int(0),
        OptionSpec::integer(
            "buf_size",
            64,
            65_535,
            "the device's SMP buffer, when it cannot report it (default: ask, else 512)",
        ),
        OptionSpec::integer(
            "max_chunk",
            16,
            65_535,
            "most image bytes per upload request (default: what the buffer takes)",
        ),
        OptionSpec::boolean(
            "erase",
            "erase the secondary slot before uploading (loses a partial upload)",
        )
        .default_bool(false),
        OptionSpec::text(
            "model_format",
            "the OS-info format letters identify asks for the model",
        )
        .syntax("letters, e.g. `i` (the hardware platform); empty: do not ask")
        .default_text("i"),
    ]
}

impl Settings {
    /// The settings from options checked against [`schema`]: every problem,
    /// each naming its option.
    pub fn from_options(options: &Options) -> Result<Settings, Vec<Problem>> {
        let specs = schema();
        let mut f = Fields::new(&specs, options);
        let public_key = match f.optional_text("public_key").map(str::trim) {
            None | Some("") => None,
            Some(text) => PublicKey::parse(text)
                .map_err(|why| f.bad("public_key", &why))
                .ok(),
        };
        let model_format = f.text("model_format").trim().to_string();
        if !model_format.chars().all(|c| c.is_ascii_alphabetic()) {
            f.bad("model_format", "expected OS-info format letters, e.g. `i`");
        }
        let settings = Settings {
            timeout_ms: f.duration_ms("timeout_ms"),
            erase_timeout_ms: f.duration_ms("erase_timeout_ms"),
            retries: f.integer("retries"),
            reset_wait_ms: f.duration_ms("reset_wait_ms"),
            public_key,
            require_newer: f.boolean("require_newer"),
            image: f.integer("image"),
            buf_size: f.optional_integer("buf_size", false),
            max_chunk: f.optional_integer("max_chunk", false),
            erase: f.boolean("erase"),
            model_format,
        };
        f.finish(settings)
    }
}

/// The schema's defaults.
impl Default for Settings {
    fn default() -> Self {
        crate::Smp::default_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Smp;
    use otagw_plugin_sdk::testing::{assert_refused, check_family};

    fn parse(options: &[(&str, &str)]) -> Result<Settings, Vec<Problem>> {
        otagw_plugin_sdk::testing::settings::<Smp>(options)
    }

    #[test]
    fn the_schema_is_valid_and_no_value_of_any_option_panics() {
        check_family::<Smp>();
    }

    #[test]
    fn defaults() {
        let s = Settings::default();
        assert_eq!(s.timeout_ms, 5000);
        assert_eq!(s.erase_timeout_ms, 30_000);
        assert_eq!(s.retries, 5);
        assert_eq!(s.reset_wait_ms, 10_000);
        assert!(!s.require_newer && !s.erase);
        assert_eq!((s.image, s.buf_size, s.max_chunk), (0, None, None));
        assert_eq!(s.public_key, None);
        assert_eq!(s.model_format, "i");
    }

    #[test]
    fn parses_every_option() {
        let key = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
        let s = parse(&[
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
        ])
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
        // Empty: no key, no model.
        let s = parse(&[("public_key", " "), ("model_format", "")]).unwrap();
        assert_eq!((s.public_key, s.model_format.as_str()), (None, ""));
    }

    #[test]
    fn bad_values_name_the_option() {
        assert_refused::<Smp>(&[
            ("timeout_ms", "0", "`timeout_ms`"),
            ("retries", "-1", "`retries`"),
            ("retries", "5000", "from 0 to 1000"),
            ("require_newer", "maybe", "`require_newer`"),
            ("public_key", "abcd", "`public_key`"),
            ("public_key", "zz!!", "`public_key`"),
            ("buf_size", "10", "from 64"),
            ("model_format", "i m", "`model_format`"),
            ("colour", "blue", "unknown option `colour`"),
        ]);
    }
}
