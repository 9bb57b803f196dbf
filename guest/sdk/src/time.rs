//! Timekeeping on the TSC (`rdtsc` runs natively at CPL 3): the frequency comes from
//! `mu2.tsc_khz=` (or CPUID at boot), the wall clock from `HostInfo` (at boot if the VMM
//! wrote one, and after every restore).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch;

/// Used when neither the command line nor CPUID gives the frequency: timing is then
/// approximate.
const FALLBACK_TSC_KHZ: u64 = 2_000_000;

static TSC_KHZ: AtomicU64 = AtomicU64::new(FALLBACK_TSC_KHZ);
static BASE_TSC: AtomicU64 = AtomicU64::new(0);
static BASE_UNIX_NS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn init(tsc_khz: Option<u64>) {
    let khz = tsc_khz.filter(|&k| k > 0).or_else(arch::counter_khz).unwrap_or(FALLBACK_TSC_KHZ);
    TSC_KHZ.store(khz, Ordering::Relaxed);
    BASE_TSC.store(arch::rdtsc(), Ordering::Relaxed);
}

/// Sets the wall clock: `unix_ns` was the time when the TSC read `tsc`.
pub(crate) fn rebase(unix_ns: u64, tsc: u64) {
    // A zero TSC from the host means "now": the host cannot cheaply read this vCPU's TSC, and
    // the guest reads it within microseconds of the host's clock reading.
    let tsc = if tsc == 0 { rdtsc() } else { tsc };
    BASE_TSC.store(tsc, Ordering::Relaxed);
    BASE_UNIX_NS.store(unix_ns, Ordering::Relaxed);
}

/// The TSC frequency in kHz.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Reads the TSC.
pub fn rdtsc() -> u64 {
    arch::rdtsc()
}

/// Converts TSC ticks to nanoseconds.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    (u128::from(ticks) * 1_000_000 / u128::from(tsc_khz())) as u64
}

/// Nanoseconds since the Unix epoch. Without a `HostInfo` from the VMM (cold boot under a
/// VMM that writes none, or another VMM), this counts from boot instead.
pub fn now_unix_ns() -> u64 {
    let elapsed = rdtsc().wrapping_sub(BASE_TSC.load(Ordering::Relaxed));
    BASE_UNIX_NS.load(Ordering::Relaxed).wrapping_add(ticks_to_ns(elapsed))
}

/// Busy-waits `us` microseconds on the TSC (natively, in ring 3).
pub fn spin_us(us: u64) {
    let start = rdtsc();
    let ticks = us.saturating_mul(tsc_khz()) / 1000;
    while rdtsc().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}
