// Upgrade notices and firmware/get replies (gateway/src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    otagw::fuzzing::notice(data);
});
