// An XMODEM/YMODEM receiver's answers (plugins/xmodem/src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    otagw_plugin_xmodem::fuzzing::session(data);
});
