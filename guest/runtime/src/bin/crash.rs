//! Test guest that faults on purpose. Request: `pf` (default: write to address 0, #PF 14),
//! `ud` (`ud2`, #UD 6), `gp` (`hlt` at CPL 3, #GP 13), `de` (divide by zero, #DE 0),
//! `panic` (a Rust panic, reported through the system device).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::arch::asm;

mu2_guest::function!(crash);

fn crash(request: &[u8]) -> Vec<u8> {
    match request.trim_ascii() {
        b"ud" => {
            // SAFETY: raises #UD on purpose; the VMM stops the guest.
            unsafe { asm!("ud2", options(nomem, nostack)) }
        }
        b"gp" => {
            // SAFETY: `hlt` at CPL 3 raises #GP on purpose.
            unsafe { asm!("hlt", options(nomem, nostack)) }
        }
        b"de" => {
            // SAFETY: divides by zero on purpose (#DE); no memory is touched.
            unsafe {
                asm!("xor edx, edx", "xor ecx, ecx", "mov eax, 1", "div ecx", out("eax") _, out("ecx") _, out("edx") _, options(nomem, nostack))
            }
        }
        b"panic" => panic!("crash guest: panic on request"),
        _ => {
            // SAFETY: writes to address 0, which is not mapped, raising #PF on purpose. In
            // asm: a null write in Rust would be undefined behaviour, not a fault.
            unsafe { asm!("mov byte ptr [{0}], 1", in(reg) 0usize, options(nostack)) }
        }
    }
    b"crash guest: still alive".to_vec()
}
