//! The SMP serial (console/UART) framing, both ways.
//!
//! A packet on the wire is `len (2, BE) + SMP packet + CRC16 (2, BE)`, where
//! `len` counts the SMP packet plus the CRC and the CRC is CRC-16/XMODEM
//! (CCITT polynomial 0x1021, initial value 0) over the SMP packet. That buffer
//! is base64 encoded and cut into frames of at most 127 bytes including the
//! two-byte marker (`0x06 0x09` for the first frame, `0x04 0x14` for
//! continuations) and the terminating `\n`, so each frame carries at most 124
//! base64 characters (93 raw bytes, a whole number of base64 quanta).
//!
//! The [`Deframer`] reads such frames out of a byte stream that also carries
//! console output: anything before a marker on a line is ignored, lines without
//! a marker are ignored, and a packet whose base64, length or CRC is wrong is
//! dropped (and counted), never half-delivered.
//!
//! What it is not: the BLE transport, which carries the SMP packet raw
//! (`transport`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Marker of the first frame of a packet.
pub const START: [u8; 2] = [0x06, 0x09];
/// Marker of a continuation frame.
pub const CONTINUATION: [u8; 2] = [0x04, 0x14];
/// Largest frame, marker and newline included.
pub const MAX_FRAME: usize = 127;
/// Base64 characters per frame: 127 - 2 (marker) - 1 (newline).
const MAX_B64_PER_FRAME: usize = MAX_FRAME - 3;
/// Lines longer than this without a newline are garbage and are dropped.
const MAX_LINE: usize = 4096;

const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);

/// CRC-16/XMODEM of `data`.
pub fn crc16(data: &[u8]) -> u16 {
    CRC16.checksum(data)
}

/// Bytes the serial framing adds to a packet before base64: length and CRC.
pub const RAW_OVERHEAD: usize = 4;

/// Encode one SMP packet (header + CBOR) as serial frames, ready to write.
pub fn encode(packet: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(packet.len() + RAW_OVERHEAD);
    raw.extend_from_slice(&((packet.len() + 2) as u16).to_be_bytes());
    raw.extend_from_slice(packet);
    raw.extend_from_slice(&crc16(packet).to_be_bytes());
    let text = STANDARD.encode(&raw);
    let mut out = Vec::with_capacity(text.len() + text.len() / MAX_B64_PER_FRAME * 3 + 3);
    for (i, piece) in text.as_bytes().chunks(MAX_B64_PER_FRAME).enumerate() {
        out.extend_from_slice(if i == 0 { &START } else { &CONTINUATION });
        out.extend_from_slice(piece);
        out.push(b'\n');
    }
    out
}

/// Number of bytes [`encode`] writes for a packet of `len` bytes.
pub fn encoded_len(len: usize) -> usize {
    let b64 = (len + RAW_OVERHEAD).div_ceil(3) * 4;
    b64 + b64.div_ceil(MAX_B64_PER_FRAME) * 3
}

/// Why a partly received packet was dropped (counted, and logged by the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    /// The base64 text of a frame did not decode.
    BadBase64,
    /// The CRC did not match.
    BadCrc,
    /// More bytes arrived than the length field announced, or it was too small.
    BadLength,
    /// A new packet started before the previous one was complete.
    Interrupted,
}

/// Reassembles SMP packets from a serial byte stream.
#[derive(Debug, Default)]
pub struct Deframer {
    /// The current line, from its marker on (None: not inside a frame line).
    line: Vec<u8>,
    in_line: bool,
    /// Raw bytes decoded so far of the packet in progress.
    raw: Vec<u8>,
    /// Base64 characters of the packet in progress not yet decoded (< 4).
    pending_b64: Vec<u8>,
    in_packet: bool,
    /// Bytes of console output and stray frames skipped.
    pub skipped: usize,
    /// Packets dropped, with the reason.
    pub dropped: Vec<Dropped>,
}

impl Deframer {
    pub fn new() -> Deframer {
        Deframer::default()
    }

    /// Feed received bytes; returns the SMP packets (header + CBOR) completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut done = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                if self.in_line {
                    self.frame(&line, &mut done);
                } else {
                    self.skipped += line.len();
                }
                self.in_line = false;
                continue;
            }
            // A marker starts a frame wherever it appears on a line: console
            // output without a newline may precede it.
            let prev = if self.in_line {
                self.line.last().copied()
            } else {
                None
            };
            self.line.push(b);
            if !self.in_line {
                // Outside a frame line: look for a marker in the last two bytes.
                let n = self.line.len();
                if n >= 2 && (self.line[n - 2..] == START || self.line[n - 2..] == CONTINUATION) {
                    self.skipped += n - 2;
                    self.line.drain(..n - 2);
                    self.in_line = true;
                } else if n > 1 {
                    self.skipped += n - 1;
                    self.line.drain(..n - 1);
                }
            } else if matches!((prev, b), (Some(0x06), 0x09) | (Some(0x04), 0x14)) {
                // A new marker inside a frame line: what came before was garbage.
                self.skipped += self.line.len() - 2;
                let keep = self.line.split_off(self.line.len() - 2);
                self.line = keep;
            } else if self.line.len() > MAX_LINE {
                self.skipped += self.line.len();
                self.line.clear();
                self.in_line = false;
            }
        }
        done
    }

    fn frame(&mut self, line: &[u8], done: &mut Vec<Vec<u8>>) {
        let (marker, rest) = line.split_at(2.min(line.len()));
        let text: Vec<u8> = rest
            .iter()
            .copied()
            .filter(|c| !matches!(c, b'\r' | b' '))
            .collect();
        if marker == START {
            if self.in_packet {
                self.dropped.push(Dropped::Interrupted);
            }
            self.raw.clear();
            self.pending_b64.clear();
            self.in_packet = true;
        } else if marker != CONTINUATION || !self.in_packet {
            self.skipped += line.len();
            return;
        }
        self.pending_b64.extend_from_slice(&text);
        let whole = self.pending_b64.len() / 4 * 4;
        if whole > 0 {
            let quanta: Vec<u8> = self.pending_b64.drain(..whole).collect();
            match STANDARD.decode(&quanta) {
                Ok(bytes) => self.raw.extend_from_slice(&bytes),
                Err(_) => return self.abandon(Dropped::BadBase64),
            }
        }
        if self.raw.len() < 2 {
            return;
        }
        let want = usize::from(u16::from_be_bytes([self.raw[0], self.raw[1]]));
        if want < 2 + crate::smp::HEADER_LEN {
            return self.abandon(Dropped::BadLength);
        }
        let have = self.raw.len() - 2;
        if have < want {
            return;
        }
        if have > want || !self.pending_b64.is_empty() {
            return self.abandon(Dropped::BadLength);
        }
        let body = &self.raw[2..2 + want - 2];
        let crc = u16::from_be_bytes([self.raw[want], self.raw[want + 1]]);
        if crc16(body) != crc {
            return self.abandon(Dropped::BadCrc);
        }
        done.push(body.to_vec());
        self.raw.clear();
        self.in_packet = false;
    }

    fn abandon(&mut self, why: Dropped) {
        self.dropped.push(why);
        self.raw.clear();
        self.pending_b64.clear();
        self.in_packet = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(n: usize) -> Vec<u8> {
        let mut p = crate::smp::Packet::request(0, 1, 0, 9, vec![0; 0]).encode();
        p.extend((0..n).map(|i| (i * 7 + 3) as u8));
        let len = (p.len() - 8) as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p
    }

    #[test]
    fn crc_is_xmodem() {
        // The CRC-16/XMODEM check value.
        assert_eq!(crc16(b"123456789"), 0x31c3);
    }

    #[test]
    fn small_packet_is_one_frame() {
        let p = packet(1);
        let out = encode(&p);
        assert_eq!(&out[..2], &START);
        assert_eq!(*out.last().unwrap(), b'\n');
        assert_eq!(out.len(), encoded_len(p.len()));
        let raw = STANDARD.decode(&out[2..out.len() - 1]).unwrap();
        assert_eq!(u16::from_be_bytes([raw[0], raw[1]]) as usize, p.len() + 2);
        assert_eq!(&raw[2..2 + p.len()], &p[..]);
        let crc = u16::from_be_bytes([raw[raw.len() - 2], raw[raw.len() - 1]]);
        assert_eq!(crc, crc16(&p));
    }

    #[test]
    fn fragments_at_127_bytes() {
        let p = packet(500);
        let out = encode(&p);
        assert_eq!(out.len(), encoded_len(p.len()));
        let frames: Vec<&[u8]> = out.split_inclusive(|b| *b == b'\n').collect();
        assert!(frames.len() > 4);
        for (i, f) in frames.iter().enumerate() {
            assert!(f.len() <= MAX_FRAME, "frame {i} is {} bytes", f.len());
            let want = if i == 0 { START } else { CONTINUATION };
            assert_eq!(&f[..2], &want);
            assert_eq!(*f.last().unwrap(), b'\n');
            if i + 1 < frames.len() {
                assert_eq!(f.len(), MAX_FRAME, "full frames except the last");
            }
        }
        let mut d = Deframer::new();
        assert_eq!(d.push(&out), vec![p]);
    }

    #[test]
    fn decodes_byte_by_byte_with_console_noise() {
        let p1 = packet(300);
        let p2 = packet(5);
        let mut stream = b"*** Booting Zephyr OS ***\r\nuart:~$ ".to_vec();
        stream.extend(encode(&p1));
        stream.extend(b"[00:00:01.000] <inf> app: hello\n");
        stream.extend(b"no newline before the frame");
        stream.extend(encode(&p2));
        let mut d = Deframer::new();
        let mut got = Vec::new();
        for b in &stream {
            got.extend(d.push(std::slice::from_ref(b)));
        }
        assert_eq!(got, vec![p1, p2]);
        assert!(d.dropped.is_empty());
        assert!(d.skipped > 40);
    }

    #[test]
    fn drops_bad_crc_and_garbled_frames_then_recovers() {
        let p = packet(200);
        let good = encode(&p);
        // Flip a base64 character inside the first frame: CRC (or base64) fails.
        let mut bad = good.clone();
        bad[10] = if bad[10] == b'A' { b'B' } else { b'A' };
        let mut d = Deframer::new();
        assert!(d.push(&bad).is_empty());
        assert_eq!(d.dropped.len(), 1);
        // Truncated packet followed by a new start: interrupted, then good.
        let cut = good.iter().position(|b| *b == b'\n').unwrap() + 1;
        assert!(d.push(&good[..cut]).is_empty());
        assert_eq!(d.push(&good), vec![p.clone()]);
        assert_eq!(d.dropped.last(), Some(&Dropped::Interrupted));
        // A continuation frame with no packet in progress is ignored.
        let mut d = Deframer::new();
        assert!(d.push(&good[cut..]).is_empty());
        assert_eq!(d.push(&good), vec![p]);
        // Invalid base64.
        let mut d = Deframer::new();
        assert!(d.push(b"\x06\x09!!!!\n").is_empty());
        assert_eq!(d.dropped, vec![Dropped::BadBase64]);
    }

    #[test]
    fn accepts_frames_split_off_quantum_boundaries() {
        // A sender that cuts the base64 text at arbitrary points (not multiples
        // of 4) still decodes.
        let p = packet(100);
        let mut raw = ((p.len() + 2) as u16).to_be_bytes().to_vec();
        raw.extend(&p);
        raw.extend(crc16(&p).to_be_bytes());
        let text = STANDARD.encode(&raw);
        let (a, b) = text.split_at(50);
        let mut stream = START.to_vec();
        stream.extend(a.as_bytes());
        stream.extend(b"\r\n\x04\x14");
        stream.extend(b.as_bytes());
        stream.push(b'\n');
        let mut d = Deframer::new();
        assert_eq!(d.push(&stream), vec![p]);
    }
}
