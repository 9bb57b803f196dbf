//! Function guest: the response is the request, byte for byte.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

mu2_guest::function!(echo);

fn echo(request: &[u8]) -> Vec<u8> {
    request.to_vec()
}
