//! Function guest: the response is the lowercase hex SHA-256 digest of the request.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use sha2::{Digest, Sha256};

mu2_guest::entry!(main);

fn main() {
    // The first digest runs sha2's CPU feature detection (CPUID: VM exits); do it before
    // the VM reports ready, so no request (and no fork of a snapshot) pays for it.
    let _ = Sha256::digest(b"");
    mu2_guest::serve(sha256)
}

fn sha256(request: &[u8]) -> Vec<u8> {
    mu2_guest::fmt::to_hex(&Sha256::digest(request))
}
