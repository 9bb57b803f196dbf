//! A cell for the runtime's mutable global state.
//!
//! The guest has one vCPU and takes no interrupts (exceptions stop it), so the only way to
//! reach a global twice at once is re-entrancy: a user function calling back into the
//! runtime while the runtime holds the state. The busy flag turns that into a panic instead
//! of aliased `&mut`.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// Mutable global state, borrowed for the duration of a closure.
pub struct Global<T> {
    value: UnsafeCell<T>,
    busy: AtomicBool,
}

// SAFETY: one vCPU, no interrupt handlers touching these; `with` refuses re-entrant borrows,
// so at most one `&mut T` exists at any time.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    /// A cell holding `value`.
    pub const fn new(value: T) -> Self {
        Self { value: UnsafeCell::new(value), busy: AtomicBool::new(false) }
    }

    /// Runs `f` with exclusive access to the value. Panics if already borrowed.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        assert!(!self.busy.swap(true, Ordering::Acquire), "mu2 runtime state re-entered");
        // SAFETY: the busy flag guarantees this is the only live reference (see above).
        let result = f(unsafe { &mut *self.value.get() });
        self.busy.store(false, Ordering::Release);
        result
    }
}
