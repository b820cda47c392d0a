//! `verify` against hand-built images (every failure) and real images made by
//! MCUboot's `imgtool` (see `testdata/README.md`).

use super::*;
use crate::testing::{ImageSpec, TestKey};
use otagw_plugin_sdk::testing::MemImage;

const ED: TestKey = TestKey::Ed25519([0x11; 32]);
const EC: TestKey = TestKey::P256([0x22; 32]);
const EC_OTHER: TestKey = TestKey::P256([0x33; 32]);

fn run(bytes: Vec<u8>, key: Option<&PublicKey>) -> Result<Verified, Error> {
    verify(&mut MemImage::new(bytes), key)
}

fn verify_err(bytes: Vec<u8>, key: Option<&PublicKey>) -> String {
    match run(bytes, key) {
        Err(Error::Verify(m)) => m,
        other => panic!("expected a verify error, got {other:?}"),
    }
}

/// Offset of the TLV area of a built image.
fn tlv_offset(b: &[u8]) -> usize {
    let h = Header::parse(b).unwrap();
    h.hashed_end() as usize
}

#[test]
fn unsigned_image_verifies_and_reports() {
    let bytes = ImageSpec::new((1, 2, 3, 0), 5000).build();
    let v = run(bytes.clone(), None).unwrap();
    assert_eq!(v.header.version.to_string(), "1.2.3");
    assert_eq!(v.size, bytes.len() as u64);
    assert_eq!(v.file_sha256, <[u8; 32]>::from(Sha256::digest(&bytes)));
    assert_eq!(v.tlv_end, bytes.len() as u64);
    assert!(v.summary.contains("unsigned"), "{}", v.summary);
    assert_eq!(v.signature, None);
}

#[test]
fn signed_images_verify_with_their_key() {
    for key in [ED, EC] {
        let bytes = ImageSpec::new((2, 0, 1, 5), 3000).signed(key).build();
        let v = run(bytes.clone(), Some(&key.public())).unwrap();
        assert_eq!(v.signature, Some(key.public().kind().name()));
        assert!(v.summary.contains("signature verified"), "{}", v.summary);
        assert_eq!(v.header.version.to_string(), "2.0.1.5");
        // Without a key the signature is reported as not checked.
        let v = run(bytes, None).unwrap();
        assert!(v.summary.contains("not checked"), "{}", v.summary);
    }
}

#[test]
fn full_key_tlv_is_accepted_and_compared() {
    let mut spec = ImageSpec::new((1, 0, 0, 0), 100).signed(EC);
    spec.full_key = true;
    let bytes = spec.build();
    run(bytes.clone(), Some(&EC.public())).unwrap();
    let m = verify_err(bytes, Some(&EC_OTHER.public()));
    assert!(m.contains("key mismatch"), "{m}");
}

#[test]
fn tampered_payload_is_a_hash_mismatch() {
    let mut bytes = ImageSpec::new((1, 0, 0, 0), 5000).signed(EC).build();
    bytes[0x200 + 1234] ^= 0x01;
    let m = verify_err(bytes, Some(&EC.public()));
    assert!(m.starts_with("hash mismatch"), "{m}");
}

#[test]
fn tampered_header_version_is_a_hash_mismatch() {
    let mut bytes = ImageSpec::new((1, 0, 0, 0), 100).build();
    bytes[20] = 9;
    assert!(verify_err(bytes, None).starts_with("hash mismatch"));
}

#[test]
fn wrong_key_is_a_key_hash_mismatch() {
    let bytes = ImageSpec::new((1, 0, 0, 0), 100).signed(EC).build();
    let m = verify_err(bytes.clone(), Some(&EC_OTHER.public()));
    assert!(m.starts_with("key hash mismatch"), "{m}");
    let m = verify_err(bytes, Some(&ED.public()));
    assert!(m.starts_with("key hash mismatch"), "{m}");
}

#[test]
fn bad_signature_with_the_right_key_hash() {
    for key in [EC, ED] {
        let mut bytes = ImageSpec::new((1, 0, 0, 0), 100).signed(key).build();
        // The signature is the last TLV: flip its last byte.
        let n = bytes.len();
        bytes[n - 1] ^= 0x40;
        let m = verify_err(bytes, Some(&key.public()));
        assert!(
            m.contains("bad signature") || m.contains("not a DER"),
            "{m}"
        );
    }
}

#[test]
fn key_set_but_image_unsigned_or_other_algorithm() {
    let bytes = ImageSpec::new((1, 0, 0, 0), 100).build();
    let m = verify_err(bytes, Some(&EC.public()));
    assert!(m.contains("no key hash TLV"), "{m}");
    // An Ed25519 key hash that matches but the image carries ECDSA: build by
    // hand an image whose key hash is the Ed25519 key's and signature ECDSA.
    let mut bytes = ImageSpec::new((1, 0, 0, 0), 100).signed(EC).build();
    let at = tlv_offset(&bytes);
    let area = walk_tlvs(&bytes[at..], at as u64, TLV_INFO_MAGIC, "t").unwrap();
    let kh = area.iter().find(|t| t.kind == TLV_KEYHASH).unwrap();
    let o = kh.offset as usize + 4;
    bytes[o..o + 32].copy_from_slice(&ED.public().key_hash());
    let m = verify_err(bytes, Some(&ED.public()));
    assert!(m.contains("carries an ECDSA signature"), "{m}");
}

#[test]
fn truncated_tlv_area() {
    let bytes = ImageSpec::new((1, 0, 0, 0), 100).signed(ED).build();
    let short = bytes[..bytes.len() - 10].to_vec();
    let m = verify_err(short, Some(&ED.public()));
    assert!(m.starts_with("TLV area truncated"), "{m}");
    // Cut inside the TLV info header.
    let at = tlv_offset(&bytes);
    let m = verify_err(bytes[..at + 2].to_vec(), None);
    assert!(m.starts_with("no TLV area"), "{m}");
}

#[test]
fn tlv_entry_overrunning_the_area() {
    let mut bytes = ImageSpec::new((1, 0, 0, 0), 100).build();
    let at = tlv_offset(&bytes);
    // The SHA-256 entry claims 33 bytes.
    bytes[at + 6] = 33;
    let m = verify_err(bytes, None);
    assert!(m.contains("is 33 bytes long but only 32"), "{m}");
    // An area whose total leaves 2 stray bytes after the last entry.
    let mut bytes = ImageSpec::new((1, 0, 0, 0), 100).build();
    let at = tlv_offset(&bytes);
    let total = u16::from_le_bytes([bytes[at + 2], bytes[at + 3]]) + 2;
    bytes[at + 2..at + 4].copy_from_slice(&total.to_le_bytes());
    bytes.extend([0, 0]);
    let m = verify_err(bytes, None);
    assert!(m.contains("runs past the end of the area"), "{m}");
}

#[test]
fn bad_magics() {
    let mut bytes = ImageSpec::new((1, 0, 0, 0), 100).build();
    bytes[0] = 0;
    let m = verify_err(bytes, None);
    assert!(m.starts_with("bad magic 0x96f3b800"), "{m}");
    let mut bytes = ImageSpec::new((1, 0, 0, 0), 100).build();
    let at = tlv_offset(&bytes);
    bytes[at] = 0x08;
    let m = verify_err(bytes, None);
    assert!(m.contains("bad TLV area magic 0x6908"), "{m}");
    assert!(m.contains("does not announce"), "{m}");
    let m = verify_err(vec![0x3d, 0xb8, 0xf3, 0x96], None);
    assert!(m.contains("too small"), "{m}");
}

#[test]
fn header_bounds_against_the_file() {
    let mut bytes = ImageSpec::new((1, 0, 0, 0), 100).build();
    bytes[12..16].copy_from_slice(&1_000_000u32.to_le_bytes());
    let m = verify_err(bytes, None);
    assert!(m.contains("but the file has only"), "{m}");
    let mut bytes = ImageSpec::new((1, 0, 0, 0), 100).build();
    bytes[8..10].copy_from_slice(&16u16.to_le_bytes());
    let m = verify_err(bytes, None);
    assert!(m.contains("header size 16"), "{m}");
}

#[test]
fn protected_tlvs_are_hashed_and_checked() {
    let mut spec = ImageSpec::new((1, 0, 0, 0), 100).signed(ED);
    spec.protected = vec![(0x50, 5u32.to_le_bytes().to_vec())];
    let bytes = spec.build();
    let v = run(bytes.clone(), Some(&ED.public())).unwrap();
    assert!(v.summary.contains("+ 1 protected"), "{}", v.summary);
    // Altering the protected area breaks the hash.
    let mut t = bytes.clone();
    let p = Header::parse(&t).unwrap().payload_end() as usize;
    t[p + 8] ^= 1;
    assert!(verify_err(t, None).starts_with("hash mismatch"));
    // Its magic must be 0x6908.
    let mut t = bytes.clone();
    t[p] = 0x07;
    assert!(verify_err(t, None).contains("bad protected TLV area magic 0x6907"));
    // Its size must equal the header's.
    let mut t = bytes;
    t[p + 2] += 4;
    assert!(verify_err(t, None).contains("declares 16 bytes but 12"));
}

#[test]
fn encrypted_and_other_hashes_are_refused() {
    let mut bytes = ImageSpec::new((1, 0, 0, 0), 100).build();
    bytes[16] = 0x04;
    assert!(verify_err(bytes, None).contains("encrypted"));
    let mut bytes = ImageSpec::new((1, 0, 0, 0), 100).build();
    let at = tlv_offset(&bytes);
    bytes[at + 4] = 0x11; // the SHA-256 TLV becomes SHA-384
    assert!(verify_err(bytes, None).contains("SHA-384/512"));
}

#[test]
fn streams_the_image() {
    let bytes = ImageSpec::new((1, 0, 0, 0), 200_000).build();
    let mut img = MemImage::new(bytes);
    verify(&mut img, None).unwrap();
    assert!(img.largest_read <= 16 * 1024, "{}", img.largest_read);
}

#[test]
fn trailing_padding_is_allowed_and_reported() {
    let mut spec = ImageSpec::new((1, 0, 0, 0), 100);
    spec.trailer = vec![0xff; 64];
    let v = run(spec.build(), None).unwrap();
    assert!(
        v.summary.contains("64 bytes after the TLV area"),
        "{}",
        v.summary
    );
}

#[test]
fn versions_parse_compare_and_print() {
    let v = |s| Version::parse(s).unwrap();
    assert_eq!(v("1.2.3").to_string(), "1.2.3");
    assert_eq!(v("1.2.3.4").to_string(), "1.2.3.4");
    assert_eq!(v("1.2.3+4"), v("1.2.3.4"));
    assert_eq!(v("2"), v("2.0.0"));
    assert!(v("1.2.10") > v("1.2.9"));
    assert!(v("1.3.0") > v("1.2.65535"));
    assert!(v("1.2.3.1") > v("1.2.3"));
    assert_eq!(Version::parse("1.2.x"), None);
    assert_eq!(Version::parse("256.0.0"), None);
    assert_eq!(Version::parse("1.2.3.4+5"), None);
}

// ---------------------------------------------------------------------------
// Real images from MCUboot's imgtool (testdata/README.md says how).

const IMG_EC: &[u8] = include_bytes!("../../testdata/ecdsa-p256.signed.bin");
const IMG_ED: &[u8] = include_bytes!("../../testdata/ed25519.signed.bin");
const IMG_EC_FULL: &[u8] = include_bytes!("../../testdata/ecdsa-p256-full-protected.signed.bin");
const IMG_UNSIGNED: &[u8] = include_bytes!("../../testdata/unsigned.bin");
const PUB_EC_C: &str = include_str!("../../testdata/ec.pub.c");
const PUB_EC_PEM: &str = include_str!("../../testdata/ec.pub.pem");
const PUB_ED_PEM: &str = include_str!("../../testdata/ed.pub.pem");
const PUB_ED_C: &str = include_str!("../../testdata/ed.pub.c");
const PUB_EC2_PEM: &str = include_str!("../../testdata/ec2.pub.pem");

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn imgtool_ecdsa_p256_image() {
    let key = PublicKey::parse(PUB_EC_C).unwrap();
    assert_eq!(key, PublicKey::parse(PUB_EC_PEM).unwrap());
    let v = run(IMG_EC.to_vec(), Some(&key)).unwrap();
    assert_eq!(v.signature, Some("ECDSA P-256"));
    assert_eq!(v.header.version.to_string(), "1.2.3");
    // `imgtool verify` printed this digest.
    assert_eq!(
        hex(&v.hash),
        "808933032925f1ee2318792f79bee6ac251a6a3d96d74ec6855e0b3579727514"
    );
    // The raw SEC1 point in hex works as well.
    let raw = hex(&key.spki_der()[26..]);
    run(IMG_EC.to_vec(), Some(&PublicKey::parse(&raw).unwrap())).unwrap();
}

#[test]
fn imgtool_ed25519_image() {
    let key = PublicKey::parse(PUB_ED_PEM).unwrap();
    assert_eq!(key, PublicKey::parse(PUB_ED_C).unwrap());
    let v = run(IMG_ED.to_vec(), Some(&key)).unwrap();
    assert_eq!(v.signature, Some("Ed25519"));
    assert_eq!(v.header.version.to_string(), "1.2.3.7");
    assert_eq!(
        hex(&v.hash),
        "24e850f298fb3fc6df111f01bad0cb0cdf58d3bc49b0a9d081f3bf8142d28bda"
    );
    let raw = hex(&key.spki_der()[12..]);
    run(IMG_ED.to_vec(), Some(&PublicKey::parse(&raw).unwrap())).unwrap();
}

#[test]
fn imgtool_full_key_and_protected_tlvs() {
    let key = PublicKey::parse(PUB_EC_PEM).unwrap();
    let v = run(IMG_EC_FULL.to_vec(), Some(&key)).unwrap();
    assert_eq!(v.header.protect_tlv_size, 12);
    assert_eq!(
        hex(&v.hash),
        "ef5643ba44b821f3834492ec9af94ee265d178fe7bba2a4db75b5e49269d8d72"
    );
    let other = PublicKey::parse(PUB_EC2_PEM).unwrap();
    assert!(verify_err(IMG_EC_FULL.to_vec(), Some(&other)).contains("key mismatch"));
}

#[test]
fn imgtool_images_rejected_when_altered_or_wrong_key() {
    let ec = PublicKey::parse(PUB_EC_PEM).unwrap();
    let ec2 = PublicKey::parse(PUB_EC2_PEM).unwrap();
    let ed = PublicKey::parse(PUB_ED_PEM).unwrap();
    // Tampered payload.
    let mut t = IMG_EC.to_vec();
    t[0x200 + 100] ^= 0x80;
    assert!(verify_err(t, Some(&ec)).starts_with("hash mismatch"));
    // Wrong keys.
    assert!(verify_err(IMG_EC.to_vec(), Some(&ec2)).starts_with("key hash mismatch"));
    assert!(verify_err(IMG_ED.to_vec(), Some(&ec)).starts_with("key hash mismatch"));
    // Truncated TLV area.
    let t = IMG_ED[..IMG_ED.len() - 1].to_vec();
    assert!(verify_err(t, Some(&ed)).starts_with("TLV area truncated"));
    // Bad magic.
    let mut t = IMG_ED.to_vec();
    t[3] = 0;
    assert!(verify_err(t, Some(&ed)).starts_with("bad magic"));
    // A re-signed hash TLV without a matching signature: forge the hash of
    // a tampered payload; the signature no longer verifies.
    let mut t = IMG_ED.to_vec();
    t[0x200 + 7] ^= 1;
    let h = Header::parse(&t).unwrap();
    let digest: [u8; 32] = Sha256::digest(&t[..h.hashed_end() as usize]).into();
    let at = h.hashed_end() as usize;
    let tlvs = walk_tlvs(&t[at..], at as u64, TLV_INFO_MAGIC, "t").unwrap();
    let sha = tlvs.iter().find(|x| x.kind == TLV_SHA256).unwrap();
    let o = sha.offset as usize + 4;
    t[o..o + 32].copy_from_slice(&digest);
    let m = verify_err(t, Some(&ed));
    assert!(m.starts_with("bad signature"), "{m}");
    // Unsigned imgtool image with a key configured.
    assert!(verify_err(IMG_UNSIGNED.to_vec(), Some(&ec)).contains("no key hash TLV"));
    run(IMG_UNSIGNED.to_vec(), None).unwrap();
}
