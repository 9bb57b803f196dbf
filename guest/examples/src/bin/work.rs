//! Function guest for research: request `pages=N spin_us=M` (both optional, any order)
//! writes one byte in each of N distinct fresh heap pages and spins M µs on the TSC; the
//! response says what it did, in the same form. A request it cannot carry out is a function
//! error, with a message saying why.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

mu2_guest::function!(work);

const PAGE: usize = 4096;

/// Why a request cannot be carried out.
#[derive(Debug)]
enum WorkError {
    /// A word that is not `pages=N` or `spin_us=M` with N, M numbers.
    Unparsable(String),
    /// More pages than an allocation can span.
    TooManyPages(usize),
    /// The pages do not fit in the heap.
    OutOfHeap(usize),
}

impl fmt::Display for WorkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkError::Unparsable(word) => {
                write!(f, "cannot parse {word:?}: the request is `pages=N spin_us=M`, both optional")
            }
            WorkError::TooManyPages(pages) => write!(f, "pages={pages} is too many"),
            WorkError::OutOfHeap(pages) => write!(f, "pages={pages} does not fit in the heap"),
        }
    }
}

fn work(request: &[u8]) -> Result<Vec<u8>, WorkError> {
    let (pages, spin_us) =
        parse(request).map_err(|word| WorkError::Unparsable(String::from_utf8_lossy(word).into_owned()))?;
    if pages > 0 {
        let size = pages.checked_mul(PAGE).ok_or(WorkError::TooManyPages(pages))?;
        let mut block: Vec<u8> = Vec::new();
        block.try_reserve_exact(size).map_err(|_| WorkError::OutOfHeap(pages))?;
        // Offsets a page apart land on `pages` distinct pages, aligned or not.
        let spare = block.spare_capacity_mut();
        for page in 0..pages {
            spare[page * PAGE].write(1);
        }
        // The writes (and their page faults) must really happen, though nothing reads them.
        core::hint::black_box(&block);
    }
    mu2_guest::spin_us(spin_us as u64);
    Ok(format!("pages={pages} spin_us={spin_us}").into_bytes())
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
