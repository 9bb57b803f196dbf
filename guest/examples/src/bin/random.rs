//! Function guest: `{"random":"<64 hex chars>","unix_time_ns":<n>,"generation":<n>}`, 32
//! random bytes, the guest's clock and its restore generation. Forks of one frozen image
//! must each answer differently.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::vec::Vec;

mu2_guest::function!(random);

fn random(_request: &[u8]) -> Vec<u8> {
    let mut bytes = [0u8; 32];
    mu2_guest::fill_random(&mut bytes);
    let mut hex = [0u8; 64];
    mu2_guest::fmt::hex_bytes(&mut hex, &bytes);
    let hex = core::str::from_utf8(&hex).unwrap_or_default();
    format!(
        "{{\"random\":\"{hex}\",\"unix_time_ns\":{},\"generation\":{}}}",
        mu2_guest::now_unix_ns(),
        mu2_guest::generation()
    )
    .into_bytes()
}
