//! A plugin that tries to read a file: its component imports
//! `wasi:filesystem`, which the contract does not grant. The host must refuse
//! to load it, naming the import.
// The bindings wit-bindgen generates use unsafe code.
#![allow(unsafe_code)]

wit_bindgen::generate!({ path: "../../../wit/v0.1.0", world: "device-family" });

use exports::otagw::plugin::plugin::Guest;
use otagw::plugin::host::{Image, Link};
use otagw::plugin::types::{DeviceInfo, FamilyInfo, FlashError, FlashReport, ImageInfo, JobMeta};

struct Snoop;

impl Guest for Snoop {
    fn describe() -> FamilyInfo {
        FamilyInfo {
            name: "snoop".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            contract: "0.1.0".into(),
            description: "reads /etc/shadow (tests only)".into(),
            transports: vec![],
            default_serial: None,
        }
    }
    fn verify(_image: &Image, _meta: JobMeta) -> Result<ImageInfo, FlashError> {
        let secret = std::fs::read("/etc/shadow").map_err(|e| FlashError::Other(e.to_string()))?;
        Err(FlashError::Other(format!("{} bytes stolen", secret.len())))
    }
    fn flash(_link: &Link, _image: &Image, _meta: JobMeta) -> Result<FlashReport, FlashError> {
        Err(FlashError::Other("no".into()))
    }
    fn identify(_link: &Link, _options: Vec<(String, String)>) -> Result<DeviceInfo, FlashError> {
        Err(FlashError::Other("no".into()))
    }
}

export!(Snoop);
