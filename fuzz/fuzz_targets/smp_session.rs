// An SMP device's answers to identify and flash (plugins/smp/src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    otagw_plugin_smp::fuzzing::session(data);
});
