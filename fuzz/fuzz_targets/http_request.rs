//! Fuzz target: a client's bytes on the control API or the dispatcher (see mu2_vmm::fuzzing::http_request).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mu2_vmm::fuzzing::http_request(data));
