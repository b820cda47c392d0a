//! The device options this family understands, parsed and checked once.
//!
//! What it is: the typed form of the `options` list from the gateway's device
//! configuration (key/value strings), with defaults, ranges and the escape
//! syntax of byte-string options (`\r \n \t \0 \\ \xNN`). Keys are matched
//! case-insensitively and `-` is the same as `_` (`enter-command` ==
//! `enter_command`).
//!
//! What it is not: it does no I/O. Unknown keys are not errors (the gateway may
//! keep its own keys in the same list); they are returned so the caller can log
//! them.

use crate::Error;
use otagw_plugin_sdk::{OptionError, parse_bool, parse_u32};

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

/// Every setting of the family, with its default.
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

impl Default for Settings {
    fn default() -> Self {
        Settings {
            protocol: Protocol::Xmodem,
            block_size: 1024,
            small_tail: true,
            pad_byte: 0x1A,
            filename: "firmware.bin".to_string(),
            retries: 10,
            block_timeout_ms: 3000,
            handshake_timeout_ms: 30_000,
            enter_command: None,
            enter_wait_ms: 0,
            enter_repeat_ms: 10_000,
            max_size: None,
            version_command: None,
            version_timeout_ms: 2000,
        }
    }
}

/// Longest timeout accepted for any `*_ms` option: one hour.
const MAX_MS: u32 = 3_600_000;

impl Settings {
    /// Parse the device options. Returns the settings and the keys this family
    /// does not know (as given), or `Error::Other` naming the bad option.
    pub fn parse(options: &[(String, String)]) -> Result<(Settings, Vec<String>), Error> {
        let mut s = Settings::default();
        let mut unknown = Vec::new();
        for (raw_key, value) in options {
            let key = raw_key.trim().to_ascii_lowercase().replace('-', "_");
            let v = value.trim();
            match key.as_str() {
                "protocol" => {
                    s.protocol = match v.to_ascii_lowercase().as_str() {
                        "xmodem" | "xmodem-1k" | "xmodem1k" => Protocol::Xmodem,
                        "ymodem" => Protocol::Ymodem,
                        _ => return Err(bad(&key, v, "expected `xmodem` or `ymodem`")),
                    }
                }
                "block_size" => {
                    s.block_size = match v {
                        "1024" | "1k" | "1K" => 1024,
                        "128" => 128,
                        _ => return Err(bad(&key, v, "expected 1024 or 128")),
                    }
                }
                "small_tail" => s.small_tail = parse_bool(&key, v)?,
                "pad_byte" => s.pad_byte = parse_byte(&key, v)?,
                "filename" => {
                    // Not trimmed: a name is what the operator wrote.
                    if value.is_empty() {
                        return Err(bad(&key, value, "must not be empty"));
                    }
                    if value.contains('\0') {
                        return Err(bad(&key, value, "must not contain NUL"));
                    }
                    // Header "name\0size\0" must fit a 1K block 0; the size takes
                    // at most 20 digits.
                    if value.len() > 1024 - 22 {
                        return Err(bad(&key, value, "longer than 1002 bytes"));
                    }
                    s.filename = value.clone();
                }
                "retries" => s.retries = parse_u32(&key, v, 0, 1000)?,
                "block_timeout_ms" => s.block_timeout_ms = parse_u32(&key, v, 10, MAX_MS)?,
                "handshake_timeout_ms" => s.handshake_timeout_ms = parse_u32(&key, v, 10, MAX_MS)?,
                "enter_command" => s.enter_command = non_empty(unescape(&key, value)?),
                "enter_wait_ms" => s.enter_wait_ms = parse_u32(&key, v, 0, MAX_MS)?,
                "enter_repeat_ms" => s.enter_repeat_ms = parse_u32(&key, v, 0, MAX_MS)?,
                "max_size" => {
                    let n: u64 = v
                        .parse()
                        .map_err(|_| bad(&key, v, "expected a number of bytes"))?;
                    if n == 0 {
                        return Err(bad(&key, v, "must be at least 1"));
                    }
                    s.max_size = Some(n);
                }
                "version_command" => s.version_command = non_empty(unescape(&key, value)?),
                "version_timeout_ms" => s.version_timeout_ms = parse_u32(&key, v, 10, MAX_MS)?,
                _ => unknown.push(raw_key.clone()),
            }
        }
        Ok((s, unknown))
    }
}

fn bad(key: &str, value: &str, why: &str) -> Error {
    OptionError::new(key, value, why).into()
}

fn non_empty(bytes: Vec<u8>) -> Option<Vec<u8>> {
    (!bytes.is_empty()).then_some(bytes)
}

/// `0x1A`, `0X1a` or decimal `26`.
fn parse_byte(key: &str, v: &str) -> Result<u8, Error> {
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => v.parse::<u8>(),
    };
    parsed.map_err(|_| bad(key, v, "expected a byte, 0x00..0xFF or 0..255"))
}

/// Turn `version\r` (typed with a real backslash in TOML or JSON) into bytes.
/// Escapes: `\r \n \t \0 \\ \xNN`; any other backslash sequence is an error.
pub fn unescape(key: &str, s: &str) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let Some(&e) = bytes.get(i + 1) else {
            return Err(bad(key, s, &format!("dangling `\\` at byte {i}")));
        };
        match e {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'0' => out.push(0),
            b'\\' => out.push(b'\\'),
            b'x' | b'X' => {
                let hex = bytes
                    .get(i + 2..i + 4)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        bad(key, s, &format!("`\\x` at byte {i} needs two hex digits"))
                    })?;
                out.push(hex);
                i += 2;
            }
            other => {
                return Err(bad(
                    key,
                    s,
                    &format!(
                        "unknown escape `\\{}` at byte {i} (known: \\r \\n \\t \\0 \\\\ \\xNN)",
                        other as char
                    ),
                ));
            }
        }
        i += 2;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_value_of_any_option_panics_the_parser() {
        let keys = [
            "protocol",
            "ymodem",
            "block_size",
            "small_tail",
            "pad_byte",
            "filename",
            "retries",
            "block_timeout_ms",
            "handshake_timeout_ms",
            "enter_command",
            "enter_wait_ms",
            "enter_repeat_ms",
            "max_size",
            "version_command",
            "version_timeout_ms",
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
        assert_eq!(s.block_size, 1024);
        assert_eq!(s.pad_byte, 0x1A);
        assert_eq!(s.retries, 10);
    }

    #[test]
    fn parses_every_option_and_dash_keys() {
        let (s, unknown) = Settings::parse(&opts(&[
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
            ("colour", "blue"),
        ]))
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
        assert_eq!(unknown, vec!["colour".to_string()]);
    }

    #[test]
    fn decimal_pad_byte() {
        let (s, _) = Settings::parse(&opts(&[("pad_byte", "0")])).unwrap();
        assert_eq!(s.pad_byte, 0);
    }

    #[test]
    fn bad_values_name_the_option() {
        for (k, v, needle) in [
            ("protocol", "zmodem", "`protocol`"),
            ("block_size", "512", "`block_size`"),
            ("retries", "-1", "`retries`"),
            ("retries", "5000", "between 0 and 1000"),
            ("block_timeout_ms", "0", "`block_timeout_ms`"),
            ("pad_byte", "0x100", "`pad_byte`"),
            ("small_tail", "maybe", "`small_tail`"),
            ("max_size", "0", "`max_size`"),
            ("filename", "", "`filename`"),
            ("enter_command", "go\\q", "unknown escape `\\q`"),
            ("enter_command", "go\\x4", "two hex digits"),
            ("enter_command", "go\\", "dangling"),
        ] {
            let err = Settings::parse(&opts(&[(k, v)])).unwrap_err();
            let Error::Options(msg) = &err else {
                panic!("{k}: expected an options error, got {err:?}")
            };
            assert!(msg.contains(needle), "{k}={v}: {msg}");
        }
    }

    #[test]
    fn unescape_all_escapes() {
        assert_eq!(
            unescape("k", "a\\r\\n\\t\\0\\\\\\x41\\xfF").unwrap(),
            b"a\r\n\t\0\\A\xff".to_vec()
        );
        // Non-ASCII text passes through as UTF-8.
        assert_eq!(unescape("k", "é").unwrap(), "é".as_bytes().to_vec());
    }

    #[test]
    fn empty_commands_are_none() {
        let (s, _) =
            Settings::parse(&opts(&[("enter_command", ""), ("version_command", "")])).unwrap();
        assert_eq!(s.enter_command, None);
        assert_eq!(s.version_command, None);
    }
}
