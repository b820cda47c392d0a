//! The device options this family understands: their [`schema`] (names,
//! kinds, ranges, defaults, one line each for operators) and the typed
//! [`Settings`] built from options checked against it.
//!
//! What it is: what can be a setting is a setting. The gateway checks and
//! types the options by the schema before the plugin sees them (the SDK does
//! the same natively, [`otagw_plugin_sdk::Family::settings_from_text`]);
//! [`Settings::from_options`] adds what the schema cannot say: a YMODEM file
//! name must be something block 0 can carry.
//!
//! What it is not: it does no I/O.

use otagw_plugin_sdk::schema::{BytesEncoding, OptionSpec, Options, Problem};
use otagw_plugin_sdk::{Family, Fields};

/// Which protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Plain XMODEM (CRC or checksum, 128 or 1K blocks): one file, no name, no size.
    Xmodem,
    /// YMODEM batch: block 0 carries name and exact size, a null block 0 ends the batch.
    Ymodem,
}

impl Protocol {
    /// Lowercase name, as in the option value.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Xmodem => "xmodem",
            Protocol::Ymodem => "ymodem",
        }
    }
}

/// Every setting of the family; the defaults are the schema's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `protocol`: `xmodem` (default) or `ymodem`.
    pub protocol: Protocol,
    /// `block_size`: 1024 (default, XMODEM-1K, falls back to 128 when refused) or 128.
    pub block_size: usize,
    /// `small_tail`: send a short tail in 128-byte blocks when that is fewer bytes
    /// on the wire than one padded 1K block (default true).
    pub small_tail: bool,
    /// `pad_byte`: filler of the last block (default 0x1A, CP/M EOF).
    pub pad_byte: u8,
    /// `filename`: the name in the YMODEM header (default `firmware.bin`).
    pub filename: String,
    /// `retries`: re-sends allowed per block, EOT and block 0 (default 10).
    pub retries: u32,
    /// `block_timeout_ms`: how long to wait for ACK/NAK after a block (default 3000).
    pub block_timeout_ms: u32,
    /// `handshake_timeout_ms`: how long to wait for the receiver's first 'C' or
    /// NAK, and in YMODEM for the ACK of block 0 and the 'C' after it, when
    /// receivers erase flash (default 30000).
    pub handshake_timeout_ms: u32,
    /// `enter_command`: bytes sent before the handshake to start the bootloader's
    /// receive mode (default none).
    pub enter_command: Option<Vec<u8>>,
    /// `enter_wait_ms`: pause after `enter_command` (default 0).
    pub enter_wait_ms: u32,
    /// `enter_repeat_ms`: with `enter_command`, send it again when no 'C' or
    /// NAK came for this long, until `handshake_timeout_ms` is over (default
    /// 10000; 0 = send it once). A receiver still inside a session the
    /// gateway's restart interrupted ignores the first one, then gives up on
    /// that session silently and waits for a new command.
    pub enter_repeat_ms: u32,
    /// `max_size`: largest image `verify` accepts, in bytes (default no limit).
    pub max_size: Option<u64>,
    /// `version_command`: bytes that make the running firmware print its version
    /// on one line, for `identify` (default none: identify is unsupported).
    pub version_command: Option<Vec<u8>>,
    /// `version_timeout_ms`: how long `identify` waits for that line (default 2000).
    pub version_timeout_ms: u32,
}

/// Longest timeout accepted for any `*_ms` option: one hour.
const MAX_MS: u64 = 3_600_000;

/// The longest YMODEM file name: block 0 (`name\0size\0`) must fit 1 KiB,
/// and the size takes at most 20 digits.
const MAX_FILENAME: u32 = 1024 - 22;

/// The options of the family, in the order operators see them.
pub fn schema() -> Vec<OptionSpec> {
    vec![
        OptionSpec::choice(
            "protocol",
            &[
                (
                    "xmodem",
                    &["xmodem-1k", "xmodem1k"],
                    "XMODEM: one file, no name, no size",
                ),
                (
                    "ymodem",
                    &[],
                    "YMODEM batch: block 0 carries the name and exact size",
                ),
            ],
            "which protocol to speak",
        )
        .default_choice("xmodem"),
        OptionSpec::choice(
            "block_size",
            &[
                ("1024", &["1k"], "XMODEM-1K; falls back to 128 when refused"),
                ("128", &[], "original 128-byte blocks"),
            ],
            "data block size",
        )
        .default_choice("1024"),
        OptionSpec::boolean(
            "small_tail",
            "send a short tail in 128-byte blocks when that is fewer bytes on the wire",
        )
        .default_bool(true),
        OptionSpec::integer(
            "pad_byte",
            0,
            255,
            "filler of the last block (0x1A: CP/M EOF)",
        )
        .default_int(0x1A),
        OptionSpec::text("filename", "the file name in the YMODEM header")
            .max_length(MAX_FILENAME)
            .default_text("firmware.bin"),
        OptionSpec::integer(
            "retries",
            0,
            1000,
            "re-sends allowed per block, EOT and block 0",
        )
        .default_int(10),
        OptionSpec::duration(
            "block_timeout_ms",
            10,
            MAX_MS,
            "how long to wait for ACK/NAK after a block",
        )
        .default_duration_ms(3000),
        OptionSpec::duration(
            "handshake_timeout_ms",
            10,
            MAX_MS,
            "how long to wait for the receiver's first 'C' or NAK (and YMODEM's block 0 ACK)",
        )
        .default_duration_ms(30_000),
        OptionSpec::bytes(
            "enter_command",
            BytesEncoding::Escaped,
            "bytes sent before the handshake to start the bootloader's receive mode",
        ),
        OptionSpec::duration("enter_wait_ms", 0, MAX_MS, "pause after enter_command")
            .default_duration_ms(0),
        OptionSpec::duration(
            "enter_repeat_ms",
            0,
            MAX_MS,
            "send enter_command again after this long without a 'C' or NAK (0: once)",
        )
        .default_duration_ms(10_000),
        OptionSpec::size("max_size", 1, u64::MAX, "largest image verify accepts"),
        OptionSpec::bytes(
            "version_command",
            BytesEncoding::Escaped,
            "bytes that make the running firmware print its version on one line (identify)",
        ),
        OptionSpec::duration(
            "version_timeout_ms",
            10,
            MAX_MS,
            "how long identify waits for the version line",
        )
        .default_duration_ms(2000),
    ]
}

impl Settings {
    /// The settings from options checked against [`schema`]: every problem,
    /// each naming its option.
    pub fn from_options(options: &Options) -> Result<Settings, Vec<Problem>> {
        let specs = schema();
        let mut f = Fields::new(&specs, options);
        let filename = f.text("filename").to_string();
        if filename.is_empty() {
            f.bad("filename", "must not be empty");
        }
        if filename.contains('\0') {
            f.bad("filename", "must not contain NUL");
        }
        let settings = Settings {
            protocol: match f.choice("protocol") {
                "ymodem" => Protocol::Ymodem,
                _ => Protocol::Xmodem,
            },
            block_size: match f.choice("block_size") {
                "128" => 128,
                _ => 1024,
            },
            small_tail: f.boolean("small_tail"),
            pad_byte: f.integer("pad_byte"),
            filename,
            retries: f.integer("retries"),
            block_timeout_ms: f.duration_ms("block_timeout_ms"),
            handshake_timeout_ms: f.duration_ms("handshake_timeout_ms"),
            enter_command: f.optional_bytes("enter_command"),
            enter_wait_ms: f.duration_ms("enter_wait_ms"),
            enter_repeat_ms: f.duration_ms("enter_repeat_ms"),
            max_size: f.optional_size("max_size"),
            version_command: f.optional_bytes("version_command"),
            version_timeout_ms: f.duration_ms("version_timeout_ms"),
        };
        f.finish(settings)
    }
}

/// The schema's defaults.
impl Default for Settings {
    fn default() -> Self {
        crate::Xmodem::default_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Xmodem;
    use otagw_plugin_sdk::testing::{assert_refused, check_family};

    fn parse(options: &[(&str, &str)]) -> Result<Settings, Vec<Problem>> {
        otagw_plugin_sdk::testing::settings::<Xmodem>(options)
    }

    #[test]
    fn the_schema_is_valid_and_no_value_of_any_option_panics() {
        check_family::<Xmodem>();
    }

    #[test]
    fn defaults() {
        let s = Settings::default();
        assert_eq!(s.protocol, Protocol::Xmodem);
        assert_eq!(s.block_size, 1024);
        assert!(s.small_tail);
        assert_eq!(s.pad_byte, 0x1A);
        assert_eq!(s.filename, "firmware.bin");
        assert_eq!(s.retries, 10);
        assert_eq!((s.block_timeout_ms, s.handshake_timeout_ms), (3000, 30_000));
        assert_eq!((s.enter_wait_ms, s.enter_repeat_ms), (0, 10_000));
        assert_eq!(s.version_timeout_ms, 2000);
        assert_eq!(
            (s.enter_command, s.max_size, s.version_command),
            (None, None, None)
        );
    }

    #[test]
    fn parses_every_option_and_dash_keys() {
        let s = parse(&[
            ("protocol", "YMODEM"),
            ("block-size", "128"),
            ("small_tail", "no"),
            ("pad_byte", "0xFF"),
            ("filename", "app v2.bin"),
            ("retries", "3"),
            ("block_timeout_ms", "500"),
            ("Handshake-Timeout-Ms", "1000"),
            ("enter-command", "update\\r\\n"),
            ("enter_wait_ms", "250"),
            ("max_size", "65536"),
            ("version_command", "ver\\x0d"),
            ("version_timeout_ms", "100"),
        ])
        .unwrap();
        assert_eq!(s.protocol, Protocol::Ymodem);
        assert_eq!(s.block_size, 128);
        assert!(!s.small_tail);
        assert_eq!(s.pad_byte, 0xFF);
        assert_eq!(s.filename, "app v2.bin");
        assert_eq!(s.retries, 3);
        assert_eq!(s.block_timeout_ms, 500);
        assert_eq!(s.handshake_timeout_ms, 1000);
        assert_eq!(s.enter_command.as_deref(), Some(&b"update\r\n"[..]));
        assert_eq!(s.enter_wait_ms, 250);
        assert_eq!(s.max_size, Some(65536));
        assert_eq!(s.version_command.as_deref(), Some(&b"ver\r"[..]));
        assert_eq!(s.version_timeout_ms, 100);
    }

    #[test]
    fn spellings_of_0_1_configurations_stay_valid() {
        for (k, v) in [
            ("protocol", "xmodem-1k"),
            ("protocol", "XMODEM1K"),
            ("block_size", "1k"),
            ("block_size", "1K"),
            ("pad_byte", "26"),
        ] {
            assert!(parse(&[(k, v)]).is_ok(), "{k} = {v}");
        }
        assert_eq!(parse(&[("pad_byte", "0")]).unwrap().pad_byte, 0);
    }

    #[test]
    fn bad_values_name_the_option() {
        assert_refused::<Xmodem>(&[
            ("protocol", "zmodem", "`protocol`"),
            ("block_size", "512", "`block_size`"),
            ("retries", "-1", "`retries`"),
            ("retries", "5000", "from 0 to 1000"),
            ("block_timeout_ms", "0", "`block_timeout_ms`"),
            ("pad_byte", "0x100", "`pad_byte`"),
            ("small_tail", "maybe", "`small_tail`"),
            ("max_size", "0", "`max_size`"),
            ("filename", "", "`filename`"),
            ("filename", "a\0b", "must not contain NUL"),
            ("enter_command", "go\\q", "unknown escape `\\q`"),
            ("enter_command", "go\\x4", "two hex digits"),
            ("enter_command", "go\\", "lone `\\`"),
            ("colour", "blue", "unknown option `colour`"),
        ]);
        let long = "x".repeat(1003);
        assert!(parse(&[("filename", &long)]).is_err());
        assert!(parse(&[("filename", &long[..1002])]).is_ok());
    }

    #[test]
    fn byte_options_take_every_escape() {
        let s = parse(&[
            ("enter_command", "a\\r\\n\\t\\0\\\\\\x41\\xfF"),
            ("version_command", "é"),
        ])
        .unwrap();
        assert_eq!(s.enter_command.unwrap(), b"a\r\n\t\0\\A\xff".to_vec());
        // Non-ASCII text passes through as UTF-8.
        assert_eq!(s.version_command.unwrap(), "é".as_bytes().to_vec());
    }

    #[test]
    fn empty_commands_are_none() {
        let s = parse(&[("enter_command", ""), ("version_command", "")]).unwrap();
        assert_eq!(s.enter_command, None);
        assert_eq!(s.version_command, None);
    }
}
