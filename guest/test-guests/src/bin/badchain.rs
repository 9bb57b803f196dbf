//! Test guest for the VMM's hardening: the request names one malformation (`addr`, `dir`,
//! `short`, `len`, `cycle`, `avail`, `rxdir`; see `mu2_guest::testing::Malformation`); the
//! guest submits it on its virtqueues and WAITs forever. The VMM must turn each into an
//! error, not a panic or a hang. An unknown name is a function error.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use mu2_guest::testing::{inject, wait_forever, Malformation};

mu2_guest::function!(badchain);

fn badchain(request: &[u8]) -> Result<Vec<u8>, &'static str> {
    let bad =
        Malformation::parse(request).ok_or("unknown malformation (addr, dir, short, len, cycle, avail, rxdir)")?;
    if !inject(bad) {
        return Err("no connection or no free TX slot");
    }
    wait_forever()
}
