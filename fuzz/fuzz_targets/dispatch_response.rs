//! Fuzz target: an HTTP guest's answer to the dispatcher (see mu2_vmm::fuzzing::dispatch_response).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mu2_vmm::fuzzing::dispatch_response(data));
