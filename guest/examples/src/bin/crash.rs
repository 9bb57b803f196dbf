//! Test guest that faults on purpose. Request: `pf` (default: write to address 0, #PF 14),
//! `ud` (`ud2`, #UD 6), `gp` (`hlt` at CPL 3, #GP 13), `de` (divide by zero, #DE 0),
//! `panic` (a Rust panic, reported through the system device). On aarch64: `pf` is a data
//! abort, `ud` an `udf`, `gp` a `brk` and `de` an `svc` (see `mu2_guest::fault`).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use mu2_guest::fault;

mu2_guest::function!(crash);

fn crash(request: &[u8]) -> Vec<u8> {
    match request.trim_ascii() {
        b"ud" => fault::invalid_opcode(),
        b"gp" => fault::privileged(),
        b"de" => fault::divide(),
        b"panic" => panic!("crash guest: panic on request"),
        _ => fault::null_write(),
    }
    b"crash guest: still alive".to_vec()
}
