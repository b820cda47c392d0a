//! The device options this family understands, parsed and checked once.
//!
//! What it is: the typed form of the `options` list from the gateway's device
//! configuration (key/value strings), with defaults and ranges, plus the two
//! small languages this family needs: DTR/RTS sequences ([`LineSeq`]) and
//! flash page layouts ([`Layout`]). Keys are matched case-insensitively and
//! `-` is the same as `_` (`reset-sequence` == `reset_sequence`).
//!
//! What it is not: it does no I/O. Unknown keys are not errors (the gateway may
//! keep its own keys in the same list); they are returned so the caller can log
//! them.

use crate::Error;
use crate::port::Parity;
use otagw_plugin_sdk::{OptionError, parse_bool, parse_u32};

/// Where the main flash of every STM32 starts; page numbers count from here.
pub const FLASH_BASE: u32 = 0x0800_0000;

/// Every setting of the family, with its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `reset_sequence`: DTR/RTS steps that put the part in its bootloader
    /// (default none: no line is touched; boards with a button or a GPIO).
    pub reset_sequence: LineSeq,
    /// `run_sequence`: DTR/RTS steps run at the end of `flash` (after GO) and of
    /// `identify`, e.g. a reset with BOOT0 low (default none).
    pub run_sequence: LineSeq,
    /// `parity`: `even` (default, AN3155's 8E1) or `none` (simulators on ptys).
    pub parity: Parity,
    /// `baud`: line speed this plugin sets on serial links (default 115200; the
    /// bootloader detects it from the 0x7F).
    pub baud: u32,
    /// `address`: where the image goes (default 0x08000000), 4-byte aligned.
    pub address: u32,
    /// `mass_erase`: erase the whole flash instead of the pages the image
    /// covers (default false).
    pub mass_erase: bool,
    /// `page_size`: the erase layout (default: from the part table by PID,
    /// else 2048 bytes).
    pub page_size: Option<Layout>,
    /// `erase_timeout_ms`: wait for the ACK of one erase command (default 30000).
    pub erase_timeout_ms: u32,
    /// `write_timeout_ms`: wait for the ACK of one written block (default 1000).
    pub write_timeout_ms: u32,
    /// `timeout_ms`: wait for any other answer (default 1000).
    pub timeout_ms: u32,
    /// `retries`: extra attempts after a NACK or a silence (default 3).
    pub retries: u32,
    /// `verify_readback`: read the flash back and compare (default true).
    pub verify_readback: bool,
    /// `go`: jump to `address` after writing (default true).
    pub go: bool,
    /// `version_address`: where `identify` reads the version string (default
    /// none: identify is unsupported).
    pub version_address: Option<u32>,
    /// `version_length`: bytes read there, 1..=256 (default 32).
    pub version_length: u32,
    /// `flash_size`: the part's flash in bytes (default: from the part table
    /// by PID at flash time; unknown: no fit check).
    pub flash_size: Option<u32>,
    /// `header_magic`: bytes the image must start with (default none).
    pub header_magic: Option<Vec<u8>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            reset_sequence: LineSeq::default(),
            run_sequence: LineSeq::default(),
            parity: Parity::Even,
            baud: 115_200,
            address: FLASH_BASE,
            mass_erase: false,
            page_size: None,
            erase_timeout_ms: 30_000,
            write_timeout_ms: 1000,
            timeout_ms: 1000,
            retries: 3,
            verify_readback: true,
            go: true,
            version_address: None,
            version_length: 32,
            flash_size: None,
            header_magic: None,
        }
    }
}

/// Longest timeout accepted for any `*_ms` option: 60 s, the host's cap on
/// one read.
const MAX_MS: u32 = 60_000;

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
                "reset_sequence" => s.reset_sequence = LineSeq::parse(&key, v)?,
                "run_sequence" => s.run_sequence = LineSeq::parse(&key, v)?,
                "parity" => {
                    s.parity = match v.to_ascii_lowercase().as_str() {
                        "even" | "e" => Parity::Even,
                        "none" | "n" => Parity::None,
                        _ => return Err(bad(&key, v, "expected `even` or `none`")),
                    }
                }
                "baud" => s.baud = parse_u32(&key, v, 1200, 4_000_000)?,
                "address" => {
                    let a = parse_num(&key, v)?;
                    if !a.is_multiple_of(4) {
                        return Err(bad(&key, v, "must be a multiple of 4"));
                    }
                    if a < FLASH_BASE {
                        return Err(bad(&key, v, "must be in flash, at or above 0x08000000"));
                    }
                    s.address = a;
                }
                "mass_erase" => s.mass_erase = parse_bool(&key, v)?,
                "page_size" => {
                    s.page_size = if v.is_empty() || v.eq_ignore_ascii_case("auto") {
                        None
                    } else {
                        Some(Layout::parse(&key, v)?)
                    }
                }
                "erase_timeout_ms" => s.erase_timeout_ms = parse_u32(&key, v, 10, MAX_MS)?,
                "write_timeout_ms" => s.write_timeout_ms = parse_u32(&key, v, 10, MAX_MS)?,
                "timeout_ms" => s.timeout_ms = parse_u32(&key, v, 10, MAX_MS)?,
                "retries" => s.retries = parse_u32(&key, v, 0, 100)?,
                "verify_readback" => s.verify_readback = parse_bool(&key, v)?,
                "go" => s.go = parse_bool(&key, v)?,
                "version_address" => {
                    s.version_address = if v.is_empty() || v.eq_ignore_ascii_case("none") {
                        None
                    } else {
                        Some(parse_num(&key, v)?)
                    }
                }
                "version_length" => s.version_length = parse_u32(&key, v, 1, 256)?,
                "flash_size" => {
                    s.flash_size = if v.is_empty() || v.eq_ignore_ascii_case("auto") {
                        None
                    } else {
                        let n = parse_size(&key, v)?;
                        if n == 0 {
                            return Err(bad(&key, v, "must not be 0"));
                        }
                        Some(n)
                    }
                }
                "header_magic" => {
                    let bytes = parse_hex_bytes(&key, v)?;
                    s.header_magic = (!bytes.is_empty()).then_some(bytes);
                }
                _ => unknown.push(raw_key.clone()),
            }
        }
        if let Some(a) = s.version_address
            && a.checked_add(s.version_length - 1).is_none()
        {
            return Err(bad(
                "version_address",
                &format!("0x{a:08X}"),
                "the version would run past 0xFFFFFFFF",
            ));
        }
        Ok((s, unknown))
    }
}

// ---------------------------------------------------------------------------
// DTR/RTS sequences.

/// One step of a DTR/RTS sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineStep {
    /// Set both lines at once (true = asserted).
    Set { dtr: bool, rts: bool },
    /// Wait this many milliseconds.
    Sleep(u32),
}

/// A DTR/RTS sequence: `rts=1,dtr=1,sleep=100,dtr=0,sleep=50`.
///
/// Steps are separated by `,` (or `;` or spaces). `dtr=`/`rts=` take `1`,
/// `0`, `on`/`off`, `high`/`low` or `true`/`false`, meaning asserted or not
/// (as the contract's `set-lines`; a USB-UART's TTL pin is low when asserted).
/// Consecutive line steps are applied together in one `set-lines` call; both
/// lines start deasserted, so a line never named stays deasserted. `sleep=MS`
/// (or `wait=MS`) pauses, at most 10000 ms. Empty or `none`: no steps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineSeq {
    pub steps: Vec<LineStep>,
}

impl LineSeq {
    /// Parse `v`; errors name `key`.
    pub fn parse(key: &str, v: &str) -> Result<LineSeq, Error> {
        let mut steps = Vec::new();
        if v.is_empty() || v.eq_ignore_ascii_case("none") {
            return Ok(LineSeq { steps });
        }
        let (mut dtr, mut rts) = (false, false);
        let mut pending = false;
        for token in v
            .split([',', ';', ' '])
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let Some((name, val)) = token.split_once('=') else {
                return Err(bad(
                    key,
                    v,
                    &format!("`{token}`: expected dtr=0|1, rts=0|1 or sleep=MS"),
                ));
            };
            match name.trim().to_ascii_lowercase().as_str() {
                "dtr" => {
                    dtr = parse_level(key, v, token, val)?;
                    pending = true;
                }
                "rts" => {
                    rts = parse_level(key, v, token, val)?;
                    pending = true;
                }
                "sleep" | "wait" | "delay" => {
                    let ms: u32 = val
                        .trim()
                        .parse()
                        .map_err(|_| bad(key, v, &format!("`{token}`: expected milliseconds")))?;
                    if ms > 10_000 {
                        return Err(bad(key, v, &format!("`{token}`: at most 10000 ms")));
                    }
                    if pending {
                        steps.push(LineStep::Set { dtr, rts });
                        pending = false;
                    }
                    steps.push(LineStep::Sleep(ms));
                }
                _ => {
                    return Err(bad(
                        key,
                        v,
                        &format!("`{token}`: unknown step (known: dtr, rts, sleep)"),
                    ));
                }
            }
        }
        if pending {
            steps.push(LineStep::Set { dtr, rts });
        }
        Ok(LineSeq { steps })
    }

    /// No steps.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

fn parse_level(key: &str, v: &str, token: &str, val: &str) -> Result<bool, Error> {
    match val.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "high" | "true" => Ok(true),
        "0" | "off" | "low" | "false" => Ok(false),
        _ => Err(bad(key, v, &format!("`{token}`: expected 0 or 1"))),
    }
}

// ---------------------------------------------------------------------------
// Erase layouts.

/// The erase units of a flash, from [`FLASH_BASE`]: `2048` (uniform pages) or
/// `16K*4,64K,128K` (STM32F4 sectors: four of 16 KiB, one of 64 KiB, then
/// 128 KiB). Each entry is a size (`K`/`M` suffixes allowed) with an optional
/// `*count`; the last entry repeats for the rest of the flash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// (unit size, count); the last count is ignored (it repeats).
    pub runs: Vec<(u32, u32)>,
}

impl Layout {
    /// A uniform layout of `size`-byte pages.
    pub fn uniform(size: u32) -> Layout {
        Layout {
            runs: vec![(size, 1)],
        }
    }

    /// Parse `v`; errors name `key`.
    pub fn parse(key: &str, v: &str) -> Result<Layout, Error> {
        let mut runs = Vec::new();
        for entry in v.split(',').map(str::trim) {
            let (size, count) = match entry.split_once('*') {
                Some((s, c)) => {
                    let c: u32 = c
                        .trim()
                        .parse()
                        .map_err(|_| bad(key, v, &format!("`{entry}`: bad count")))?;
                    (s.trim(), c)
                }
                None => (entry, 1),
            };
            let size = parse_size(key, size)?;
            if size < 4 || count == 0 {
                return Err(bad(
                    key,
                    v,
                    &format!("`{entry}`: pages of at least 4 bytes"),
                ));
            }
            runs.push((size, count));
        }
        Ok(Layout { runs })
    }

    /// The pages (index, start offset, size) that overlap `[from, to)`, offsets
    /// counted from [`FLASH_BASE`].
    pub fn pages(&self, from: u64, to: u64) -> Vec<(u32, u64, u32)> {
        let mut out = Vec::new();
        let mut start = 0u64;
        let mut index = 0u32;
        for (i, &(size, count)) in self.runs.iter().enumerate() {
            let last = i + 1 == self.runs.len();
            let mut n = 0u32;
            while (last || n < count) && start < to {
                let end = start + u64::from(size);
                if end > from {
                    out.push((index, start, size));
                }
                start = end;
                index += 1;
                n += 1;
            }
            if start >= to {
                break;
            }
        }
        out
    }

    /// One line, e.g. `2048 B pages` or `16K*4,64K,128K`.
    pub fn describe(&self) -> String {
        match self.runs.as_slice() {
            [(size, _)] => format!("{size}-byte pages"),
            runs => runs
                .iter()
                .enumerate()
                .map(|(i, (s, c))| {
                    let s = if s % 1024 == 0 {
                        format!("{}K", s / 1024)
                    } else {
                        s.to_string()
                    };
                    if i + 1 == runs.len() || *c == 1 {
                        s
                    } else {
                        format!("{s}*{c}")
                    }
                })
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

// ---------------------------------------------------------------------------
// Scalars.

fn bad(key: &str, value: &str, why: &str) -> Error {
    OptionError::new(key, value, why).into()
}

/// `0x08000000`, `0X0800_0000` or decimal.
fn parse_num(key: &str, v: &str) -> Result<u32, Error> {
    let clean = v.replace('_', "");
    let parsed = match clean
        .strip_prefix("0x")
        .or_else(|| clean.strip_prefix("0X"))
    {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => clean.parse::<u32>(),
    };
    parsed.map_err(|_| bad(key, v, "expected a 32-bit number, 0x… hex or decimal"))
}

/// A number with an optional `K` (1024) or `M` (1024²) suffix (`KiB`, `MiB`
/// and a trailing `B` allowed).
fn parse_size(key: &str, v: &str) -> Result<u32, Error> {
    let t = v.trim();
    let upper = t.to_ascii_uppercase();
    let body = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (digits, mult) = if let Some(d) = body.strip_suffix('K') {
        (d, 1024u64)
    } else if let Some(d) = body.strip_suffix('M') {
        (d, 1024 * 1024)
    } else {
        (body, 1)
    };
    let n = parse_num(key, digits.trim())
        .map_err(|_| bad(key, v, "expected a size: bytes, or with K / M"))?;
    u32::try_from(u64::from(n) * mult).map_err(|_| bad(key, v, "larger than 4 GiB"))
}

/// `7F454C46`, `7f 45 4c 46`, `0x7F:0x45` …: pairs of hex digits.
fn parse_hex_bytes(key: &str, v: &str) -> Result<Vec<u8>, Error> {
    let mut digits = String::new();
    for part in v.split([' ', ':', ',', '-']).filter(|p| !p.is_empty()) {
        let p = part
            .strip_prefix("0x")
            .or_else(|| part.strip_prefix("0X"))
            .unwrap_or(part);
        digits.push_str(p);
    }
    // Checked before slicing: a non-ASCII character would split a slice in
    // the middle of its UTF-8 bytes (a panic, found by issue 12's review).
    if !digits.len().is_multiple_of(2) || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(key, v, "expected pairs of hex digits"));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&digits[i..i + 2], 16)
                .map_err(|_| bad(key, v, "expected pairs of hex digits"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_value_of_any_option_panics_the_parser() {
        let keys = [
            "reset_sequence",
            "run_sequence",
            "parity",
            "baud",
            "address",
            "mass_erase",
            "page_size",
            "erase_timeout_ms",
            "write_timeout_ms",
            "timeout_ms",
            "retries",
            "verify_readback",
            "go",
            "version_address",
            "version_length",
            "flash_size",
            "header_magic",
        ];
        otagw_plugin_sdk::assert_no_option_value_panics(&keys, super::Settings::parse);
        let r = super::Settings::parse(&[("header_magic".into(), "aéb".into())]);
        assert!(r.unwrap_err().to_string().contains("hex digits"));
    }

    use super::*;

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
        assert_eq!(s.parity, Parity::Even);
        assert_eq!(s.address, 0x0800_0000);
        assert!(s.reset_sequence.is_empty());
        assert_eq!(s.retries, 3);
    }

    #[test]
    fn parses_every_option() {
        let (s, unknown) = Settings::parse(&opts(&[
            ("reset-sequence", "rts=1, dtr=1, sleep=100, dtr=0, sleep=50"),
            ("run_sequence", "rts=0;dtr=1;wait=20;dtr=0"),
            ("Parity", "NONE"),
            ("baud", "57600"),
            ("address", "0x0800_4000"),
            ("mass_erase", "yes"),
            ("page_size", "16K*4,64K,128K"),
            ("erase_timeout_ms", "40000"),
            ("write_timeout_ms", "200"),
            ("timeout_ms", "300"),
            ("retries", "0"),
            ("verify_readback", "off"),
            ("go", "false"),
            ("version_address", "0x08000200"),
            ("version_length", "16"),
            ("flash_size", "256K"),
            ("header_magic", "00 50 00 20"),
            ("colour", "blue"),
        ]))
        .unwrap();
        assert_eq!(
            s.reset_sequence.steps,
            vec![
                LineStep::Set {
                    dtr: true,
                    rts: true
                },
                LineStep::Sleep(100),
                LineStep::Set {
                    dtr: false,
                    rts: true
                },
                LineStep::Sleep(50),
            ]
        );
        assert_eq!(
            s.run_sequence.steps,
            vec![
                LineStep::Set {
                    dtr: true,
                    rts: false
                },
                LineStep::Sleep(20),
                LineStep::Set {
                    dtr: false,
                    rts: false
                },
            ]
        );
        assert_eq!(s.parity, Parity::None);
        assert_eq!(s.baud, 57600);
        assert_eq!(s.address, 0x0800_4000);
        assert!(s.mass_erase);
        assert_eq!(
            s.page_size,
            Some(Layout {
                runs: vec![(16384, 4), (65536, 1), (131072, 1)]
            })
        );
        assert_eq!(s.erase_timeout_ms, 40000);
        assert_eq!(s.write_timeout_ms, 200);
        assert_eq!(s.timeout_ms, 300);
        assert_eq!(s.retries, 0);
        assert!(!s.verify_readback);
        assert!(!s.go);
        assert_eq!(s.version_address, Some(0x0800_0200));
        assert_eq!(s.version_length, 16);
        assert_eq!(s.flash_size, Some(256 * 1024));
        assert_eq!(s.header_magic, Some(vec![0x00, 0x50, 0x00, 0x20]));
        assert_eq!(unknown, vec!["colour".to_string()]);
    }

    #[test]
    fn none_sequences_and_sizes() {
        for v in ["", "none", "NONE"] {
            assert!(LineSeq::parse("k", v).unwrap().is_empty());
        }
        assert_eq!(parse_size("k", "64KiB").unwrap(), 65536);
        assert_eq!(parse_size("k", "1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("k", "0x10000").unwrap(), 65536);
        assert_eq!(parse_size("k", "2048").unwrap(), 2048);
    }

    #[test]
    fn bad_values_name_the_option() {
        for (k, v, needle) in [
            ("parity", "odd", "`parity`"),
            ("address", "0x08000002", "multiple of 4"),
            ("address", "0x20000000x", "`address`"),
            ("address", "0x1000", "at or above 0x08000000"),
            ("reset_sequence", "dtr", "expected dtr=0|1"),
            ("reset_sequence", "dtr=2", "expected 0 or 1"),
            ("reset_sequence", "boot0=1", "unknown step"),
            ("reset_sequence", "sleep=x", "milliseconds"),
            ("run_sequence", "sleep=20000", "at most 10000"),
            ("page_size", "2K*0", "`page_size`"),
            ("page_size", "big", "`page_size`"),
            ("timeout_ms", "0", "between 10 and 60000"),
            ("retries", "-1", "`retries`"),
            ("version_length", "300", "between 1 and 256"),
            ("flash_size", "0", "must not be 0"),
            ("flash_size", "8M*1024", "`flash_size`"),
            ("header_magic", "ABC", "pairs of hex digits"),
            ("header_magic", "zz", "pairs of hex digits"),
            ("mass_erase", "maybe", "`mass_erase`"),
            ("version_address", "0xFFFFFFF0", "past 0xFFFFFFFF"),
        ] {
            let err = Settings::parse(&opts(&[(k, v)])).unwrap_err();
            let Error::Options(msg) = &err else {
                panic!("{k}: expected an options error, got {err:?}")
            };
            assert!(msg.contains(needle), "{k}={v}: {msg}");
        }
    }

    #[test]
    fn uniform_pages() {
        let l = Layout::uniform(2048);
        assert_eq!(l.pages(0, 1), vec![(0, 0, 2048)]);
        assert_eq!(l.pages(0, 2048), vec![(0, 0, 2048)]);
        assert_eq!(l.pages(0, 2049), vec![(0, 0, 2048), (1, 2048, 2048)]);
        // From 0x08004100 (page 8, unaligned) for 0x200 bytes: pages 8 only.
        assert_eq!(l.pages(0x4100, 0x4300), vec![(8, 0x4000, 2048)]);
        assert_eq!(l.describe(), "2048-byte pages");
    }

    #[test]
    fn sector_layout() {
        let l = Layout::parse("k", "16K*4,64K,128K").unwrap();
        let p = l.pages(0, 0x40000);
        let idx: Vec<u32> = p.iter().map(|x| x.0).collect();
        assert_eq!(idx, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(p[4], (4, 0x10000, 0x10000));
        assert_eq!(p[5], (5, 0x20000, 0x20000));
        // Only sector 6 for something in 0x40000..0x50000.
        assert_eq!(l.pages(0x40000, 0x50000), vec![(6, 0x40000, 0x20000)]);
        assert_eq!(l.describe(), "16K*4,64K,128K");
    }
}
