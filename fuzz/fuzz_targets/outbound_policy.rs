#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| remora_fuzz::outbound_policy(data));
