//! The memory primitives the compiler expects from libc, which a bare-metal guest lacks.
//! The bulk loops are the architecture's (x86_64: `rep movsb`/`rep stosb`): short, and the
//! compiler cannot turn them back into a call to the function being defined.

use crate::arch;

/// # Safety
/// `dest` and `src` are valid for `n` bytes and do not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint.
    unsafe { arch::copy_forward(dest, src, n) };
    dest
}

/// # Safety
/// `dest` and `src` are valid for `n` bytes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // Copying forwards is safe: dest is below src or past its end.
        // SAFETY: forwarded from the caller's guarantee.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: forwarded from the caller's guarantee; dest is above src, so copy downwards.
    unsafe { arch::copy_backward(dest, src, n) };
    dest
}

/// # Safety
/// `dest` is valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe { arch::fill(dest, c as u8, n) };
    dest
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and both ranges are valid for n bytes.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded from the caller's guarantee.
    unsafe { memcmp(a, b, n) }
}

/// The prebuilt `alloc` crate has unwinding landing pads that name this symbol; with
/// `panic = "abort"` (and a panic handler that never returns) nothing ever unwinds, so it is
/// never called.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::arch::spin_forever()
}
