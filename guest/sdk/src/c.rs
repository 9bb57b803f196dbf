//! The C interface (feature `c`): with it, the SDK builds as a static library for a function
//! written in C, declared in `include/mu2.h`. The C program defines `mu2_function`; the
//! library's entry boots, serves each request to it and sends what it put in the response.

use alloc::alloc::Layout;
use alloc::vec::Vec;
use core::ffi::{c_int, c_void};
use core::ptr::null_mut;

/// A response being built by a C function (`mu2_response`, opaque in C). It belongs to the
/// SDK, which sends it and frees it when the function returns.
#[derive(Debug, Default)]
pub struct Response {
    bytes: Vec<u8>,
}

extern "C" {
    // The response is opaque to C, hence `void *` here.
    fn mu2_function(request: *const u8, len: usize, response: *mut c_void) -> c_int;
}

/// Runs the C function on one request: a non-zero return is a function error naming the value.
fn call(request: &[u8]) -> Result<Vec<u8>, alloc::string::String> {
    let mut response = Response::default();
    // SAFETY: `mu2_function` is defined by the C program with the signature mu2.h declares;
    // mu2.h lets it read `len` bytes at `request`, and reach `response` only through the
    // functions below, both during the call only, and both outlive the call.
    let status = unsafe { mu2_function(request.as_ptr(), request.len(), (&raw mut response).cast()) };
    if status != 0 {
        return Err(alloc::format!("mu2_function returned {status}"));
    }
    Ok(response.bytes)
}

#[no_mangle]
fn mu2_main() {
    crate::serve(call)
}

/// The response behind a C pointer, if it is not null.
///
/// # Safety
/// `response` is null or the pointer the SDK passed to the running `mu2_function`.
unsafe fn response_mut<'a>(response: *mut Response) -> Option<&'a mut Response> {
    // SAFETY: by the caller's contract, a non-null pointer is the live `Response` of `call`,
    // which nothing else references while the C function runs.
    unsafe { response.as_mut() }
}

/// Appends `len` bytes at `data` to the response. Returns 0, or -1 if the heap is exhausted
/// or `response` is null.
///
/// # Safety
/// `response` is the pointer given to `mu2_function`; `data` points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn mu2_response_write(response: *mut Response, data: *const u8, len: usize) -> c_int {
    // SAFETY: the caller passes the pointer `mu2_function` was given.
    let Some(response) = (unsafe { response_mut(response) }) else { return -1 };
    if len == 0 {
        return 0;
    }
    if data.is_null() || response.bytes.try_reserve(len).is_err() {
        return -1;
    }
    // SAFETY: the caller guarantees `len` readable bytes at the non-null `data`.
    response.bytes.extend_from_slice(unsafe { core::slice::from_raw_parts(data, len) });
    0
}

/// Makes the response `len` zero bytes and returns where they are, for the function to fill
/// in place (valid until it returns or calls a `mu2_response_*` function again); null if the
/// heap is exhausted or `response` is null.
///
/// # Safety
/// `response` is the pointer given to `mu2_function`.
#[no_mangle]
pub unsafe extern "C" fn mu2_response_alloc(response: *mut Response, len: usize) -> *mut u8 {
    // SAFETY: the caller passes the pointer `mu2_function` was given.
    let Some(response) = (unsafe { response_mut(response) }) else { return null_mut() };
    response.bytes.clear();
    if response.bytes.try_reserve_exact(len).is_err() {
        return null_mut();
    }
    response.bytes.resize(len, 0);
    response.bytes.as_mut_ptr()
}

/// Room before each `mu2_malloc` block for its size, keeping the block 16-byte aligned.
const HEADER: usize = 16;

/// `len` bytes from the SDK's heap, 16-byte aligned; null if it is exhausted.
#[no_mangle]
pub extern "C" fn mu2_malloc(len: usize) -> *mut c_void {
    let Some(layout) = len.checked_add(HEADER).and_then(|total| Layout::from_size_align(total, HEADER).ok()) else {
        return null_mut();
    };
    // SAFETY: the layout's size is at least HEADER, so not zero.
    let base = unsafe { alloc::alloc::alloc(layout) };
    if base.is_null() {
        return null_mut();
    }
    // SAFETY: `base` is a fresh block of at least HEADER bytes aligned to 16, so its first
    // word is writable and `base + HEADER` is inside or one past the block.
    unsafe {
        base.cast::<usize>().write(layout.size());
        base.add(HEADER).cast()
    }
}

/// Frees a block from `mu2_malloc`; null is ignored.
///
/// # Safety
/// `block` is null or came from `mu2_malloc` and was not freed since.
#[no_mangle]
pub unsafe extern "C" fn mu2_free(block: *mut c_void) {
    if block.is_null() {
        return;
    }
    // SAFETY: `block` came from `mu2_malloc`, which put the block's total size HEADER bytes
    // before it, at the start of an allocation made with that size and alignment HEADER.
    unsafe {
        let base = block.cast::<u8>().sub(HEADER);
        let size = base.cast::<usize>().read();
        alloc::alloc::dealloc(base, Layout::from_size_align_unchecked(size, HEADER));
    }
}

/// Writes `len` bytes at `text` to the console (slow: for debugging, not the serve path).
///
/// # Safety
/// `text` points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn mu2_log(text: *const u8, len: usize) {
    if text.is_null() {
        return;
    }
    // SAFETY: the caller guarantees `len` readable bytes at the non-null `text`.
    crate::console::write_bytes(unsafe { core::slice::from_raw_parts(text, len) });
}

/// 64 random bits from the SDK's generator (reseeded from the host in every fork).
#[no_mangle]
pub extern "C" fn mu2_random_u64() -> u64 {
    crate::random_u64()
}

/// The wall-clock time, nanoseconds since the Unix epoch (rebased from the host in every fork).
#[no_mangle]
pub extern "C" fn mu2_now_unix_ns() -> u64 {
    crate::now_unix_ns()
}
