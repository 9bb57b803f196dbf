//! Virtio over MMIO (version 2) with split virtqueues, polled: the guest takes no
//! interrupts.

pub mod mmio;
pub mod queue;

use core::cell::UnsafeCell;

/// Memory shared with the device (rings, buffers). Only ever accessed through raw pointers
/// (volatile for what the device writes), never through references, so the device writing it
/// behind the compiler's back is fine.
#[repr(transparent)]
pub struct Dma<T>(UnsafeCell<T>);

/// A page-aligned page, for rings and buffers.
#[repr(C, align(4096))]
#[derive(Debug, Clone, Copy)]
pub struct Page(pub [u8; 4096]);

impl Page {
    /// A zeroed page.
    pub const ZERO: Self = Self([0; 4096]);
}

// SAFETY: only raw pointers to the contents are handed out; one vCPU.
unsafe impl<T> Sync for Dma<T> {}

impl<T> Dma<T> {
    /// Wraps `value`.
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }

    /// The guest-physical (= virtual, identity-mapped) address of the contents.
    pub fn addr(&self) -> u64 {
        self.0.get() as u64
    }

    /// A raw pointer to the contents.
    pub fn ptr(&self) -> *mut T {
        self.0.get()
    }
}
