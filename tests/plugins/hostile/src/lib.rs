//! A plugin that misbehaves on purpose, for the host's tests. The option
//! `hostile` picks how, in `verify` or `flash` (`hostile_in` = verify|flash,
//! default flash):
//! - `loop`: spin forever without calling the host (CPU limit);
//! - `membomb`: allocate until memory runs out (memory limit);
//! - `trap`: panic (a trap, with the panic message on stderr);
//! - `sleep`: keep calling the host's sleep forever (job deadline);
//! - `none`: behave: read the whole image and write it to the link.
// The bindings wit-bindgen generates use unsafe code.
#![allow(unsafe_code)]

wit_bindgen::generate!({ path: "../../../wit/v0.1.0", world: "device-family" });

use exports::otagw::plugin::plugin::Guest;
use otagw::plugin::host::{self, Image, Link};
use otagw::plugin::types::{
    DeviceInfo, FamilyInfo, FlashError, FlashReport, ImageInfo, JobMeta, LinkKind, Phase,
};

struct Hostile;

fn opt<'a>(meta: &'a JobMeta, key: &str) -> Option<&'a str> {
    meta.options
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn misbehave(meta: &JobMeta, phase: &str) {
    if opt(meta, "hostile_in").unwrap_or("flash") != phase {
        return;
    }
    match opt(meta, "hostile").unwrap_or("none") {
        "loop" => {
            let mut x: u64 = 1;
            loop {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        "membomb" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                let mut chunk = vec![0u8; 1 << 20];
                chunk[0] = 1;
                hoard.push(std::hint::black_box(chunk));
            }
        }
        "trap" => panic!("hostile plugin panics on purpose"),
        "sleep" => loop {
            host::sleep(1000);
        },
        _ => {}
    }
}

impl Guest for Hostile {
    fn describe() -> FamilyInfo {
        FamilyInfo {
            name: "hostile".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            contract: "0.1.0".into(),
            description: "misbehaves on purpose (tests only)".into(),
            transports: vec![LinkKind::Serial, LinkKind::Tcp],
            default_serial: None,
        }
    }

    fn verify(image: &Image, meta: JobMeta) -> Result<ImageInfo, FlashError> {
        misbehave(&meta, "verify");
        Ok(ImageInfo {
            version: meta.version,
            payload_size: image.size(),
            summary: "not checked".into(),
        })
    }

    fn flash(link: &Link, image: &Image, meta: JobMeta) -> Result<FlashReport, FlashError> {
        misbehave(&meta, "flash");
        let size = image.size();
        let mut off = 0u64;
        while off < size {
            let chunk = image.read(off, 4096);
            if chunk.is_empty() {
                return Err(FlashError::Other(format!("image ended early at {off}")));
            }
            link.write(&chunk)
                .map_err(|e| FlashError::Transfer(format!("write at {off}: {e:?}")))?;
            off += chunk.len() as u64;
            host::progress(off, size, Phase::Transfer);
        }
        Ok(FlashReport {
            bytes_sent: off,
            retries: 0,
            summary: "raw copy".into(),
        })
    }

    fn identify(_link: &Link, _options: Vec<(String, String)>) -> Result<DeviceInfo, FlashError> {
        Err(FlashError::Unsupported("hostile cannot identify".into()))
    }
}

export!(Hostile);
