//! The virtio-mmio version 2 register window. Every access is a VM exit: the driver touches
//! these at boot and, for queue notifications, only when the device asks for them.

// The register map, magic value and status bits are the ABI's, shared with the VMM's device.
pub use mu2_abi::virtio_mmio::{regs as reg, status, MAGIC_VALUE, VERSION};

/// One device's register window.
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    base: u64,
}

impl Transport {
    /// The window at `base` (from the command line).
    pub fn new(base: u64) -> Self {
        Self { base }
    }

    /// The window's address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Reads a 32-bit register.
    pub fn read(&self, reg: u64) -> u32 {
        // SAFETY: `base` names a virtio-mmio window from the command line, identity-mapped,
        // user-accessible and uncached; a register read has no effect on guest memory.
        unsafe { crate::arch::mmio_read32(self.base + reg) }
    }

    /// Writes a 32-bit register.
    pub fn write(&self, reg: u64, value: u32) {
        // SAFETY: as in `read`; the registers written here never make the device write
        // memory the driver did not hand it.
        unsafe { crate::arch::mmio_write32(self.base + reg, value) }
    }

    /// Writes a 64-bit address as its low/high register pair (high = low + 4).
    pub fn write_addr(&self, low_reg: u64, addr: u64) {
        self.write(low_reg, addr as u32);
        self.write(low_reg + 4, (addr >> 32) as u32);
    }
}
