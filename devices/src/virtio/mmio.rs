//! The virtio-mmio transport, version 2 (virtio 1.x, no legacy interface).
//!
//! [`MmioTransport`] owns one [`VirtioDevice`] and implements its 4 KiB register window: feature
//! negotiation, the device status state machine, queue configuration and the device
//! configuration space from offset 0x100. The VMM forwards MMIO exits to [`MmioTransport::read`]
//! and [`MmioTransport::write`] and calls [`MmioTransport::poll`] when the guest waits.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

pub use self::persist::{MmioRestoreError, MmioTransportState};
use super::{VirtioDevice, VirtioError};
use crate::throttle::{Throttled, GUEST_WARNING_INTERVAL};
use crate::GuestMemoryMmap;

mod persist;

pub use mu2_abi::virtio_mmio::{regs, MAGIC_VALUE, VERSION};
/// The vendor ID the transport reports: "mu2v" little-endian. Drivers do not interpret it.
pub const VENDOR_ID: u32 = 0x7632_756d;

/// Size of the register window.
pub const WINDOW_SIZE: u64 = 0x1000;

/// Most recorded errors kept for [`MmioTransport::take_errors`]; later ones are only counted.
const MAX_RECORDED_ERRORS: usize = 64;

/// The maximum size the transport offers for a queue the device says has `max` entries.
///
/// Queue::new wants a power of two in 1..=32768; a device's odd value is rounded down rather
/// than refused, so construction cannot fail.
fn queue_max_size(max: u16) -> u16 {
    if max == 0 {
        1
    } else {
        1u16 << (15 - max.leading_zeros())
    }
}

/// Misuse of the transport by the driver. None of them is fatal: the access is ignored.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A register access that is not 4 bytes wide and aligned, or a config access of another
    /// width than 1, 2, 4 or 8 bytes.
    #[error("{len}-byte access at offset {offset:#x} is not allowed")]
    BadAccess {
        /// Offset in the window.
        offset: u64,
        /// Access width.
        len: usize,
    },
    /// Read of a write-only or undefined register.
    #[error("read of unreadable register {0:#x}")]
    NotReadable(u64),
    /// Write to a read-only or undefined register.
    #[error("write to unwritable register {0:#x}")]
    NotWritable(u64),
    /// A status change the state machine does not allow.
    #[error("invalid status transition {from:#x} -> {to:#x}")]
    InvalidStatus {
        /// Status before.
        from: u32,
        /// Status written.
        to: u32,
    },
    /// FEATURES_OK refused: the driver accepted unknown features or not VERSION_1.
    #[error("driver features {driver:#x} not acceptable (device offers {device:#x})")]
    FeaturesRejected {
        /// What the driver accepted.
        driver: u64,
        /// What the device offers.
        device: u64,
    },
    /// Driver features written outside the DRIVER..FEATURES_OK window.
    #[error("driver features written in status {0:#x}")]
    FeaturesLocked(u32),
    /// Queue register written after the queue became ready or after DRIVER_OK.
    #[error("queue {queue} configuration is locked")]
    QueueLocked {
        /// Selected queue.
        queue: u32,
    },
    /// Queue register accessed with a QueueSel naming no queue.
    #[error("queue {0} does not exist")]
    NoSuchQueue(u32),
    /// virtio-queue refused a size or address.
    #[error("queue {queue}: {source}")]
    QueueConfig {
        /// Selected queue.
        queue: u32,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// A ready queue lies outside guest memory at DRIVER_OK.
    #[error("queue {0} is not valid at DRIVER_OK")]
    InvalidQueue(usize),
    /// The device refused activation.
    #[error("device activation failed")]
    Activation(#[source] VirtioError),
    /// The device reported an unrecoverable error while processing its queues.
    #[error("device needs reset")]
    DeviceFailed,
    /// Writing the interrupt eventfd failed.
    #[error("interrupt eventfd write failed")]
    Irq(#[source] std::io::Error),
}

/// The virtio-mmio transport for one device.
#[derive(Debug)]
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    /// Queue configuration as the driver writes it; the device gets copies at activation.
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver accepted a feature bit above 63 (none exist).
    unknown_features: bool,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    activated: bool,
    wakeup: bool,
    irq: Option<EventFd>,
    errors: Vec<MmioError>,
    error_count: u64,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`; its queues start unconfigured.
    pub fn new(device: D) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| {
                let size = queue_max_size(max);
                if size != max {
                    log::warn!("virtio-mmio: queue max size {max} rounded to {size}");
                }
                Queue::new(size).ok()
            })
            .collect();
        MmioTransport {
            device,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            unknown_features: false,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            activated: false,
            wakeup: false,
            irq: None,
            errors: Vec::new(),
            error_count: 0,
        }
    }

    /// Handles a guest read of `data.len()` bytes at `offset` in the register window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.read_config(offset - regs::CONFIG, data);
            } else {
                data.fill(0);
                self.error(MmioError::BadAccess { offset, len: data.len() });
            }
            return;
        }
        if data.len() != 4 {
            self.bad_access(offset, data);
            return;
        }
        let Ok(out) = <&mut [u8; 4]>::try_from(data) else {
            return;
        };
        if offset % 4 != 0 {
            *out = [0; 4];
            self.error(MmioError::BadAccess { offset, len: 4 });
            return;
        }
        let value = match offset {
            regs::MAGIC_VALUE => MAGIC_VALUE,
            regs::VERSION => VERSION,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            regs::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            regs::INTERRUPT_STATUS => self.interrupt_status,
            regs::STATUS => self.status,
            regs::CONFIG_GENERATION => self.config_generation,
            _ => {
                self.error(MmioError::NotReadable(offset));
                0
            }
        };
        *out = value.to_le_bytes();
    }

    /// Handles a guest write of `data` at `offset`. A QueueNotify write polls the device.
    pub fn write(&mut self, mem: &GuestMemoryMmap, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.write_config(offset - regs::CONFIG, data);
            } else {
                self.error(MmioError::BadAccess { offset, len: data.len() });
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.error(MmioError::BadAccess { offset, len: data.len() });
            return;
        };
        if offset % 4 != 0 {
            self.error(MmioError::BadAccess { offset, len: 4 });
            return;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            regs::DRIVER_FEATURES => self.write_driver_features(value),
            regs::QUEUE_SEL => self.queue_sel = value,
            regs::QUEUE_NUM
            | regs::QUEUE_READY
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_DRIVER_LOW
            | regs::QUEUE_DRIVER_HIGH
            | regs::QUEUE_DEVICE_LOW
            | regs::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, value),
            regs::QUEUE_NOTIFY => {
                self.poll(mem);
            }
            regs::INTERRUPT_ACK => self.interrupt_status &= !value,
            regs::STATUS => self.write_status(mem, value),
            _ => self.error(MmioError::NotWritable(offset)),
        }
    }

    /// Lets the device process its queues (if activated). When it added used buffers, sets
    /// InterruptStatus bit 0 and the wake-up flag, and signals the irq if the driver wants it.
    /// Returns whether used buffers were added.
    pub fn poll(&mut self, mem: &GuestMemoryMmap) -> bool {
        if !self.activated || self.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) != 0 {
            return false;
        }
        let used = self.device.process(mem);
        if used {
            self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
            self.wakeup = true;
            if self.device.interrupt_wanted() {
                self.signal_irq();
            }
        }
        if self.device.needs_reset() {
            self.error(MmioError::DeviceFailed);
            self.needs_reset();
        }
        used
    }

    /// Returns and clears "used buffers were added since the last call" (what a WAIT reports).
    pub fn take_wakeup(&mut self) -> bool {
        std::mem::take(&mut self.wakeup)
    }

    /// Sets the eventfd written when the device interrupts the driver.
    pub fn set_irq(&mut self, irq: Option<EventFd>) {
        self.irq = irq;
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably (for its host-side API).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether the driver set DRIVER_OK and the device accepted its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Driver misuse recorded since the last call (each is also logged). At most a few dozen
    /// are kept; [`MmioTransport::error_count`] counts all.
    pub fn take_errors(&mut self) -> Vec<MmioError> {
        std::mem::take(&mut self.errors)
    }

    /// Number of driver misuses since the transport was created.
    pub fn error_count(&self) -> u64 {
        self.error_count
    }

    fn error(&mut self, e: MmioError) {
        // A guest can repeat its misuse at will: the log says so once per interval.
        static WARNINGS: Throttled = Throttled::new(GUEST_WARNING_INTERVAL);
        WARNINGS.warn(format_args!("virtio-mmio: {e}"));
        self.error_count += 1;
        if self.errors.len() < MAX_RECORDED_ERRORS {
            self.errors.push(e);
        }
    }

    fn bad_access(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        self.error(MmioError::BadAccess { offset, len: data.len() });
    }

    fn signal_irq(&mut self) {
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.write(1) {
                self.error(MmioError::Irq(e));
            }
        }
    }

    fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
        self.wakeup = true;
        self.signal_irq();
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    fn write_driver_features(&mut self, value: u32) {
        let s = self.status;
        if s & VIRTIO_CONFIG_S_DRIVER == 0 || s & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            self.error(MmioError::FeaturesLocked(s));
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
            // Feature words beyond 64 bits: the device offers none, so any set bit there is
            // unknown and makes FEATURES_OK fail.
            _ => self.unknown_features |= value != 0,
        }
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        let sel = self.queue_sel;
        let driver_ok = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        let Some(q) = usize::try_from(sel).ok().and_then(|i| self.queues.get_mut(i)) else {
            self.error(MmioError::NoSuchQueue(sel));
            return;
        };
        // Only QueueReady may be written on a ready queue (to clear it), never after DRIVER_OK.
        if driver_ok || (q.ready() && offset != regs::QUEUE_READY) {
            self.error(MmioError::QueueLocked { queue: sel });
            return;
        }
        let lo = |addr: u64| GuestAddress((addr & !0xffff_ffff) | u64::from(value));
        let hi = |addr: u64| GuestAddress((addr & 0xffff_ffff) | (u64::from(value) << 32));
        let result = match offset {
            regs::QUEUE_NUM => {
                u16::try_from(value).map_err(|_| virtio_queue::Error::InvalidSize).and_then(|size| q.try_set_size(size))
            }
            regs::QUEUE_READY => {
                q.set_ready(value == 1);
                Ok(())
            }
            regs::QUEUE_DESC_LOW => q.try_set_desc_table_address(lo(q.desc_table())),
            regs::QUEUE_DESC_HIGH => q.try_set_desc_table_address(hi(q.desc_table())),
            regs::QUEUE_DRIVER_LOW => q.try_set_avail_ring_address(lo(q.avail_ring())),
            regs::QUEUE_DRIVER_HIGH => q.try_set_avail_ring_address(hi(q.avail_ring())),
            regs::QUEUE_DEVICE_LOW => q.try_set_used_ring_address(lo(q.used_ring())),
            regs::QUEUE_DEVICE_HIGH => q.try_set_used_ring_address(hi(q.used_ring())),
            _ => Ok(()),
        };
        if let Err(source) = result {
            self.error(MmioError::QueueConfig { queue: sel, source });
        }
    }

    /// A status write. Apart from a reset (0) and FAILED, each write must add exactly the next
    /// bit of the initialisation sequence (virtio 1.2 §3.1.1: ACKNOWLEDGE, DRIVER, FEATURES_OK,
    /// DRIVER_OK): a driver that sets several at once, or out of order, is refused, as
    /// Firecracker's transport refuses it, so a guest that works here works there too.
    fn write_status(&mut self, mem: &GuestMemoryMmap, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // NEEDS_RESET belongs to the device: a driver writing back what it read may include it.
        let old = self.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let new = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            // The driver gave up, whatever else it wrote; stop processing until it resets the
            // device.
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        let next = [
            VIRTIO_CONFIG_S_ACKNOWLEDGE,
            VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK,
        ]
        .into_iter()
        .find(|bit| old & bit == 0);
        let Some(bit) = next.filter(|&bit| old & VIRTIO_CONFIG_S_FAILED == 0 && new == old | bit) else {
            self.error(MmioError::InvalidStatus { from: self.status, to: value });
            return;
        };
        match bit {
            VIRTIO_CONFIG_S_FEATURES_OK => {
                let device = self.device.features();
                let driver = self.driver_features;
                if driver & !device != 0 || driver & (1 << VIRTIO_F_VERSION_1) == 0 || self.unknown_features {
                    // Not setting the bit is how the device says no; the driver rereads.
                    self.error(MmioError::FeaturesRejected { driver, device });
                    return;
                }
                self.device.ack_features(driver);
                self.status |= bit;
            }
            VIRTIO_CONFIG_S_DRIVER_OK => {
                self.status |= bit;
                self.activate(mem);
            }
            _ => self.status |= bit,
        }
    }

    fn activate(&mut self, mem: &GuestMemoryMmap) {
        if let Some(index) = self.queues.iter().position(|q| q.ready() && !q.is_valid(mem)) {
            self.error(MmioError::InvalidQueue(index));
            self.needs_reset();
            return;
        }
        // The transport keeps its copies for register reads; the device gets its own.
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut result = Ok(());
        for (index, q) in self.queues.iter().enumerate() {
            match Queue::try_from(q.state()) {
                Ok(q) => queues.push(q),
                Err(source) => {
                    result = Err(VirtioError::Queue { index, source });
                    break;
                }
            }
        }
        let result = result.and_then(|()| self.device.activate(mem, queues));
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                self.error(MmioError::Activation(e));
                self.needs_reset();
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.unknown_features = false;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.activated = false;
        self.wakeup = false;
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::virtio::test_utils::DriverQueue;
    use crate::virtio::vsock::{Vsock, VsockConfig};

    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FOK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    const V1: u64 = 1 << VIRTIO_F_VERSION_1;

    /// A device that records what the transport does to it.
    #[derive(Debug, Default)]
    struct Dummy {
        acked: u64,
        activated_with: Option<usize>,
        refuse: bool,
        work: bool,
        fail: bool,
        resets: usize,
        config: [u8; 8],
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            V1 | 1
        }
        fn ack_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(&mut self, _mem: &GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), VirtioError> {
            if self.refuse {
                return Err(VirtioError::QueueNotReady(0));
            }
            self.activated_with = Some(queues.len());
            Ok(())
        }
        fn process(&mut self, _mem: &GuestMemoryMmap) -> bool {
            self.work
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated_with = None;
        }
        fn needs_reset(&self) -> bool {
            self.fail
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn rd<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr<D: VirtioDevice>(t: &mut MmioTransport<D>, mem: &GuestMemoryMmap, offset: u64, v: u32) {
        t.write(mem, offset, &v.to_le_bytes());
    }

    /// Status ACK | DRIVER | FEATURES_OK with VERSION_1 accepted.
    fn negotiate<D: VirtioDevice>(t: &mut MmioTransport<D>, mem: &GuestMemoryMmap) {
        wr(t, mem, regs::STATUS, ACK);
        wr(t, mem, regs::STATUS, ACK | DRV);
        wr(t, mem, regs::DRIVER_FEATURES_SEL, 1);
        wr(t, mem, regs::DRIVER_FEATURES, 1);
        wr(t, mem, regs::STATUS, ACK | DRV | FOK);
        assert_eq!(rd(t, regs::STATUS), ACK | DRV | FOK);
    }

    /// Configures queue `sel` like a driver would.
    fn setup_queue<D: VirtioDevice>(t: &mut MmioTransport<D>, mem: &GuestMemoryMmap, sel: u32, q: &DriverQueue) {
        wr(t, mem, regs::QUEUE_SEL, sel);
        wr(t, mem, regs::QUEUE_NUM, u32::from(q.size));
        let addrs = [
            (regs::QUEUE_DESC_LOW, q.mock.desc_table_addr().0),
            (regs::QUEUE_DRIVER_LOW, q.mock.avail_addr().0),
            (regs::QUEUE_DEVICE_LOW, q.used_addr().0),
        ];
        for (reg, addr) in addrs {
            wr(t, mem, reg, addr as u32);
            wr(t, mem, reg + 4, (addr >> 32) as u32);
        }
        wr(t, mem, regs::QUEUE_READY, 1);
    }

    #[test]
    fn identity_registers() {
        let mut t = MmioTransport::new(Dummy::default());
        assert_eq!(rd(&mut t, regs::MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(&MAGIC_VALUE.to_le_bytes(), b"virt");
        assert_eq!(rd(&mut t, regs::VERSION), 2);
        assert_eq!(rd(&mut t, regs::DEVICE_ID), 42);
        assert_eq!(rd(&mut t, regs::VENDOR_ID), VENDOR_ID);
        assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), 1);
        let mem = memory();
        wr(&mut t, &mem, regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), 1);
        wr(&mut t, &mem, regs::DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), 0);
        for sel in [0, 1] {
            wr(&mut t, &mem, regs::QUEUE_SEL, sel);
            assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 16);
            assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
        }
        wr(&mut t, &mem, regs::QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 0);
        assert_eq!(rd(&mut t, regs::CONFIG_GENERATION), 0);
        assert!(t.take_errors().is_empty());
        // Write-only and undefined registers read as 0 and count as errors.
        assert_eq!(rd(&mut t, regs::QUEUE_NOTIFY), 0);
        assert_eq!(rd(&mut t, 0x0f0), 0);
        assert_eq!(t.take_errors().len(), 2);
        // Read-only registers ignore writes.
        wr(&mut t, &mem, regs::MAGIC_VALUE, 0);
        assert!(matches!(t.take_errors().as_slice(), [MmioError::NotWritable(0)]));
    }

    #[test]
    fn wrong_width_accesses_are_ignored() {
        let mem = memory();
        let mut t = MmioTransport::new(Dummy { config: *b"abcdefgh", ..Dummy::default() });
        let mut two = [0xffu8; 2];
        t.read(regs::MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        let mut eight = [0xffu8; 8];
        t.read(regs::MAGIC_VALUE, &mut eight);
        assert_eq!(eight, [0; 8]);
        assert_eq!(rd(&mut t, 0x002), 0, "misaligned");
        t.write(&mem, regs::STATUS, &[ACK as u8]);
        t.write(&mem, regs::STATUS + 2, &ACK.to_le_bytes());
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        assert_eq!(t.take_errors().len(), 5);
        assert_eq!(t.error_count(), 5);

        // Config space: 1, 2, 4 and 8 bytes.
        let mut one = [0u8; 1];
        t.read(regs::CONFIG + 1, &mut one);
        assert_eq!(&one, b"b");
        t.read(regs::CONFIG + 2, &mut two);
        assert_eq!(&two, b"cd");
        assert_eq!(rd(&mut t, regs::CONFIG + 4).to_le_bytes(), *b"efgh");
        t.read(regs::CONFIG, &mut eight);
        assert_eq!(&eight, b"abcdefgh");
        t.write(&mem, regs::CONFIG, b"XY");
        t.read(regs::CONFIG, &mut two);
        assert_eq!(&two, b"XY");
        let mut three = [0xffu8; 3];
        t.read(regs::CONFIG, &mut three);
        assert_eq!(three, [0; 3]);
        t.write(&mem, regs::CONFIG, b"123");
        assert_eq!(t.take_errors().len(), 2);
        t.read(regs::CONFIG, &mut two);
        assert_eq!(&two, b"XY");
    }

    #[test]
    fn feature_negotiation() {
        let mem = memory();
        let mut t = MmioTransport::new(Dummy::default());
        // Features before DRIVER are refused.
        wr(&mut t, &mem, regs::DRIVER_FEATURES, 1);
        assert!(matches!(t.take_errors().as_slice(), [MmioError::FeaturesLocked(0)]));
        wr(&mut t, &mem, regs::STATUS, ACK);
        wr(&mut t, &mem, regs::STATUS, ACK | DRV);

        // Unknown feature: FEATURES_OK does not stick.
        wr(&mut t, &mem, regs::DRIVER_FEATURES, 1 | 2);
        wr(&mut t, &mem, regs::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, &mem, regs::DRIVER_FEATURES, 1);
        wr(&mut t, &mem, regs::STATUS, ACK | DRV | FOK);
        assert_eq!(rd(&mut t, regs::STATUS), ACK | DRV);
        assert!(matches!(t.take_errors().as_slice(), [MmioError::FeaturesRejected { driver: 0x1_0000_0003, .. }]));

        // Without VERSION_1: refused too.
        wr(&mut t, &mem, regs::DRIVER_FEATURES, 0);
        wr(&mut t, &mem, regs::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, &mem, regs::DRIVER_FEATURES, 1);
        wr(&mut t, &mem, regs::STATUS, ACK | DRV | FOK);
        assert_eq!(rd(&mut t, regs::STATUS), ACK | DRV);

        // Bits beyond 64: unknown.
        wr(&mut t, &mem, regs::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, &mem, regs::DRIVER_FEATURES, 1);
        wr(&mut t, &mem, regs::DRIVER_FEATURES_SEL, 2);
        wr(&mut t, &mem, regs::DRIVER_FEATURES, 4);
        wr(&mut t, &mem, regs::STATUS, ACK | DRV | FOK);
        assert_eq!(rd(&mut t, regs::STATUS), ACK | DRV);
        t.take_errors();

        // A fresh start with an acceptable subset.
        wr(&mut t, &mem, regs::STATUS, 0);
        negotiate(&mut t, &mem);
        assert_eq!(t.device().acked, V1);
        // Locked after FEATURES_OK.
        wr(&mut t, &mem, regs::DRIVER_FEATURES, 0);
        assert!(matches!(t.take_errors().as_slice(), [MmioError::FeaturesLocked(_)]));
        assert_eq!(t.device().acked, V1);
    }

    #[test]
    fn status_state_machine() {
        let mem = memory();
        let mut t = MmioTransport::new(Dummy::default());
        wr(&mut t, &mem, regs::STATUS, DRV); // DRIVER before ACKNOWLEDGE
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        wr(&mut t, &mem, regs::STATUS, ACK);
        wr(&mut t, &mem, regs::STATUS, ACK | DRV | DOK); // two bits, DRIVER_OK before FEATURES_OK
        assert_eq!(rd(&mut t, regs::STATUS), ACK, "a write adding two bits changes nothing");
        wr(&mut t, &mem, regs::STATUS, ACK | DRV);
        wr(&mut t, &mem, regs::STATUS, ACK); // clearing a bit
        assert_eq!(rd(&mut t, regs::STATUS), ACK | DRV);
        wr(&mut t, &mem, regs::STATUS, ACK | DRV | 0x10); // unknown bit
        assert_eq!(rd(&mut t, regs::STATUS), ACK | DRV);
        assert_eq!(t.take_errors().len(), 4);
        assert!(!t.is_activated());

        // FAILED stops everything until reset.
        wr(&mut t, &mem, regs::STATUS, ACK | DRV | VIRTIO_CONFIG_S_FAILED);
        assert_eq!(rd(&mut t, regs::STATUS), ACK | DRV | VIRTIO_CONFIG_S_FAILED);
        wr(&mut t, &mem, regs::STATUS, ACK | DRV | VIRTIO_CONFIG_S_FAILED | FOK);
        assert_eq!(rd(&mut t, regs::STATUS) & FOK, 0);
        wr(&mut t, &mem, regs::STATUS, 0);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
    }

    /// Firecracker's transport refuses a driver that sets ACKNOWLEDGE and DRIVER in one write,
    /// and so does this one: the device never reaches FEATURES_OK that way.
    #[test]
    fn acknowledge_and_driver_in_one_write_is_refused() {
        let mem = memory();
        let mut t = MmioTransport::new(Dummy::default());
        wr(&mut t, &mem, regs::STATUS, ACK | DRV);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
        assert!(matches!(t.take_errors().as_slice(), [MmioError::InvalidStatus { from: 0, to: 3 }]));
        wr(&mut t, &mem, regs::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, &mem, regs::DRIVER_FEATURES, 1);
        wr(&mut t, &mem, regs::STATUS, ACK | DRV | FOK);
        assert_eq!(rd(&mut t, regs::STATUS) & FOK, 0, "no FEATURES_OK after the refused write");
        // One bit at a time, in order, it works.
        wr(&mut t, &mem, regs::STATUS, 0);
        t.take_errors();
        negotiate(&mut t, &mem);
        assert!(t.take_errors().is_empty());
    }

    #[test]
    fn queue_configuration_rules() {
        let mem = memory();
        let mut t = MmioTransport::new(Dummy::default());
        negotiate(&mut t, &mem);
        wr(&mut t, &mem, regs::QUEUE_SEL, 0);
        for bad in [0, 3, 32, 0x1_0000] {
            wr(&mut t, &mem, regs::QUEUE_NUM, bad);
        }
        assert_eq!(t.take_errors().len(), 4);
        wr(&mut t, &mem, regs::QUEUE_NUM, 8);
        wr(&mut t, &mem, regs::QUEUE_DESC_LOW, 0x1008); // not 16-byte aligned
        wr(&mut t, &mem, regs::QUEUE_DRIVER_LOW, 0x2001); // not 2-byte aligned
        wr(&mut t, &mem, regs::QUEUE_DEVICE_LOW, 0x3002); // not 4-byte aligned
        assert_eq!(t.take_errors().len(), 3);
        wr(&mut t, &mem, regs::QUEUE_DESC_LOW, 0x1000);
        wr(&mut t, &mem, regs::QUEUE_DESC_HIGH, 0);
        wr(&mut t, &mem, regs::QUEUE_DRIVER_LOW, 0x2000);
        wr(&mut t, &mem, regs::QUEUE_DEVICE_LOW, 0x3000);
        wr(&mut t, &mem, regs::QUEUE_READY, 1);
        assert!(t.take_errors().is_empty());
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 1);
        // Ready: locked, except clearing QueueReady.
        wr(&mut t, &mem, regs::QUEUE_NUM, 4);
        assert!(matches!(t.take_errors().as_slice(), [MmioError::QueueLocked { queue: 0 }]));
        wr(&mut t, &mem, regs::QUEUE_READY, 0);
        wr(&mut t, &mem, regs::QUEUE_NUM, 4);
        wr(&mut t, &mem, regs::QUEUE_READY, 1);
        assert!(t.take_errors().is_empty());
        let q = t.queues.first().unwrap();
        assert_eq!((q.size(), q.desc_table(), q.avail_ring(), q.used_ring()), (4, 0x1000, 0x2000, 0x3000));
        // No such queue.
        wr(&mut t, &mem, regs::QUEUE_SEL, 7);
        wr(&mut t, &mem, regs::QUEUE_NUM, 4);
        assert!(matches!(t.take_errors().as_slice(), [MmioError::NoSuchQueue(7)]));
        // After DRIVER_OK everything is locked.
        wr(&mut t, &mem, regs::STATUS, ACK | DRV | FOK | DOK);
        assert!(t.is_activated());
        assert_eq!(t.device().activated_with, Some(2), "ready or not, every queue is handed over");
        wr(&mut t, &mem, regs::QUEUE_SEL, 1);
        wr(&mut t, &mem, regs::QUEUE_NUM, 4);
        assert!(matches!(t.take_errors().as_slice(), [MmioError::QueueLocked { queue: 1 }]));
    }

    #[test]
    fn invalid_queue_or_refusal_sets_needs_reset() {
        let mem = memory();
        let mut t = MmioTransport::new(Dummy::default());
        negotiate(&mut t, &mem);
        wr(&mut t, &mem, regs::QUEUE_NUM, 16);
        wr(&mut t, &mem, regs::QUEUE_DESC_LOW, 0xff00_0000); // outside the 16 MiB of RAM
        wr(&mut t, &mem, regs::QUEUE_READY, 1);
        wr(&mut t, &mem, regs::STATUS, ACK | DRV | FOK | DOK);
        assert!(!t.is_activated());
        assert_eq!(rd(&mut t, regs::STATUS), ACK | DRV | FOK | DOK | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert!(matches!(t.take_errors().as_slice(), [MmioError::InvalidQueue(0)]));

        // Reset recovers; a device refusing activation gives the same result.
        wr(&mut t, &mem, regs::STATUS, 0);
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
        t.device_mut().refuse = true;
        negotiate(&mut t, &mem);
        wr(&mut t, &mem, regs::STATUS, ACK | DRV | FOK | DOK);
        assert!(!t.is_activated());
        assert_ne!(rd(&mut t, regs::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(matches!(t.take_errors().as_slice(), [MmioError::Activation(_)]));
    }

    #[test]
    fn poll_wakeup_interrupts_and_reset() {
        let mem = memory();
        let mut t = MmioTransport::new(Dummy::default());
        // Non-blocking, so a missing write fails the test instead of hanging it.
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        t.set_irq(Some(irq.try_clone().unwrap()));
        t.device_mut().work = true;
        assert!(!t.poll(&mem), "not activated");
        negotiate(&mut t, &mem);
        wr(&mut t, &mem, regs::STATUS, ACK | DRV | FOK | DOK);
        assert!(t.is_activated());
        assert!(!t.take_wakeup());
        wr(&mut t, &mem, regs::QUEUE_NOTIFY, 0); // polls
        assert!(t.take_wakeup());
        assert!(!t.take_wakeup());
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.read().unwrap(), 1);
        wr(&mut t, &mem, regs::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);

        // Nothing added: no wake-up.
        t.device_mut().work = false;
        assert!(!t.poll(&mem));
        assert!(!t.take_wakeup());

        // The device breaks: NEEDS_RESET, config interrupt, no more processing.
        t.device_mut().fail = true;
        t.poll(&mem);
        assert_ne!(rd(&mut t, regs::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert!(t.take_wakeup());
        t.device_mut().work = true;
        assert!(!t.poll(&mem));

        // Reset.
        wr(&mut t, &mem, regs::STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(t.device().resets, 1);
        assert_eq!(rd(&mut t, regs::STATUS), 0);
    }

    #[test]
    fn vsock_through_the_transport() {
        let mem = memory();
        let queues = [
            DriverQueue::new(&mem, 0x1_0000, 16),
            DriverQueue::new(&mem, 0x2_0000, 16),
            DriverQueue::new(&mem, 0x3_0000, 16),
        ];
        let mut t = MmioTransport::new(Vsock::new(VsockConfig::default()));
        assert_eq!(rd(&mut t, regs::DEVICE_ID), 19);
        assert_eq!(rd(&mut t, regs::CONFIG), 3, "guest cid low half");
        assert_eq!(rd(&mut t, regs::CONFIG + 4), 0);
        wr(&mut t, &mem, regs::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 256);
        negotiate(&mut t, &mem);
        for (sel, q) in queues.iter().enumerate() {
            setup_queue(&mut t, &mem, sel as u32, q);
        }
        wr(&mut t, &mem, regs::STATUS, ACK | DRV | FOK | DOK);
        assert!(t.is_activated());
        assert!(t.take_errors().is_empty());
        for q in &queues {
            assert_eq!(q.used_flags(), VRING_USED_F_NO_NOTIFY as u16);
        }
        let [mut rx, _, _] = queues;
        let id = t.device_mut().host_mut().connect(5000, 0).unwrap();
        rx.add_chain(&[(0x10_0000, 44, true), (0x10_1000, 4096, true)]);
        assert!(t.poll(&mem));
        assert!(t.take_wakeup());
        assert_eq!(rx.take_used(), [(0, 44)]);
        wr(&mut t, &mem, regs::STATUS, 0);
        assert!(t.device().host().state(id).is_none(), "reset drops connections");
    }
}
