//! Bulk memory primitives for the C memory functions (`crate::mem`): 16 bytes at a time,
//! then single bytes. In assembly, so that the compiler cannot turn them back into calls
//! to `memcpy`/`memset`. Guest RAM is Normal memory (MMU on), so unaligned accesses are fine.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest`, lowest address first.
///
/// # Safety
/// Both ranges valid for `n` bytes; if they overlap, `dest` must not be above `src`.
pub unsafe fn copy_forward(dest: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller guarantees the ranges; the loop touches exactly `n` bytes of each.
    unsafe {
        asm!(
            "2: cmp {n}, #16",
            "   b.lo 3f",
            "   ldp {a}, {b}, [{s}], #16",
            "   stp {a}, {b}, [{d}], #16",
            "   sub {n}, {n}, #16",
            "   b 2b",
            "3: cbz {n}, 4f",
            "   ldrb {a:w}, [{s}], #1",
            "   strb {a:w}, [{d}], #1",
            "   sub {n}, {n}, #1",
            "   b 3b",
            "4:",
            d = inout(reg) dest => _, s = inout(reg) src => _, n = inout(reg) n => _,
            a = out(reg) _, b = out(reg) _, options(nostack),
        );
    }
}

/// Copies `n` bytes from `src` to `dest`, highest address first (for overlapping moves up).
///
/// # Safety
/// Both ranges valid for `n` bytes.
pub unsafe fn copy_backward(dest: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller guarantees the ranges; pointers start one past the end and the loop
    // touches exactly `n` bytes of each, downwards.
    unsafe {
        asm!(
            "2: cbz {n}, 3f",
            "   ldrb {a:w}, [{s}, #-1]!",
            "   strb {a:w}, [{d}, #-1]!",
            "   sub {n}, {n}, #1",
            "   b 2b",
            "3:",
            d = inout(reg) dest.wrapping_add(n) => _, s = inout(reg) src.wrapping_add(n) => _,
            n = inout(reg) n => _, a = out(reg) _, options(nostack),
        );
    }
}

/// Sets `n` bytes at `dest` to `c`.
///
/// # Safety
/// `dest` valid for `n` bytes.
pub unsafe fn fill(dest: *mut u8, c: u8, n: usize) {
    let word = u64::from(c) * 0x0101_0101_0101_0101;
    // SAFETY: the caller guarantees the range; the loop writes exactly `n` bytes.
    unsafe {
        asm!(
            "2: cmp {n}, #16",
            "   b.lo 3f",
            "   stp {w}, {w}, [{d}], #16",
            "   sub {n}, {n}, #16",
            "   b 2b",
            "3: cbz {n}, 4f",
            "   strb {w:w}, [{d}], #1",
            "   sub {n}, {n}, #1",
            "   b 3b",
            "4:",
            d = inout(reg) dest => _, n = inout(reg) n => _, w = in(reg) word, options(nostack),
        );
    }
}
