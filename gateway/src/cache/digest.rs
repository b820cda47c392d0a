//! [`Digest`], the key of the cache: the hash method a notice names
//! (`signMethod`) and the lowercase hex of the whole image (`sign`).

use std::fmt;
use std::str::FromStr;

use md5::Md5;
use sha2::Digest as _;
use sha2::Sha256;

/// A hash method an upgrade notice may name in `signMethod`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestMethod {
    Md5,
    Sha256,
}

impl DigestMethod {
    /// Parse a notice's `signMethod`, in any case (`Md5`, `MD5`, `SHA256`,
    /// `Sha256`, also `sha-256`).
    pub fn from_sign_method(s: &str) -> Result<DigestMethod, ParseDigestError> {
        match s.to_ascii_lowercase().as_str() {
            "md5" => Ok(DigestMethod::Md5),
            "sha256" | "sha-256" => Ok(DigestMethod::Sha256),
            _ => Err(ParseDigestError::Method(s.chars().take(16).collect())),
        }
    }

    /// The lowercase name used in [`Digest`]'s `Display` (`md5`, `sha256`).
    pub fn name(self) -> &'static str {
        match self {
            DigestMethod::Md5 => "md5",
            DigestMethod::Sha256 => "sha256",
        }
    }

    /// The length of the hex digest: 32 for MD5, 64 for SHA-256.
    pub fn hex_len(self) -> usize {
        match self {
            DigestMethod::Md5 => 32,
            DigestMethod::Sha256 => 64,
        }
    }
}

impl fmt::Display for DigestMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a digest (or a notice's `sign`/`signMethod`) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseDigestError {
    #[error("unknown sign method {0:?} (expected Md5 or SHA256)")]
    Method(String),
    #[error("{method} digest must be {expected} hex characters, got {got}")]
    Length {
        method: DigestMethod,
        expected: usize,
        got: usize,
    },
    #[error("digest is not hex")]
    NotHex,
    #[error("digest must look like `sha256:<hex>` or `md5:<hex>`")]
    Form,
}

/// The content address of an image: its hash method and lowercase hex digest.
///
/// Always valid: the hex has the method's length and is lowercase. `Display`
/// and `FromStr` use the form `sha256:ab12…` / `md5:93230c…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    method: DigestMethod,
    hex: String,
}

impl Digest {
    /// A digest from a method and hex in any case.
    pub fn new(method: DigestMethod, hex: &str) -> Result<Digest, ParseDigestError> {
        if hex.len() != method.hex_len() {
            return Err(ParseDigestError::Length {
                method,
                expected: method.hex_len(),
                got: hex.len(),
            });
        }
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseDigestError::NotHex);
        }
        Ok(Digest {
            method,
            hex: hex.to_ascii_lowercase(),
        })
    }

    /// A digest from a notice's `signMethod` and `sign`.
    pub fn from_sign(sign_method: &str, sign: &str) -> Result<Digest, ParseDigestError> {
        Digest::new(DigestMethod::from_sign_method(sign_method)?, sign.trim())
    }

    pub fn method(&self) -> DigestMethod {
        self.method
    }

    /// Lowercase hex.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// `sha256:ab12cd34ef56…`: short enough for a 128-character `desc`.
    pub fn short(&self) -> String {
        format!("{}:{}…", self.method, &self.hex[..12])
    }

    /// The bytes this digest is stored under (its `Display` form).
    pub(crate) fn key(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.method, self.hex)
    }
}

impl FromStr for Digest {
    type Err = ParseDigestError;
    fn from_str(s: &str) -> Result<Digest, ParseDigestError> {
        let (method, hex) = s.split_once(':').ok_or(ParseDigestError::Form)?;
        Digest::new(DigestMethod::from_sign_method(method)?, hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The hash a notice names, fed in order as an image's bytes are stored.
///
/// Only the notice's method is computed: it is the image's key and what the
/// download is checked against. (Computing md5 and sha256 of every byte, as
/// the first version did, halved the download's throughput; see BENCHMARKS.md.)
#[derive(Clone)]
pub(crate) enum Hasher {
    Md5(Md5),
    Sha256(Sha256),
}

impl Hasher {
    pub(crate) fn new(method: DigestMethod) -> Hasher {
        match method {
            DigestMethod::Md5 => Hasher::Md5(Md5::new()),
            DigestMethod::Sha256 => Hasher::Sha256(Sha256::new()),
        }
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
        }
    }

    /// The digest of everything fed so far.
    pub(crate) fn finish(self) -> Digest {
        match self {
            Hasher::Md5(h) => Digest {
                method: DigestMethod::Md5,
                hex: hex::encode(h.finalize()),
            },
            Hasher::Sha256(h) => Digest {
                method: DigestMethod::Sha256,
                hex: hex::encode(h.finalize()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_digest_parses_notice_forms() {
        for m in ["Md5", "MD5", "md5"] {
            let d = Digest::from_sign(m, "93230C3BDE425A9D7984A594AC55EA1E").unwrap();
            assert_eq!(d.to_string(), "md5:93230c3bde425a9d7984a594ac55ea1e");
            assert_eq!(d.method(), DigestMethod::Md5);
        }
        for m in ["SHA256", "Sha256", "sha-256"] {
            let d = Digest::from_sign(m, &"Ab".repeat(32)).unwrap();
            assert_eq!(d.hex(), "ab".repeat(32));
            assert_eq!(d.short(), "sha256:abababababab…");
            assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        }
        assert!(matches!(
            Digest::from_sign("crc32", "00"),
            Err(ParseDigestError::Method(_))
        ));
        assert!(matches!(
            Digest::from_sign("Md5", "abc"),
            Err(ParseDigestError::Length { got: 3, .. })
        ));
        assert_eq!(
            Digest::from_sign("Md5", &"zz".repeat(16)),
            Err(ParseDigestError::NotHex)
        );
        assert_eq!("nocolon".parse::<Digest>(), Err(ParseDigestError::Form));
    }

    #[test]
    fn cache_hashers_match_known_vectors() {
        let feed = |method| {
            let mut h = Hasher::new(method);
            h.update(b"ab");
            h.update(b"c");
            h.finish()
        };
        let (md5, sha256) = (feed(DigestMethod::Md5), feed(DigestMethod::Sha256));
        assert_eq!(md5.method(), DigestMethod::Md5);
        assert_eq!(sha256.method(), DigestMethod::Sha256);
        assert_eq!(md5.hex(), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            sha256.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let json = serde_json::to_string(&md5).unwrap();
        assert_eq!(json, "\"md5:900150983cd24fb0d6963f7d28e17f72\"");
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), md5);
    }
}
