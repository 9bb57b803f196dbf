//! aarch64: the entry, the console, MMIO accessors, the counter, entropy and the crash
//! helpers. Everything else of the runtime is shared with x86_64.
//!
//! **mu2 entry**: the VMM enters at EL1h with the MMU, caches and FP/SIMD enabled, its own
//! identity-mapped page tables (page 0 unmapped, the MMIO window Device memory), a vector
//! table whose stubs report faults to the system device, SP = `STACK_TOP` and X0 = the
//! devicetree. `.bss` is already zero (the ELF was loaded into zeroed memory). The command
//! line is `/chosen/bootargs` and RAM is `/memory/reg`.

mod fdt;
#[cfg(not(test))]
mod mem;

use core::arch::asm;
#[cfg(not(test))]
use core::arch::global_asm;

#[cfg(not(test))]
pub use mem::{copy_backward, copy_forward, fill};

#[cfg(not(test))]
global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "    mov x29, xzr",
    "    mov x30, xzr",
    "    mov x1, xzr",
    "    bl {rust_start}",
    "    udf #0",
    ".text",
    rust_start = sym crate::rust_start,
);

/// The devicetree the VMM passed in X0, as bytes (bounded by its header and `fdt::MAX_SIZE`).
fn devicetree(addr: u64) -> Option<&'static [u8]> {
    if addr < 4096 || addr % 8 != 0 {
        return None;
    }
    // SAFETY: the VMM passes the address of a devicetree in RAM; 8 header bytes are readable.
    let header = unsafe { core::slice::from_raw_parts(addr as *const u8, 8) };
    let size = fdt::total_size(header)?;
    if !(40..=fdt::MAX_SIZE).contains(&size) {
        return None;
    }
    // SAFETY: the header says the blob spans `size` bytes, bounded above; the VMM wrote it
    // into RAM and nothing modifies it.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, size) })
}

/// Address of the NUL-terminated command line, or 0 if there is none.
pub fn cmdline_addr(boot_arg: u64) -> u64 {
    devicetree(boot_arg).and_then(fdt::bootargs).map_or(0, |args| args.as_ptr() as u64)
}

/// The heap: from the image's end to the end of the RAM region holding the image.
pub fn heap_range(boot_arg: u64, image_start: u64, image_end: u64) -> Option<(u64, u64)> {
    let blob = devicetree(boot_arg)?;
    let end = fdt::ram_end_around(blob, image_start, image_end)?.min(mu2_abi::layout::MMIO_BASE);
    (end > image_end).then_some((image_end, end))
}

/// Writes one byte to the console: the 8250's transmit register (MMIO).
#[inline(always)]
pub fn console_byte(value: u8) {
    // SAFETY: the console's transmit register is a Device-memory MMIO byte register.
    unsafe { mmio_write8(mu2_abi::layout::SERIAL_MMIO, value) };
}

/// Stops the machine without a system device: PSCI SYSTEM_OFF.
pub fn power_off() {
    // SAFETY: an SMCCC call through HVC (PSCI 0.2, handled by KVM); it clobbers x0-x3.
    unsafe { asm!("hvc #0", inout("x0") 0x8400_0008u64 => _, out("x1") _, out("x2") _, out("x3") _, options(nostack)) };
}

/// Reads a 32-bit device register; the barrier orders later memory reads after it.
///
/// # Safety
/// `addr` is a mapped MMIO register.
#[inline(always)]
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    let value: u32;
    // SAFETY: the caller guarantees a mapped register. A plain `ldr` with no writeback, so
    // that the trap carries a valid syndrome for KVM to emulate.
    unsafe { asm!("ldr {v:w}, [{a}]", "dsb ld", a = in(reg) addr, v = out(reg) value, options(nostack)) };
    value
}

/// Writes a 32-bit device register after all earlier memory writes (the rings).
///
/// # Safety
/// `addr` is a mapped MMIO register.
#[inline(always)]
pub unsafe fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: as for `mmio_read32`.
    unsafe { asm!("dsb st", "str {v:w}, [{a}]", a = in(reg) addr, v = in(reg) value, options(nostack)) };
}

/// Writes a 64-bit device register after all earlier memory writes.
///
/// # Safety
/// `addr` is a mapped MMIO register.
#[inline(always)]
pub unsafe fn mmio_write64(addr: u64, value: u64) {
    // SAFETY: as for `mmio_read32`.
    unsafe { asm!("dsb st", "str {v}, [{a}]", a = in(reg) addr, v = in(reg) value, options(nostack)) };
}

/// Writes an 8-bit device register.
///
/// # Safety
/// `addr` is a mapped MMIO register.
#[inline(always)]
unsafe fn mmio_write8(addr: u64, value: u8) {
    // SAFETY: as for `mmio_read32`.
    unsafe { asm!("dsb st", "strb {v:w}, [{a}]", a = in(reg) addr, v = in(reg) value, options(nostack)) };
}

/// The virtual counter (CNTVCT_EL0); the runtime's clock ticks, under x86's name.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let value: u64;
    // SAFETY: reads the virtual counter; `isb` keeps the read from being hoisted.
    unsafe { asm!("isb", "mrs {v}, cntvct_el0", v = out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// The counter frequency in kHz (CNTFRQ_EL0).
pub fn counter_khz() -> Option<u64> {
    let hz: u64;
    // SAFETY: reads a system register.
    unsafe { asm!("mrs {v}, cntfrq_el0", v = out(reg) hz, options(nomem, nostack, preserves_flags)) };
    (hz >= 1000).then_some(hz / 1000)
}

/// Whether the CPU has RNDR (FEAT_RNG: ID_AA64ISAR0_EL1 bits 63:60).
pub fn has_rdrand() -> bool {
    let isar0: u64;
    // SAFETY: reads an ID register (allowed at EL1).
    unsafe { asm!("mrs {v}, id_aa64isar0_el1", v = out(reg) isar0, options(nomem, nostack, preserves_flags)) };
    isar0 >> 60 != 0
}

/// One RNDR value, retried a few times; `None` if it keeps failing.
pub fn rdrand() -> Option<u64> {
    for _ in 0..10 {
        let value: u64;
        let ok: u64;
        // SAFETY: only called after the ID register reported RNDR; it writes a register and
        // NZCV (Z set on failure).
        unsafe {
            asm!("mrs {v}, s3_3_c2_c4_0", "cset {ok}, ne", v = out(reg) value, ok = out(reg) ok, options(nomem, nostack))
        };
        if ok != 0 {
            return Some(value);
        }
    }
    None
}

/// Spins forever: where a stop request went unanswered.
pub fn spin_forever() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// Faults on purpose, for the crash guest: `udf` (exception class 0x00).
pub fn fault_invalid_opcode() {
    // SAFETY: raises an undefined-instruction exception on purpose; the VMM stops the guest.
    unsafe { asm!("udf #0", options(nomem, nostack)) }
}

/// Faults on purpose: `brk` (exception class 0x3c). aarch64 at EL1 has no x86-style
/// privilege fault, so the crash guest's `gp` is a breakpoint here.
pub fn fault_privileged() {
    // SAFETY: raises a breakpoint exception on purpose.
    unsafe { asm!("brk #0", options(nomem, nostack)) }
}

/// Faults on purpose: `svc` (exception class 0x15). aarch64 integer division by zero does
/// not trap, so the crash guest's `de` is a supervisor call here.
pub fn fault_divide() {
    // SAFETY: raises an SVC exception on purpose; no handler returns from it.
    unsafe { asm!("svc #0", options(nomem, nostack)) }
}

/// Faults on purpose: a write to address 0, which is not mapped (a data abort, class 0x25).
pub fn fault_null_write() {
    // SAFETY: writes to address 0, unmapped, on purpose. In asm: a null write in Rust would be
    // undefined behaviour, not a fault.
    unsafe { asm!("strb wzr, [{0}]", in(reg) 0usize, options(nostack)) }
}

/// The unwinding personality the prebuilt aarch64 `core` refers to (it is built with
/// `panic=unwind`); guests abort on panic, so it is never called.
#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
