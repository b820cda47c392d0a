// MCUboot image header, TLV walk, hash and signatures (plugins/smp/src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    otagw_plugin_smp::fuzzing::image(data);
});
