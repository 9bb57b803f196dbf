//! Test guest that faults on purpose. Request: `pf` (default: write to address 0, #PF 14),
//! `ud` (`ud2`, #UD 6), `gp` (`hlt` at CPL 3, #GP 13), `de` (divide by zero, #DE 0),
//! `panic` (a Rust panic, reported through the system device). On aarch64: `pf` is a data
//! abort, `ud` an `udf`, `gp` a `brk` and `de` an `svc` (see `mu2_guest::testing`).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use mu2_guest::testing;

mu2_guest::function!(crash);

fn crash(request: &[u8]) -> Vec<u8> {
    match request.trim_ascii() {
        b"ud" => testing::fault_invalid_opcode(),
        b"gp" => testing::fault_privileged(),
        b"de" => testing::fault_divide(),
        b"panic" => panic!("crash guest: panic on request"),
        _ => testing::fault_null_write(),
    }
    b"crash guest: still alive".to_vec()
}
