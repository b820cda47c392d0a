//! `verify`: the MCUboot image checks made before any device is touched.
//!
//! What it is: the image header (magic 0x96f3b83d, sizes against the file),
//! the protected TLV area (magic 0x6908, its size equal to the header's
//! `ih_protect_tlv_size`) and the TLV area (magic 0x6907) walked with strict
//! lengths, the SHA-256 TLV (0x10) recomputed over header + payload +
//! protected TLVs, and, when a `public_key` is configured, the key hash TLV
//! (0x01, or the full key TLV 0x02) and the signature TLV (ECDSA P-256 0x22 or
//! Ed25519 0x24) checked against the SHA-256. The image is streamed through
//! [`Source::read`]; only the TLV areas (at most 64 KiB each) are held.
//! The same pass computes the SHA-256 of the whole file, which the upload
//! sends to identify its session.
//!
//! What it is not: a check of encrypted images (their hash covers the
//! plaintext) or of RSA / P-384 / "pure" signatures: those are refused.

use sha2::{Digest, Sha256};

use otagw_plugin_sdk::{Error, Source};

use crate::PublicKey;

pub const IMAGE_MAGIC: u32 = 0x96f3_b83d;
pub const TLV_INFO_MAGIC: u16 = 0x6907;
pub const TLV_PROT_INFO_MAGIC: u16 = 0x6908;
pub const HEADER_SIZE: usize = 32;

pub const TLV_KEYHASH: u16 = 0x01;
pub const TLV_PUBKEY: u16 = 0x02;
pub const TLV_SHA256: u16 = 0x10;
pub const TLV_SHA384: u16 = 0x11;
pub const TLV_SHA512: u16 = 0x12;
pub const TLV_RSA2048_PSS: u16 = 0x20;
pub const TLV_ECDSA_SIG: u16 = 0x22;
pub const TLV_RSA3072_PSS: u16 = 0x23;
pub const TLV_ED25519: u16 = 0x24;
pub const TLV_SIG_PURE: u16 = 0x25;

/// `ih_flags` bits of encrypted images.
const IMAGE_F_ENCRYPTED_AES128: u32 = 0x04;
const IMAGE_F_ENCRYPTED_AES256: u32 = 0x08;

/// Bytes read from the image at once while hashing.
const READ_CHUNK: u32 = 16 * 1024;

/// An MCUboot image version: `major.minor.revision+build`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
    pub revision: u16,
    pub build: u32,
}

impl Version {
    /// Parse the forms devices and imgtool write: `1.2.3`, `1.2.3.4` (Zephyr's
    /// image list) and `1.2.3+4` (imgtool). Missing parts are 0.
    pub fn parse(s: &str) -> Option<Version> {
        let s = s.trim();
        let (main, build) = match s.split_once('+') {
            Some((m, b)) => (m, Some(b)),
            None => (s, None),
        };
        let parts: Vec<&str> = main.split('.').collect();
        if parts.is_empty() || parts.len() > 4 || (parts.len() == 4 && build.is_some()) {
            return None;
        }
        let num =
            |i: usize| -> Option<u64> { parts.get(i).map_or(Some(0), |p| p.parse::<u64>().ok()) };
        let build = match build {
            Some(b) => b.parse().ok()?,
            None => u32::try_from(num(3)?).ok()?,
        };
        Some(Version {
            major: u8::try_from(num(0)?).ok()?,
            minor: u8::try_from(num(1)?).ok()?,
            revision: u16::try_from(num(2)?).ok()?,
            build,
        })
    }
}

impl std::fmt::Display for Version {
    /// The way Zephyr's image list writes it: `1.2.3`, or `1.2.3.4` with a build number.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.revision)?;
        if self.build != 0 {
            write!(f, ".{}", self.build)?;
        }
        Ok(())
    }
}

/// The parsed image header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub load_addr: u32,
    pub hdr_size: u16,
    pub protect_tlv_size: u16,
    pub img_size: u32,
    pub flags: u32,
    pub version: Version,
}

impl Header {
    /// Parse and check the 32 header bytes.
    pub fn parse(b: &[u8]) -> Result<Header, Error> {
        if b.len() < HEADER_SIZE {
            return Err(Error::Verify(format!(
                "the image is {} bytes, too small for an MCUboot header ({HEADER_SIZE} bytes)",
                b.len()
            )));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let magic = u32_at(0);
        if magic != IMAGE_MAGIC {
            return Err(Error::Verify(format!(
                "bad magic 0x{magic:08x} at offset 0, expected 0x{IMAGE_MAGIC:08x}: not an MCUboot image"
            )));
        }
        let h = Header {
            load_addr: u32_at(4),
            hdr_size: u16_at(8),
            protect_tlv_size: u16_at(10),
            img_size: u32_at(12),
            flags: u32_at(16),
            version: Version {
                major: b[20],
                minor: b[21],
                revision: u16_at(22),
                build: u32_at(24),
            },
        };
        if usize::from(h.hdr_size) < HEADER_SIZE {
            return Err(Error::Verify(format!(
                "header size {} is smaller than the {HEADER_SIZE}-byte MCUboot header",
                h.hdr_size
            )));
        }
        Ok(h)
    }

    /// Offset of the protected TLV area (end of the payload).
    pub fn payload_end(&self) -> u64 {
        u64::from(self.hdr_size) + u64::from(self.img_size)
    }

    /// End of the hashed region: header + payload + protected TLVs.
    pub fn hashed_end(&self) -> u64 {
        self.payload_end() + u64::from(self.protect_tlv_size)
    }
}

/// One TLV entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlv {
    pub kind: u16,
    /// Offset of the entry's header in the file.
    pub offset: u64,
    pub value: Vec<u8>,
}

/// Walk a TLV area (`area` starts with its 4-byte info header at file offset
/// `base`) with strict lengths: the info's total must equal `area.len()` and
/// the entries must fill it exactly.
pub fn walk_tlvs(area: &[u8], base: u64, magic: u16, what: &str) -> Result<Vec<Tlv>, Error> {
    if area.len() < 4 {
        return Err(Error::Verify(format!(
            "{what} at offset {base} is truncated: {} bytes, less than its 4-byte info header",
            area.len()
        )));
    }
    let found = u16::from_le_bytes([area[0], area[1]]);
    if found != magic {
        return Err(Error::Verify(format!(
            "bad {what} magic 0x{found:04x} at offset {base}, expected 0x{magic:04x}"
        )));
    }
    let total = usize::from(u16::from_le_bytes([area[2], area[3]]));
    if total != area.len() {
        return Err(Error::Verify(format!(
            "{what} at offset {base} declares {total} bytes but {} are available",
            area.len()
        )));
    }
    let mut out = Vec::new();
    let mut pos = 4;
    while pos < total {
        let at = base + pos as u64;
        if total - pos < 4 {
            return Err(Error::Verify(format!(
                "{what}: a TLV entry header at offset {at} runs past the end of the area ({} bytes left)",
                total - pos
            )));
        }
        let kind = u16::from_le_bytes([area[pos], area[pos + 1]]);
        let len = usize::from(u16::from_le_bytes([area[pos + 2], area[pos + 3]]));
        if len > total - pos - 4 {
            return Err(Error::Verify(format!(
                "{what}: TLV 0x{kind:02x} at offset {at} is {len} bytes long but only {} bytes of the area remain",
                total - pos - 4
            )));
        }
        out.push(Tlv {
            kind,
            offset: at,
            value: area[pos + 4..pos + 4 + len].to_vec(),
        });
        pos += 4 + len;
    }
    Ok(out)
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub header: Header,
    /// The file size: what will be uploaded.
    pub size: u64,
    /// The image hash (SHA-256 TLV, recomputed and equal): what the device's
    /// image list shows and what test/confirm name.
    pub hash: [u8; 32],
    /// SHA-256 of the whole file: the upload's session id (`sha`).
    pub file_sha256: [u8; 32],
    /// The signature algorithm checked, when a key was given.
    pub signature: Option<&'static str>,
    /// End of the TLV area; bytes after it (padding, trailer) are uploaded as they are.
    pub tlv_end: u64,
    /// One line for the job log.
    pub summary: String,
}

fn read_exact<S: Source + ?Sized>(
    src: &mut S,
    off: u64,
    len: usize,
    what: &str,
) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let want = (len - out.len()).min(READ_CHUNK as usize) as u32;
        let got = src.read(off + out.len() as u64, want);
        if got.is_empty() {
            return Err(Error::Verify(format!(
                "{what}: the image ended at offset {} while reading {len} bytes at offset {off}",
                off + out.len() as u64
            )));
        }
        out.extend_from_slice(&got);
    }
    out.truncate(len);
    Ok(out)
}

fn short_hex(b: &[u8]) -> String {
    b.iter()
        .take(8)
        .map(|x| format!("{x:02x}"))
        .collect::<String>()
        + "…"
}

/// Check an MCUboot image; `key` enables the key-hash and signature checks.
pub fn verify<S: Source + ?Sized>(src: &mut S, key: Option<&PublicKey>) -> Result<Verified, Error> {
    let size = src.size();
    let head = read_exact(src, 0, HEADER_SIZE.min(size as usize), "header")?;
    let header = Header::parse(&head)?;
    if header.flags & (IMAGE_F_ENCRYPTED_AES128 | IMAGE_F_ENCRYPTED_AES256) != 0 {
        return Err(Error::Verify(format!(
            "the image is encrypted (flags 0x{:08x}): its hash covers the plaintext and cannot be checked here",
            header.flags
        )));
    }
    if header.payload_end() > size {
        return Err(Error::Verify(format!(
            "header ({} bytes) + payload ({} bytes) = {} bytes, but the file has only {size}",
            header.hdr_size,
            header.img_size,
            header.payload_end()
        )));
    }
    // Protected TLVs.
    let mut protected = Vec::new();
    if header.protect_tlv_size > 0 {
        if header.hashed_end() > size {
            return Err(Error::Verify(format!(
                "the protected TLV area ({} bytes at offset {}) runs past the end of the file ({size} bytes)",
                header.protect_tlv_size,
                header.payload_end()
            )));
        }
        let area = read_exact(
            src,
            header.payload_end(),
            usize::from(header.protect_tlv_size),
            "protected TLV area",
        )?;
        protected = walk_tlvs(
            &area,
            header.payload_end(),
            TLV_PROT_INFO_MAGIC,
            "protected TLV area",
        )?;
    }
    // The TLV area.
    let tlv_at = header.hashed_end();
    if tlv_at + 4 > size {
        return Err(Error::Verify(format!(
            "no TLV area: the file ends at {size}, the TLV info header belongs at offset {tlv_at}"
        )));
    }
    let info = read_exact(src, tlv_at, 4, "TLV info")?;
    let magic = u16::from_le_bytes([info[0], info[1]]);
    if magic != TLV_INFO_MAGIC {
        return Err(Error::Verify(format!(
            "bad TLV area magic 0x{magic:04x} at offset {tlv_at}, expected 0x{TLV_INFO_MAGIC:04x}{}",
            if magic == TLV_PROT_INFO_MAGIC {
                " (a protected TLV area the header does not announce)"
            } else {
                ""
            }
        )));
    }
    let total = u64::from(u16::from_le_bytes([info[2], info[3]]));
    if tlv_at + total > size {
        return Err(Error::Verify(format!(
            "TLV area truncated: it declares {total} bytes at offset {tlv_at}, but the file ends after {} of them",
            size - tlv_at
        )));
    }
    let area = read_exact(src, tlv_at, total as usize, "TLV area")?;
    let tlvs = walk_tlvs(&area, tlv_at, TLV_INFO_MAGIC, "TLV area")?;
    let tlv_end = tlv_at + total;

    for t in &protected {
        if matches!(
            t.kind,
            TLV_SHA256 | TLV_KEYHASH | TLV_ECDSA_SIG | TLV_ED25519 | TLV_SIG_PURE
        ) {
            return Err(Error::Verify(format!(
                "TLV 0x{:02x} at offset {} must not be in the protected area",
                t.kind, t.offset
            )));
        }
    }
    let single = |kind: u16, name: &str| -> Result<Option<&Tlv>, Error> {
        let mut it = tlvs.iter().filter(|t| t.kind == kind);
        let first = it.next();
        if let Some(dup) = it.next() {
            return Err(Error::Verify(format!(
                "{name} TLV (0x{kind:02x}) appears twice (again at offset {})",
                dup.offset
            )));
        }
        Ok(first)
    };
    let hash_tlv = match single(TLV_SHA256, "SHA-256")? {
        Some(t) => t,
        None if tlvs
            .iter()
            .any(|t| matches!(t.kind, TLV_SHA384 | TLV_SHA512)) =>
        {
            return Err(Error::Verify(
                "the image is hashed with SHA-384/512; this plugin checks SHA-256 images only"
                    .into(),
            ));
        }
        None => {
            return Err(Error::Verify(format!(
                "no SHA-256 TLV (0x10) in the TLV area at offset {tlv_at}"
            )));
        }
    };
    let expected: [u8; 32] = hash_tlv.value.as_slice().try_into().map_err(|_| {
        Error::Verify(format!(
            "the SHA-256 TLV at offset {} is {} bytes, expected 32",
            hash_tlv.offset,
            hash_tlv.value.len()
        ))
    })?;

    // Stream the whole file once: the image hash over the hashed region and
    // the file hash over everything.
    let mut image_hasher = Sha256::new();
    let mut file_hasher = Sha256::new();
    let hashed_end = header.hashed_end();
    let mut off = 0u64;
    while off < size {
        let want = (size - off).min(u64::from(READ_CHUNK)) as u32;
        let chunk = src.read(off, want);
        if chunk.is_empty() {
            return Err(Error::Verify(format!(
                "the image ended at offset {off}, its size is {size}"
            )));
        }
        let chunk = &chunk[..chunk.len().min(want as usize)];
        if off < hashed_end {
            let n = ((hashed_end - off) as usize).min(chunk.len());
            image_hasher.update(&chunk[..n]);
        }
        file_hasher.update(chunk);
        off += chunk.len() as u64;
    }
    let computed: [u8; 32] = image_hasher.finalize().into();
    if computed != expected {
        return Err(Error::Verify(format!(
            "hash mismatch: the SHA-256 TLV says {}, header + payload + protected TLVs hash to {} (the image was altered)",
            short_hex(&expected),
            short_hex(&computed)
        )));
    }

    let signature = match key {
        None => None,
        Some(key) => Some(check_signature(&tlvs, key, &computed)?),
    };
    let sig_note = match (signature, sig_kind_present(&tlvs)) {
        (Some(name), _) => format!(", {name} signature verified"),
        (None, Some(name)) => format!(", {name} signature not checked (no public_key)"),
        (None, None) => ", unsigned".to_string(),
    };
    let trailing = size - tlv_end;
    let summary = format!(
        "MCUboot image {} ({} bytes payload, header {} bytes, {} TLVs{}), hash {}{sig_note}, {size} bytes to upload{}",
        header.version,
        header.img_size,
        header.hdr_size,
        tlvs.len(),
        if protected.is_empty() {
            String::new()
        } else {
            format!(" + {} protected", protected.len())
        },
        short_hex(&computed),
        if trailing > 0 {
            format!(" ({trailing} bytes after the TLV area)")
        } else {
            String::new()
        }
    );
    Ok(Verified {
        header,
        size,
        hash: computed,
        file_sha256: file_hasher.finalize().into(),
        signature,
        tlv_end,
        summary,
    })
}

fn sig_kind_present(tlvs: &[Tlv]) -> Option<&'static str> {
    tlvs.iter().find_map(|t| match t.kind {
        TLV_ECDSA_SIG => Some("ECDSA"),
        TLV_ED25519 => Some("Ed25519"),
        TLV_SIG_PURE => Some("pure"),
        TLV_RSA2048_PSS | TLV_RSA3072_PSS => Some("RSA"),
        _ => None,
    })
}

fn check_signature(tlvs: &[Tlv], key: &PublicKey, hash: &[u8; 32]) -> Result<&'static str, Error> {
    let kind = key.kind();
    // Which key signed: the key hash (imgtool's default) or the full key.
    let key_hash = key.key_hash();
    if let Some(t) = tlvs.iter().find(|t| t.kind == TLV_KEYHASH) {
        if t.value != key_hash {
            return Err(Error::Verify(format!(
                "key hash mismatch: the image was signed with the key whose hash is {}, public_key hashes to {}",
                short_hex(&t.value),
                short_hex(&key_hash)
            )));
        }
    } else if let Some(t) = tlvs.iter().find(|t| t.kind == TLV_PUBKEY) {
        if t.value != key.spki_der() {
            return Err(Error::Verify(
                "key mismatch: the public key TLV (0x02) in the image is not public_key".into(),
            ));
        }
    } else {
        return Err(Error::Verify(
            "the image has no key hash TLV (0x01) nor public key TLV (0x02): it is not signed the way MCUboot checks"
                .into(),
        ));
    }
    if tlvs.iter().any(|t| t.kind == TLV_SIG_PURE) {
        return Err(Error::Verify(
            "the image carries a \"pure\" signature (TLV 0x25, over the whole image); this plugin checks signatures over the hash only"
                .into(),
        ));
    }
    let wanted = kind.signature_tlv();
    let Some(sig) = tlvs.iter().find(|t| t.kind == wanted) else {
        let other = sig_kind_present(tlvs);
        return Err(Error::Verify(match other {
            Some(o) => format!(
                "the image carries an {o} signature, but public_key is an {} key",
                kind.name()
            ),
            None => format!(
                "the image is not signed (no signature TLV) but public_key ({}) is set",
                kind.name()
            ),
        }));
    };
    key.verify(hash, &sig.value).map_err(Error::Verify)?;
    Ok(kind.name())
}

#[cfg(test)]
mod tests;
