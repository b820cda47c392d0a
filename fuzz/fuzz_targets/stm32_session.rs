// An STM32 ROM bootloader's answers (plugins/stm32/src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    otagw_plugin_stm32::fuzzing::session(data);
});
