//! The virtio-mmio version 2 register window. Every access is a VM exit: the driver touches
//! these at boot and, for queue notifications, only when the device asks for them.

/// Register offsets (virtio 1.2 §4.2.2).
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const CONFIG: u64 = 0x100;
}

/// "virt" little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const FAILED: u32 = 128;
}

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
