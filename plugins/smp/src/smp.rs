//! SMP packets, independent of the transport: the 8-byte header, the CBOR
//! bodies (a small [`Value`] tree for answers, [`minicbor::Encoder`] for
//! requests), and the names of the return codes.
//!
//! What it is: the bytes of one SMP packet, as the serial framing
//! (`serial`) wraps them and as BLE carries them raw (`transport`).
//!
//! What it is not: I/O, retries or command semantics (`client`).

use minicbor::data::Type;
use minicbor::{Decoder, Encoder};

/// Length of the SMP header.
pub const HEADER_LEN: usize = 8;

/// Operation codes.
pub mod op {
    pub const READ: u8 = 0;
    pub const READ_RSP: u8 = 1;
    pub const WRITE: u8 = 2;
    pub const WRITE_RSP: u8 = 3;
}

/// Management groups and the command ids this family uses.
pub mod group {
    /// OS management.
    pub const OS: u16 = 0;
    /// Image management.
    pub const IMAGE: u16 = 1;
}

/// Command ids.
pub mod id {
    /// OS: echo.
    pub const ECHO: u8 = 0;
    /// OS: reset.
    pub const RESET: u8 = 5;
    /// OS: MCUmgr parameters.
    pub const PARAMS: u8 = 6;
    /// OS: OS/application info.
    pub const INFO: u8 = 7;
    /// Image: state read/write.
    pub const STATE: u8 = 0;
    /// Image: upload.
    pub const UPLOAD: u8 = 1;
    /// Image: erase.
    pub const ERASE: u8 = 5;
}

/// The SMP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// 0 = SMP version 1 (plain `rc`), 1 = version 2 (`err {group, rc}`).
    pub version: u8,
    pub op: u8,
    pub flags: u8,
    /// Length of the CBOR body.
    pub len: u16,
    pub group: u16,
    pub seq: u8,
    pub id: u8,
}

impl Header {
    /// The 8 bytes on the wire (big-endian fields).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let [l0, l1] = self.len.to_be_bytes();
        let [g0, g1] = self.group.to_be_bytes();
        [
            ((self.version & 0b11) << 3) | (self.op & 0b111),
            self.flags,
            l0,
            l1,
            g0,
            g1,
            self.seq,
            self.id,
        ]
    }

    /// Parse the first 8 bytes of `b` (None when shorter).
    pub fn decode(b: &[u8]) -> Option<Header> {
        let h = b.get(..HEADER_LEN)?;
        Some(Header {
            version: (h[0] >> 3) & 0b11,
            op: h[0] & 0b111,
            flags: h[1],
            len: u16::from_be_bytes([h[2], h[3]]),
            group: u16::from_be_bytes([h[4], h[5]]),
            seq: h[6],
            id: h[7],
        })
    }
}

/// A whole SMP packet: header plus CBOR body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub header: Header,
    pub body: Vec<u8>,
}

impl Packet {
    /// A request (SMP version 1) with `body` as its CBOR.
    pub fn request(op: u8, group: u16, id: u8, seq: u8, body: Vec<u8>) -> Packet {
        Packet {
            header: Header {
                version: 0,
                op,
                flags: 0,
                len: body.len() as u16,
                group,
                seq,
                id,
            },
            body,
        }
    }

    /// Header followed by body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.body.len());
        let mut h = self.header;
        h.len = self.body.len() as u16;
        out.extend_from_slice(&h.encode());
        out.extend_from_slice(&self.body);
        out
    }

    /// Parse a complete packet; the header's length must match exactly.
    pub fn decode(b: &[u8]) -> Result<Packet, String> {
        let header = Header::decode(b)
            .ok_or_else(|| format!("{} bytes are too short for an SMP header", b.len()))?;
        let body = &b[HEADER_LEN..];
        if body.len() != usize::from(header.len) {
            return Err(format!(
                "SMP header says {} body bytes, the packet has {}",
                header.len,
                body.len()
            ));
        }
        Ok(Packet {
            header,
            body: body.to_vec(),
        })
    }
}

/// A decoded CBOR item (what SMP bodies use; tags are dropped, floats kept as text).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i128),
    Bytes(Vec<u8>),
    Text(String),
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
    Bool(bool),
    Null,
    /// Undefined, simple values, floats: present but not used here.
    Other,
}

impl Value {
    /// The value under text key `key` of a map.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(k, Value::Text(t) if t == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i128> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        self.as_int().and_then(|i| u64::try_from(i).ok())
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(t) => Some(t),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Decode one CBOR item that must span all of `b`.
    pub fn decode(b: &[u8]) -> Result<Value, String> {
        let mut d = Decoder::new(b);
        let v = decode_item(&mut d, 0).map_err(|e| format!("bad CBOR body: {e}"))?;
        if d.position() != b.len() {
            return Err(format!(
                "bad CBOR body: {} bytes after the first item",
                b.len() - d.position()
            ));
        }
        Ok(v)
    }
}

/// Nesting deeper than this is refused (SMP bodies nest two or three levels).
const MAX_DEPTH: usize = 16;

fn decode_item(d: &mut Decoder<'_>, depth: usize) -> Result<Value, minicbor::decode::Error> {
    if depth > MAX_DEPTH {
        return Err(minicbor::decode::Error::message("CBOR nested too deeply"));
    }
    Ok(match d.datatype()? {
        Type::Bool => Value::Bool(d.bool()?),
        Type::Null => {
            d.skip()?;
            Value::Null
        }
        Type::U8
        | Type::U16
        | Type::U32
        | Type::U64
        | Type::I8
        | Type::I16
        | Type::I32
        | Type::I64
        | Type::Int => Value::Int(i128::from(d.int()?)),
        Type::Bytes => Value::Bytes(d.bytes()?.to_vec()),
        Type::BytesIndef => {
            let mut out = Vec::new();
            for part in d.bytes_iter()? {
                out.extend_from_slice(part?);
            }
            Value::Bytes(out)
        }
        Type::String => Value::Text(d.str()?.to_string()),
        Type::StringIndef => {
            let mut out = String::new();
            for part in d.str_iter()? {
                out.push_str(part?);
            }
            Value::Text(out)
        }
        Type::Array | Type::ArrayIndef => {
            let n = d.array()?;
            let mut items = Vec::new();
            match n {
                Some(n) => {
                    for _ in 0..n {
                        items.push(decode_item(d, depth + 1)?);
                    }
                }
                None => {
                    while d.datatype()? != Type::Break {
                        items.push(decode_item(d, depth + 1)?);
                    }
                    d.skip()?;
                }
            }
            Value::Array(items)
        }
        Type::Map | Type::MapIndef => {
            let n = d.map()?;
            let mut entries = Vec::new();
            match n {
                Some(n) => {
                    for _ in 0..n {
                        let k = decode_item(d, depth + 1)?;
                        let v = decode_item(d, depth + 1)?;
                        entries.push((k, v));
                    }
                }
                None => {
                    while d.datatype()? != Type::Break {
                        let k = decode_item(d, depth + 1)?;
                        let v = decode_item(d, depth + 1)?;
                        entries.push((k, v));
                    }
                    d.skip()?;
                }
            }
            Value::Map(entries)
        }
        Type::Tag => {
            d.tag()?;
            decode_item(d, depth + 1)?
        }
        _ => {
            d.skip()?;
            Value::Other
        }
    })
}

/// A CBOR map under construction (definite length, written at the end).
#[derive(Debug, Default)]
pub struct MapBuilder {
    count: u64,
    body: Vec<u8>,
}

impl MapBuilder {
    pub fn new() -> MapBuilder {
        MapBuilder::default()
    }

    fn enc(&mut self) -> Encoder<&mut Vec<u8>> {
        Encoder::new(&mut self.body)
    }

    pub fn uint(mut self, key: &str, v: u64) -> MapBuilder {
        let _ = self.enc().str(key).and_then(|e| e.u64(v));
        self.count += 1;
        self
    }

    pub fn bytes(mut self, key: &str, v: &[u8]) -> MapBuilder {
        let _ = self.enc().str(key).and_then(|e| e.bytes(v));
        self.count += 1;
        self
    }

    pub fn text(mut self, key: &str, v: &str) -> MapBuilder {
        let _ = self.enc().str(key).and_then(|e| e.str(v));
        self.count += 1;
        self
    }

    pub fn bool(mut self, key: &str, v: bool) -> MapBuilder {
        let _ = self.enc().str(key).and_then(|e| e.bool(v));
        self.count += 1;
        self
    }

    /// The encoded map. (Writing to a `Vec` cannot fail.)
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 9);
        let _ = Encoder::new(&mut out).map(self.count);
        out.extend_from_slice(&self.body);
        out
    }
}

/// Size of the CBOR head of a byte string of `len` bytes.
pub fn bstr_head_len(len: usize) -> usize {
    match len {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        _ => 5,
    }
}

/// Name and meaning of an SMP version 1 (`rc`) return code.
pub fn rc_meaning(rc: i128) -> &'static str {
    match rc {
        0 => "EOK: success",
        1 => "EUNKNOWN: unknown error",
        2 => "ENOMEM: the device is out of memory",
        3 => "EINVAL: invalid argument",
        4 => "ETIMEOUT: operation timed out on the device",
        5 => "ENOENT: no such file or entry",
        6 => "EBADSTATE: the device is in a state that does not allow this",
        7 => "EMSGSIZE: the response would be too large",
        8 => "ENOTSUP: command not supported",
        9 => "ECORRUPT: corrupt data",
        10 => "EBUSY: the device is busy",
        11 => "EACCESSDENIED: access denied",
        12 => "UNSUPPORTED_TOO_OLD: protocol version too old for the device",
        13 => "UNSUPPORTED_TOO_NEW: protocol version too new for the device",
        _ => "no standard meaning",
    }
}

/// Name of an SMP version 2 image-group (`err.group == 1`) return code.
pub fn img_rc_meaning(rc: i128) -> &'static str {
    const NAMES: [&str; 35] = [
        "OK",
        "UNKNOWN",
        "FLASH_CONFIG_QUERY_FAIL",
        "NO_IMAGE",
        "NO_TLVS",
        "INVALID_TLV",
        "TLV_MULTIPLE_HASHES_FOUND",
        "TLV_INVALID_SIZE",
        "HASH_NOT_FOUND",
        "NO_FREE_SLOT",
        "FLASH_OPEN_FAILED",
        "FLASH_READ_FAILED",
        "FLASH_WRITE_FAILED",
        "FLASH_ERASE_FAILED",
        "INVALID_SLOT",
        "NO_FREE_MEMORY",
        "FLASH_CONTEXT_ALREADY_SET",
        "FLASH_CONTEXT_NOT_SET",
        "FLASH_AREA_DEVICE_NULL",
        "INVALID_PAGE_OFFSET",
        "INVALID_OFFSET",
        "INVALID_LENGTH",
        "INVALID_IMAGE_HEADER",
        "INVALID_IMAGE_HEADER_MAGIC",
        "INVALID_HASH",
        "INVALID_FLASH_ADDRESS",
        "VERSION_GET_FAILED",
        "CURRENT_VERSION_IS_NEWER",
        "IMAGE_ALREADY_PENDING",
        "INVALID_IMAGE_VECTOR_TABLE",
        "INVALID_IMAGE_TOO_LARGE",
        "INVALID_IMAGE_DATA_OVERRUN",
        "IMAGE_CONFIRMATION_DENIED",
        "IMAGE_SETTING_TEST_TO_ACTIVE_DENIED",
        "ACTIVE_SLOT_NOT_KNOWN",
    ];
    usize::try_from(rc)
        .ok()
        .and_then(|i| NAMES.get(i).copied())
        .unwrap_or("no standard meaning")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_layout() {
        let h = Header {
            version: 1,
            op: op::WRITE,
            flags: 0,
            len: 0x1234,
            group: group::IMAGE,
            seq: 7,
            id: id::UPLOAD,
        };
        let b = h.encode();
        assert_eq!(b, [0x0a, 0, 0x12, 0x34, 0, 1, 7, 1]);
        assert_eq!(Header::decode(&b), Some(h));
        assert_eq!(Header::decode(&b[..7]), None);
    }

    #[test]
    fn packet_length_must_match() {
        let p = Packet::request(op::READ, group::OS, id::PARAMS, 3, vec![0xa0]);
        let b = p.encode();
        assert_eq!(b.len(), 9);
        assert_eq!(Packet::decode(&b).unwrap(), p);
        assert!(
            Packet::decode(&b[..8])
                .unwrap_err()
                .contains("says 1 body bytes")
        );
    }

    #[test]
    fn map_builder_and_value_round_trip() {
        let body = MapBuilder::new()
            .uint("off", 70000)
            .bytes("data", &[1, 2, 3])
            .text("d", "hi")
            .bool("confirm", false)
            .finish();
        let v = Value::decode(&body).unwrap();
        assert_eq!(v.get("off").and_then(Value::as_u64), Some(70000));
        assert_eq!(
            v.get("data").and_then(Value::as_bytes),
            Some(&[1u8, 2, 3][..])
        );
        assert_eq!(v.get("d").and_then(Value::as_text), Some("hi"));
        assert_eq!(v.get("confirm").and_then(Value::as_bool), Some(false));
        assert_eq!(v.get("nope"), None);
    }

    #[test]
    fn decodes_indefinite_maps_and_negative_ints() {
        // {_ "rc": -1, "a": [_ 1, 2] }
        let b = [
            0xbf, 0x62, b'r', b'c', 0x20, 0x61, b'a', 0x9f, 0x01, 0x02, 0xff, 0xff,
        ];
        let v = Value::decode(&b).unwrap();
        assert_eq!(v.get("rc").and_then(Value::as_int), Some(-1));
        assert_eq!(
            v.get("a").and_then(Value::as_array).map(<[_]>::len),
            Some(2)
        );
        assert!(Value::decode(&[0xa1, 0x61]).is_err());
        assert!(Value::decode(&[0xa0, 0x00]).unwrap_err().contains("after"));
    }

    #[test]
    fn bstr_head_sizes_match_minicbor() {
        for n in [0usize, 23, 24, 255, 256, 65535, 65536] {
            let mut out = Vec::new();
            Encoder::new(&mut out).bytes(&vec![0u8; n]).unwrap();
            assert_eq!(out.len() - n, bstr_head_len(n), "len {n}");
        }
    }
}
