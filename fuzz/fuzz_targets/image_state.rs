//! Fuzz target: an image's state file (see mu2_vmm::fuzzing::image_state).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mu2_vmm::fuzzing::image_state(data));
