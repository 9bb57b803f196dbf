//! The global allocator: a first-fit free list (`linked_list_allocator`) over the RAM from
//! the end of the image to the end of its e820 region. First fit keeps a request's
//! allocations low in the heap, on pages that earlier requests already touched.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{null_mut, NonNull};
use linked_list_allocator::Heap;

use crate::global::Global;

struct GuestHeap(Global<Heap>);

#[cfg_attr(not(test), global_allocator)]
static HEAP: GuestHeap = GuestHeap(Global::new(Heap::empty()));

/// Hands `[start, end)` to the allocator. Called once, at boot.
pub(crate) fn init(start: u64, end: u64) {
    HEAP.0.with(|heap| {
        // SAFETY: the range is RAM from the e820 map, past the image (so unused by anything
        // else), identity-mapped and writable; this runs once, before any allocation.
        unsafe { heap.init(start as *mut u8, (end - start) as usize) }
    });
}

/// Bytes the allocator manages.
pub fn size() -> usize {
    HEAP.0.with(|heap| heap.size())
}

/// Bytes currently free.
pub fn free() -> usize {
    HEAP.0.with(|heap| heap.free())
}

// SAFETY: allocation goes through `Heap`, which returns blocks that fit the layout and never
// overlap; `Global` serializes access (one vCPU, no interrupts).
unsafe impl GlobalAlloc for GuestHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0.with(|heap| heap.allocate_first_fit(layout).map_or(null_mut(), NonNull::as_ptr))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(ptr) = NonNull::new(ptr) {
            // SAFETY: the caller passes a block this allocator returned, with its layout.
            self.0.with(|heap| unsafe { heap.deallocate(ptr, layout) });
        }
    }
}
