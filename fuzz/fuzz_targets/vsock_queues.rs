//! Fuzz target: a guest driving the vsock device's queues (see mu2_devices::fuzzing::vsock_queues).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mu2_devices::fuzzing::vsock_queues(data));
