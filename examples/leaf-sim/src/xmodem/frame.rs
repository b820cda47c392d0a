//! Pure XMODEM/YMODEM framing helpers: control bytes, CRC-16 and checksum, block checks,
//! the YMODEM block-0 header and the `FWVER:` marker of a booted image.
//!
//! This module does no I/O and keeps no state; the session logic that uses it lives in
//! `device.rs`. It is not a sender: it only checks what a receiver gets.

use crc::{CRC_16_XMODEM, Crc};

/// Start of a 128-byte block.
pub const SOH: u8 = 0x01;
/// Start of a 1024-byte block (XMODEM-1K / YMODEM).
pub const STX: u8 = 0x02;
/// End of transmission.
pub const EOT: u8 = 0x04;
/// Positive acknowledgement.
pub const ACK: u8 = 0x06;
/// Negative acknowledgement; also the start character of checksum mode.
pub const NAK: u8 = 0x15;
/// Cancel (two in a row abort a transfer).
pub const CAN: u8 = 0x18;
/// Start character of CRC mode.
pub const CRC_START: u8 = b'C';

const CRC16: Crc<u16> = Crc::<u16>::new(&CRC_16_XMODEM);

/// CRC-16/XMODEM of `data` (polynomial 0x1021, initial value 0).
pub fn crc16(data: &[u8]) -> u16 {
    CRC16.checksum(data)
}

/// The classic 8-bit arithmetic checksum of `data`.
pub fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// Why a block body was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockError {
    /// The block number and its complement do not match.
    BadComplement,
    /// The CRC or checksum does not match the payload.
    BadCheck,
}

/// Checks a block body (everything after SOH/STX: number, complement, payload, check bytes)
/// and returns the block number. `crc` selects CRC-16 (2 bytes, big endian) or the 8-bit checksum.
pub fn check_block(body: &[u8], payload_len: usize, crc: bool) -> Result<u8, BlockError> {
    let num = body[0];
    if body[1] != !num {
        return Err(BlockError::BadComplement);
    }
    let payload = &body[2..2 + payload_len];
    let tail = &body[2 + payload_len..];
    let ok = if crc {
        tail.len() == 2 && u16::from_be_bytes([tail[0], tail[1]]) == crc16(payload)
    } else {
        tail.len() == 1 && tail[0] == checksum(payload)
    };
    if ok {
        Ok(num)
    } else {
        Err(BlockError::BadCheck)
    }
}

/// A parsed YMODEM block 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct YmodemHeader {
    /// File name; empty means "end of batch".
    pub name: String,
    /// Declared size in bytes, when present and decimal.
    pub size: Option<u64>,
}

/// Parses the payload of YMODEM block 0: `name\0size[ mtime ...]\0` padded with NULs.
pub fn parse_ymodem_header(payload: &[u8]) -> YmodemHeader {
    let name_end = payload
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(payload.len());
    let name = String::from_utf8_lossy(&payload[..name_end]).into_owned();
    let rest = payload.get(name_end + 1..).unwrap_or(&[]);
    let info_end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    let info = String::from_utf8_lossy(&rest[..info_end]);
    let size = info
        .split(' ')
        .next()
        .filter(|s| !s.is_empty())
        .and_then(|s| s.parse().ok());
    YmodemHeader { name, size }
}

/// The marker that names an image's firmware version.
pub const VERSION_MARKER: &[u8] = b"FWVER:";
/// The longest version string taken after the marker.
pub const MAX_VERSION_LEN: usize = 32;

/// Finds `FWVER:<version>` in an image. The version ends at NUL, CR, LF, the end of the data
/// or after [`MAX_VERSION_LEN`] bytes. Returns `None` when there is no marker or the version is empty.
pub fn find_version(image: &[u8]) -> Option<String> {
    let at = image
        .windows(VERSION_MARKER.len())
        .position(|w| w == VERSION_MARKER)?;
    let rest = &image[at + VERSION_MARKER.len()..];
    let len = rest
        .iter()
        .take(MAX_VERSION_LEN)
        .position(|b| matches!(b, 0 | b'\r' | b'\n'))
        .unwrap_or(rest.len().min(MAX_VERSION_LEN));
    let version = String::from_utf8_lossy(&rest[..len]).into_owned();
    (!version.is_empty()).then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_xmodem_check_value() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn checksum_wraps() {
        assert_eq!(checksum(&[0xff, 0x02]), 0x01);
    }

    fn body(num: u8, payload: &[u8], crc: bool) -> Vec<u8> {
        let mut b = vec![num, !num];
        b.extend_from_slice(payload);
        if crc {
            b.extend_from_slice(&crc16(payload).to_be_bytes());
        } else {
            b.push(checksum(payload));
        }
        b
    }

    #[test]
    fn check_block_accepts_good_and_rejects_bad() {
        let payload = [7u8; 128];
        assert_eq!(check_block(&body(3, &payload, true), 128, true), Ok(3));
        assert_eq!(check_block(&body(3, &payload, false), 128, false), Ok(3));
        let mut bad = body(3, &payload, true);
        bad[10] ^= 1;
        assert_eq!(check_block(&bad, 128, true), Err(BlockError::BadCheck));
        let mut bad = body(3, &payload, true);
        bad[1] = 0;
        assert_eq!(check_block(&bad, 128, true), Err(BlockError::BadComplement));
    }

    #[test]
    fn ymodem_header_parses_name_and_size() {
        let mut p = b"fw.bin\x001234 14567123 100644\x00".to_vec();
        p.resize(128, 0);
        let h = parse_ymodem_header(&p);
        assert_eq!(h.name, "fw.bin");
        assert_eq!(h.size, Some(1234));
        let h = parse_ymodem_header(&[0u8; 128]);
        assert_eq!(h.name, "");
        assert_eq!(h.size, None);
        let h = parse_ymodem_header(b"a\0\0");
        assert_eq!((h.name.as_str(), h.size), ("a", None));
    }

    #[test]
    fn version_marker_is_found_and_bounded() {
        assert_eq!(find_version(b"xxFWVER:1.2.3\0yy"), Some("1.2.3".into()));
        assert_eq!(find_version(b"FWVER:2.0\r\n"), Some("2.0".into()));
        assert_eq!(find_version(b"..FWVER:9"), Some("9".into()));
        assert_eq!(find_version(b"no marker"), None);
        assert_eq!(find_version(b"FWVER:\0"), None);
        let long = [b"FWVER:".as_slice(), &[b'a'; 40]].concat();
        assert_eq!(find_version(&long).map(|v| v.len()), Some(MAX_VERSION_LEN));
    }
}
