//! Function guest for research: request `pages=N spin_us=M` (both optional, any order)
//! writes one byte in each of N distinct fresh heap pages and spins M µs on the TSC; the
//! response says what it did, in the same form.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::alloc::{alloc, dealloc, Layout};
use alloc::format;
use alloc::vec::Vec;

mu2_guest::function!(work);

const PAGE: usize = 4096;

fn work(request: &[u8]) -> Vec<u8> {
    let (pages, spin_us) = match parse(request) {
        Ok(v) => v,
        Err(word) => {
            return format!("error: cannot parse {:?}", core::str::from_utf8(word).unwrap_or("?")).into_bytes()
        }
    };
    if pages > 0 {
        let Some(layout) = pages.checked_mul(PAGE).and_then(|size| Layout::from_size_align(size, PAGE).ok()) else {
            return format!("error: pages={pages} is too many").into_bytes();
        };
        // SAFETY: the layout has a non-zero size.
        let block = unsafe { alloc(layout) };
        if block.is_null() {
            return format!("error: pages={pages} does not fit in the heap").into_bytes();
        }
        for page in 0..pages {
            // SAFETY: `page * PAGE` is within the block just allocated. Volatile, so the
            // write (and its page fault) really happens.
            unsafe { block.add(page * PAGE).write_volatile(1) };
        }
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(block, layout) };
    }
    mu2_guest::spin_us(spin_us as u64);
    format!("pages={pages} spin_us={spin_us}").into_bytes()
}

/// `(pages, spin_us)`, or the word that is not understood.
fn parse(request: &[u8]) -> Result<(usize, usize), &[u8]> {
    let (mut pages, mut spin_us) = (0, 0);
    for word in request.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty()) {
        let (slot, value) = if let Some(v) = word.strip_prefix(b"pages=") {
            (&mut pages, v)
        } else if let Some(v) = word.strip_prefix(b"spin_us=") {
            (&mut spin_us, v)
        } else {
            return Err(word);
        };
        *slot = core::str::from_utf8(value).ok().and_then(|v| v.parse().ok()).ok_or(word)?;
    }
    Ok((pages, spin_us))
}
