// SMP serial framing and raw BLE packets (plugins/smp/src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    otagw_plugin_smp::fuzzing::frame(data);
});
