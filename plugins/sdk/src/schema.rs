//! Device options by schema: what a family declares about its options, how
//! operators write their values, and the one set of messages about them.
//!
//! What it is: the plain-Rust mirror of the `types` interface of
//! `wit/v0.2.0/plugin.wit` ([`OptionSpec`], [`OptionKind`], [`OptionValue`],
//! [`ChoiceValue`], [`BytesEncoding`]) and the rules its doc comments state:
//! - [`check`] turns a device's options as operators wrote them (key/value
//!   text) into typed [`Options`]: keys match without regard to case and `-`
//!   equals `_`, unknown keys are refused (with the closest valid key when
//!   there is a plausible one), required options must be set, defaults fill
//!   the rest;
//! - [`parse_value`] is the grammar of each kind (booleans, whole numbers in
//!   decimal or hex, escaped or hex bytes, choices with aliases, durations with
//!   units, sizes with `K`/`M` suffixes);
//! - [`validate_schema`] checks the schema itself (names, defaults, ranges,
//!   choices), which the gateway does before it accepts a plugin;
//! - [`shown`] and [`OptionKind::describe`] say values and kinds the way an
//!   operator writes and reads them, secrets masked.
//!
//! The gateway and the plugins both use this module, so `otagw check`, the
//! daemon and a family's unit tests say the same thing in the same words. A
//! bad value reads ``option `retries` = "many": expected a whole number from
//! 0 to 1000 (re-sends allowed per block)``; a secret's value is never
//! echoed: ``option `key` (secret): ...``.
//!
//! What it is not: no bindings and no I/O (callers convert to and from the
//! generated WIT types), and no family-specific checks: the syntax of a
//! `text` option or options that only make sense together are the family's
//! `check-options`. Nothing here panics on any input.

use std::fmt;
use std::fmt::Write as _;

use crate::OptionError;

/// How many characters of a value (or key) a message shows.
const SHOWN_CHARS: usize = 80;

/// How many valid keys a message about an unknown key lists.
const LISTED_KEYS: usize = 12;

/// Keys longer than this get no "did you mean" (string distances are
/// quadratic in the length).
const SUGGEST_MAX_CHARS: usize = 64;

/// How the text of a [`OptionKind::Bytes`] option encodes its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BytesEncoding {
    /// Text with escapes: `\r \n \t \0 \\ \xNN`; any other backslash sequence
    /// is an error. Other characters stand for their UTF-8 bytes.
    Escaped,
    /// Pairs of hex digits, optionally `0x`-prefixed (per byte or as a prefix
    /// of the whole) and separated by spaces, `:`, `,` or `-`.
    Hex,
}

/// One value of a [`OptionKind::Choice`] option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChoiceValue {
    /// The value, lowercase, e.g. "ymodem": what the plugin gets.
    pub value: String,
    /// Other spellings operators may write for it, e.g. "xmodem-1k".
    pub aliases: Vec<String>,
    /// One line for operators; may be empty.
    pub doc: String,
}

impl ChoiceValue {
    pub fn new(value: &str, aliases: &[&str], doc: &str) -> ChoiceValue {
        ChoiceValue {
            value: value.to_string(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            doc: doc.to_string(),
        }
    }
}

/// The kind of an option's value: how operators write it, what is accepted,
/// and which [`OptionValue`] case it becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionKind {
    /// Free text, exactly as written; `max_length` in bytes of UTF-8.
    /// `syntax` is one line telling operators what the family expects; it is
    /// not parsed here (the family checks it).
    Text {
        max_length: Option<u32>,
        syntax: Option<String>,
    },
    /// `true`/`yes`/`on`/`1` or `false`/`no`/`off`/`0`, any case.
    Boolean,
    /// A whole number within `min..=max`, decimal or `0x` hex.
    Integer { min: i64, max: i64 },
    /// Bytes written as text in `encoding`; `max_length` in bytes.
    Bytes {
        encoding: BytesEncoding,
        max_length: Option<u32>,
    },
    /// One of the values or their aliases, any case.
    Choice(Vec<ChoiceValue>),
    /// A duration within `min_ms..=max_ms` milliseconds.
    Duration { min_ms: u64, max_ms: u64 },
    /// A number of bytes within `min..=max`.
    Size { min: u64, max: u64 },
}

/// A checked option value, of the case its [`OptionKind`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionValue {
    Text(String),
    Boolean(bool),
    Integer(i64),
    Bytes(Vec<u8>),
    /// The choice's `value` (never an alias).
    Choice(String),
    /// Milliseconds.
    Duration(u64),
    /// Bytes.
    Size(u64),
}

/// One device option a family understands.
///
/// Built compactly with the constructors and builder methods:
///
/// ```
/// use otagw_plugin_sdk::schema::{BytesEncoding, OptionSpec, OptionValue};
///
/// let schema = vec![
///     OptionSpec::choice(
///         "protocol",
///         &[
///             ("xmodem", &["xmodem-1k", "xmodem1k"], "plain XMODEM"),
///             ("ymodem", &[], "YMODEM batch"),
///         ],
///         "which protocol to speak",
///     )
///     .default_choice("xmodem"),
///     OptionSpec::integer("retries", 0, 1000, "re-sends allowed per block")
///         .default(OptionValue::Integer(10)),
///     OptionSpec::duration("block_timeout", 10, 3_600_000, "wait for ACK/NAK")
///         .default_duration_ms(3000),
///     OptionSpec::bytes("enter_command", BytesEncoding::Escaped, "starts receive mode")
///         .max_length(256),
///     OptionSpec::text("passkey", "BLE passkey").secret().required(),
/// ];
/// assert!(otagw_plugin_sdk::schema::validate_schema(&schema).is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionSpec {
    /// The key operators write: lowercase letters, digits and '_', starting
    /// with a letter.
    pub name: String,
    /// How the value is written and checked.
    pub kind: OptionKind,
    /// The value when operators set none; of `kind`, within its limits, and
    /// none for a `required` option.
    pub default: Option<OptionValue>,
    /// Whether every device of the family must set it.
    pub required: bool,
    /// Whether the value is a secret: never echoed in messages or [`shown`].
    pub secret: bool,
    /// One line for operators, shown in messages about this option.
    pub doc: String,
}

impl OptionSpec {
    /// An option of any kind, not required, not secret, no default.
    pub fn new(name: impl Into<String>, kind: OptionKind, doc: impl Into<String>) -> OptionSpec {
        OptionSpec {
            name: name.into(),
            kind,
            default: None,
            required: false,
            secret: false,
            doc: doc.into(),
        }
    }

    /// Free text, no length limit, no syntax line.
    pub fn text(name: impl Into<String>, doc: impl Into<String>) -> OptionSpec {
        OptionSpec::new(
            name,
            OptionKind::Text {
                max_length: None,
                syntax: None,
            },
            doc,
        )
    }

    /// `true` or `false`.
    pub fn boolean(name: impl Into<String>, doc: impl Into<String>) -> OptionSpec {
        OptionSpec::new(name, OptionKind::Boolean, doc)
    }

    /// A whole number within `min..=max`.
    pub fn integer(
        name: impl Into<String>,
        min: i64,
        max: i64,
        doc: impl Into<String>,
    ) -> OptionSpec {
        OptionSpec::new(name, OptionKind::Integer { min, max }, doc)
    }

    /// Bytes in `encoding`, no length limit (see [`OptionSpec::max_length`]).
    pub fn bytes(
        name: impl Into<String>,
        encoding: BytesEncoding,
        doc: impl Into<String>,
    ) -> OptionSpec {
        OptionSpec::new(
            name,
            OptionKind::Bytes {
                encoding,
                max_length: None,
            },
            doc,
        )
    }

    /// One of `values`, each `(value, aliases, doc)`.
    pub fn choice(
        name: impl Into<String>,
        values: &[(&str, &[&str], &str)],
        doc: impl Into<String>,
    ) -> OptionSpec {
        let values = values
            .iter()
            .map(|(value, aliases, doc)| ChoiceValue::new(value, aliases, doc))
            .collect();
        OptionSpec::new(name, OptionKind::Choice(values), doc)
    }

    /// A duration within `min_ms..=max_ms` milliseconds.
    pub fn duration(
        name: impl Into<String>,
        min_ms: u64,
        max_ms: u64,
        doc: impl Into<String>,
    ) -> OptionSpec {
        OptionSpec::new(name, OptionKind::Duration { min_ms, max_ms }, doc)
    }

    /// A number of bytes within `min..=max`.
    pub fn size(name: impl Into<String>, min: u64, max: u64, doc: impl Into<String>) -> OptionSpec {
        OptionSpec::new(name, OptionKind::Size { min, max }, doc)
    }

    /// The value when operators set none.
    pub fn default(mut self, value: OptionValue) -> OptionSpec {
        self.default = Some(value);
        self
    }

    /// `.default(OptionValue::Text(..))`.
    pub fn default_text(self, text: &str) -> OptionSpec {
        self.default(OptionValue::Text(text.to_string()))
    }

    /// `.default(OptionValue::Boolean(..))`.
    pub fn default_bool(self, value: bool) -> OptionSpec {
        self.default(OptionValue::Boolean(value))
    }

    /// `.default(OptionValue::Integer(..))`.
    pub fn default_int(self, value: i64) -> OptionSpec {
        self.default(OptionValue::Integer(value))
    }

    /// `.default(OptionValue::Bytes(..))`.
    pub fn default_bytes(self, bytes: &[u8]) -> OptionSpec {
        self.default(OptionValue::Bytes(bytes.to_vec()))
    }

    /// `.default(OptionValue::Choice(..))`: one of the values, not an alias.
    pub fn default_choice(self, value: &str) -> OptionSpec {
        self.default(OptionValue::Choice(value.to_string()))
    }

    /// `.default(OptionValue::Duration(..))`.
    pub fn default_duration_ms(self, ms: u64) -> OptionSpec {
        self.default(OptionValue::Duration(ms))
    }

    /// `.default(OptionValue::Size(..))`.
    pub fn default_size(self, bytes: u64) -> OptionSpec {
        self.default(OptionValue::Size(bytes))
    }

    /// Every device of the family must set it.
    pub fn required(mut self) -> OptionSpec {
        self.required = true;
        self
    }

    /// The value is a secret: never echoed.
    pub fn secret(mut self) -> OptionSpec {
        self.secret = true;
        self
    }

    /// For `text` options: the one line telling operators the syntax the
    /// family expects. Other kinds have no syntax line; it is ignored there.
    pub fn syntax(mut self, line: impl Into<String>) -> OptionSpec {
        if let OptionKind::Text { syntax, .. } = &mut self.kind {
            *syntax = Some(line.into());
        }
        self
    }

    /// For `text` and `bytes` options: the most bytes the value may hold.
    /// Other kinds have no length; it is ignored there.
    pub fn max_length(mut self, bytes: u32) -> OptionSpec {
        match &mut self.kind {
            OptionKind::Text { max_length, .. } | OptionKind::Bytes { max_length, .. } => {
                *max_length = Some(bytes)
            }
            _ => {}
        }
        self
    }
}

impl OptionKind {
    /// The kind's name as the WIT spells it: "text", "boolean", "integer",
    /// "bytes", "choice", "duration" or "size".
    pub fn name(&self) -> &'static str {
        match self {
            OptionKind::Text { .. } => "text",
            OptionKind::Boolean => "boolean",
            OptionKind::Integer { .. } => "integer",
            OptionKind::Bytes { .. } => "bytes",
            OptionKind::Choice(_) => "choice",
            OptionKind::Duration { .. } => "duration",
            OptionKind::Size { .. } => "size",
        }
    }

    /// What values of this kind look like, for operators: "a whole number
    /// from 0 to 1000", "one of xmodem, ymodem", "a duration from 10ms to
    /// 1h", "true or false". Messages say "expected " followed by this.
    pub fn describe(&self) -> String {
        match self {
            OptionKind::Text { max_length, syntax } => {
                let mut s = String::from("text");
                if let Some(n) = max_length {
                    let _ = write!(s, " of at most {n} bytes");
                }
                if let Some(syntax) = syntax {
                    let _ = write!(s, ": {syntax}");
                }
                s
            }
            OptionKind::Boolean => "true or false".to_string(),
            OptionKind::Integer { min, max } => match (*min == i64::MIN, *max == i64::MAX) {
                (true, true) => "a whole number".to_string(),
                (true, false) => format!("a whole number up to {max}"),
                (false, true) => format!("a whole number of at least {min}"),
                (false, false) => format!("a whole number from {min} to {max}"),
            },
            OptionKind::Bytes {
                encoding,
                max_length,
            } => {
                let mut s = match encoding {
                    BytesEncoding::Escaped => {
                        String::from(r"text with escapes \r \n \t \0 \\ \xNN")
                    }
                    BytesEncoding::Hex => String::from("bytes in hex, like `7f 45 4c 46`"),
                };
                if let Some(n) = max_length {
                    let _ = write!(s, ", at most {n} bytes");
                }
                s
            }
            OptionKind::Choice(values) => {
                let names: Vec<&str> = values.iter().map(|v| v.value.as_str()).collect();
                format!("one of {}", names.join(", "))
            }
            OptionKind::Duration { min_ms, max_ms } => match (*min_ms == 0, *max_ms == u64::MAX) {
                (true, true) => "a duration".to_string(),
                (false, true) => format!("a duration of at least {}", format_ms(*min_ms)),
                _ => format!(
                    "a duration from {} to {}",
                    format_ms(*min_ms),
                    format_ms(*max_ms)
                ),
            },
            OptionKind::Size { min, max } => match (*min == 0, *max == u64::MAX) {
                (true, true) => "a size in bytes".to_string(),
                (false, true) => format!("a size in bytes of at least {}", format_size(*min)),
                _ => format!(
                    "a size in bytes from {} to {}",
                    format_size(*min),
                    format_size(*max)
                ),
            },
        }
    }
}

impl OptionValue {
    /// The name of the kind this value belongs to (see [`OptionKind::name`]).
    pub fn kind_name(&self) -> &'static str {
        match self {
            OptionValue::Text(_) => "text",
            OptionValue::Boolean(_) => "boolean",
            OptionValue::Integer(_) => "integer",
            OptionValue::Bytes(_) => "bytes",
            OptionValue::Choice(_) => "choice",
            OptionValue::Duration(_) => "duration",
            OptionValue::Size(_) => "size",
        }
    }
}

/// How an operator writes the value: text as is, bytes escaped
/// ([`escape_bytes`]), durations and sizes with the largest exact unit
/// (`90s`, `256K`). Not for secrets: use [`shown`], which knows the spec.
impl fmt::Display for OptionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionValue::Text(s) | OptionValue::Choice(s) => f.write_str(s),
            OptionValue::Boolean(b) => write!(f, "{b}"),
            OptionValue::Integer(n) => write!(f, "{n}"),
            OptionValue::Bytes(b) => f.write_str(&escape_bytes(b)),
            OptionValue::Duration(ms) => f.write_str(&format_ms(*ms)),
            OptionValue::Size(n) => f.write_str(&format_size(*n)),
        }
    }
}

/// How an operator would write `value` of the option `spec`: `(secret)` for
/// secret options, bytes in the spec's encoding, otherwise as
/// [`OptionValue`]'s `Display`. What `otagw plugins` and logs show.
pub fn shown(spec: &OptionSpec, value: &OptionValue) -> String {
    if spec.secret {
        return "(secret)".to_string();
    }
    match (value, &spec.kind) {
        (
            OptionValue::Bytes(b),
            OptionKind::Bytes {
                encoding: BytesEncoding::Hex,
                ..
            },
        ) => hex_bytes(b),
        _ => value.to_string(),
    }
}

/// Bytes as escaped text that parses back to them: `\\ \r \n \t \0` named,
/// other control characters and bytes that are not UTF-8 as `\xNN`, other
/// characters as themselves.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str(r"\\"),
                '\r' => out.push_str(r"\r"),
                '\n' => out.push_str(r"\n"),
                '\t' => out.push_str(r"\t"),
                '\0' => out.push_str(r"\0"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        let _ = write!(out, r"\x{b:02x}");
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, r"\x{b:02x}");
        }
    }
    out
}

/// Bytes as lowercase hex pairs separated by spaces: `7f 45 4c 46`.
pub fn hex_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Milliseconds with the largest unit that divides them exactly: `0`,
/// `1500ms`, `90s`, `2m`, `1h`.
pub fn format_ms(ms: u64) -> String {
    match ms {
        0 => "0".to_string(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

/// Bytes with the largest suffix that divides them exactly: `100`, `256K`,
/// `1M`.
pub fn format_size(bytes: u64) -> String {
    match bytes {
        0 => "0".to_string(),
        n if n % (1 << 20) == 0 => format!("{}M", n >> 20),
        n if n % 1024 == 0 => format!("{}K", n >> 10),
        n => n.to_string(),
    }
}

/// One problem with a device's options (or with a schema), for operators.
/// `Display` is the message, which names the option itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The option it is about: its schema name, or for an unknown key the key
    /// as written; none when it is about several together.
    pub option: Option<String>,
    /// What is wrong and what would be right.
    pub message: String,
}

impl Problem {
    /// A problem about `option` (when it is about one).
    pub fn new(option: Option<&str>, message: impl Into<String>) -> Problem {
        Problem {
            option: option.map(str::to_string),
            message: message.into(),
        }
    }

    /// A value of `spec` that is not acceptable, in the one format:
    /// ``option `retries` = "many": expected a whole number from 0 to 1000
    /// (re-sends allowed per block)``. `written` is shown shortened and
    /// escaped, or not at all for a secret (``option `key` (secret): ...``);
    /// the doc follows in parentheses when there is one.
    pub fn bad_value(spec: &OptionSpec, written: &str, why: &str) -> Problem {
        let mut message = if spec.secret {
            format!("option `{}` (secret): {why}", spec.name)
        } else {
            format!("option `{}` = {}: {why}", spec.name, quoted(written))
        };
        push_doc(&mut message, &spec.doc);
        Problem::new(Some(&spec.name), message)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Problem {}

impl From<Problem> for OptionError {
    fn from(p: Problem) -> OptionError {
        OptionError(p.message)
    }
}

/// Checked, typed options: every option that has a value (set, or its
/// default) exactly once under its schema name, in schema order. What
/// [`check`] returns and what a plugin gets from the gateway.
///
/// `Debug` shows values, secrets included: log options with [`shown`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options(Vec<(String, OptionValue)>);

/// One typed accessor of [`Options`]: the value of the option `name` when it
/// is of the case `$case`.
macro_rules! accessor {
    ($(#[$doc:meta])* $method:ident, $case:ident, $ty:ty, |$v:ident| $out:expr) => {
        $(#[$doc])*
        pub fn $method(&self, name: &str) -> Option<$ty> {
            match self.get(name)? {
                OptionValue::$case($v) => Some($out),
                _ => None,
            }
        }
    };
}

impl Options {
    /// Options as they are, e.g. as the gateway handed them to a plugin
    /// (already checked there).
    pub fn new(options: Vec<(String, OptionValue)>) -> Options {
        Options(options)
    }

    /// The value of the option named `name` (its schema name, exactly).
    pub fn get(&self, name: &str) -> Option<&OptionValue> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    accessor!(
        /// A `text` option's value; none when absent or of another kind.
        text, Text, &str, |s| s
    );
    accessor!(
        /// A `boolean` option's value; none when absent or of another kind.
        boolean, Boolean, bool, |b| *b
    );
    accessor!(
        /// An `integer` option's value; none when absent or of another kind.
        integer, Integer, i64, |n| *n
    );
    accessor!(
        /// A `bytes` option's value; none when absent or of another kind.
        bytes, Bytes, &[u8], |b| b
    );
    accessor!(
        /// A `choice` option's value (never an alias); none when absent or of
        /// another kind.
        choice, Choice, &str, |s| s
    );
    accessor!(
        /// A `duration` option's value in milliseconds; none when absent or
        /// of another kind.
        duration_ms, Duration, u64, |ms| *ms
    );
    accessor!(
        /// A `size` option's value in bytes; none when absent or of another kind.
        size, Size, u64, |n| *n
    );

    /// (name, value) in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &OptionValue)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn into_vec(self) -> Vec<(String, OptionValue)> {
        self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl From<Vec<(String, OptionValue)>> for Options {
    fn from(options: Vec<(String, OptionValue)>) -> Options {
        Options(options)
    }
}

/// A key as it is matched: trimmed, lowercase, `-` taken for `_`.
pub fn normalize_key(key: &str) -> String {
    key.trim().to_lowercase().replace('-', "_")
}

/// The spec `key` names, matched as [`normalize_key`] says.
pub fn find<'a>(specs: &'a [OptionSpec], key: &str) -> Option<&'a OptionSpec> {
    let key = normalize_key(key);
    specs.iter().find(|s| normalize_key(&s.name) == key)
}

/// Check a device's options, as operators wrote them, against `specs`: every
/// problem (unknown or repeated keys, bad values, required options not set),
/// or the typed [`Options`] with defaults filled in.
///
/// `specs` is assumed to have passed [`validate_schema`]; its defaults are
/// taken as they are.
pub fn check(specs: &[OptionSpec], raw: &[(String, String)]) -> Result<Options, Vec<Problem>> {
    let names: Vec<String> = specs.iter().map(|s| normalize_key(&s.name)).collect();
    let mut values: Vec<Option<OptionValue>> = vec![None; specs.len()];
    let mut spellings: Vec<Vec<&str>> = vec![Vec::new(); specs.len()];
    let mut unknown: Vec<String> = Vec::new();
    let mut problems = Vec::new();

    for (key, value) in raw {
        let norm = normalize_key(key);
        match names.iter().position(|n| *n == norm) {
            Some(i) => {
                spellings[i].push(key);
                if spellings[i].len() == 1 {
                    match parse_value(&specs[i], value) {
                        Ok(v) => values[i] = Some(v),
                        Err(p) => problems.push(p),
                    }
                }
            }
            None if unknown.contains(&norm) => {}
            None => {
                unknown.push(norm);
                problems.push(unknown_key(specs, key));
            }
        }
    }
    for (spec, keys) in specs.iter().zip(&spellings) {
        if keys.len() > 1 {
            let keys: Vec<String> = keys.iter().map(|k| format!("`{}`", shorten(k))).collect();
            problems.push(Problem::new(
                Some(&spec.name),
                format!(
                    "option `{}` is set {} times (as {}); set it once",
                    spec.name,
                    keys.len(),
                    keys.join(", ")
                ),
            ));
        }
        if keys.is_empty() && spec.required {
            let mut message = format!("option `{}` is required but not set", spec.name);
            push_doc(&mut message, &spec.doc);
            problems.push(Problem::new(Some(&spec.name), message));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let options = specs
        .iter()
        .zip(values)
        .filter_map(|(spec, v)| Some((spec.name.clone(), v.or_else(|| spec.default.clone())?)))
        .collect();
    Ok(Options(options))
}

/// ``unknown option `retrys` (did you mean `retries`?)``, or the valid keys
/// when none is close.
fn unknown_key(specs: &[OptionSpec], key: &str) -> Problem {
    let names = specs.iter().map(|s| s.name.as_str());
    let message = match closest(&normalize_key(key), names) {
        Some(name) => format!("unknown option `{}` (did you mean `{name}`?)", shorten(key)),
        None if specs.is_empty() => {
            format!(
                "unknown option `{}` (this family takes no options)",
                shorten(key)
            )
        }
        None => {
            let listed: Vec<&str> = specs
                .iter()
                .take(LISTED_KEYS)
                .map(|s| s.name.as_str())
                .collect();
            let more = specs.len().saturating_sub(LISTED_KEYS);
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            format!(
                "unknown option `{}` (known options: {}{more})",
                shorten(key),
                listed.join(", ")
            )
        }
    };
    Problem::new(Some(key), message)
}

/// The candidate most like `word` when one is plausibly a misspelling of it.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let len = word.chars().count();
    if len == 0 || len > SUGGEST_MAX_CHARS {
        return None;
    }
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        let c_len = c.chars().count();
        if c_len > SUGGEST_MAX_CHARS {
            continue;
        }
        let jw = strsim::jaro_winkler(word, c);
        let edits = strsim::damerau_levenshtein(word, c);
        let shorter = len.min(c_len);
        let plausible = jw >= 0.85 || (edits <= 1 && shorter >= 3) || (edits <= 2 && shorter >= 6);
        if plausible && best.is_none_or(|(score, _)| jw > score) {
            best = Some((jw, c));
        }
    }
    best.map(|(_, c)| c)
}

/// `value` as written, for messages: at most [`SHOWN_CHARS`] characters,
/// escaped so that control and invisible characters show, in double quotes.
fn quoted(value: &str) -> String {
    let mut chars = value.chars();
    let head: String = chars.by_ref().take(SHOWN_CHARS).collect();
    let more = if chars.next().is_some() { "…" } else { "" };
    format!("\"{}{more}\"", head.escape_debug())
}

/// A key as written, for messages: shortened and escaped, without quotes.
fn shorten(key: &str) -> String {
    let mut chars = key.chars();
    let head: String = chars.by_ref().take(SHOWN_CHARS).collect();
    let more = if chars.next().is_some() { "…" } else { "" };
    format!("{}{more}", head.escape_debug())
}

fn push_doc(message: &mut String, doc: &str) {
    if !doc.trim().is_empty() {
        let _ = write!(message, " ({})", doc.trim());
    }
}

/// Parse one value of `spec` as an operator wrote it. The error is in the
/// one message format ([`Problem::bad_value`]).
pub fn parse_value(spec: &OptionSpec, raw: &str) -> Result<OptionValue, Problem> {
    parse_kind(&spec.kind, raw, spec.secret).map_err(|why| Problem::bad_value(spec, raw, &why))
}

/// The grammar of each kind; the error is the "why" of a message. With
/// `secret`, the why shows nothing of the value but positions.
fn parse_kind(kind: &OptionKind, raw: &str, secret: bool) -> Result<OptionValue, String> {
    let expected = || format!("expected {}", kind.describe());
    match kind {
        OptionKind::Text { max_length, .. } => {
            check_length(raw.len(), *max_length, "bytes of text", secret)?;
            Ok(OptionValue::Text(raw.to_string()))
        }
        OptionKind::Boolean => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(OptionValue::Boolean(true)),
            "false" | "no" | "off" | "0" => Ok(OptionValue::Boolean(false)),
            _ => Err(expected()),
        },
        OptionKind::Integer { min, max } => match parse_integer(raw.trim()) {
            Ok(n) if n >= i128::from(*min) && n <= i128::from(*max) => {
                // In range of two i64s, so the conversion cannot fail.
                i64::try_from(n)
                    .map(OptionValue::Integer)
                    .map_err(|_| expected())
            }
            _ => Err(expected()),
        },
        OptionKind::Bytes {
            encoding,
            max_length,
        } => {
            let bytes = match encoding {
                BytesEncoding::Escaped => unescape(raw, secret)?,
                BytesEncoding::Hex => unhex(raw, secret)?,
            };
            check_length(bytes.len(), *max_length, "bytes", secret)?;
            Ok(OptionValue::Bytes(bytes))
        }
        OptionKind::Choice(values) => {
            let written = raw.trim().to_lowercase();
            for v in values {
                if v.value.to_lowercase() == written
                    || v.aliases.iter().any(|a| a.to_lowercase() == written)
                {
                    return Ok(OptionValue::Choice(v.value.clone()));
                }
            }
            let mut why = expected();
            if !secret {
                let spellings = values.iter().flat_map(|v| {
                    std::iter::once(v.value.as_str()).chain(v.aliases.iter().map(String::as_str))
                });
                if let Some(close) = closest(&written, spellings) {
                    // Suggest the value the spelling stands for.
                    let value = values
                        .iter()
                        .find(|v| v.value == close || v.aliases.iter().any(|a| a == close))
                        .map_or(close, |v| v.value.as_str());
                    let _ = write!(why, "; did you mean `{value}`?");
                }
            }
            Err(why)
        }
        OptionKind::Duration { min_ms, max_ms } => {
            let written = raw.trim();
            match parse_duration_ms(written) {
                Ok(ms) if ms >= *min_ms && ms <= *max_ms => Ok(OptionValue::Duration(ms)),
                Err(NumError::Syntax) => Err(format!(
                    "{}, written as milliseconds (`500`) or with a unit (`1500ms`, `30s`, `2m`, `1h`)",
                    expected()
                )),
                Ok(_) | Err(NumError::TooLarge) => {
                    let mut why = expected();
                    if is_digits(written) {
                        why.push_str("; a number without a unit is milliseconds");
                    }
                    Err(why)
                }
            }
        }
        OptionKind::Size { min, max } => match parse_size(raw.trim()) {
            Ok(n) if n >= *min && n <= *max => Ok(OptionValue::Size(n)),
            Err(NumError::Syntax) => Err(format!(
                "{}, written like `4096`, `0x1000`, `256K` or `1M`",
                expected()
            )),
            Ok(_) | Err(NumError::TooLarge) => Err(expected()),
        },
    }
}

fn check_length(len: usize, max: Option<u32>, what: &str, secret: bool) -> Result<(), String> {
    match max {
        Some(max) if len > max as usize => Err(if secret {
            format!("expected at most {max} {what}")
        } else {
            format!("expected at most {max} {what}, got {len}")
        }),
        _ => Ok(()),
    }
}

/// Why a number did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumError {
    /// Not written as the kind's numbers are.
    Syntax,
    /// Written right, but past what 64 bits hold.
    TooLarge,
}

/// Digits in `radix`, `_` allowed between two digits. Syntax is checked to
/// the end even after an overflow, so that a malformed value is reported as
/// such.
fn digits(s: &str, radix: u32) -> Result<u64, NumError> {
    let mut n = Some(0u64);
    let mut after_digit = false;
    for c in s.chars() {
        if c == '_' {
            if !after_digit {
                return Err(NumError::Syntax);
            }
            after_digit = false;
            continue;
        }
        let d = c.to_digit(radix).ok_or(NumError::Syntax)?;
        n = n
            .and_then(|n| n.checked_mul(u64::from(radix)))
            .and_then(|n| n.checked_add(u64::from(d)));
        after_digit = true;
    }
    if !after_digit {
        // Empty, or ends with '_'.
        return Err(NumError::Syntax);
    }
    n.ok_or(NumError::TooLarge)
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '_')
}

fn strip_hex_prefix(s: &str) -> Option<&str> {
    s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))
}

/// Decimal with an optional `-`, or `0x` hex.
fn parse_integer(s: &str) -> Result<i128, NumError> {
    if let Some(hex) = strip_hex_prefix(s) {
        return digits(hex, 16).map(i128::from);
    }
    match s.strip_prefix('-') {
        Some(body) => digits(body, 10).map(|n| -i128::from(n)),
        None => digits(s, 10).map(i128::from),
    }
}

/// A whole number of bytes (decimal or `0x` hex) with an optional `K`,
/// `KiB`, `M` or `MiB` suffix, any case.
fn parse_size(s: &str) -> Result<u64, NumError> {
    let (radix, body) = match strip_hex_prefix(s) {
        Some(hex) => (16, hex),
        None => (10, s),
    };
    let end = body
        .find(|c: char| !(c.is_digit(radix) || c == '_'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(end);
    let unit: u64 = match suffix.trim_start().to_ascii_lowercase().as_str() {
        "" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        _ => return Err(NumError::Syntax),
    };
    digits(number, radix)?
        .checked_mul(unit)
        .ok_or(NumError::TooLarge)
}

/// Milliseconds of a duration unit, any case.
fn unit_ms(unit: &str) -> Option<u64> {
    match unit.to_ascii_lowercase().as_str() {
        "ms" | "msec" | "msecs" | "millis" | "millisecond" | "milliseconds" => Some(1),
        "s" | "sec" | "secs" | "second" | "seconds" => Some(1000),
        "m" | "min" | "mins" | "minute" | "minutes" => Some(60_000),
        "h" | "hr" | "hrs" | "hour" | "hours" => Some(3_600_000),
        _ => None,
    }
}

/// A bare number of milliseconds, or numbers with units, added up: `500`,
/// `1500ms`, `30s`, `2m`, `1h`, `1m30s`, `1m 30s`.
fn parse_duration_ms(s: &str) -> Result<u64, NumError> {
    if is_digits(s) {
        return digits(s, 10);
    }
    let mut total = Some(0u64);
    let mut rest = s;
    let mut any = false;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '_'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(end);
        let n = match digits(number, 10) {
            Ok(n) => Some(n),
            Err(NumError::TooLarge) => None,
            Err(NumError::Syntax) => return Err(NumError::Syntax),
        };
        let after = after.trim_start();
        let end = after
            .find(|c: char| !c.is_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(end);
        let unit = unit_ms(unit).ok_or(NumError::Syntax)?;
        total = total
            .zip(n)
            .and_then(|(t, n)| n.checked_mul(unit).and_then(|ms| t.checked_add(ms)));
        any = true;
        rest = after;
    }
    if !any {
        return Err(NumError::Syntax);
    }
    total.ok_or(NumError::TooLarge)
}

/// `\r \n \t \0 \\ \xNN`; other characters stand for their UTF-8 bytes.
/// Positions in errors count characters from 1.
fn unescape(s: &str, secret: bool) -> Result<Vec<u8>, String> {
    const ESCAPES: &str = r"the escapes are \r \n \t \0 \\ \xNN";
    let mut out = Vec::with_capacity(s.len());
    let mut chars = s.chars().enumerate();
    while let Some((i, c)) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        let at = i + 1;
        let Some((_, e)) = chars.next() else {
            return Err(format!(
                r"a lone `\` at the end (character {at}); write `\\` for a backslash"
            ));
        };
        match e {
            'r' => out.push(b'\r'),
            'n' => out.push(b'\n'),
            't' => out.push(b'\t'),
            '0' => out.push(0),
            '\\' => out.push(b'\\'),
            'x' => {
                let hi = chars.next().and_then(|(_, c)| c.to_digit(16));
                let lo = hi
                    .and_then(|_| chars.next())
                    .and_then(|(_, c)| c.to_digit(16));
                match hi.zip(lo) {
                    // Two hex digits make at most 0xff.
                    Some((hi, lo)) => out.push(u8::try_from(hi * 16 + lo).unwrap_or(u8::MAX)),
                    None => {
                        return Err(format!(
                            r"`\x` at character {at} must be followed by two hex digits"
                        ));
                    }
                }
            }
            _ if secret => {
                return Err(format!("unknown escape at character {at}; {ESCAPES}"));
            }
            e => {
                return Err(format!(
                    r"unknown escape `\{}` at character {at}; {ESCAPES}",
                    e.escape_debug()
                ));
            }
        }
    }
    Ok(out)
}

/// Pairs of hex digits, each group optionally `0x`-prefixed, groups
/// separated by spaces, `:`, `,` or `-`. Positions count characters from 1.
fn unhex(s: &str, secret: bool) -> Result<Vec<u8>, String> {
    let chars: Vec<char> = s.chars().collect();
    let is_separator = |c: char| c.is_whitespace() || matches!(c, ':' | ',' | '-');
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if is_separator(chars[i]) {
            i += 1;
            continue;
        }
        // One group: up to the next separator.
        let start = i;
        let mut end = i;
        while end < chars.len() && !is_separator(chars[end]) {
            end += 1;
        }
        let mut first = start;
        if end - start >= 2 && chars[start] == '0' && matches!(chars[start + 1], 'x' | 'X') {
            first += 2;
            if first == end {
                return Err(format!(
                    "`0x` at character {} is followed by no hex digits",
                    start + 1
                ));
            }
        }
        let mut digits = Vec::with_capacity(end - first);
        for (j, c) in chars.iter().enumerate().take(end).skip(first) {
            match c.to_digit(16) {
                Some(d) => digits.push(d),
                None if secret => {
                    return Err(format!("character {} is not a hex digit", j + 1));
                }
                None => {
                    return Err(format!(
                        "`{}` at character {} is not a hex digit",
                        c.escape_debug(),
                        j + 1
                    ));
                }
            }
        }
        if digits.len() % 2 != 0 {
            let group: String = chars[start..end].iter().take(SHOWN_CHARS).collect();
            return Err(if secret {
                format!(
                    "odd number of hex digits at character {}: a byte is two digits",
                    start + 1
                )
            } else {
                format!(
                    "odd number of hex digits in `{}` (character {}): a byte is two digits",
                    group.escape_debug(),
                    start + 1
                )
            });
        }
        for pair in digits.chunks_exact(2) {
            // Two hex digits make at most 0xff.
            out.push(u8::try_from(pair[0] * 16 + pair[1]).unwrap_or(u8::MAX));
        }
        i = end;
    }
    Ok(out)
}

/// Whether `value` is a value `spec` accepts: of its kind and within its
/// limits (a choice: one of its values, not an alias). For values that did
/// not come from [`parse_value`], e.g. defaults or options a plugin got.
pub fn check_value(spec: &OptionSpec, value: &OptionValue) -> Result<(), Problem> {
    match value_why(&spec.kind, value) {
        None => Ok(()),
        Some(why) => Err(Problem::bad_value(spec, &shown(spec, value), &why)),
    }
}

/// Why `value` is not one `kind` accepts, or none.
fn value_why(kind: &OptionKind, value: &OptionValue) -> Option<String> {
    let expected = || format!("expected {}", kind.describe());
    let ok = match (kind, value) {
        (OptionKind::Text { max_length, .. }, OptionValue::Text(s)) => {
            max_length.is_none_or(|max| s.len() <= max as usize)
        }
        (OptionKind::Boolean, OptionValue::Boolean(_)) => true,
        (OptionKind::Integer { min, max }, OptionValue::Integer(n)) => min <= n && n <= max,
        (OptionKind::Bytes { max_length, .. }, OptionValue::Bytes(b)) => {
            max_length.is_none_or(|max| b.len() <= max as usize)
        }
        (OptionKind::Choice(values), OptionValue::Choice(c)) => {
            values.iter().any(|v| v.value == *c)
        }
        (OptionKind::Duration { min_ms, max_ms }, OptionValue::Duration(ms)) => {
            min_ms <= ms && ms <= max_ms
        }
        (OptionKind::Size { min, max }, OptionValue::Size(n)) => min <= n && n <= max,
        (kind, value) => {
            return Some(format!(
                "{}, not a value of kind {} (the option is of kind {})",
                expected(),
                value.kind_name(),
                kind.name()
            ));
        }
    };
    (!ok).then(expected)
}

/// Whether `name` is a valid option name: lowercase letters, digits and
/// '_', starting with a letter.
pub fn is_valid_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Check a family's schema: names valid and unique; each default of the
/// option's kind and within its limits; no default on a required option;
/// ranges with min <= max; choices with at least one value, values
/// lowercase, values and aliases unique (any case) within the option. Every
/// violation, each naming its option.
pub fn validate_schema(specs: &[OptionSpec]) -> Result<(), Vec<Problem>> {
    let mut problems = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let name = shorten(&spec.name);
        let mut problem = |message: String| problems.push(Problem::new(Some(&spec.name), message));
        if !is_valid_name(&spec.name) {
            problem(format!(
                "option `{name}`: a name is lowercase letters, digits and '_', starting with a letter"
            ));
        }
        if specs[..i].iter().any(|s| s.name == spec.name) {
            problem(format!("option `{name}` is declared more than once"));
        }
        match &spec.kind {
            OptionKind::Integer { min, max } if min > max => problem(format!(
                "option `{name}`: the range {min} to {max} is empty (min > max)"
            )),
            OptionKind::Duration { min_ms, max_ms } if min_ms > max_ms => problem(format!(
                "option `{name}`: the range {} to {} is empty (min > max)",
                format_ms(*min_ms),
                format_ms(*max_ms)
            )),
            OptionKind::Size { min, max } if min > max => problem(format!(
                "option `{name}`: the range {} to {} is empty (min > max)",
                format_size(*min),
                format_size(*max)
            )),
            OptionKind::Choice(values) => {
                if values.is_empty() {
                    problem(format!(
                        "option `{name}`: a choice needs at least one value"
                    ));
                }
                let mut seen: Vec<String> = Vec::new();
                for v in values {
                    if v.value.is_empty() || v.value != v.value.trim().to_lowercase() {
                        problem(format!(
                            "option `{name}`: the value `{}` must be lowercase, without spaces around it, and not empty",
                            shorten(&v.value)
                        ));
                    }
                    for spelling in std::iter::once(&v.value).chain(&v.aliases) {
                        let key = spelling.trim().to_lowercase();
                        if key.is_empty() && spelling != &v.value {
                            problem(format!(
                                "option `{name}`: the value `{}` has an empty alias",
                                shorten(&v.value)
                            ));
                        } else if seen.contains(&key) {
                            problem(format!(
                                "option `{name}`: `{}` is listed more than once among its values and aliases",
                                shorten(spelling)
                            ));
                        } else {
                            seen.push(key);
                        }
                    }
                }
            }
            _ => {}
        }
        if let Some(default) = &spec.default {
            if spec.required {
                problem(format!(
                    "option `{name}` is required, so it cannot have a default"
                ));
            }
            if let Some(why) = value_why(&spec.kind, default) {
                if spec.secret {
                    problem(format!("option `{name}` (secret): bad default: {why}"));
                } else {
                    problem(format!(
                        "option `{name}`: bad default {}: {why}",
                        quoted(&shown(spec, default))
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The message for `raw` written for `spec`, which must be refused.
    fn refused(spec: &OptionSpec, raw: &str) -> String {
        match parse_value(spec, raw) {
            Ok(v) => panic!("{raw:?} was accepted as {v:?}"),
            Err(p) => {
                assert_eq!(p.option.as_deref(), Some(spec.name.as_str()));
                p.message
            }
        }
    }

    fn xmodem_schema() -> Vec<OptionSpec> {
        vec![
            OptionSpec::choice(
                "protocol",
                &[
                    ("xmodem", &["xmodem-1k", "xmodem1k"], "plain XMODEM"),
                    ("ymodem", &[], "YMODEM batch"),
                ],
                "which protocol to speak",
            )
            .default_choice("xmodem"),
            OptionSpec::integer("retries", 0, 1000, "re-sends allowed per block").default_int(10),
            OptionSpec::duration("block_timeout", 10, 3_600_000, "wait for ACK/NAK")
                .default_duration_ms(3000),
            OptionSpec::bytes(
                "enter_command",
                BytesEncoding::Escaped,
                "starts receive mode",
            )
            .max_length(16),
            OptionSpec::boolean("small_tail", "").default_bool(true),
            OptionSpec::size("max_size", 1, u64::MAX, "largest image"),
            OptionSpec::text("filename", "name in block 0").default_text("firmware.bin"),
        ]
    }

    #[test]
    fn the_example_schema_is_valid() {
        assert_eq!(validate_schema(&xmodem_schema()), Ok(()));
    }

    #[test]
    fn text_is_taken_exactly_as_written_up_to_its_length() {
        let spec = OptionSpec::text("filename", "").max_length(4);
        assert_eq!(
            parse_value(&spec, " a b"),
            Ok(OptionValue::Text(" a b".into()))
        );
        assert_eq!(parse_value(&spec, ""), Ok(OptionValue::Text(String::new())));
        // "é" is two bytes: "ééé" is six.
        assert_eq!(
            refused(&spec, "ééé"),
            "option `filename` = \"ééé\": expected at most 4 bytes of text, got 6"
        );
        let spec = OptionSpec::text("reset", "how to reset")
            .syntax("steps like `dtr=1, rts=0`")
            .max_length(64);
        assert_eq!(
            spec.kind.describe(),
            "text of at most 64 bytes: steps like `dtr=1, rts=0`"
        );
    }

    #[test]
    fn booleans_in_any_case_trimmed() {
        let spec = OptionSpec::boolean("go", "whether to go");
        for t in ["true", "YES", " On ", "1"] {
            assert_eq!(parse_value(&spec, t), Ok(OptionValue::Boolean(true)), "{t}");
        }
        for f in ["false", "no", "OFF\t", "0"] {
            assert_eq!(
                parse_value(&spec, f),
                Ok(OptionValue::Boolean(false)),
                "{f}"
            );
        }
        assert_eq!(
            refused(&spec, "maybe"),
            "option `go` = \"maybe\": expected true or false (whether to go)"
        );
        assert_eq!(
            refused(&spec, "2"),
            "option `go` = \"2\": expected true or false (whether to go)"
        );
    }

    #[test]
    fn integers_decimal_hex_underscores_and_range() {
        let spec = OptionSpec::integer("retries", 0, 1000, "re-sends allowed per block");
        let ok = |s: &str| parse_value(&spec, s);
        assert_eq!(ok("5"), Ok(OptionValue::Integer(5)));
        assert_eq!(ok(" 1_000 "), Ok(OptionValue::Integer(1000)));
        assert_eq!(ok("0x3e8"), Ok(OptionValue::Integer(1000)));
        assert_eq!(ok("0X3_E8"), Ok(OptionValue::Integer(1000)));
        assert_eq!(ok("0"), Ok(OptionValue::Integer(0)));
        let expected =
            "expected a whole number from 0 to 1000 (re-sends allowed per block)".to_string();
        for bad in [
            "many", "", "-1", "1001", "1_", "_1", "1__0", "0x", "0x_1", "-0x1", "+5", "1e3", "5.0",
            "--1",
        ] {
            assert_eq!(
                refused(&spec, bad),
                format!("option `retries` = {:?}: {expected}", bad),
                "{bad}"
            );
        }
        let wide = OptionSpec::integer("offset", i64::MIN, i64::MAX, "");
        assert_eq!(
            parse_value(&wide, "-9223372036854775808"),
            Ok(OptionValue::Integer(i64::MIN))
        );
        assert_eq!(
            parse_value(&wide, "0x7fff_ffff_ffff_ffff"),
            Ok(OptionValue::Integer(i64::MAX))
        );
        assert_eq!(
            refused(&wide, "9223372036854775808"),
            "option `offset` = \"9223372036854775808\": expected a whole number"
        );
        assert_eq!(
            refused(&wide, "99999999999999999999"),
            "option `offset` = \"99999999999999999999\": expected a whole number"
        );
        let neg = OptionSpec::integer("trim", -10, 10, "");
        assert_eq!(parse_value(&neg, "-10"), Ok(OptionValue::Integer(-10)));
        assert_eq!(
            refused(&neg, "-11"),
            "option `trim` = \"-11\": expected a whole number from -10 to 10"
        );
    }

    #[test]
    fn escaped_bytes() {
        let spec = OptionSpec::bytes("cmd", BytesEncoding::Escaped, "").max_length(8);
        assert_eq!(
            parse_value(&spec, r"update\r"),
            Ok(OptionValue::Bytes(b"update\r".to_vec()))
        );
        assert_eq!(
            parse_value(&spec, r"\n\t\0\\\x7F\xfe"),
            Ok(OptionValue::Bytes(vec![b'\n', b'\t', 0, b'\\', 0x7f, 0xfe]))
        );
        assert_eq!(
            parse_value(&spec, " é "),
            Ok(OptionValue::Bytes(vec![b' ', 0xc3, 0xa9, b' ']))
        );
        assert_eq!(
            refused(&spec, r"ab\q"),
            r#"option `cmd` = "ab\\q": unknown escape `\q` at character 3; the escapes are \r \n \t \0 \\ \xNN"#
        );
        assert_eq!(
            refused(&spec, r"\X41"),
            r#"option `cmd` = "\\X41": unknown escape `\X` at character 1; the escapes are \r \n \t \0 \\ \xNN"#
        );
        assert_eq!(
            refused(&spec, "ab\\"),
            r#"option `cmd` = "ab\\": a lone `\` at the end (character 3); write `\\` for a backslash"#
        );
        for bad in [r"\xé", r"\x4", r"\x", r"\x4g", r"a\xé1"] {
            let at = bad.find('\\').unwrap_or(0) + 1;
            assert!(
                refused(&spec, bad).ends_with(&format!(
                    r"`\x` at character {at} must be followed by two hex digits"
                )),
                "{bad}"
            );
        }
        assert_eq!(
            refused(&spec, "123456789"),
            "option `cmd` = \"123456789\": expected at most 8 bytes, got 9"
        );
        // Positions count characters, not bytes.
        assert!(refused(&spec, r"éé\q").contains("at character 3"));
    }

    #[test]
    fn hex_bytes_with_prefixes_and_separators() {
        let spec = OptionSpec::bytes("magic", BytesEncoding::Hex, "header magic");
        let elf = Ok(OptionValue::Bytes(vec![0x7f, 0x45, 0x4c, 0x46]));
        for ok in [
            "7F 45 4C 46",
            "0x7f:0x45:0x4c:0x46",
            "0x7f454c46",
            "7f454c46",
            "7f,45-4c 46",
            " 7f  45\t4c 46 ",
        ] {
            assert_eq!(parse_value(&spec, ok), elf, "{ok}");
        }
        assert_eq!(parse_value(&spec, ""), Ok(OptionValue::Bytes(vec![])));
        assert_eq!(
            refused(&spec, "7f4"),
            "option `magic` = \"7f4\": odd number of hex digits in `7f4` (character 1): a byte is two digits (header magic)"
        );
        assert_eq!(
            refused(&spec, "7f 4g"),
            "option `magic` = \"7f 4g\": `g` at character 5 is not a hex digit (header magic)"
        );
        assert_eq!(
            refused(&spec, "7fé4"),
            "option `magic` = \"7fé4\": `é` at character 3 is not a hex digit (header magic)"
        );
        assert_eq!(
            refused(&spec, "7f 0x"),
            "option `magic` = \"7f 0x\": `0x` at character 4 is followed by no hex digits (header magic)"
        );
        let short = OptionSpec::bytes("magic", BytesEncoding::Hex, "").max_length(2);
        assert_eq!(
            refused(&short, "01 02 03"),
            "option `magic` = \"01 02 03\": expected at most 2 bytes, got 3"
        );
    }

    #[test]
    fn choices_by_value_or_alias_any_case() {
        let spec = &xmodem_schema()[0];
        for (written, value) in [
            ("xmodem", "xmodem"),
            ("XModem-1K", "xmodem"),
            (" xmodem1k ", "xmodem"),
            ("YMODEM", "ymodem"),
        ] {
            assert_eq!(
                parse_value(spec, written),
                Ok(OptionValue::Choice(value.into())),
                "{written}"
            );
        }
        assert_eq!(
            refused(spec, "zmodem"),
            "option `protocol` = \"zmodem\": expected one of xmodem, ymodem; did you mean `xmodem`? (which protocol to speak)"
        );
        assert_eq!(
            refused(spec, "kermit"),
            "option `protocol` = \"kermit\": expected one of xmodem, ymodem (which protocol to speak)"
        );
        // A near alias suggests the value it stands for.
        assert!(refused(spec, "xmodem-2k").contains("did you mean `xmodem`?"));
    }

    #[test]
    fn durations_bare_milliseconds_or_units() {
        let spec = OptionSpec::duration("timeout", 10, 3_600_000, "wait for ACK");
        for (written, ms) in [
            ("500", 500),
            ("1_500", 1500),
            ("1500ms", 1500),
            ("30s", 30_000),
            (" 2m ", 120_000),
            ("1h", 3_600_000),
            ("1m30s", 90_000),
            ("1m 30s", 90_000),
            ("2 sec", 2000),
            ("10MS", 10),
            ("5min", 300_000),
        ] {
            assert_eq!(
                parse_value(&spec, written),
                Ok(OptionValue::Duration(ms)),
                "{written}"
            );
        }
        let syntax = "expected a duration from 10ms to 1h, written as milliseconds (`500`) or with a unit (`1500ms`, `30s`, `2m`, `1h`) (wait for ACK)";
        for bad in ["soon", "", "1.5s", "1d", "1m30", "s", "-5", "1e9", "0x10"] {
            assert_eq!(
                refused(&spec, bad),
                format!("option `timeout` = {bad:?}: {syntax}"),
                "{bad}"
            );
        }
        assert_eq!(
            refused(&spec, "2h"),
            "option `timeout` = \"2h\": expected a duration from 10ms to 1h (wait for ACK)"
        );
        assert_eq!(
            refused(&spec, "5"),
            "option `timeout` = \"5\": expected a duration from 10ms to 1h; a number without a unit is milliseconds (wait for ACK)"
        );
        assert_eq!(
            refused(&spec, "99999999999999999999h"),
            "option `timeout` = \"99999999999999999999h\": expected a duration from 10ms to 1h (wait for ACK)"
        );
        assert_eq!(
            refused(&spec, "5124095576030432h"),
            "option `timeout` = \"5124095576030432h\": expected a duration from 10ms to 1h (wait for ACK)"
        );
    }

    #[test]
    fn sizes_with_suffixes() {
        let spec = OptionSpec::size("flash", 1, 1 << 30, "flash size");
        for (written, n) in [
            ("4096", 4096),
            ("0x1000", 4096),
            ("256K", 256 * 1024),
            ("256kib", 256 * 1024),
            ("1M", 1 << 20),
            ("2 MiB", 2 << 20),
            ("0x10K", 16 * 1024),
            ("1_024", 1024),
        ] {
            assert_eq!(
                parse_value(&spec, written),
                Ok(OptionValue::Size(n)),
                "{written}"
            );
        }
        let syntax = "expected a size in bytes from 1 to 1024M, written like `4096`, `0x1000`, `256K` or `1M` (flash size)";
        for bad in ["K", "", "1.5M", "1G", "1KB", "-1", "0x", "1e9", "12 bytes"] {
            assert_eq!(
                refused(&spec, bad),
                format!("option `flash` = {bad:?}: {syntax}"),
                "{bad}"
            );
        }
        let range = "expected a size in bytes from 1 to 1024M (flash size)";
        for bad in ["0", "2048M", "99999999999999999999", "17592186044416M"] {
            assert_eq!(
                refused(&spec, bad),
                format!("option `flash` = {bad:?}: {range}"),
                "{bad}"
            );
        }
    }

    #[test]
    fn describe_each_kind() {
        let d = |spec: OptionSpec| spec.kind.describe();
        assert_eq!(
            d(OptionSpec::integer("a", 0, 1000, "")),
            "a whole number from 0 to 1000"
        );
        assert_eq!(
            d(OptionSpec::integer("a", 1, i64::MAX, "")),
            "a whole number of at least 1"
        );
        assert_eq!(d(OptionSpec::boolean("a", "")), "true or false");
        assert_eq!(d(xmodem_schema().remove(0)), "one of xmodem, ymodem");
        assert_eq!(
            d(OptionSpec::duration("a", 10, 3_600_000, "")),
            "a duration from 10ms to 1h"
        );
        assert_eq!(
            d(OptionSpec::duration("a", 0, 90_000, "")),
            "a duration from 0 to 90s"
        );
        assert_eq!(
            d(OptionSpec::size("a", 1024, u64::MAX, "")),
            "a size in bytes of at least 1K"
        );
        assert_eq!(d(OptionSpec::text("a", "")), "text");
        assert_eq!(
            d(OptionSpec::bytes("a", BytesEncoding::Hex, "").max_length(4)),
            "bytes in hex, like `7f 45 4c 46`, at most 4 bytes"
        );
        assert_eq!(
            d(OptionSpec::bytes("a", BytesEncoding::Escaped, "")),
            r"text with escapes \r \n \t \0 \\ \xNN"
        );
    }

    #[test]
    fn secrets_are_never_echoed() {
        let key = OptionSpec::bytes("key", BytesEncoding::Hex, "the AES key")
            .max_length(16)
            .secret();
        assert_eq!(
            refused(&key, "00 11 2S"),
            "option `key` (secret): character 8 is not a hex digit (the AES key)"
        );
        assert_eq!(
            refused(&key, "00112"),
            "option `key` (secret): odd number of hex digits at character 1: a byte is two digits (the AES key)"
        );
        let long = "00".repeat(17);
        assert_eq!(
            refused(&key, &long),
            "option `key` (secret): expected at most 16 bytes (the AES key)"
        );
        let pass = OptionSpec::bytes("pass", BytesEncoding::Escaped, "").secret();
        assert_eq!(
            refused(&pass, r"hunter\2"),
            r"option `pass` (secret): unknown escape at character 7; the escapes are \r \n \t \0 \\ \xNN"
        );
        let mode = OptionSpec::choice("mode", &[("secure", &[], "")], "").secret();
        assert_eq!(
            refused(&mode, "securr"),
            "option `mode` (secret): expected one of secure"
        );
        assert_eq!(shown(&key, &OptionValue::Bytes(vec![1, 2])), "(secret)");
        let schema = [OptionSpec::text("pin", "").secret().default_int(5)];
        let problems = validate_schema(&schema).unwrap_err();
        assert!(!problems[0].message.contains('5'), "{}", problems[0]);
    }

    #[test]
    fn shown_as_an_operator_writes_it() {
        let hex = OptionSpec::bytes("magic", BytesEncoding::Hex, "");
        let esc = OptionSpec::bytes("cmd", BytesEncoding::Escaped, "");
        let bytes = OptionValue::Bytes(b"go\r\n\\\x01\xff\0\x7f\xc3\xa9".to_vec());
        assert_eq!(shown(&hex, &OptionValue::Bytes(vec![0x7f, 0x45])), "7f 45");
        assert_eq!(shown(&esc, &bytes), r"go\r\n\\\x01\xff\0\x7fé");
        // What is shown parses back to the same bytes.
        assert_eq!(parse_value(&esc, &shown(&esc, &bytes)), Ok(bytes.clone()));
        assert_eq!(parse_value(&hex, &shown(&hex, &bytes)), Ok(bytes));
        let any = OptionSpec::text("t", "");
        assert_eq!(shown(&any, &OptionValue::Duration(90_000)), "90s");
        assert_eq!(shown(&any, &OptionValue::Duration(1500)), "1500ms");
        assert_eq!(shown(&any, &OptionValue::Size(256 * 1024)), "256K");
        assert_eq!(shown(&any, &OptionValue::Size(100)), "100");
        assert_eq!(shown(&any, &OptionValue::Boolean(true)), "true");
        assert_eq!(OptionValue::Integer(-3).to_string(), "-3");
    }

    #[test]
    fn long_and_invisible_values_are_shortened_and_escaped_in_messages() {
        let spec = OptionSpec::boolean("go", "");
        let message = refused(&spec, &"x".repeat(500));
        assert_eq!(
            message,
            format!(
                "option `go` = \"{}…\": expected true or false",
                "x".repeat(80)
            )
        );
        assert_eq!(
            refused(&spec, "a\u{0}\n\"é"),
            "option `go` = \"a\\0\\n\\\"é\": expected true or false"
        );
    }

    #[test]
    fn check_fills_defaults_in_schema_order() {
        let options = check(&xmodem_schema(), &raw(&[("retries", "5")])).unwrap();
        assert_eq!(
            options.into_vec(),
            vec![
                ("protocol".to_string(), OptionValue::Choice("xmodem".into())),
                ("retries".to_string(), OptionValue::Integer(5)),
                ("block_timeout".to_string(), OptionValue::Duration(3000)),
                ("small_tail".to_string(), OptionValue::Boolean(true)),
                (
                    "filename".to_string(),
                    OptionValue::Text("firmware.bin".into())
                ),
            ]
        );
    }

    #[test]
    fn keys_match_any_case_and_dash_for_underscore() {
        let options = check(
            &xmodem_schema(),
            &raw(&[
                ("Block-Timeout", "30s"),
                (" ENTER-command ", r"go\r"),
                ("max_size", "1M"),
            ]),
        )
        .unwrap();
        assert_eq!(options.duration_ms("block_timeout"), Some(30_000));
        assert_eq!(options.bytes("enter_command"), Some(&b"go\r"[..]));
        assert_eq!(options.size("max_size"), Some(1 << 20));
        assert_eq!(normalize_key(" Enter-Command "), "enter_command");
        assert_eq!(
            find(&xmodem_schema(), "SMALL-TAIL").map(|s| s.name.as_str()),
            Some("small_tail")
        );
    }

    #[test]
    fn unknown_keys_with_a_suggestion_or_the_list() {
        let problems = check(
            &xmodem_schema(),
            &raw(&[("retrys", "5"), ("baud", "9600"), ("RETRYS", "6")]),
        )
        .unwrap_err();
        assert_eq!(
            problems,
            vec![
                Problem::new(
                    Some("retrys"),
                    "unknown option `retrys` (did you mean `retries`?)"
                ),
                Problem::new(
                    Some("baud"),
                    "unknown option `baud` (known options: protocol, retries, block_timeout, enter_command, small_tail, max_size, filename)"
                ),
            ]
        );
        let suggest = |key: &str| {
            check(&xmodem_schema(), &raw(&[(key, "1")])).unwrap_err()[0]
                .message
                .clone()
        };
        assert!(suggest("block-timeout-ms").contains("did you mean `block_timeout`?"));
        assert!(suggest("Protocl").contains("did you mean `protocol`?"));
        assert!(suggest("filenmae").contains("did you mean `filename`?"));
        assert!(suggest("x").contains("known options:"));
        assert_eq!(
            check(&[], &raw(&[("a", "1")])).unwrap_err()[0].message,
            "unknown option `a` (this family takes no options)"
        );
        let many: Vec<OptionSpec> = (0..20)
            .map(|i| OptionSpec::boolean(format!("opt{i}"), ""))
            .collect();
        assert!(
            check(&many, &raw(&[("zzzzzz", "1")])).unwrap_err()[0]
                .message
                .ends_with("opt11 and 8 more)")
        );
    }

    #[test]
    fn a_key_set_twice_is_a_problem() {
        let problems = check(
            &xmodem_schema(),
            &raw(&[("retries", "5"), ("Retries", "6"), ("small-tail", "no")]),
        )
        .unwrap_err();
        assert_eq!(
            problems,
            vec![Problem::new(
                Some("retries"),
                "option `retries` is set 2 times (as `retries`, `Retries`); set it once"
            )]
        );
    }

    #[test]
    fn required_options_must_be_set() {
        let schema = [
            OptionSpec::text("port", "the serial port").required(),
            OptionSpec::boolean("fast", "").required(),
        ];
        let problems = check(&schema, &[]).unwrap_err();
        assert_eq!(
            problems,
            vec![
                Problem::new(
                    Some("port"),
                    "option `port` is required but not set (the serial port)"
                ),
                Problem::new(Some("fast"), "option `fast` is required but not set"),
            ]
        );
        let options = check(&schema, &raw(&[("port", ""), ("fast", "yes")])).unwrap();
        assert_eq!(options.text("port"), Some(""));
        assert_eq!(options.boolean("fast"), Some(true));
    }

    #[test]
    fn check_reports_every_problem() {
        let problems = check(
            &xmodem_schema(),
            &raw(&[("retries", "many"), ("protocol", "kermit"), ("nope", "1")]),
        )
        .unwrap_err();
        let options: Vec<Option<&str>> = problems.iter().map(|p| p.option.as_deref()).collect();
        assert_eq!(options, [Some("retries"), Some("protocol"), Some("nope")]);
        assert_eq!(
            problems[0].to_string(),
            "option `retries` = \"many\": expected a whole number from 0 to 1000 (re-sends allowed per block)"
        );
        assert_eq!(
            OptionError::from(problems[0].clone()).to_string(),
            problems[0].message
        );
    }

    #[test]
    fn options_without_value_or_default_are_absent() {
        let options = check(&xmodem_schema(), &[]).unwrap();
        assert_eq!(options.get("enter_command"), None);
        assert_eq!(options.get("max_size"), None);
        assert_eq!(options.len(), 5);
        assert!(!options.is_empty());
    }

    #[test]
    fn options_accessors_by_kind() {
        let options = Options::new(vec![
            ("t".into(), OptionValue::Text("hi".into())),
            ("b".into(), OptionValue::Boolean(false)),
            ("i".into(), OptionValue::Integer(-7)),
            ("y".into(), OptionValue::Bytes(vec![1, 2])),
            ("c".into(), OptionValue::Choice("ymodem".into())),
            ("d".into(), OptionValue::Duration(1500)),
            ("s".into(), OptionValue::Size(4096)),
        ]);
        assert_eq!(options.text("t"), Some("hi"));
        assert_eq!(options.boolean("b"), Some(false));
        assert_eq!(options.integer("i"), Some(-7));
        assert_eq!(options.bytes("y"), Some(&[1u8, 2][..]));
        assert_eq!(options.choice("c"), Some("ymodem"));
        assert_eq!(options.duration_ms("d"), Some(1500));
        assert_eq!(options.size("s"), Some(4096));
        // Wrong kind or absent: none.
        assert_eq!(options.integer("t"), None);
        assert_eq!(options.text("i"), None);
        assert_eq!(options.boolean("missing"), None);
        assert_eq!(options.get("b"), Some(&OptionValue::Boolean(false)));
        assert_eq!(options.len(), 7);
        let names: Vec<&str> = options.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["t", "b", "i", "y", "c", "d", "s"]);
        assert!(Options::default().is_empty());
    }

    #[test]
    fn validate_schema_catches_each_rule() {
        let messages = |specs: &[OptionSpec]| -> Vec<String> {
            validate_schema(specs)
                .unwrap_err()
                .into_iter()
                .map(|p| p.message)
                .collect()
        };
        assert_eq!(
            messages(&[
                OptionSpec::boolean("Retries", ""),
                OptionSpec::boolean("1st", ""),
                OptionSpec::boolean("", ""),
                OptionSpec::boolean("a-b", ""),
            ]),
            [
                "option `Retries`: a name is lowercase letters, digits and '_', starting with a letter",
                "option `1st`: a name is lowercase letters, digits and '_', starting with a letter",
                "option ``: a name is lowercase letters, digits and '_', starting with a letter",
                "option `a-b`: a name is lowercase letters, digits and '_', starting with a letter",
            ]
        );
        assert_eq!(
            messages(&[OptionSpec::boolean("a", ""), OptionSpec::text("a", "")]),
            ["option `a` is declared more than once"]
        );
        assert_eq!(
            messages(&[OptionSpec::integer("n", 0, 10, "").default_bool(true)]),
            [
                "option `n`: bad default \"true\": expected a whole number from 0 to 10, not a value of kind boolean (the option is of kind integer)"
            ]
        );
        assert_eq!(
            messages(&[OptionSpec::integer("n", 0, 10, "").default_int(11)]),
            ["option `n`: bad default \"11\": expected a whole number from 0 to 10"]
        );
        assert_eq!(
            messages(&[OptionSpec::duration("d", 10, 100, "").default_duration_ms(5)]),
            ["option `d`: bad default \"5ms\": expected a duration from 10ms to 100ms"]
        );
        assert_eq!(
            messages(&[OptionSpec::text("t", "").max_length(2).default_text("abc")]),
            ["option `t`: bad default \"abc\": expected text of at most 2 bytes"]
        );
        assert_eq!(
            messages(&[OptionSpec::bytes("b", BytesEncoding::Hex, "")
                .max_length(1)
                .default_bytes(&[1, 2])]),
            [
                "option `b`: bad default \"01 02\": expected bytes in hex, like `7f 45 4c 46`, at most 1 bytes"
            ]
        );
        assert_eq!(
            messages(&[xmodem_schema().remove(0).default_choice("xmodem-1k")]),
            ["option `protocol`: bad default \"xmodem-1k\": expected one of xmodem, ymodem"]
        );
        assert_eq!(
            messages(&[OptionSpec::boolean("b", "").default_bool(true).required()]),
            ["option `b` is required, so it cannot have a default"]
        );
        assert_eq!(
            messages(&[
                OptionSpec::integer("i", 5, 4, ""),
                OptionSpec::duration("d", 2000, 1000, ""),
                OptionSpec::size("s", 2048, 1024, ""),
            ]),
            [
                "option `i`: the range 5 to 4 is empty (min > max)",
                "option `d`: the range 2s to 1s is empty (min > max)",
                "option `s`: the range 2K to 1K is empty (min > max)",
            ]
        );
        assert_eq!(
            messages(&[OptionSpec::choice("c", &[], "")]),
            ["option `c`: a choice needs at least one value"]
        );
        assert_eq!(
            messages(&[OptionSpec::choice(
                "c",
                &[
                    ("a", &["x", "A"], ""),
                    ("b", &["X", ""], ""),
                    ("Up", &[], "")
                ],
                ""
            )]),
            [
                "option `c`: `A` is listed more than once among its values and aliases",
                "option `c`: `X` is listed more than once among its values and aliases",
                "option `c`: the value `b` has an empty alias",
                "option `c`: the value `Up` must be lowercase, without spaces around it, and not empty",
            ]
        );
        let all = validate_schema(&[
            OptionSpec::integer("n", 0, 10, "").default_int(11),
            OptionSpec::boolean("B", ""),
        ])
        .unwrap_err();
        let names: Vec<Option<&str>> = all.iter().map(|p| p.option.as_deref()).collect();
        assert_eq!(names, [Some("n"), Some("B")]);
    }

    #[test]
    fn check_value_for_typed_values() {
        let spec = OptionSpec::integer("retries", 0, 10, "re-sends");
        assert_eq!(check_value(&spec, &OptionValue::Integer(10)), Ok(()));
        assert_eq!(
            check_value(&spec, &OptionValue::Integer(11))
                .unwrap_err()
                .message,
            "option `retries` = \"11\": expected a whole number from 0 to 10 (re-sends)"
        );
    }

    #[test]
    fn no_kind_panics_on_hostile_values() {
        let kinds = [
            OptionSpec::text("t", "").max_length(8),
            OptionSpec::boolean("b", ""),
            OptionSpec::integer("i", 0, 10, ""),
            OptionSpec::integer("w", i64::MIN, i64::MAX, ""),
            OptionSpec::bytes("e", BytesEncoding::Escaped, "").max_length(4),
            OptionSpec::bytes("h", BytesEncoding::Hex, "").max_length(4),
            OptionSpec::bytes("s", BytesEncoding::Hex, "").secret(),
            xmodem_schema().remove(0),
            OptionSpec::duration("d", 10, 3_600_000, ""),
            OptionSpec::duration("u", 0, u64::MAX, ""),
            OptionSpec::size("z", 0, u64::MAX, ""),
        ];
        let long_values = [
            "x".repeat(100_000),
            "é".repeat(10_000),
            "9".repeat(10_000),
            "0x".to_string() + &"f".repeat(10_000),
            "\\xé".repeat(1000),
            "1h".repeat(10_000),
            "7".repeat(10_001),
        ];
        let values = crate::HOSTILE_OPTION_VALUES
            .iter()
            .copied()
            .chain(long_values.iter().map(String::as_str))
            .chain(["\\", "\\x", "0x0x", "1_", "18446744073709551616K", "1m1"]);
        for value in values {
            for spec in &kinds {
                let r = std::panic::catch_unwind(|| {
                    let _ = parse_value(spec, value);
                    let _ = check(&kinds, &[(value.to_string(), value.to_string())]);
                    let _ = check(&kinds, &[(spec.name.clone(), value.to_string())]);
                });
                let shown: String = value.chars().take(20).collect();
                assert!(r.is_ok(), "{} = {shown:?} panicked", spec.name);
            }
        }
        crate::assert_no_option_value_panics(
            &["t", "i", "e", "h", "protocol", "d", "z", "zz"],
            |o| check(&kinds, o),
        );
    }
}
