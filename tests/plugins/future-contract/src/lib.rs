//! A plugin built against `otagw:plugin@0.3.0`, a contract this gateway does
//! not speak. The host must refuse it by its exports, before instantiation.
// The bindings wit-bindgen generates use unsafe code.
#![allow(unsafe_code)]

wit_bindgen::generate!({ path: "wit", world: "device-family" });

struct Future;

impl exports::otagw::plugin::plugin::Guest for Future {
    fn describe() -> String {
        "from the future".into()
    }
}

export!(Future);
