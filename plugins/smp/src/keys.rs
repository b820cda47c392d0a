//! The `public_key` option: parsing, the DER form imgtool hashes, and the
//! signature checks of the two algorithms this family verifies.
//!
//! What it is: ECDSA P-256 (MCUboot TLV 0x22, an ASN.1 DER signature over the
//! image's SHA-256) and Ed25519 (TLV 0x24, a signature whose message is the
//! 32-byte SHA-256 of the image), which is what `imgtool sign` writes for
//! `ecdsa-p256` and `ed25519` keys. The key hash MCUboot compares (TLV 0x01) is
//! the SHA-256 of the key's SubjectPublicKeyInfo DER, with P-256 points
//! uncompressed, as imgtool's `get_public_bytes` produces.
//!
//! What it is not: RSA, ECDSA P-384, or "pure" Ed25519 (TLV 0x25, a signature
//! over the whole image), which are refused with a message saying so.

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// SubjectPublicKeyInfo prefix of an uncompressed P-256 key (id-ecPublicKey,
/// prime256v1), followed by the 65-byte SEC1 point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// SubjectPublicKeyInfo prefix of an Ed25519 key (id-Ed25519), followed by 32 bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The algorithm of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA over NIST P-256, signature TLV 0x22.
    EcdsaP256,
    /// Ed25519, signature TLV 0x24.
    Ed25519,
}

impl KeyKind {
    /// Human name.
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::EcdsaP256 => "ECDSA P-256",
            KeyKind::Ed25519 => "Ed25519",
        }
    }

    /// The MCUboot TLV type of this algorithm's signature.
    pub fn signature_tlv(self) -> u16 {
        match self {
            KeyKind::EcdsaP256 => 0x22,
            KeyKind::Ed25519 => 0x24,
        }
    }
}

/// A public key images must be signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    kind: KeyKind,
    /// SEC1 uncompressed point (65 bytes) or the 32 Ed25519 bytes.
    raw: Vec<u8>,
}

impl PublicKey {
    /// Parse the option value: hex, base64, PEM or `imgtool getpub` C output of
    /// either the raw key or its SubjectPublicKeyInfo DER. The error says what
    /// is accepted.
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let bytes = decode_text(text)?;
        PublicKey::from_bytes(&bytes)
    }

    /// Classify decoded key bytes by length and prefix.
    pub fn from_bytes(b: &[u8]) -> Result<PublicKey, String> {
        if b.len() == 32 {
            return PublicKey::ed25519(b);
        }
        if b.len() == ED25519_SPKI_PREFIX.len() + 32 && b.starts_with(&ED25519_SPKI_PREFIX) {
            return PublicKey::ed25519(&b[ED25519_SPKI_PREFIX.len()..]);
        }
        if b.len() == P256_SPKI_PREFIX.len() + 65 && b.starts_with(&P256_SPKI_PREFIX) {
            return PublicKey::p256(&b[P256_SPKI_PREFIX.len()..]);
        }
        if (b.len() == 33 && (b[0] == 2 || b[0] == 3)) || (b.len() == 65 && b[0] == 4) {
            return PublicKey::p256(b);
        }
        Err(format!(
            "a {}-byte key is neither a 32-byte Ed25519 key, a 33/65-byte SEC1 P-256 point, \
             nor the SubjectPublicKeyInfo DER of one (44 or 91 bytes)",
            b.len()
        ))
    }

    fn ed25519(b: &[u8]) -> Result<PublicKey, String> {
        let arr: [u8; 32] = b.try_into().map_err(|_| "Ed25519 keys are 32 bytes")?;
        ed25519_dalek::VerifyingKey::from_bytes(&arr)
            .map_err(|_| "not a valid Ed25519 public key (not a curve point)".to_string())?;
        Ok(PublicKey {
            kind: KeyKind::Ed25519,
            raw: arr.to_vec(),
        })
    }

    fn p256(b: &[u8]) -> Result<PublicKey, String> {
        let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(b)
            .map_err(|_| "not a valid P-256 public key (not a curve point)".to_string())?;
        Ok(PublicKey {
            kind: KeyKind::EcdsaP256,
            raw: key.to_sec1_point(false).as_bytes().to_vec(),
        })
    }

    /// The algorithm.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The SubjectPublicKeyInfo DER, the bytes imgtool hashes for the key-hash
    /// TLV and embeds for `--public-key-format full`.
    pub fn spki_der(&self) -> Vec<u8> {
        let prefix: &[u8] = match self.kind {
            KeyKind::EcdsaP256 => &P256_SPKI_PREFIX,
            KeyKind::Ed25519 => &ED25519_SPKI_PREFIX,
        };
        let mut der = prefix.to_vec();
        der.extend_from_slice(&self.raw);
        der
    }

    /// SHA-256 of [`Self::spki_der`]: what MCUboot's key-hash TLV (0x01) holds.
    pub fn key_hash(&self) -> [u8; 32] {
        Sha256::digest(self.spki_der()).into()
    }

    /// Check `signature` (the TLV value) over the image hash `digest`.
    pub fn verify(&self, digest: &[u8; 32], signature: &[u8]) -> Result<(), String> {
        match self.kind {
            KeyKind::EcdsaP256 => {
                use p256::ecdsa::signature::hazmat::PrehashVerifier;
                let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&self.raw)
                    .map_err(|_| "internal: stored P-256 key does not parse".to_string())?;
                let sig = p256::ecdsa::Signature::from_der(signature).map_err(|_| {
                    format!(
                        "the ECDSA signature TLV ({} bytes) is not a DER ECDSA signature",
                        signature.len()
                    )
                })?;
                key.verify_prehash(digest, &sig).map_err(|_| {
                    "bad signature: the ECDSA P-256 signature does not verify with public_key"
                        .to_string()
                })
            }
            KeyKind::Ed25519 => {
                let arr: [u8; 32] = self.raw.as_slice().try_into().map_err(|_| "key size")?;
                let key = ed25519_dalek::VerifyingKey::from_bytes(&arr)
                    .map_err(|_| "internal: stored Ed25519 key does not parse".to_string())?;
                let sig = ed25519_dalek::Signature::from_slice(signature).map_err(|_| {
                    format!(
                        "the Ed25519 signature TLV is {} bytes, expected 64",
                        signature.len()
                    )
                })?;
                key.verify_strict(digest, &sig).map_err(|_| {
                    "bad signature: the Ed25519 signature does not verify with public_key"
                        .to_string()
                })
            }
        }
    }
}

/// Turn the option text into bytes: `imgtool getpub` C output (`{ 0x30, ... }`),
/// PEM, hex (with or without `:` or spaces) or base64.
fn decode_text(text: &str) -> Result<Vec<u8>, String> {
    let t = text.trim();
    if let (Some(open), Some(close)) = (t.find('{'), t.rfind('}'))
        && open < close
    {
        return t[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                let h = s.trim_start_matches("0x").trim_start_matches("0X");
                u8::from_str_radix(h, 16).map_err(|_| format!("`{s}` in the C array is not a byte"))
            })
            .collect();
    }
    let body: String = t
        .lines()
        .filter(|l| !l.trim_start().starts_with("-----"))
        .collect::<Vec<_>>()
        .concat()
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    if body.is_empty() {
        return Err("empty key".into());
    }
    if body.len().is_multiple_of(2) && body.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok((0..body.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&body[i..i + 2], 16).unwrap_or(0))
            .collect());
    }
    base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .map_err(|_| "expected hex, base64 or PEM of the key".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8032 test 1 public key.
    const ED_HEX: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    #[test]
    fn ed25519_forms_agree() {
        let raw = PublicKey::parse(ED_HEX).unwrap();
        assert_eq!(raw.kind(), KeyKind::Ed25519);
        let der = raw.spki_der();
        assert_eq!(der.len(), 44);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        assert_eq!(PublicKey::parse(&b64).unwrap(), raw);
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n");
        assert_eq!(PublicKey::parse(&pem).unwrap(), raw);
        let c: Vec<String> = der.iter().map(|b| format!("0x{b:02x}")).collect();
        let c = format!(
            "const unsigned char ed25519_pub_key[] = {{ {} }};\nconst unsigned int ed25519_pub_key_len = 44;",
            c.join(", ")
        );
        assert_eq!(PublicKey::parse(&c).unwrap(), raw);
    }

    #[test]
    fn p256_compressed_and_uncompressed_agree() {
        let sk = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let vk = sk.verifying_key();
        let un = vk.to_sec1_point(false);
        let co = vk.to_sec1_point(true);
        let hex_of = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let a = PublicKey::parse(&hex_of(un.as_bytes())).unwrap();
        let b = PublicKey::parse(&hex_of(co.as_bytes())).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.kind(), KeyKind::EcdsaP256);
        assert_eq!(a.spki_der().len(), 91);
        assert_eq!(PublicKey::from_bytes(&a.spki_der()).unwrap(), a);
    }

    #[test]
    fn rejects_odd_sizes_and_non_points() {
        assert!(PublicKey::parse("abcd").unwrap_err().contains("2-byte key"));
        let mut not_point = vec![4u8];
        not_point.extend([0xffu8; 64]);
        assert!(
            PublicKey::from_bytes(&not_point)
                .unwrap_err()
                .contains("not a valid P-256")
        );
    }
}
