//! The device options this family understands: their [`schema`] (names,
//! kinds, ranges, defaults, one line each for operators), the typed
//! [`Settings`] built from options checked against it, and the two small
//! languages this family needs: DTR/RTS sequences ([`LineSeq`]) and flash
//! page layouts ([`Layout`]).
//!
//! What it is: what can be a setting is a setting. The gateway checks and
//! types the options by the schema before the plugin sees them (the SDK does
//! the same natively, [`otagw_plugin_sdk::Family::settings_from_text`]);
//! [`Settings::from_options`] adds what the schema cannot say: the syntax of
//! the `text` options (sequences, layouts, `auto` and `none` beside sizes
//! and addresses), an address in flash and 4-byte aligned, a version that
//! ends before 0xFFFFFFFF.
//!
//! What it is not: it does no I/O.

use otagw_plugin_sdk::schema::{BytesEncoding, OptionSpec, Options, Problem};
use otagw_plugin_sdk::{Family, Fields, Parity};

/// Where the main flash of every STM32 starts; page numbers count from here.
pub const FLASH_BASE: u32 = 0x0800_0000;

/// Parity of the serial line (the cases this family uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineParity {
    /// 8E1, what AN3155 requires of a real STM32.
    Even,
    /// 8N1, for simulators on pseudo-terminals.
    None,
}

impl LineParity {
    /// As the link's parity.
    pub fn parity(self) -> Parity {
        match self {
            LineParity::Even => Parity::Even,
            LineParity::None => Parity::None,
        }
    }
}

/// Every setting of the family; the defaults are the schema's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `reset_sequence`: DTR/RTS steps that put the part in its bootloader
    /// (default none: no line is touched; boards with a button or a GPIO).
    pub reset_sequence: LineSeq,
    /// `run_sequence`: DTR/RTS steps run at the end of `flash` (after GO) and of
    /// `identify`, e.g. a reset with BOOT0 low (default none).
    pub run_sequence: LineSeq,
    /// `parity`: `even` (default, AN3155's 8E1) or `none` (simulators on ptys).
    pub parity: LineParity,
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

/// Longest timeout accepted for any `*_ms` option: 60 s, the host's cap on
/// one read.
const MAX_MS: u64 = 60_000;

/// The options of the family, in the order operators see them.
pub fn schema() -> Vec<OptionSpec> {
    let sequence = "steps like `rts=1, dtr=1, sleep=100, dtr=0` (1 = asserted; sleep in ms, \
                    at most 10000), or `none`";
    vec![
        OptionSpec::text(
            "reset_sequence",
            "DTR/RTS steps that put the part in its bootloader (default: none)",
        )
        .syntax(sequence),
        OptionSpec::text(
            "run_sequence",
            "DTR/RTS steps after GO and identify, e.g. a reset with BOOT0 low (default: none)",
        )
        .syntax(sequence),
        OptionSpec::choice(
            "parity",
            &[
                ("even", &["e"], "8E1, what the STM32 bootloader needs"),
                ("none", &["n"], "8N1, for simulators on pseudo-terminals"),
            ],
            "parity of the serial line",
        )
        .default_choice("even"),
        OptionSpec::integer("baud", 1200, 4_000_000, "line speed set on serial links")
            .default_int(115_200),
        OptionSpec::integer(
            "address",
            0,
            i64::from(u32::MAX),
            "where the image goes: in flash (0x08000000 up), 4-byte aligned",
        )
        .default_int(i64::from(FLASH_BASE)),
        OptionSpec::boolean(
            "mass_erase",
            "erase the whole flash instead of the pages the image covers",
        )
        .default_bool(false),
        OptionSpec::text(
            "page_size",
            "the erase layout (default: from the part's PID, else 2048-byte pages)",
        )
        .syntax("`auto`, a page size like `2K`, or sectors like `16K*4,64K,128K`"),
        OptionSpec::duration(
            "erase_timeout_ms",
            10,
            MAX_MS,
            "wait for the ACK of one erase",
        )
        .default_duration_ms(30_000),
        OptionSpec::duration(
            "write_timeout_ms",
            10,
            MAX_MS,
            "wait for the ACK of one written block",
        )
        .default_duration_ms(1000),
        OptionSpec::duration("timeout_ms", 10, MAX_MS, "wait for any other answer")
            .default_duration_ms(1000),
        OptionSpec::integer(
            "retries",
            0,
            100,
            "extra attempts after a NACK or a silence",
        )
        .default_int(3),
        OptionSpec::boolean("verify_readback", "read the flash back and compare")
            .default_bool(true),
        OptionSpec::boolean("go", "jump to the image after writing").default_bool(true),
        OptionSpec::text(
            "version_address",
            "where identify reads the version string (default: identify is unsupported)",
        )
        .syntax("an address like `0x08000200`, or `none`"),
        OptionSpec::integer("version_length", 1, 256, "bytes of the version string")
            .default_int(32),
        OptionSpec::text(
            "flash_size",
            "the part's flash (default: from the part's PID; unknown: no fit check)",
        )
        .syntax("a size like `256K` or `0x40000`, or `auto`"),
        OptionSpec::bytes(
            "header_magic",
            BytesEncoding::Hex,
            "bytes the image must start with",
        ),
    ]
}

impl Settings {
    /// The settings from options checked against [`schema`]: every problem,
    /// each naming its option.
    pub fn from_options(options: &Options) -> Result<Settings, Vec<Problem>> {
        let specs = schema();
        let mut f = Fields::new(&specs, options);
        let reset_sequence = parsed(&mut f, "reset_sequence", "none", LineSeq::parse);
        let run_sequence = parsed(&mut f, "run_sequence", "none", LineSeq::parse);
        let page_size = parsed(&mut f, "page_size", "auto", Layout::parse);
        let version_address = parsed(&mut f, "version_address", "none", parse_num);
        let flash_size = parsed(&mut f, "flash_size", "auto", |v| match parse_size(v)? {
            0 => Err("must not be 0".to_string()),
            n => Ok(n),
        });
        let address: u32 = f.integer("address");
        if !address.is_multiple_of(4) {
            f.bad("address", "must be a multiple of 4");
        }
        if address < FLASH_BASE {
            f.bad("address", "must be in flash, at or above 0x08000000");
        }
        let version_length: u32 = f.integer("version_length");
        if let Some(a) = version_address
            && a.checked_add(version_length.saturating_sub(1)).is_none()
        {
            f.bad("version_address", "the version would run past 0xFFFFFFFF");
        }
        let settings = Settings {
            reset_sequence: reset_sequence.unwrap_or_default(),
            run_sequence: run_sequence.unwrap_or_default(),
            parity: match f.choice("parity") {
                "none" => LineParity::None,
                _ => LineParity::Even,
            },
            baud: f.integer("baud"),
            address,
            mass_erase: f.boolean("mass_erase"),
            page_size,
            erase_timeout_ms: f.duration_ms("erase_timeout_ms"),
            write_timeout_ms: f.duration_ms("write_timeout_ms"),
            timeout_ms: f.duration_ms("timeout_ms"),
            retries: f.integer("retries"),
            verify_readback: f.boolean("verify_readback"),
            go: f.boolean("go"),
            version_address,
            version_length,
            flash_size,
            header_magic: f.optional_bytes("header_magic"),
        };
        f.finish(settings)
    }
}

/// A `text` option in a syntax of the family's, by `parse`: none when not
/// set, empty or `unset` (`auto`, `none`, any case), or when it does not
/// parse (a problem naming it).
fn parsed<T>(
    f: &mut Fields<'_>,
    name: &str,
    unset: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Option<T> {
    let v = f
        .optional_text(name)
        .map(str::trim)
        .filter(|v| !v.is_empty() && !v.eq_ignore_ascii_case(unset))?;
    parse(v).map_err(|why| f.bad(name, &why)).ok()
}

/// The schema's defaults.
impl Default for Settings {
    fn default() -> Self {
        crate::Stm32::default_settings()
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
    /// Parse `v`; the error says what is wrong with it.
    pub fn parse(v: &str) -> Result<LineSeq, String> {
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
                return Err(format!("`{token}`: expected dtr=0|1, rts=0|1 or sleep=MS"));
            };
            match name.trim().to_ascii_lowercase().as_str() {
                "dtr" => {
                    dtr = parse_level(token, val)?;
                    pending = true;
                }
                "rts" => {
                    rts = parse_level(token, val)?;
                    pending = true;
                }
                "sleep" | "wait" | "delay" => {
                    let ms: u32 = val
                        .trim()
                        .parse()
                        .map_err(|_| format!("`{token}`: expected milliseconds"))?;
                    if ms > 10_000 {
                        return Err(format!("`{token}`: at most 10000 ms"));
                    }
                    if pending {
                        steps.push(LineStep::Set { dtr, rts });
                        pending = false;
                    }
                    steps.push(LineStep::Sleep(ms));
                }
                _ => {
                    return Err(format!("`{token}`: unknown step (known: dtr, rts, sleep)"));
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

fn parse_level(token: &str, val: &str) -> Result<bool, String> {
    match val.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "high" | "true" => Ok(true),
        "0" | "off" | "low" | "false" => Ok(false),
        _ => Err(format!("`{token}`: expected 0 or 1")),
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

    /// Parse `v`; the error says what is wrong with it.
    pub fn parse(v: &str) -> Result<Layout, String> {
        let mut runs = Vec::new();
        for entry in v.split(',').map(str::trim) {
            let (size, count) = match entry.split_once('*') {
                Some((s, c)) => {
                    let c: u32 = c
                        .trim()
                        .parse()
                        .map_err(|_| format!("`{entry}`: bad count"))?;
                    (s.trim(), c)
                }
                None => (entry, 1),
            };
            let size = parse_size(size)?;
            if size < 4 || count == 0 {
                return Err(format!("`{entry}`: pages of at least 4 bytes"));
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

/// `0x08000000`, `0X0800_0000` or decimal.
fn parse_num(v: &str) -> Result<u32, String> {
    let clean = v.replace('_', "");
    let parsed = match clean
        .strip_prefix("0x")
        .or_else(|| clean.strip_prefix("0X"))
    {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => clean.parse::<u32>(),
    };
    parsed.map_err(|_| "expected a 32-bit number, 0x… hex or decimal".to_string())
}

/// A number with an optional `K` (1024) or `M` (1024²) suffix (`KiB`, `MiB`
/// and a trailing `B` allowed).
fn parse_size(v: &str) -> Result<u32, String> {
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
    let n = parse_num(digits.trim())
        .map_err(|_| format!("`{t}`: expected a size: bytes, or with K / M"))?;
    u32::try_from(u64::from(n) * mult).map_err(|_| format!("`{t}`: larger than 4 GiB"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Stm32;
    use otagw_plugin_sdk::testing::{assert_refused, check_family};

    fn parse(options: &[(&str, &str)]) -> Result<Settings, Vec<Problem>> {
        otagw_plugin_sdk::testing::settings::<Stm32>(options)
    }

    #[test]
    fn the_schema_is_valid_and_no_value_of_any_option_panics() {
        check_family::<Stm32>();
        let r = parse(&[("header_magic", "aéb")]);
        assert!(r.unwrap_err()[0].message.contains("hex digit"));
    }

    #[test]
    fn defaults() {
        let s = Settings::default();
        assert_eq!(s.parity, LineParity::Even);
        assert_eq!(s.baud, 115_200);
        assert_eq!(s.address, 0x0800_0000);
        assert!(s.reset_sequence.is_empty() && s.run_sequence.is_empty());
        assert_eq!(s.retries, 3);
        assert_eq!(
            (s.erase_timeout_ms, s.write_timeout_ms, s.timeout_ms),
            (30_000, 1000, 1000)
        );
        assert!(s.verify_readback && s.go && !s.mass_erase);
        assert_eq!(s.version_length, 32);
        assert_eq!(
            (s.page_size, s.version_address, s.flash_size, s.header_magic),
            (None, None, None, None)
        );
    }

    #[test]
    fn parses_every_option() {
        let s = parse(&[
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
        ])
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
        assert_eq!(s.parity, LineParity::None);
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
    }

    #[test]
    fn auto_and_none_mean_unset() {
        for v in ["", "auto", "AUTO"] {
            let s = parse(&[("page_size", v), ("flash_size", v)]).unwrap();
            assert_eq!((s.page_size, s.flash_size), (None, None), "{v:?}");
        }
        for v in ["", "none", " None "] {
            let s = parse(&[("version_address", v), ("reset_sequence", v)]).unwrap();
            assert_eq!(s.version_address, None, "{v:?}");
            assert!(s.reset_sequence.is_empty());
        }
        assert_eq!(parse(&[("parity", "e")]).unwrap().parity, LineParity::Even);
        assert_eq!(
            parse(&[("flash_size", "64KB")]).unwrap().flash_size,
            Some(65536)
        );
    }

    #[test]
    fn none_sequences_and_sizes() {
        for v in ["", "none", "NONE"] {
            assert!(LineSeq::parse(v).unwrap().is_empty());
        }
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("0x10000").unwrap(), 65536);
        assert_eq!(parse_size("2048").unwrap(), 2048);
    }

    #[test]
    fn bad_values_name_the_option() {
        assert_refused::<Stm32>(&[
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
            ("timeout_ms", "0", "`timeout_ms`"),
            ("timeout_ms", "61s", "from 10ms to"),
            ("retries", "-1", "`retries`"),
            ("version_length", "300", "from 1 to 256"),
            ("flash_size", "0", "must not be 0"),
            ("flash_size", "8M*1024", "`flash_size`"),
            ("header_magic", "ABC", "odd number of hex digits"),
            ("header_magic", "zz", "not a hex digit"),
            ("mass_erase", "maybe", "`mass_erase`"),
            ("version_address", "0xFFFFFFF0", "past 0xFFFFFFFF"),
            ("version_address", "high", "`version_address`"),
            ("colour", "blue", "unknown option `colour`"),
        ]);
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
        let l = Layout::parse("16K*4,64K,128K").unwrap();
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
