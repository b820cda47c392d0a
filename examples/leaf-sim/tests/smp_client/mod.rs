//! A small SMP client for the simulator's tests, written from the public specifications
//! independently of the simulator's code: console framing (base64 of length + packet +
//! CRC-16/XMODEM, 0x06 0x09 / 0x04 0x14 frames of at most 127 bytes), the SMP header, CBOR
//! bodies, and an MCUboot image builder. It uses none of `otagw_leaf_sim::smp`.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use minicbor::data::Type;
use minicbor::{Decoder, Encoder};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

/// CRC-16/XMODEM, bit by bit.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0u16;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Frames one SMP packet for the console: 93 raw bytes (124 base64 characters) a frame.
pub fn frames(packet: &[u8]) -> Vec<u8> {
    let mut raw = ((packet.len() + 2) as u16).to_be_bytes().to_vec();
    raw.extend_from_slice(packet);
    raw.extend_from_slice(&crc16(packet).to_be_bytes());
    let mut out = Vec::new();
    for (i, chunk) in raw.chunks(93).enumerate() {
        out.extend_from_slice(if i == 0 { &[6, 9] } else { &[4, 20] });
        out.extend_from_slice(STANDARD.encode(chunk).as_bytes());
        out.push(b'\n');
    }
    out
}

/// A decoded CBOR value.
#[derive(Debug, Clone, PartialEq)]
pub enum V {
    U(u64),
    I(i64),
    B(Vec<u8>),
    T(String),
    Bool(bool),
    A(Vec<V>),
    M(Vec<(String, V)>),
}

impl V {
    pub fn get(&self, key: &str) -> Option<&V> {
        match self {
            V::M(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn u(&self, key: &str) -> Option<u64> {
        match self.get(key) {
            Some(V::U(v)) => Some(*v),
            _ => None,
        }
    }
    pub fn bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(V::Bool(v)) => Some(*v),
            _ => None,
        }
    }
    pub fn text(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(V::T(v)) => Some(v),
            _ => None,
        }
    }
    pub fn bytes(&self, key: &str) -> Option<&[u8]> {
        match self.get(key) {
            Some(V::B(v)) => Some(v),
            _ => None,
        }
    }
    /// The `images` list of a state answer.
    pub fn images(&self) -> Vec<V> {
        match self.get("images") {
            Some(V::A(list)) => list.clone(),
            other => panic!("no images list: {other:?} in {self:?}"),
        }
    }
}

/// Decodes one CBOR item.
pub fn decode(d: &mut Decoder<'_>) -> V {
    match d.datatype().expect("a CBOR item") {
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => V::U(d.u64().unwrap()),
        Type::I8 | Type::I16 | Type::I32 | Type::I64 => V::I(d.i64().unwrap()),
        Type::Bool => V::Bool(d.bool().unwrap()),
        Type::Bytes => V::B(d.bytes().unwrap().to_vec()),
        Type::String => V::T(d.str().unwrap().to_owned()),
        Type::Array => {
            let n = d.array().unwrap().expect("definite array");
            V::A((0..n).map(|_| decode(d)).collect())
        }
        Type::Map => {
            let n = d.map().unwrap().expect("definite map");
            V::M(
                (0..n)
                    .map(|_| (d.str().unwrap().to_owned(), decode(d)))
                    .collect(),
            )
        }
        t => panic!("unexpected CBOR type {t:?}"),
    }
}

/// A request body: a CBOR map.
pub struct Req(Encoder<Vec<u8>>);

impl Req {
    pub fn map(entries: u64) -> Self {
        let mut e = Encoder::new(Vec::new());
        e.map(entries).unwrap();
        Self(e)
    }
    pub fn u(mut self, k: &str, v: u64) -> Self {
        self.0.str(k).unwrap().u64(v).unwrap();
        self
    }
    pub fn b(mut self, k: &str, v: &[u8]) -> Self {
        self.0.str(k).unwrap().bytes(v).unwrap();
        self
    }
    pub fn t(mut self, k: &str, v: &str) -> Self {
        self.0.str(k).unwrap().str(v).unwrap();
        self
    }
    pub fn bool(mut self, k: &str, v: bool) -> Self {
        self.0.str(k).unwrap().bool(v).unwrap();
        self
    }
    pub fn done(self) -> Vec<u8> {
        self.0.into_writer()
    }
}

/// An answer: its header fields and body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub op: u8,
    pub group: u16,
    pub seq: u8,
    pub id: u8,
    pub body: V,
}

/// What came back for a request.
#[derive(Debug)]
pub enum Got {
    Answer(Answer),
    /// A packet whose CRC, length or base64 was wrong.
    Garbled,
    /// Nothing within the wait.
    Nothing,
}

/// The client over any byte stream.
pub struct Client<S> {
    io: S,
    seq: u8,
    pending: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(io: S) -> Self {
        Self {
            io,
            seq: 0,
            pending: Vec::new(),
        }
    }

    /// Sends raw bytes.
    pub async fn raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
        self.io.flush().await.unwrap();
    }

    /// Sends a request with the next sequence number; returns that number.
    pub async fn send(&mut self, op: u8, group: u16, id: u8, body: &[u8]) -> u8 {
        self.seq = self.seq.wrapping_add(1);
        let mut packet = vec![op, 0];
        packet.extend_from_slice(&(body.len() as u16).to_be_bytes());
        packet.extend_from_slice(&group.to_be_bytes());
        packet.extend_from_slice(&[self.seq, id]);
        packet.extend_from_slice(body);
        self.raw(&frames(&packet)).await;
        self.seq
    }

    async fn line(&mut self, wait: Duration) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Some(line[..line.len() - 1].to_vec());
            }
            let mut buf = [0u8; 512];
            let n = timeout(wait, self.io.read(&mut buf)).await.ok()?.unwrap();
            assert!(n > 0, "the device closed the link");
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Reads the next packet within `wait`.
    pub async fn receive(&mut self, wait: Duration) -> Got {
        let mut raw: Option<Vec<u8>> = None;
        loop {
            let Some(line) = self.line(wait).await else {
                return Got::Nothing;
            };
            assert!(line.len() < 127, "frame of {} bytes", line.len() + 1);
            let (marker, text) = line.split_at(2);
            let Ok(decoded) = STANDARD.decode(text) else {
                return Got::Garbled;
            };
            match marker {
                [6, 9] => raw = Some(decoded),
                [4, 20] => raw.as_mut().expect("a start frame first").extend(decoded),
                _ => panic!("unexpected console line {line:?}"),
            }
            let r = raw.as_ref().unwrap();
            let total = usize::from(u16::from_be_bytes([r[0], r[1]]));
            if r.len() < 2 + total {
                continue;
            }
            if r.len() != 2 + total || total < 10 {
                return Got::Garbled;
            }
            let (packet, crc) = r[2..].split_at(total - 2);
            if crc16(packet).to_be_bytes() != crc {
                return Got::Garbled;
            }
            let len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            if len != packet.len() - 8 {
                return Got::Garbled;
            }
            let mut d = Decoder::new(&packet[8..]);
            let body = decode(&mut d);
            return Got::Answer(Answer {
                op: packet[0] & 7,
                group: u16::from_be_bytes([packet[4], packet[5]]),
                seq: packet[6],
                id: packet[7],
                body,
            });
        }
    }

    /// Sends a request and returns its answer (checking op + 1 and the echoed sequence).
    pub async fn call(&mut self, op: u8, group: u16, id: u8, body: &[u8]) -> V {
        let seq = self.send(op, group, id, body).await;
        match self.receive(Duration::from_secs(10)).await {
            Got::Answer(a) => {
                assert_eq!(
                    (a.op, a.group, a.seq, a.id),
                    (op + 1, group, seq, id),
                    "{a:?}"
                );
                a.body
            }
            other => panic!("no answer to ({group}, {id}): {other:?}"),
        }
    }

    pub async fn echo(&mut self, text: &str) -> V {
        self.call(2, 0, 0, &Req::map(1).t("d", text).done()).await
    }
    pub async fn params(&mut self) -> V {
        self.call(0, 0, 6, &[]).await
    }
    pub async fn state(&mut self) -> V {
        self.call(0, 1, 0, &[]).await
    }
    pub async fn reset(&mut self) -> V {
        self.call(2, 0, 5, &Req::map(0).done()).await
    }
    pub async fn test_image(&mut self, hash: &[u8]) -> V {
        let body = Req::map(2).b("hash", hash).bool("confirm", false).done();
        self.call(2, 1, 0, &body).await
    }
    pub async fn confirm(&mut self, hash: Option<&[u8]>) -> V {
        let body = match hash {
            Some(h) => Req::map(2).b("hash", h).bool("confirm", true).done(),
            None => Req::map(1).bool("confirm", true).done(),
        };
        self.call(2, 1, 0, &body).await
    }
    pub async fn erase(&mut self) -> V {
        self.call(2, 1, 5, &Req::map(0).done()).await
    }
}

/// An upload request for `image` at `off` with at most `chunk` bytes.
pub fn upload_body(image: &[u8], off: usize, chunk: usize) -> Vec<u8> {
    let data = &image[off..(off + chunk).min(image.len())];
    if off == 0 {
        Req::map(5)
            .u("image", 0)
            .u("len", image.len() as u64)
            .u("off", 0)
            .b("sha", &Sha256::digest(image))
            .b("data", data)
            .done()
    } else {
        Req::map(2).u("off", off as u64).b("data", data).done()
    }
}

/// An MCUboot image: 32-byte header, payload, unprotected TLV area with the SHA-256 TLV.
/// Returns the image and its hash.
pub fn mcuboot_image(version: (u8, u8, u16, u32), payload: &[u8]) -> (Vec<u8>, [u8; 32]) {
    let mut image = Vec::new();
    image.extend_from_slice(&0x96f3_b83du32.to_le_bytes());
    image.extend_from_slice(&[0; 4]);
    image.extend_from_slice(&32u16.to_le_bytes());
    image.extend_from_slice(&[0; 2]);
    image.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    image.extend_from_slice(&[0; 4]);
    image.extend_from_slice(&[version.0, version.1]);
    image.extend_from_slice(&version.2.to_le_bytes());
    image.extend_from_slice(&version.3.to_le_bytes());
    image.extend_from_slice(&[0; 4]);
    image.extend_from_slice(payload);
    let hash: [u8; 32] = Sha256::digest(&image).into();
    image.extend_from_slice(&[0x07, 0x69, 40, 0, 0x10, 0, 32, 0]);
    image.extend_from_slice(&hash);
    (image, hash)
}
