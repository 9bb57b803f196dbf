//! Test guest: becomes ready, accepts a connection (its RESPONSE is delivered), then spins
//! forever in ring 3 without answering: for the VMM's timeouts.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

mu2_guest::function!(hang);

fn hang(_request: &[u8]) -> Vec<u8> {
    mu2_guest::testing::notify_host();
    loop {
        core::hint::spin_loop();
    }
}
