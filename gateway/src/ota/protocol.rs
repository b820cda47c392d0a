//! The payloads of the upstream OTA protocol (`shared/protocol.md`): strict in
//! what we send, lenient in what we accept.
//!
//! Outgoing: [`Inform`], [`Progress`], [`firmware_get_request`] and
//! [`reissue_notice`] produce exactly the JSON of the protocol (field order
//! included: they are serialised from structs, never from maps). Incoming:
//! [`parse_notice`] and [`parse_get_reply`] accept every variant real platforms
//! and SDKs put on the wire (ids and codes as strings or numbers, any case of
//! the sign method, ...) and turn anything else into a [`NoticeError`] that
//! names the field and the reason. They never panic, whatever the bytes.
//!
//! This module does no I/O and knows nothing of topics or jobs.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The module a notice or report is about when it names none: the whole-device
/// firmware. It is never written on the wire (the field is omitted instead).
pub const DEFAULT_MODULE: &str = "default";

/// Longest `desc` we send, in bytes (the platform wants it under 128 characters).
pub const MAX_DESC_BYTES: usize = 127;

fn is_default_module(module: &str) -> bool {
    module.is_empty() || module == DEFAULT_MODULE
}

/// `None` for the default module, which is omitted on the wire.
fn wire_module(module: &str) -> Option<&str> {
    (!is_default_module(module)).then_some(module)
}

fn to_json_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    // Our wire structs hold only strings, integers and JSON values: they always serialise.
    serde_json::to_vec(value).expect("a wire struct always serialises")
}

/// `{"id":"…","params":…}`, the envelope of every message we send upstream.
#[derive(Serialize)]
struct Envelope<P> {
    id: String,
    params: P,
}

// ---------------------------------------------------------------------------
// inform

/// The current version of one module of a device, reported on `inform`:
/// `{"id":"123","params":{"version":"1.0.1","module":"MCU"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inform {
    pub id: u64,
    pub version: String,
    pub module: String,
}

#[derive(Serialize)]
struct InformParams<'a> {
    version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    module: Option<&'a str>,
}

impl Inform {
    pub fn new(id: u64, version: impl Into<String>, module: impl Into<String>) -> Inform {
        Inform {
            id,
            version: version.into(),
            module: module.into(),
        }
    }

    /// The payload to publish.
    pub fn payload(&self) -> Vec<u8> {
        to_json_bytes(&Envelope {
            id: self.id.to_string(),
            params: InformParams {
                version: &self.version,
                module: wire_module(&self.module),
            },
        })
    }

    /// The payload as a string.
    pub fn to_json(&self) -> String {
        String::from_utf8_lossy(&self.payload()).into_owned()
    }
}

// ---------------------------------------------------------------------------
// progress

/// The `step` of a progress report: a percentage or a failure code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// 0..=100 percent done (larger values are clamped to 100).
    Percent(u8),
    /// `-1`: the upgrade failed (generic).
    UpgradeFailed,
    /// `-2`: the download failed.
    DownloadFailed,
    /// `-3`: verification failed (digest, signature, image format).
    VerifyFailed,
    /// `-4`: flashing (burning) the device failed.
    FlashFailed,
}

impl Step {
    /// The code on the wire: 0..=100, or -1..=-4.
    pub fn code(self) -> i32 {
        match self {
            Step::Percent(p) => i32::from(p.min(100)),
            Step::UpgradeFailed => -1,
            Step::DownloadFailed => -2,
            Step::VerifyFailed => -3,
            Step::FlashFailed => -4,
        }
    }

    /// The step of a wire code; `None` outside 0..=100 and -1..=-4.
    pub fn from_code(code: i64) -> Option<Step> {
        match code {
            0..=100 => u8::try_from(code).ok().map(Step::Percent),
            -1 => Some(Step::UpgradeFailed),
            -2 => Some(Step::DownloadFailed),
            -3 => Some(Step::VerifyFailed),
            -4 => Some(Step::FlashFailed),
            _ => None,
        }
    }

    /// True for the failure codes.
    pub fn is_failure(self) -> bool {
        !matches!(self, Step::Percent(_))
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code())
    }
}

/// Serialised as on the wire: a string holding the code.
impl Serialize for Step {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.code().to_string())
    }
}

/// Accepts the code as a string (the protocol) or a number (lenient).
impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Step, D::Error> {
        let value = Value::deserialize(d)?;
        let code = match &value {
            Value::String(s) => s.trim().parse::<i64>().ok(),
            Value::Number(n) => n.as_i64(),
            _ => None,
        };
        code.and_then(Step::from_code)
            .ok_or_else(|| serde::de::Error::custom(format!("{value} is not a progress step")))
    }
}

/// One progress report of one module of a device:
/// `{"id":"124","params":{"step":"45","desc":"flashing 45%","module":"MCU"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub step: Step,
    /// Why it failed, or what is going on; cut to [`MAX_DESC_BYTES`] on the wire.
    pub desc: String,
    pub module: String,
}

#[derive(Serialize)]
struct ProgressParams<'a> {
    step: Step,
    desc: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    module: Option<&'a str>,
}

/// `s` cut to at most [`MAX_DESC_BYTES`] bytes: at the last space that
/// keeps most of it (else on a character boundary), with "…" to say it was
/// cut.
pub fn truncate_desc(s: &str) -> std::borrow::Cow<'_, str> {
    const MORE: &str = "…";
    if s.len() <= MAX_DESC_BYTES {
        return s.into();
    }
    let mut end = MAX_DESC_BYTES - MORE.len();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    // A word boundary, unless it would throw away more than a third.
    if let Some(space) = s[..end].rfind(' ')
        && space >= end * 2 / 3
    {
        end = space;
    }
    format!("{}{MORE}", s[..end].trim_end()).into()
}

impl Progress {
    /// A report; `desc` is cut to [`MAX_DESC_BYTES`] on a character boundary.
    pub fn new(step: Step, desc: impl Into<String>, module: impl Into<String>) -> Progress {
        let mut desc = desc.into();
        desc = truncate_desc(&desc).into_owned();
        Progress {
            step,
            desc,
            module: module.into(),
        }
    }

    /// The payload to publish, with message id `id`.
    pub fn payload(&self, id: u64) -> Vec<u8> {
        let desc = truncate_desc(&self.desc);
        to_json_bytes(&Envelope {
            id: id.to_string(),
            params: ProgressParams {
                step: self.step,
                desc: &desc,
                module: wire_module(&self.module),
            },
        })
    }
}

// ---------------------------------------------------------------------------
// firmware/get

#[derive(Serialize)]
struct GetParams<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    module: Option<&'a str>,
}

/// The `firmware/get` request: `{"id":"125","params":{"module":"MCU"}}`
/// (`"params":{}` for the default module).
pub fn firmware_get_request(id: u64, module: &str) -> Vec<u8> {
    to_json_bytes(&Envelope {
        id: id.to_string(),
        params: GetParams {
            module: wire_module(module),
        },
    })
}

// ---------------------------------------------------------------------------
// notices

/// How an image's digest is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignMethod {
    Md5,
    Sha256,
}

impl SignMethod {
    /// Hex digits of a digest of this kind.
    pub fn hex_len(self) -> usize {
        match self {
            SignMethod::Md5 => 32,
            SignMethod::Sha256 => 64,
        }
    }

    /// The spelling every SDK accepts: `Md5` or `SHA256`.
    pub fn wire_name(self) -> &'static str {
        match self {
            SignMethod::Md5 => "Md5",
            SignMethod::Sha256 => "SHA256",
        }
    }
}

impl fmt::Display for SignMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignMethod::Md5 => "md5",
            SignMethod::Sha256 => "sha256",
        })
    }
}

/// Where the image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "protocol", rename_all = "lowercase")]
pub enum Download {
    /// An http or https URL (expires after 24 hours on the platform).
    Http { url: String },
    /// Download over MQTT (`dProtocol:"mqtt"`); not supported yet, the daemon
    /// rejects it with -2.
    Mqtt { stream_id: u64, stream_file_id: u64 },
}

/// An upgrade notice, validated and normalised: what to install on one module
/// of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The message id (a number; ids sent as decimal strings are converted).
    pub id: u64,
    pub version: String,
    /// Image size in bytes.
    pub size: u64,
    pub download: Download,
    pub sign_method: SignMethod,
    /// The image digest, lowercase hex of the length `sign_method` needs.
    pub sign: String,
    /// [`DEFAULT_MODULE`] when the notice names none.
    pub module: String,
    pub is_diff: bool,
    /// `extData` as received (any JSON value but `null`).
    pub ext_data: Option<Value>,
}

impl Notice {
    /// The URL of an http(s) download.
    pub fn url(&self) -> Option<&str> {
        match &self.download {
            Download::Http { url } => Some(url),
            Download::Mqtt { .. } => None,
        }
    }
}

/// Why an incoming notice (or `firmware/get` reply) was rejected. The message
/// names the field and the reason, fit for a progress `desc`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoticeError {
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    #[error("payload is not a JSON object")]
    NotObject,
    #[error("missing field \"{0}\"")]
    Missing(&'static str),
    #[error("{field} {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl NoticeError {
    /// The field at fault, if the error is about one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            NoticeError::Missing(field) | NoticeError::Invalid { field, .. } => Some(field),
            NoticeError::NotJson(_) | NoticeError::NotObject => None,
        }
    }

    fn invalid(field: &'static str, reason: impl Into<String>) -> NoticeError {
        NoticeError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// A JSON value for an error message, cut short.
fn show(value: &Value) -> String {
    const MAX: usize = 48;
    let text = value.to_string();
    if text.len() <= MAX {
        return text;
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, NoticeError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(NoticeError::NotObject),
        Err(e) => Err(NoticeError::NotJson(e.to_string())),
    }
}

/// A field present and not `null`.
fn field<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    map.get(name).filter(|v| !v.is_null())
}

/// A non-negative integer given as a number or a decimal string.
fn unsigned(value: &Value, name: &'static str) -> Result<u64, NoticeError> {
    let parsed = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    parsed
        .ok_or_else(|| NoticeError::invalid(name, format!("{} is not a whole number", show(value))))
}

fn required_unsigned(map: &Map<String, Value>, name: &'static str) -> Result<u64, NoticeError> {
    unsigned(field(map, name).ok_or(NoticeError::Missing(name))?, name)
}

/// `code`, when present, must be `expected` (as a number or a string).
fn check_code(map: &Map<String, Value>, expected: u64) -> Result<(), NoticeError> {
    let Some(code) = field(map, "code") else {
        return Ok(());
    };
    if unsigned(code, "code").ok() == Some(expected) {
        return Ok(());
    }
    let message = field(map, "message")
        .map(|m| format!(" (message {})", show(m)))
        .unwrap_or_default();
    Err(NoticeError::invalid(
        "code",
        format!("{} is not {expected}{message}", show(code)),
    ))
}

fn string<'a>(
    map: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, NoticeError> {
    match field(map, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(NoticeError::invalid(
            name,
            format!("{} is not a string", show(other)),
        )),
    }
}

fn sign_method(value: &Value) -> Result<SignMethod, NoticeError> {
    let name = value
        .as_str()
        .map(|s| s.trim().to_ascii_lowercase().replace(['-', '_'], ""));
    match name.as_deref() {
        Some("md5") => Ok(SignMethod::Md5),
        Some("sha256") => Ok(SignMethod::Sha256),
        _ => Err(NoticeError::invalid(
            "signMethod",
            format!("{} is not md5 or sha256", show(value)),
        )),
    }
}

/// A digest as lowercase hex of the length `method` needs.
fn digest(value: &str, field: &'static str, method: SignMethod) -> Result<String, NoticeError> {
    let value = value.trim();
    if !value.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(NoticeError::invalid(
            field,
            format!("{} is not hexadecimal", show(&Value::from(value))),
        ));
    }
    if value.len() != method.hex_len() {
        return Err(NoticeError::invalid(
            field,
            format!(
                "has {} hex digits, {method} needs {}",
                value.len(),
                method.hex_len()
            ),
        ));
    }
    Ok(value.to_ascii_lowercase())
}

fn is_diff(value: Option<&Value>) -> Result<bool, NoticeError> {
    match value {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => match unsigned(v, "isDiff") {
            Ok(0) => Ok(false),
            Ok(1) => Ok(true),
            _ => Err(NoticeError::invalid(
                "isDiff",
                format!("{} is not 0 or 1", show(v)),
            )),
        },
    }
}

fn http_url(url: &str) -> Result<String, NoticeError> {
    let url = url.trim();
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    let rest = if lower.starts_with("https://") {
        &url[8..]
    } else if lower.starts_with("http://") {
        &url[7..]
    } else {
        return Err(NoticeError::invalid(
            "url",
            format!("{} is not an http or https URL", show(&Value::from(url))),
        ));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(NoticeError::invalid("url", "has no host"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(NoticeError::invalid("url", "contains whitespace"));
    }
    Ok(url.to_string())
}

/// The `data` object of a notice or a `firmware/get` reply.
fn notice_from_data(id: u64, data: &Map<String, Value>) -> Result<Notice, NoticeError> {
    let version = match string(data, "version")? {
        Some(v) if !v.trim().is_empty() => v.to_string(),
        Some(_) => return Err(NoticeError::invalid("version", "is empty")),
        None => return Err(NoticeError::Missing("version")),
    };
    let size = required_unsigned(data, "size")?;
    if size == 0 {
        return Err(NoticeError::invalid("size", "is 0"));
    }

    let mqtt = string(data, "dProtocol")
        .ok()
        .flatten()
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("mqtt"));
    let download = if mqtt {
        Download::Mqtt {
            stream_id: required_unsigned(data, "streamId")?,
            stream_file_id: required_unsigned(data, "streamFileId")?,
        }
    } else {
        let url = string(data, "url")?.ok_or(NoticeError::Missing("url"))?;
        Download::Http {
            url: http_url(url)?,
        }
    };

    let md5 = string(data, "md5")?.filter(|s| !s.trim().is_empty());
    let sign = string(data, "sign")?.filter(|s| !s.trim().is_empty());
    let method = match field(data, "signMethod") {
        Some(m) => sign_method(m)?,
        // Older notices carry only `md5`.
        None if md5.is_some() => SignMethod::Md5,
        None => return Err(NoticeError::Missing("signMethod")),
    };
    let sign = match (sign, md5, method) {
        (Some(sign), Some(md5), SignMethod::Md5) => {
            let sign = digest(sign, "sign", method)?;
            if digest(md5, "md5", method)? != sign {
                return Err(NoticeError::invalid("md5", "differs from sign"));
            }
            sign
        }
        (Some(sign), _, _) => digest(sign, "sign", method)?,
        (None, Some(md5), SignMethod::Md5) => digest(md5, "md5", method)?,
        (None, _, _) => return Err(NoticeError::Missing("sign")),
    };

    let module = match string(data, "module")? {
        Some(m) if !m.trim().is_empty() => m.to_string(),
        _ => DEFAULT_MODULE.to_string(),
    };
    Ok(Notice {
        id,
        version,
        size,
        download,
        sign_method: method,
        sign,
        module,
        is_diff: is_diff(field(data, "isDiff"))?,
        ext_data: field(data, "extData").cloned(),
    })
}

fn object<'a>(
    map: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a Map<String, Value>>, NoticeError> {
    match field(map, name) {
        None => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(other) => Err(NoticeError::invalid(
            name,
            format!("{} is not an object", show(other)),
        )),
    }
}

/// Parse an upgrade notice (the payload of `/ota/device/upgrade/{pk}/{dn}`).
///
/// Accepted: `id` as a number or a decimal string; `code`, when present,
/// `1000` or `"1000"`; `size` a number or a decimal string; `signMethod` any
/// case of md5 or sha256 (absent with an `md5` field: md5); `sign` hex of any
/// case, of the length the method needs (absent with MD5: taken from `md5`);
/// `module` absent = [`DEFAULT_MODULE`]; `isDiff` 0 or 1; `extData` kept as is;
/// `dProtocol:"mqtt"` with `streamId` and `streamFileId` instead of a `url`.
pub fn parse_notice(bytes: &[u8]) -> Result<Notice, NoticeError> {
    let root = parse_object(bytes)?;
    check_code(&root, 1000)?;
    let id = required_unsigned(&root, "id")?;
    let data = object(&root, "data")?.ok_or(NoticeError::Missing("data"))?;
    notice_from_data(id, data)
}

/// Parse a `firmware/get_reply`: `{"id":"125","code":200,"data":{…}}`. `None`
/// when nothing is pending (`data` empty or absent). `code`, when present, must
/// be 200 (a number or a string); `data` holds the fields of a notice.
pub fn parse_get_reply(bytes: &[u8]) -> Result<Option<Notice>, NoticeError> {
    let root = parse_object(bytes)?;
    check_code(&root, 200)?;
    let id = required_unsigned(&root, "id")?;
    match object(&root, "data")? {
        None => Ok(None),
        Some(data) if data.is_empty() => Ok(None),
        Some(data) => notice_from_data(id, data).map(Some),
    }
}

/// The module a (possibly invalid) notice is about, as far as it can be read:
/// to echo in the failure report of a rejected notice.
pub fn module_hint(bytes: &[u8]) -> String {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .as_ref()
        .and_then(|v| v.get("data"))
        .and_then(|d| d.get("module"))
        .and_then(Value::as_str)
        .filter(|m| !m.trim().is_empty())
        .unwrap_or(DEFAULT_MODULE)
        .to_string()
}

#[derive(Serialize)]
struct Reissue<'a> {
    code: &'static str,
    message: &'static str,
    id: u64,
    data: ReissueData<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReissueData<'a> {
    size: u64,
    version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<&'a str>,
    #[serde(rename = "dProtocol", skip_serializing_if = "Option::is_none")]
    d_protocol: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_file_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    md5: Option<&'a str>,
    sign: &'a str,
    sign_method: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    module: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_diff: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ext_data: Option<&'a Value>,
}

/// A notice in the canonical form every SDK accepts, to re-issue to a leaf on
/// the local broker: `code:"1000"`, `message:"success"`, numeric `id` and
/// `size`, `signMethod` exactly `Md5` or `SHA256`, `md5` repeating `sign` for
/// MD5, lowercase hex; `module` omitted for the default module, `isDiff:1` only
/// for diff packages.
pub fn reissue_notice(notice: &Notice) -> Vec<u8> {
    let (url, d_protocol, stream_id, stream_file_id) = match &notice.download {
        Download::Http { url } => (Some(url.as_str()), None, None, None),
        Download::Mqtt {
            stream_id,
            stream_file_id,
        } => (None, Some("mqtt"), Some(*stream_id), Some(*stream_file_id)),
    };
    let sign = notice.sign.to_ascii_lowercase();
    to_json_bytes(&Reissue {
        code: "1000",
        message: "success",
        id: notice.id,
        data: ReissueData {
            size: notice.size,
            version: &notice.version,
            url,
            d_protocol,
            stream_id,
            stream_file_id,
            md5: (notice.sign_method == SignMethod::Md5).then_some(sign.as_str()),
            sign: &sign,
            sign_method: notice.sign_method.wire_name(),
            module: wire_module(&notice.module),
            is_diff: notice.is_diff.then_some(1),
            ext_data: notice.ext_data.as_ref(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MD5: &str = "93230c3bde425a9d7984a594ac55ea1e";
    const SHA256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    /// The notice of protocol.md, with a concrete URL and digestsign.
    const SAMPLE_NOTICE: &str = r#"{"code":"1000","message":"success","id":1626969597470,
 "data":{"size":432945,"version":"2.0.0","url":"https://ota.example.com/fw.bin?Expires=1627056000","md5":"93230c3bde425a9d7984a594ac55ea1e",
         "sign":"93230c3bde425a9d7984a594ac55ea1e","signMethod":"Md5","module":"MCU","isDiff":1,
         "digestsign":"abc","extData":{"key1":"value1","_package_udi":"x"}}}"#;

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    fn json(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    /// A notice with `data` built from `fields`.
    fn notice_with(fields: Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"code":"1000","id":"7","data":fields})).unwrap()
    }

    fn base_data() -> Value {
        serde_json::json!({"size":10,"version":"2.0.0","url":"http://h/f","sign":MD5,"signMethod":"Md5"})
    }

    fn with(mut data: Value, key: &str, value: Value) -> Value {
        data[key] = value;
        data
    }

    fn without(mut data: Value, key: &str) -> Value {
        data.as_object_mut().unwrap().remove(key);
        data
    }

    fn err(data: Value) -> String {
        parse_notice(&notice_with(data)).unwrap_err().to_string()
    }

    #[test]
    fn inform_is_exactly_the_protocol_sample() {
        assert_eq!(
            Inform::new(123, "1.0.1", "MCU").to_json(),
            r#"{"id":"123","params":{"version":"1.0.1","module":"MCU"}}"#
        );
        assert_eq!(
            text(Inform::new(9, "1.0.0", DEFAULT_MODULE).payload()),
            r#"{"id":"9","params":{"version":"1.0.0"}}"#
        );
    }

    #[test]
    fn progress_is_exactly_the_protocol_sample() {
        let p = Progress::new(Step::Percent(45), "flashing 45%", "MCU");
        assert_eq!(
            text(p.payload(124)),
            r#"{"id":"124","params":{"step":"45","desc":"flashing 45%","module":"MCU"}}"#
        );
        let failed = Progress::new(Step::DownloadFailed, "HTTP 404", DEFAULT_MODULE);
        assert_eq!(
            text(failed.payload(1)),
            r#"{"id":"1","params":{"step":"-2","desc":"HTTP 404"}}"#
        );
    }

    #[test]
    fn progress_desc_is_cut_under_128_bytes_on_a_word_or_char_boundary() {
        let long = "é".repeat(100); // 200 bytes, no spaces
        let p = Progress::new(Step::UpgradeFailed, long.clone(), "m");
        assert!(p.desc.len() <= MAX_DESC_BYTES);
        assert_eq!(p.desc.len(), 124 + "…".len());
        assert!(long.starts_with(p.desc.trim_end_matches('…')));
        // Words are not cut in half.
        let words = "the device refused the image because its bootloader is locked; \
                     unlock it with the vendor tool and send the notice again please";
        let p = Progress::new(Step::FlashFailed, words.repeat(2), "m");
        assert!(p.desc.len() <= MAX_DESC_BYTES, "{}", p.desc);
        assert!(p.desc.ends_with("…"), "{}", p.desc);
        let kept = p.desc.trim_end_matches('…');
        assert!(words.repeat(2).starts_with(kept));
        assert_eq!(
            words.repeat(2).as_bytes()[kept.len()],
            b' ',
            "cut before a space: {kept:?}"
        );
        // Short ones are left alone.
        assert_eq!(
            Progress::new(Step::FlashFailed, "HTTP 404", "m").desc,
            "HTTP 404"
        );
        // A desc set directly is cut on the wire too.
        let p = Progress {
            step: Step::UpgradeFailed,
            desc: "x".repeat(500),
            module: "m".into(),
        };
        let sent = json(&text(p.payload(1)));
        assert_eq!(
            sent["params"]["desc"].as_str().unwrap().len(),
            MAX_DESC_BYTES
        );
    }

    #[test]
    fn steps_map_to_codes_and_back() {
        for (step, code) in [
            (Step::Percent(0), 0),
            (Step::Percent(100), 100),
            (Step::UpgradeFailed, -1),
            (Step::DownloadFailed, -2),
            (Step::VerifyFailed, -3),
            (Step::FlashFailed, -4),
        ] {
            assert_eq!(step.code(), code);
            assert_eq!(Step::from_code(i64::from(code)), Some(step));
            assert_eq!(serde_json::to_string(&step).unwrap(), format!("\"{code}\""));
            assert_eq!(
                serde_json::from_str::<Step>(&format!("\"{code}\"")).unwrap(),
                step
            );
            assert_eq!(
                serde_json::from_str::<Step>(&code.to_string()).unwrap(),
                step
            );
        }
        assert_eq!(Step::Percent(200).code(), 100);
        assert_eq!(Step::from_code(101), None);
        assert_eq!(Step::from_code(-5), None);
        assert!(serde_json::from_str::<Step>("\"x\"").is_err());
    }

    #[test]
    fn firmware_get_request_is_exactly_the_protocol_sample() {
        assert_eq!(
            text(firmware_get_request(125, "MCU")),
            r#"{"id":"125","params":{"module":"MCU"}}"#
        );
        assert_eq!(
            text(firmware_get_request(126, DEFAULT_MODULE)),
            r#"{"id":"126","params":{}}"#
        );
    }

    #[test]
    fn the_protocol_sample_notice_parses() {
        let n = parse_notice(SAMPLE_NOTICE.as_bytes()).unwrap();
        assert_eq!(
            n,
            Notice {
                id: 1626969597470,
                version: "2.0.0".into(),
                size: 432945,
                download: Download::Http {
                    url: "https://ota.example.com/fw.bin?Expires=1627056000".into()
                },
                sign_method: SignMethod::Md5,
                sign: MD5.into(),
                module: "MCU".into(),
                is_diff: true,
                ext_data: Some(json(r#"{"key1":"value1","_package_udi":"x"}"#)),
            }
        );
        assert_eq!(
            n.url(),
            Some("https://ota.example.com/fw.bin?Expires=1627056000")
        );
        assert_eq!(module_hint(SAMPLE_NOTICE.as_bytes()), "MCU");
    }

    #[test]
    fn lenient_variants_are_accepted() {
        // id and code as numbers or strings, size as a string.
        let bytes =
            br#"{"code":1000,"id":"42","data":{"size":"10","version":"1","url":"HTTPS://h/f",
            "sign":"93230C3BDE425A9D7984A594AC55EA1E","signMethod":"MD5"}}"#;
        let n = parse_notice(bytes).unwrap();
        assert_eq!((n.id, n.size, n.sign.as_str()), (42, 10, MD5));
        assert_eq!(n.module, DEFAULT_MODULE);
        assert!(!n.is_diff);
        assert_eq!(n.ext_data, None);
        // No code at all.
        assert!(parse_notice(br#"{"id":1,"data":{"size":1,"version":"1","url":"http://h","md5":"93230c3bde425a9d7984a594ac55ea1e"}}"#).is_ok());
        for method in ["SHA256", "Sha256", "sha256", "SHA-256"] {
            let n = parse_notice(&notice_with(with(
                with(base_data(), "signMethod", method.into()),
                "sign",
                SHA256.to_uppercase().into(),
            )))
            .unwrap();
            assert_eq!(
                (n.sign_method, n.sign.as_str()),
                (SignMethod::Sha256, SHA256)
            );
        }
        for method in ["Md5", "MD5", "md5"] {
            let n = parse_notice(&notice_with(with(base_data(), "signMethod", method.into())));
            assert_eq!(n.unwrap().sign_method, SignMethod::Md5);
        }
        // Only md5, no sign and no signMethod (older notices).
        let data = with(
            without(without(base_data(), "sign"), "signMethod"),
            "md5",
            MD5.into(),
        );
        assert_eq!(parse_notice(&notice_with(data)).unwrap().sign, MD5);
        // isDiff 0, "1", false; module empty = default.
        for (v, d) in [
            (json("0"), false),
            (json("\"1\""), true),
            (json("false"), false),
        ] {
            assert_eq!(
                parse_notice(&notice_with(with(base_data(), "isDiff", v)))
                    .unwrap()
                    .is_diff,
                d
            );
        }
        let n = parse_notice(&notice_with(with(base_data(), "module", "".into()))).unwrap();
        assert_eq!(n.module, DEFAULT_MODULE);
    }

    #[test]
    fn mqtt_download_notices_parse_into_mqtt() {
        let data = with(
            with(without(base_data(), "url"), "dProtocol", "mqtt".into()),
            "streamId",
            json("1234"),
        );
        let data = with(data, "streamFileId", json("\"1\""));
        let n = parse_notice(&notice_with(data.clone())).unwrap();
        assert_eq!(
            n.download,
            Download::Mqtt {
                stream_id: 1234,
                stream_file_id: 1
            }
        );
        assert_eq!(n.url(), None);
        assert_eq!(
            err(without(data, "streamId")),
            r#"missing field "streamId""#
        );
    }

    #[test]
    fn each_rejection_names_the_field_and_why() {
        let cases = [
            (
                without(base_data(), "version"),
                r#"missing field "version""#,
            ),
            (with(base_data(), "version", "".into()), "version is empty"),
            (
                with(base_data(), "version", json("2")),
                "version 2 is not a string",
            ),
            (without(base_data(), "size"), r#"missing field "size""#),
            (
                with(base_data(), "size", json("-1")),
                "size -1 is not a whole number",
            ),
            (
                with(base_data(), "size", json("\"ten\"")),
                r#"size "ten" is not a whole number"#,
            ),
            (with(base_data(), "size", json("0")), "size is 0"),
            (without(base_data(), "url"), r#"missing field "url""#),
            (
                with(base_data(), "url", "ftp://h/f".into()),
                r#"url "ftp://h/f" is not an http or https URL"#,
            ),
            (
                with(base_data(), "url", "https://".into()),
                "url has no host",
            ),
            (
                with(base_data(), "signMethod", "crc32".into()),
                r#"signMethod "crc32" is not md5 or sha256"#,
            ),
            (
                without(base_data(), "signMethod"),
                r#"missing field "signMethod""#,
            ),
            (without(base_data(), "sign"), r#"missing field "sign""#),
            (
                with(base_data(), "sign", MD5[..31].into()),
                "sign has 31 hex digits, md5 needs 32",
            ),
            (
                with(base_data(), "signMethod", "sha256".into()),
                "sign has 32 hex digits, sha256 needs 64",
            ),
            (
                with(base_data(), "sign", "zz".repeat(16).into()),
                &format!("sign \"{}\" is not hexadecimal", "zz".repeat(16)),
            ),
            (
                with(base_data(), "md5", "0".repeat(32).into()),
                "md5 differs from sign",
            ),
            (
                with(base_data(), "isDiff", json("2")),
                "isDiff 2 is not 0 or 1",
            ),
            (
                with(base_data(), "module", json("[]")),
                "module [] is not a string",
            ),
        ];
        for (data, expected) in cases {
            assert_eq!(err(data.clone()), expected, "{data}");
        }
        let e = parse_notice(b"{nope").unwrap_err();
        assert!(e.to_string().starts_with("payload is not JSON: "), "{e}");
        assert_eq!(e.field(), None);
        assert_eq!(parse_notice(b"[1]").unwrap_err(), NoticeError::NotObject);
        assert_eq!(
            parse_notice(br#"{"code":"1000","data":{}}"#).unwrap_err(),
            NoticeError::Missing("id")
        );
        assert_eq!(
            parse_notice(br#"{"id":1}"#).unwrap_err(),
            NoticeError::Missing("data")
        );
        assert_eq!(
            parse_notice(br#"{"id":1,"data":"x"}"#)
                .unwrap_err()
                .to_string(),
            r#"data "x" is not an object"#
        );
        let e =
            parse_notice(br#"{"code":"9201","message":"no task","id":1,"data":{}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"code "9201" is not 1000 (message "no task")"#
        );
        assert_eq!(e.field(), Some("code"));
    }

    #[test]
    fn get_reply_parses_with_data_or_empty() {
        let reply = format!(
            r#"{{"id":"125","code":200,"data":{}}}"#,
            serde_json::to_string(&base_data()).unwrap()
        );
        let n = parse_get_reply(reply.as_bytes()).unwrap().unwrap();
        assert_eq!((n.id, n.version.as_str()), (125, "2.0.0"));
        assert_eq!(
            parse_get_reply(br#"{"id":"125","code":200,"data":{}}"#).unwrap(),
            None
        );
        assert_eq!(
            parse_get_reply(br#"{"id":125,"code":"200"}"#).unwrap(),
            None
        );
        assert_eq!(
            parse_get_reply(br#"{"id":"125","code":500,"data":{}}"#)
                .unwrap_err()
                .to_string(),
            "code 500 is not 200"
        );
        assert_eq!(
            parse_get_reply(br#"{"id":"125","code":200,"data":{"version":"1"}}"#)
                .unwrap_err()
                .to_string(),
            r#"missing field "size""#
        );
    }

    #[test]
    fn reissue_is_the_canonical_form() {
        let mut n = parse_notice(SAMPLE_NOTICE.as_bytes()).unwrap();
        n.sign = n.sign.to_uppercase();
        let out = json(&text(reissue_notice(&n)));
        assert_eq!(
            out,
            json(&format!(
                r#"{{"code":"1000","message":"success","id":1626969597470,"data":{{
                "size":432945,"version":"2.0.0","url":"https://ota.example.com/fw.bin?Expires=1627056000",
                "md5":"{MD5}","sign":"{MD5}","signMethod":"Md5","module":"MCU","isDiff":1,
                "extData":{{"key1":"value1","_package_udi":"x"}}}}}}"#
            ))
        );
        // It parses back to the same notice (lowercase sign).
        n.sign = n.sign.to_lowercase();
        assert_eq!(parse_notice(&reissue_notice(&n)).unwrap(), n);

        let sha = Notice {
            sign_method: SignMethod::Sha256,
            sign: SHA256.into(),
            module: DEFAULT_MODULE.into(),
            is_diff: false,
            ext_data: None,
            ..n
        };
        let out = json(&text(reissue_notice(&sha)));
        assert_eq!(out["data"]["signMethod"], "SHA256");
        assert_eq!(out["data"]["sign"], SHA256);
        assert!(out["data"].get("md5").is_none());
        assert!(out["data"].get("module").is_none());
        assert!(out["data"].get("isDiff").is_none());
        assert!(out["id"].is_u64() && out["data"]["size"].is_u64());
        assert_eq!(parse_notice(&reissue_notice(&sha)).unwrap(), sha);
    }

    /// Property-style: truncations, byte flips and field-type swaps of valid
    /// payloads never panic; they parse or give an error.
    #[test]
    fn garbled_payloads_never_panic() {
        let samples: Vec<Vec<u8>> = vec![
            SAMPLE_NOTICE.as_bytes().to_vec(),
            notice_with(base_data()),
            format!(r#"{{"id":"1","code":200,"data":{}}}"#, base_data()).into_bytes(),
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            // xorshift64*
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut inputs = Vec::new();
        for sample in &samples {
            for cut in 0..sample.len() {
                inputs.push(sample[..cut].to_vec());
            }
            for _ in 0..500 {
                let mut garbled = sample.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() % garbled.len() as u64) as usize;
                    garbled[at] = (next() % 256) as u8;
                }
                inputs.push(garbled);
            }
        }
        let odd_values = [
            "null",
            "true",
            "-1",
            "1e300",
            "18446744073709551616",
            "\"\"",
            "\"é\"",
            "[]",
            "{}",
            "1.5",
            "\"\\u0000\"",
        ];
        for key in [
            "id",
            "code",
            "size",
            "version",
            "url",
            "sign",
            "signMethod",
            "md5",
            "module",
            "isDiff",
            "extData",
            "dProtocol",
            "streamId",
        ] {
            for v in odd_values {
                inputs.push(notice_with(with(base_data(), key, json(v))));
                inputs.push(
                    format!(
                        r#"{{"id":{v},"code":{v},"data":{}}}"#,
                        with(base_data(), key, json(v))
                    )
                    .into_bytes(),
                );
            }
        }
        for input in &inputs {
            let _ = parse_notice(input);
            let _ = parse_get_reply(input);
            let _ = module_hint(input);
        }
        assert!(inputs.len() > 2000);
    }
}
