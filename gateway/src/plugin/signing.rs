//! Signed plugins, in wasmsign2's format (the WebAssembly tool-conventions
//! `Signatures.md`: a `signature` custom section first, Ed25519, for modules
//! and components alike), through the `wasmsign2` crate: keys and
//! signatures made by the `wasmsign2` CLI are accepted, and what
//! `otagw plugin sign` writes verifies with it.
//!
//! Inside the signed content, a custom section `otagw-plugin` ([`Manifest`],
//! JSON) says what the plugin claims to be; the signature covers it.
//!
//! What it is not: the policy (trusted keys and threshold from the
//! configuration, what the manifest must say, security-version floors):
//! `plugin/update.rs`.

use std::collections::HashSet;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use wasmsign2::{CustomSection, KeyPair, Module, PublicKeySet, Section, SectionLike};
pub use wasmsign2::{PublicKey, SecretKey};

/// The custom section holding the manifest.
pub const MANIFEST_SECTION: &str = "otagw-plugin";

/// What a signed plugin claims to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub family: String,
    pub version: String,
    /// Raised for a release that fixes a security problem; a gateway refuses
    /// to go back below the highest one it ran (unless told otherwise).
    pub security_version: u64,
    /// The contract it is built for (`0.2.0`).
    pub contract: String,
    /// The oldest gateway version it needs.
    pub min_gateway: String,
}

/// Why signing or checking failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("not a WebAssembly module or component: {0}")]
    Parse(String),
    #[error("not signed (no `signature` section)")]
    Unsigned,
    #[error(
        "no valid signature by a trusted key (signed by someone else, or changed after signing)"
    )]
    Untrusted,
    #[error("signed by {found} trusted key(s), {needed} needed")]
    Threshold { found: usize, needed: usize },
    #[error("the `otagw-plugin` manifest is not valid: {0}")]
    Manifest(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn key_error(path: &Path, e: impl std::fmt::Display) -> SignError {
    SignError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// A new Ed25519 key pair: the secret key at `out`, the public one at
/// `out.pub`, both in wasmsign2's format. Refuses to overwrite.
pub fn keygen(out: &Path) -> Result<PathBuf, SignError> {
    let public = PathBuf::from(format!("{}.pub", out.display()));
    for p in [out, public.as_path()] {
        if p.exists() {
            return Err(key_error(p, "exists already (not overwritten)"));
        }
    }
    let kp = KeyPair::generate();
    kp.sk.to_file(out).map_err(|e| key_error(out, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o600))?;
    }
    kp.pk.to_file(&public).map_err(|e| key_error(&public, e))?;
    Ok(public)
}

/// A secret key file (wasmsign2's format, PEM, DER or OpenSSH).
pub fn secret_key(path: &Path) -> Result<SecretKey, SignError> {
    let bytes = std::fs::read(path).map_err(|e| key_error(path, e))?;
    SecretKey::from_any(&bytes).map_err(|e| key_error(path, format!("not a secret key: {e}")))
}

/// A public key file (wasmsign2's format, PEM, DER or OpenSSH).
pub fn public_key(path: &Path) -> Result<PublicKey, SignError> {
    let bytes = std::fs::read(path).map_err(|e| key_error(path, e))?;
    PublicKey::from_any(&bytes).map_err(|e| key_error(path, format!("not a public key: {e}")))
}

fn parse(bytes: &[u8]) -> Result<Module, SignError> {
    Module::deserialize(&mut Cursor::new(bytes)).map_err(|e| SignError::Parse(e.to_string()))
}

/// The manifest a plugin carries, if any.
pub fn manifest(bytes: &[u8]) -> Result<Option<Manifest>, SignError> {
    let module = parse(bytes)?;
    for s in &module.sections {
        if let Section::Custom(c) = s
            && c.name() == MANIFEST_SECTION
        {
            return serde_json::from_slice(c.payload())
                .map(Some)
                .map_err(|e| SignError::Manifest(e.to_string()));
        }
    }
    Ok(None)
}

/// `bytes` with `manifest` in it (replacing one it had) and a signature by
/// `key` added (earlier signatures by other keys stay valid when the
/// manifest is unchanged: k-of-n signing is signing in turn).
pub fn sign(
    bytes: &[u8],
    key: &SecretKey,
    manifest: Option<&Manifest>,
) -> Result<Vec<u8>, SignError> {
    let mut module = parse(bytes)?;
    if let Some(m) = manifest {
        let json = serde_json::to_vec(m).map_err(|e| SignError::Manifest(e.to_string()))?;
        let section = Section::Custom(CustomSection::new(MANIFEST_SECTION.to_string(), json));
        let at = module
            .sections
            .iter()
            .position(|s| matches!(s, Section::Custom(c) if c.name() == MANIFEST_SECTION));
        match at {
            Some(i) if module.sections[i].payload() == section.payload() => {}
            Some(i) => {
                // A new manifest: the content changes, old signatures go.
                module.sections[i] = section;
                module
                    .sections
                    .retain(|s| !matches!(s, Section::Custom(c) if c.is_signature_header()));
            }
            None => {
                module
                    .sections
                    .retain(|s| !matches!(s, Section::Custom(c) if c.is_signature_header()));
                module.sections.push(section);
            }
        }
    }
    let (signed, _) = key
        .sign_multi(module, None, false, false)
        .map_err(|e| SignError::Parse(e.to_string()))?;
    let mut out = Vec::new();
    signed
        .serialize(&mut out)
        .map_err(|e| SignError::Parse(e.to_string()))?;
    Ok(out)
}

/// Which of `keys` signed `bytes` (as a whole); at least `threshold` must
/// have, or it is refused.
pub fn verify<'k>(
    bytes: &[u8],
    keys: &'k [(PathBuf, PublicKey)],
    threshold: usize,
) -> Result<Vec<&'k Path>, SignError> {
    let signed = parse(bytes)?
        .sections
        .first()
        .is_some_and(|s| matches!(s, Section::Custom(c) if c.is_signature_header()));
    if !signed {
        return Err(SignError::Unsigned);
    }
    let set = PublicKeySet::new(keys.iter().map(|(_, k)| k.clone()).collect::<HashSet<_>>());
    let valid = match set.verify(&mut Cursor::new(bytes), None) {
        Ok(v) => v,
        Err(wasmsign2::WSError::NoSignatures) => return Err(SignError::Unsigned),
        Err(wasmsign2::WSError::VerificationFailed) => return Err(SignError::Untrusted),
        Err(e) => return Err(SignError::Parse(e.to_string())),
    };
    let signers: Vec<&Path> = keys
        .iter()
        .filter(|(_, k)| valid.contains(k))
        .map(|(p, _)| p.as_path())
        .collect();
    if signers.len() < threshold.max(1) {
        return Err(SignError::Threshold {
            found: signers.len(),
            needed: threshold.max(1),
        });
    }
    Ok(signers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest component: its header.
    const COMPONENT: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

    fn manifest_of(version: &str) -> Manifest {
        Manifest {
            family: "acme".into(),
            version: version.into(),
            security_version: 1,
            contract: "0.2.0".into(),
            min_gateway: "0.1.0".into(),
        }
    }

    #[test]
    fn sign_verify_thresholds_and_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.key");
        let b = dir.path().join("b.key");
        let c = dir.path().join("c.key");
        let keys: Vec<(PathBuf, PublicKey)> = [&a, &b, &c]
            .iter()
            .map(|k| {
                let p = keygen(k).unwrap();
                (p.clone(), public_key(&p).unwrap())
            })
            .collect();
        assert!(keygen(&a).is_err(), "never overwrites a key");

        let m = manifest_of("1.0.0");
        let once = sign(&COMPONENT, &secret_key(&a).unwrap(), Some(&m)).unwrap();
        assert_eq!(manifest(&once).unwrap(), Some(m.clone()));
        assert_eq!(verify(&once, &keys, 1).unwrap(), vec![keys[0].0.as_path()]);
        assert!(matches!(
            verify(&once, &keys, 2),
            Err(SignError::Threshold {
                found: 1,
                needed: 2
            })
        ));
        // A second signer, same manifest: both count.
        let twice = sign(&once, &secret_key(&b).unwrap(), Some(&m)).unwrap();
        assert_eq!(verify(&twice, &keys, 2).unwrap().len(), 2);
        // Only the third key trusted: not signed by it.
        assert!(matches!(
            verify(&twice, &keys[2..], 1),
            Err(SignError::Untrusted)
        ));
        // Unsigned, tampered.
        assert!(matches!(
            verify(&COMPONENT, &keys, 1),
            Err(SignError::Unsigned)
        ));
        let mut tampered = once.clone();
        let last = tampered.len() - 3;
        tampered[last] ^= 1;
        assert!(verify(&tampered, &keys, 1).is_err());
        // A new manifest drops the old signatures.
        let resigned = sign(
            &twice,
            &secret_key(&c).unwrap(),
            Some(&manifest_of("1.0.1")),
        )
        .unwrap();
        assert_eq!(
            verify(&resigned, &keys, 1).unwrap(),
            vec![keys[2].0.as_path()]
        );
        assert!(parse(b"not wasm").is_err());
    }
}
