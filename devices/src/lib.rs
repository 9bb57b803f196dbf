//! mu2's emulated devices.
//!
//! - [`persist`]: the [`persist::Persist`] trait devices implement to be saved into a snapshot
//!   and restored from it;
//! - [`serial`]: an 8250 UART console (vm-superio) whose output goes to a writer;
//! - [`sysdev`]: the mu2 system device (readiness, exit, panic, fault reports, WAIT);
//! - [`virtio`]: the virtio-mmio transport and the virtio-vsock device with its host endpoint.
//!
//! Devices never hold guest memory: every call that touches the guest gets it as an argument,
//! so one device object works across a memory remap and its saved state stays plain data.

#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod persist;
pub mod serial;
pub mod sysdev;
pub mod throttle;
pub mod virtio;

/// Guest memory as devices see it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
