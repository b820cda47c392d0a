//! SMP packets on a link, the receiving and the sending side, without I/O: the 8-byte SMP
//! header ([`Header`]), the console framing of the serial transport ([`Deframer`], [`encode`])
//! and the raw form of the Bluetooth LE (and UDP) transport ([`RawAssembler`]).
//!
//! # Raw
//! Over Bluetooth LE an SMP packet is sent as it is, header and CBOR body, with no length
//! prefix, CRC or base64: a central cuts it into ATT writes and the device reassembles it by
//! the header's length field (Zephyr's `CONFIG_MCUMGR_TRANSPORT_BT_REASSEMBLY`); answers go back
//! the same way in notifications. On a byte stream that carries such packets back to back,
//! [`RawAssembler`] finds each packet's end from its header.
//!
//! # Console
//! A packet on the wire is `len (2, big endian) + SMP packet + CRC-16/XMODEM of the SMP packet
//! (2, big endian)`, where `len` counts the SMP packet and the CRC (as the mcumgr console
//! specification says). That is base64-encoded and cut into frames of at most 127 bytes: the
//! first starts `0x06 0x09`, continuations `0x04 0x14`, each ends with `\n`. As in Zephyr,
//! each frame's base64 is decoded on its own (so a sender must cut on 4-character
//! boundaries), a frame longer than 127 bytes is dropped with its packet, and a line that
//! starts with neither marker is console text and ignored.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use crc::{CRC_16_XMODEM, Crc};

/// Marker of a packet's first frame.
pub const START: [u8; 2] = [0x06, 0x09];
/// Marker of a continuation frame.
pub const CONTINUATION: [u8; 2] = [0x04, 0x14];
/// The longest frame, markers and newline included.
pub const MAX_FRAME: usize = 127;
/// Raw bytes per frame: 124 base64 characters.
const RAW_PER_FRAME: usize = (MAX_FRAME - 3) / 4 * 3;

const CRC16: Crc<u16> = Crc::<u16>::new(&CRC_16_XMODEM);

/// CRC-16/XMODEM (polynomial 0x1021, initial value 0).
pub fn crc16(data: &[u8]) -> u16 {
    CRC16.checksum(data)
}

/// The SMP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// 0 read, 1 read response, 2 write, 3 write response.
    pub op: u8,
    /// SMP version (0: v1, 1: v2), bits 3-4 of the first byte.
    pub version: u8,
    /// Flags (unused, 0).
    pub flags: u8,
    /// Length of the CBOR body.
    pub len: u16,
    /// Management group.
    pub group: u16,
    /// Sequence number, echoed by the answer.
    pub seq: u8,
    /// Command within the group.
    pub id: u8,
}

impl Header {
    /// The header size.
    pub const SIZE: usize = 8;

    /// Splits a packet into its header and body; `None` when it is shorter than a header or
    /// its length field disagrees with the body.
    pub fn split(packet: &[u8]) -> Option<(Self, &[u8])> {
        let (h, body) = packet.split_at_checked(Self::SIZE)?;
        let header = Self {
            op: h[0] & 0x07,
            version: (h[0] >> 3) & 0x03,
            flags: h[1],
            len: u16::from_be_bytes([h[2], h[3]]),
            group: u16::from_be_bytes([h[4], h[5]]),
            seq: h[6],
            id: h[7],
        };
        (usize::from(header.len) == body.len()).then_some((header, body))
    }

    /// The header's 8 bytes.
    pub fn to_bytes(self) -> [u8; 8] {
        let [l0, l1] = self.len.to_be_bytes();
        let [g0, g1] = self.group.to_be_bytes();
        [
            ((self.version & 0x03) << 3) | (self.op & 0x07),
            self.flags,
            l0,
            l1,
            g0,
            g1,
            self.seq,
            self.id,
        ]
    }

    /// The packet answering this request: op + 1, same group, command, sequence and version.
    pub fn answer(self, body: &[u8]) -> Vec<u8> {
        let header = Self {
            op: self.op | 1,
            flags: 0,
            len: u16::try_from(body.len()).expect("answer body over 64 KiB"),
            ..self
        };
        let mut packet = header.to_bytes().to_vec();
        packet.extend_from_slice(body);
        packet
    }
}

/// Encodes one SMP packet into console frames.
pub fn encode(packet: &[u8]) -> Vec<u8> {
    let len = u16::try_from(packet.len() + 2).expect("packet over 64 KiB");
    let mut raw = Vec::with_capacity(packet.len() + 4);
    raw.extend_from_slice(&len.to_be_bytes());
    raw.extend_from_slice(packet);
    raw.extend_from_slice(&crc16(packet).to_be_bytes());
    let mut out = Vec::with_capacity(raw.len() * 4 / 3 + 16);
    for (i, chunk) in raw.chunks(RAW_PER_FRAME).enumerate() {
        out.extend_from_slice(if i == 0 { &START } else { &CONTINUATION });
        out.extend_from_slice(STANDARD.encode(chunk).as_bytes());
        out.push(b'\n');
    }
    out
}

/// Why a packet was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame longer than [`MAX_FRAME`].
    #[error("frame longer than {MAX_FRAME} bytes")]
    FrameTooLong,
    /// A frame's base64 does not decode.
    #[error("bad base64 in a frame")]
    Base64,
    /// The length field is below 2, or more bytes arrived than it announced.
    #[error("length field {0} disagrees with the data")]
    Length(usize),
    /// The SMP packet is larger than the device's buffer.
    #[error("packet of {size} bytes exceeds the {limit}-byte buffer")]
    TooLarge {
        /// The SMP packet's size.
        size: usize,
        /// The buffer size.
        limit: usize,
    },
    /// The CRC does not match.
    #[error("CRC mismatch")]
    Crc,
}

/// Reassembles SMP packets from console bytes.
#[derive(Debug)]
pub struct Deframer {
    limit: usize,
    line: Vec<u8>,
    line_too_long: bool,
    /// The decoded bytes of the packet being received (length field included).
    packet: Option<Vec<u8>>,
}

impl Deframer {
    /// A deframer that refuses SMP packets larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            line: Vec::with_capacity(MAX_FRAME),
            line_too_long: false,
            packet: None,
        }
    }

    /// Forgets any partial frame and packet (the device rebooted).
    pub fn reset(&mut self) {
        self.line.clear();
        self.line_too_long = false;
        self.packet = None;
    }

    /// Takes one byte; at the end of a frame that completes (or spoils) a packet, returns the
    /// SMP packet (or why it was dropped).
    pub fn push(&mut self, byte: u8) -> Option<Result<Vec<u8>, FrameError>> {
        if byte != b'\n' {
            if self.line.len() < MAX_FRAME {
                self.line.push(byte);
            } else {
                self.line_too_long = true;
            }
            return None;
        }
        let too_long = std::mem::take(&mut self.line_too_long) || self.line.len() + 1 > MAX_FRAME;
        let line = std::mem::take(&mut self.line);
        let (first, text) = match line.split_at_checked(2) {
            Some((m, text)) if m == START => (true, text),
            Some((m, text)) if m == CONTINUATION && self.packet.is_some() => (false, text),
            _ => return None, // console text
        };
        if too_long {
            self.packet = None;
            return Some(Err(FrameError::FrameTooLong));
        }
        let Ok(decoded) = STANDARD.decode(text) else {
            self.packet = None;
            return Some(Err(FrameError::Base64));
        };
        let packet = if first {
            self.packet.insert(decoded)
        } else {
            let p = self.packet.as_mut()?;
            p.extend_from_slice(&decoded);
            p
        };
        if packet.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([packet[0], packet[1]]));
        if len < 2 {
            self.packet = None;
            return Some(Err(FrameError::Length(len)));
        }
        if len - 2 > self.limit {
            self.packet = None;
            return Some(Err(FrameError::TooLarge {
                size: len - 2,
                limit: self.limit,
            }));
        }
        if packet.len() < 2 + len {
            return None;
        }
        let packet = self.packet.take()?;
        if packet.len() > 2 + len {
            return Some(Err(FrameError::Length(len)));
        }
        let (body, crc) = packet[2..].split_at(len - 2);
        if crc16(body).to_be_bytes() != crc {
            return Some(Err(FrameError::Crc));
        }
        Some(Ok(body.to_vec()))
    }
}

/// Reassembles raw SMP packets (header + CBOR body, see the module docs) from a byte stream
/// that may split them anywhere, by the length field of each header.
///
/// A packet larger than the device's buffer is reported as [`FrameError::TooLarge`] as soon as
/// its header is complete, and its body is skipped by the announced length, so the packets
/// after it still line up.
#[derive(Debug)]
pub struct RawAssembler {
    limit: usize,
    packet: Vec<u8>,
    /// Body bytes of an oversized packet still to skip.
    skip: usize,
}

impl RawAssembler {
    /// An assembler that refuses SMP packets (header + body) larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            packet: Vec::with_capacity(limit.min(4096)),
            skip: 0,
        }
    }

    /// Forgets any partial packet (the session ended or the device rebooted).
    pub fn reset(&mut self) {
        self.packet.clear();
        self.skip = 0;
    }

    /// Takes one byte; returns a complete SMP packet, or why one was dropped.
    pub fn push(&mut self, byte: u8) -> Option<Result<Vec<u8>, FrameError>> {
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        self.packet.push(byte);
        if self.packet.len() < Header::SIZE {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([self.packet[2], self.packet[3]]));
        let size = Header::SIZE + len;
        if self.packet.len() == Header::SIZE && size > self.limit {
            self.packet.clear();
            self.skip = len;
            return Some(Err(FrameError::TooLarge {
                size,
                limit: self.limit,
            }));
        }
        (self.packet.len() == size).then(|| Ok(std::mem::take(&mut self.packet)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_packets_split_anywhere_and_oversized_ones_skipped() {
        let packet = |len: u16, fill: u8| {
            let mut p = Header {
                op: 2,
                version: 1,
                flags: 0,
                len,
                group: 1,
                seq: fill,
                id: 1,
            }
            .to_bytes()
            .to_vec();
            p.extend(std::iter::repeat_n(fill, usize::from(len)));
            p
        };
        let (a, big, b, empty) = (packet(100, 1), packet(300, 2), packet(7, 3), packet(0, 4));
        let stream: Vec<u8> = [&a[..], &big, &b, &empty].concat();
        let mut asm = RawAssembler::new(200);
        let got: Vec<_> = stream.iter().filter_map(|&x| asm.push(x)).collect();
        assert_eq!(
            got,
            vec![
                Ok(a.clone()),
                Err(FrameError::TooLarge {
                    size: 308,
                    limit: 200
                }),
                Ok(b),
                Ok(empty)
            ]
        );
        // A partial packet is forgotten at a reset.
        asm.push(9);
        asm.reset();
        let got: Vec<_> = a.iter().filter_map(|&x| asm.push(x)).collect();
        assert_eq!(got, vec![Ok(a)]);
    }

    fn feed(d: &mut Deframer, bytes: &[u8]) -> Vec<Result<Vec<u8>, FrameError>> {
        bytes.iter().filter_map(|b| d.push(*b)).collect()
    }

    #[test]
    fn crc_is_xmodem() {
        assert_eq!(crc16(b"123456789"), 0x31c3);
    }

    #[test]
    fn round_trip_small_and_multi_frame() {
        for size in [8, 91, 92, 93, 200, 1000] {
            let packet: Vec<u8> = (0..size).map(|i| i as u8).collect();
            let wire = encode(&packet);
            for frame in wire.split_inclusive(|b| *b == b'\n') {
                assert!(frame.len() <= MAX_FRAME, "{size}: {}", frame.len());
            }
            let mut d = Deframer::new(2048);
            assert_eq!(feed(&mut d, &wire), vec![Ok(packet)], "{size}");
        }
    }

    #[test]
    fn noise_bad_crc_and_oversize() {
        let packet = [1u8; 50];
        let mut d = Deframer::new(40);
        let mut wire = b"boot banner\n".to_vec();
        wire.extend(encode(&packet));
        assert_eq!(
            feed(&mut d, &wire),
            vec![Err(FrameError::TooLarge {
                size: 50,
                limit: 40
            })]
        );
        let mut d = Deframer::new(1024);
        let mut wire = encode(&packet);
        wire[10] = if wire[10] == b'A' { b'B' } else { b'A' };
        assert_eq!(feed(&mut d, &wire), vec![Err(FrameError::Crc)]);
        // A new start frame abandons a partial packet.
        let long = encode(&[2u8; 300]);
        let first_frame_end = long.iter().position(|b| *b == b'\n').unwrap() + 1;
        let mut wire = long[..first_frame_end].to_vec();
        wire.extend(encode(&packet));
        assert_eq!(feed(&mut d, &wire), vec![Ok(packet.to_vec())]);
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            op: 2,
            version: 1,
            flags: 0,
            len: 3,
            group: 1,
            seq: 9,
            id: 1,
        };
        let mut p = h.to_bytes().to_vec();
        p.extend_from_slice(&[0xa0, 0, 0]);
        assert_eq!(Header::split(&p), Some((h, &[0xa0, 0, 0][..])));
        assert_eq!(Header::split(&p[..10]), None);
        let a = h.answer(&[0xa0]);
        assert_eq!(&a[..8], &[0x0b, 0, 0, 1, 0, 1, 9, 1]);
    }
}
