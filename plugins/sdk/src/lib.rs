//! What otagw's device-family plugins share, so each family keeps only its
//! protocol. Today: parsing the scalar device options (`retries = "5"`,
//! `require_newer = "yes"`) with the same words and the same messages in
//! every family. Plain Rust, no bindings: families convert [`OptionError`]
//! into their own error type.
//!
//! Also, natively only and hidden from the docs: `fuzzing`, the scripted
//! device link the fuzz targets in `fuzz/` drive the families' protocol code
//! with, and the replay of their corpus as tests.
//!
//! Not here (yet): the wasm glue each family repeats in its `guest.rs`
//! (see ARCHITECTURE.md, "a plugin SDK crate").

pub mod schema;

use std::fmt;

#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod fuzzing;

/// Values that have panicked option parsers (non-ASCII inside hex or
/// escapes, numbers past every range, empty, control characters).
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub const HOSTILE_OPTION_VALUES: &[&str] = &[
    "aéb",
    "é",
    "7fé4",
    "0xé",
    "\\xé",
    "\\é",
    "ü=1",
    "dtr=é",
    "99999999999999999999",
    "-1",
    "",
    " ",
    "0x",
    "K",
    "1MiB",
    "1e9",
    "\u{0}",
];

/// Test support: `parse` (a family's option parser) is called with every key
/// in `keys` set to each of [`HOSTILE_OPTION_VALUES`]; it may refuse any of
/// them, but must not panic.
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub fn assert_no_option_value_panics<R>(
    keys: &[&str],
    parse: impl Fn(&[(String, String)]) -> R + std::panic::RefUnwindSafe,
) {
    for k in keys {
        for v in HOSTILE_OPTION_VALUES {
            let opts = vec![(k.to_string(), v.to_string())];
            let r = std::panic::catch_unwind(|| {
                parse(&opts);
            });
            assert!(r.is_ok(), "{k} = {v:?} panicked");
        }
    }
}

/// A device option with a value the family cannot use. The message names the
/// option, its value (shortened) and why, e.g.
/// ``option `retries` = "many": expected a whole number``.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError(pub String);

impl OptionError {
    pub fn new(key: &str, value: &str, why: &str) -> OptionError {
        let shown: String = value.chars().take(80).collect();
        OptionError(format!("option `{key}` = {shown:?}: {why}"))
    }
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OptionError {}

/// A whole number within `min..=max`.
pub fn parse_u32(key: &str, v: &str, min: u32, max: u32) -> Result<u32, OptionError> {
    let n: u32 = v
        .parse()
        .map_err(|_| OptionError::new(key, v, "expected a whole number"))?;
    if n < min || n > max {
        return Err(OptionError::new(
            key,
            v,
            &format!("must be between {min} and {max}"),
        ));
    }
    Ok(n)
}

/// `true`/`yes`/`on`/`1` or `false`/`no`/`off`/`0`, any case.
pub fn parse_bool(key: &str, v: &str) -> Result<bool, OptionError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(OptionError::new(key, v, "expected true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_range() {
        assert_eq!(parse_u32("retries", "5", 0, 10), Ok(5));
        assert_eq!(
            parse_u32("retries", "11", 0, 10).unwrap_err().to_string(),
            "option `retries` = \"11\": must be between 0 and 10"
        );
        assert_eq!(
            parse_u32("retries", "many", 0, 10).unwrap_err().to_string(),
            "option `retries` = \"many\": expected a whole number"
        );
    }

    #[test]
    fn booleans_in_any_case() {
        for t in ["true", "YES", "On", "1"] {
            assert_eq!(parse_bool("go", t), Ok(true));
        }
        for f in ["false", "no", "OFF", "0"] {
            assert_eq!(parse_bool("go", f), Ok(false));
        }
        assert!(
            parse_bool("go", "maybe")
                .unwrap_err()
                .0
                .contains("expected true or false")
        );
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let e = OptionError::new("k", &"x".repeat(500), "too long");
        assert!(e.0.len() < 120, "{e}");
    }
}
