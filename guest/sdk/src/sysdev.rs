//! The mu2 system device: readiness, waiting, exit and panic reports. Every access is one VM
//! exit (~45 µs at CPL 3). Absent under other VMMs (no `mu2.sysdev=` on the command line).

use mu2_abi::{sysdev, HostInfo, ReadyInfo, Text};

/// Whether the VMM is mu2 (it gave the system device's address).
pub fn present() -> bool {
    base().is_some()
}

fn base() -> Option<u64> {
    crate::sysdev_addr::get()
}

fn write32(base: u64, reg: u64, value: u32) {
    // SAFETY: `base` came from the command line's `mu2.sysdev=`, an identity-mapped,
    // user-accessible MMIO window; writing a register is one exit with no memory effect.
    unsafe { crate::arch::mmio_write32(base + reg, value) }
}

fn write64(base: u64, reg: u64, value: u64) {
    // SAFETY: as in `write32`.
    unsafe { crate::arch::mmio_write64(base + reg, value) }
}

/// Parks the vCPU until a virtio device has work; returns the [`mu2_abi::wait`] bits, or
/// `None` without a system device.
pub fn wait() -> Option<u32> {
    let base = base()?;
    // SAFETY: as in `write32`; the read blocks in the VMM until there is work.
    Some(unsafe { crate::arch::mmio_read32(base + sysdev::WAIT) })
}

/// Reports readiness with a `ReadyInfo` that must stay in place (a static).
pub(crate) fn ready(info: *const ReadyInfo) {
    if let Some(base) = base() {
        write64(base, sysdev::READY, info as u64);
    }
}

/// Asks the VMM to stop the guest with `code`; returns if there is no system device.
pub(crate) fn exit(code: u32) {
    if let Some(base) = base() {
        write32(base, sysdev::EXIT, code);
    }
}

/// Reports a panic message held in `text` (a static); returns if there is no system device.
pub(crate) fn panic(text: *const Text) {
    if let Some(base) = base() {
        write64(base, sysdev::PANIC, text as u64);
    }
}

/// Reads the `HostInfo` the VMM wrote (only meaningful under mu2).
pub(crate) fn host_info() -> HostInfo {
    // SAFETY: HOST_INFO is a guest RAM page below the image, identity-mapped; the VMM writes
    // it while the vCPU is stopped, so a plain (volatile) read sees a consistent value.
    unsafe { (mu2_abi::layout::HOST_INFO as *const HostInfo).read_volatile() }
}
