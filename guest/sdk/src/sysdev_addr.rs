//! Where the mu2 system device is: set once from the command line, read by the device's
//! driver (`sysdev`) and by the architecture's fault stubs, which report through it. A leaf
//! module, so that both can use it without using each other.

use core::sync::atomic::{AtomicU64, Ordering};

/// Base address of the system device, 0 if there is none. The Linux-entry fault stubs read
/// it by name (it has the layout of a `u64`).
#[no_mangle]
pub(crate) static MU2_SYSDEV_BASE: AtomicU64 = AtomicU64::new(0);

/// Records the address the command line gave.
pub(crate) fn set(addr: u64) {
    MU2_SYSDEV_BASE.store(addr, Ordering::Relaxed);
}

/// The address, or `None` where the VMM gave none (it is not mu2).
pub(crate) fn get() -> Option<u64> {
    match MU2_SYSDEV_BASE.load(Ordering::Relaxed) {
        0 => None,
        addr => Some(addr),
    }
}
