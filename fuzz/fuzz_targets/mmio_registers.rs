//! Fuzz target: a guest reading and writing the virtio-mmio registers (see mu2_devices::fuzzing::mmio_registers).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mu2_devices::fuzzing::mmio_registers(data));
