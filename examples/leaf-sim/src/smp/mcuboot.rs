//! MCUboot image format, as the simulated bootloader sees it: the 32-byte header (magic
//! `0x96f3b83d`, sizes, version), the payload and the TLV areas (an optional protected area,
//! magic `0x6908`, then the unprotected one, magic `0x6907`), and the SHA-256 TLV over header,
//! payload and protected TLVs, which is the image's identity ("hash" in SMP image state).
//!
//! [`parse`] checks what the simulated bootloader checks (magic, bounds, a strict TLV walk,
//! the SHA-256); it checks no signature. [`build`] makes a small valid unsigned image, for the
//! simulator's initial slot-0 image and for tests. No I/O here.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// `ih_magic`.
pub const IMAGE_MAGIC: u32 = 0x96f3_b83d;
/// The size of `struct image_header`.
pub const HEADER_SIZE: usize = 32;
/// Magic of the unprotected TLV area.
pub const TLV_INFO_MAGIC: u16 = 0x6907;
/// Magic of the protected TLV area.
pub const TLV_PROT_INFO_MAGIC: u16 = 0x6908;
/// TLV type of the SHA-256 of header + payload + protected TLVs.
pub const TLV_SHA256: u16 = 0x10;

/// `struct image_version`: major.minor.revision and a build number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ImageVersion {
    /// `iv_major`.
    pub major: u8,
    /// `iv_minor`.
    pub minor: u8,
    /// `iv_revision`.
    pub revision: u16,
    /// `iv_build_num`.
    pub build: u32,
}

impl fmt::Display for ImageVersion {
    /// As Zephyr's image management prints it: `major.minor.revision`, then `.build` when the
    /// build number is not 0.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.revision)?;
        if self.build != 0 {
            write!(f, ".{}", self.build)?;
        }
        Ok(())
    }
}

/// A version string that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad image version `{0}`: expected MAJOR.MINOR.REVISION with an optional +BUILD or .BUILD")]
pub struct VersionParseError(pub String);

impl FromStr for ImageVersion {
    type Err = VersionParseError;

    /// Parses `1.2.3`, `1.2.3+4` (imgtool's form) or `1.2.3.4` (Zephyr's form); `1.2` and `1`
    /// leave the rest 0.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VersionParseError(s.to_owned());
        let (main, build) = match s.split_once('+') {
            Some((m, b)) => (m, Some(b)),
            None => (s, None),
        };
        let mut parts = main.split('.');
        let mut next = || parts.next().map(str::trim);
        let major = next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let minor = next().map_or(Ok(0), str::parse).map_err(|_| bad())?;
        let revision = next().map_or(Ok(0), str::parse).map_err(|_| bad())?;
        let dotted_build = next();
        if next().is_some() || (dotted_build.is_some() && build.is_some()) {
            return Err(bad());
        }
        let build = build
            .or(dotted_build)
            .map_or(Ok(0), str::parse)
            .map_err(|_| bad())?;
        Ok(Self {
            major,
            minor,
            revision,
            build,
        })
    }
}

/// What the bootloader knows of a valid image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// `ih_ver`.
    pub version: ImageVersion,
    /// The SHA-256 TLV (equal to the hash the bootloader computed).
    pub hash: [u8; 32],
    /// `ih_hdr_size`.
    pub header_size: usize,
    /// `ih_img_size`.
    pub payload_size: usize,
    /// Header + payload + both TLV areas (bytes past it, e.g. padding, are not part of it).
    pub total_size: usize,
}

/// Why an image is not valid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// Shorter than a header.
    #[error("image too short for a header ({0} bytes)")]
    TooShort(usize),
    /// `ih_magic` is wrong.
    #[error("bad image magic {0:#010x}")]
    BadMagic(u32),
    /// A size field points outside the image.
    #[error("image bounds: {0}")]
    Bounds(&'static str),
    /// A TLV area is malformed.
    #[error("TLV area: {0}")]
    Tlv(&'static str),
    /// No SHA-256 TLV.
    #[error("no SHA-256 TLV")]
    NoHash,
    /// The SHA-256 TLV does not match the image.
    #[error("SHA-256 TLV does not match the image")]
    HashMismatch,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// One TLV: its type and value.
type Tlv<'a> = (u16, &'a [u8]);

/// Walks one TLV area at `start` with magic `magic`; returns its end and its TLVs.
fn tlv_area(image: &[u8], start: usize, magic: u16) -> Result<(usize, Vec<Tlv<'_>>), ImageError> {
    let found = u16_at(image, start).ok_or(ImageError::Tlv("area header past the end"))?;
    if found != magic {
        return Err(ImageError::Tlv("bad area magic"));
    }
    let total = usize::from(u16_at(image, start + 2).ok_or(ImageError::Tlv("truncated header"))?);
    let end = start + total;
    if total < 4 || end > image.len() {
        return Err(ImageError::Tlv("area length out of bounds"));
    }
    let mut tlvs = Vec::new();
    let mut at = start + 4;
    while at < end {
        let (Some(kind), Some(len)) = (u16_at(image, at), u16_at(image, at + 2)) else {
            return Err(ImageError::Tlv("truncated TLV header"));
        };
        let value_end = at + 4 + usize::from(len);
        if at + 4 > end || value_end > end {
            return Err(ImageError::Tlv("TLV runs past its area"));
        }
        tlvs.push((kind, &image[at + 4..value_end]));
        at = value_end;
    }
    Ok((end, tlvs))
}

/// Checks `image` as the simulated bootloader does and returns what it knows of it.
pub fn parse(image: &[u8]) -> Result<ImageInfo, ImageError> {
    if image.len() < HEADER_SIZE {
        return Err(ImageError::TooShort(image.len()));
    }
    let field32 = |at| u32_at(image, at).unwrap_or_default();
    let field16 = |at| u16_at(image, at).unwrap_or_default();
    let magic = field32(0);
    if magic != IMAGE_MAGIC {
        return Err(ImageError::BadMagic(magic));
    }
    let header_size = usize::from(field16(8));
    let protected_size = usize::from(field16(10));
    let payload_size = field32(12) as usize;
    let version = ImageVersion {
        major: image[20],
        minor: image[21],
        revision: field16(22),
        build: field32(24),
    };
    if header_size < HEADER_SIZE {
        return Err(ImageError::Bounds("header size below 32"));
    }
    let payload_end = header_size
        .checked_add(payload_size)
        .filter(|end| *end <= image.len())
        .ok_or(ImageError::Bounds("payload runs past the end"))?;
    let mut hashed_end = payload_end;
    let mut tlvs = Vec::new();
    if protected_size > 0 {
        let (end, protected) = tlv_area(image, payload_end, TLV_PROT_INFO_MAGIC)?;
        if end - payload_end != protected_size {
            return Err(ImageError::Tlv(
                "protected area size differs from the header",
            ));
        }
        hashed_end = end;
        tlvs.extend(protected);
    }
    let (total_size, unprotected) = tlv_area(image, hashed_end, TLV_INFO_MAGIC)?;
    tlvs.extend(unprotected);
    let stored = tlvs
        .iter()
        .find(|(kind, _)| *kind == TLV_SHA256)
        .ok_or(ImageError::NoHash)?
        .1;
    let hash: [u8; 32] = stored
        .try_into()
        .map_err(|_| ImageError::Tlv("SHA-256 TLV is not 32 bytes"))?;
    if Sha256::digest(&image[..hashed_end]).as_slice() != hash {
        return Err(ImageError::HashMismatch);
    }
    Ok(ImageInfo {
        version,
        hash,
        header_size,
        payload_size,
        total_size,
    })
}

/// Builds a valid unsigned image: a 32-byte header with `version`, `payload`, and an
/// unprotected TLV area holding only the SHA-256.
pub fn build(version: ImageVersion, payload: &[u8]) -> Vec<u8> {
    let payload_size = u32::try_from(payload.len()).expect("payload larger than 4 GiB");
    let mut image = Vec::with_capacity(HEADER_SIZE + payload.len() + 40);
    image.extend_from_slice(&IMAGE_MAGIC.to_le_bytes());
    image.extend_from_slice(&0u32.to_le_bytes()); // ih_load_addr
    image.extend_from_slice(&(HEADER_SIZE as u16).to_le_bytes());
    image.extend_from_slice(&0u16.to_le_bytes()); // ih_protect_tlv_size
    image.extend_from_slice(&payload_size.to_le_bytes());
    image.extend_from_slice(&0u32.to_le_bytes()); // ih_flags
    image.push(version.major);
    image.push(version.minor);
    image.extend_from_slice(&version.revision.to_le_bytes());
    image.extend_from_slice(&version.build.to_le_bytes());
    image.extend_from_slice(&0u32.to_le_bytes()); // _pad1
    image.extend_from_slice(payload);
    let hash = Sha256::digest(&image);
    image.extend_from_slice(&TLV_INFO_MAGIC.to_le_bytes());
    image.extend_from_slice(&(4u16 + 4 + 32).to_le_bytes());
    image.extend_from_slice(&TLV_SHA256.to_le_bytes());
    image.extend_from_slice(&32u16.to_le_bytes());
    image.extend_from_slice(&hash);
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> ImageVersion {
        s.parse().unwrap()
    }

    #[test]
    fn versions_parse_and_print() {
        assert_eq!(v("1.2.3").to_string(), "1.2.3");
        assert_eq!(v("1.2.3+4").to_string(), "1.2.3.4");
        assert_eq!(v("1.2.3.4"), v("1.2.3+4"));
        assert_eq!(v("2").to_string(), "2.0.0");
        for bad in ["", "a.b", "1.2.3.4.5", "1.2.3.4+5", "256.0.0", "1.2.3+x"] {
            assert!(bad.parse::<ImageVersion>().is_err(), "{bad}");
        }
    }

    #[test]
    fn built_images_parse() {
        let image = build(v("1.4.2+7"), &[0xab; 1000]);
        let info = parse(&image).unwrap();
        assert_eq!(info.version, v("1.4.2+7"));
        assert_eq!((info.header_size, info.payload_size), (32, 1000));
        assert_eq!(info.total_size, image.len());
        assert_eq!(
            info.hash.as_slice(),
            Sha256::digest(&image[..1032]).as_slice()
        );
        // Padding after the TLVs is allowed.
        let mut padded = image.clone();
        padded.extend_from_slice(&[0xff; 100]);
        assert_eq!(parse(&padded).unwrap(), info);
    }

    #[test]
    fn broken_images_are_refused() {
        let image = build(v("1.0.0"), &[1; 100]);
        let mut bad = image.clone();
        bad[0] ^= 1;
        assert!(matches!(parse(&bad), Err(ImageError::BadMagic(_))));
        let mut bad = image.clone();
        bad[40] ^= 1;
        assert_eq!(parse(&bad), Err(ImageError::HashMismatch));
        assert!(matches!(
            parse(&image[..image.len() - 1]),
            Err(ImageError::Tlv(_))
        ));
        assert!(matches!(parse(&image[..100]), Err(ImageError::Bounds(_))));
        assert_eq!(parse(&image[..10]), Err(ImageError::TooShort(10)));
    }
}
