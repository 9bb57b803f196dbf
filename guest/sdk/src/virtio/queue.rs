//! Split virtqueues (virtio 1.2 §2.7) in static memory. The three parts of a queue lie
//! back to back ([`RingLayout`]) so that all of a device's rings share one page: a request
//! then touches a single ring page.

use core::sync::atomic::{fence, Ordering};

use super::mmio::{reg, Transport};

/// Descriptor continues in `next`.
pub const F_NEXT: u16 = 1;
/// Buffer is device-writable.
pub const F_WRITE: u16 = 2;
/// Used-ring flag: the device does not want notifications.
const USED_F_NO_NOTIFY: u16 = 1;

/// A descriptor as laid out in the table.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `F_*` bits.
    pub flags: u16,
    /// Next descriptor when `F_NEXT` is set.
    pub next: u16,
}

/// Offsets of the three parts of a split queue of `size` entries placed at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    pub desc: usize,
    pub avail: usize,
    pub used: usize,
    /// First byte past the used ring.
    pub end: usize,
}

impl RingLayout {
    /// Descriptor table (16-byte aligned), then the available ring (flags, idx, ring,
    /// used_event), then the used ring (4-byte aligned: flags, idx, ring, avail_event).
    pub const fn new(offset: usize, size: usize) -> Self {
        let desc = (offset + 15) & !15;
        let avail = desc + 16 * size;
        let used = (avail + 6 + 2 * size + 3) & !3;
        let end = used + 6 + 8 * size;
        Self { desc, avail, used, end }
    }
}

/// One split virtqueue, driver side.
#[derive(Debug)]
pub struct Queue {
    index: u16,
    size: u16,
    desc: *mut Desc,
    avail: *mut u16,
    used: *const u16,
    next_avail: u16,
    last_used: u16,
    notify: Transport,
}

impl Queue {
    /// Sets up queue `index` of `transport` with `size` entries (a power of two no larger
    /// than the device allows) in the memory at `base + layout`, and marks it ready.
    ///
    /// # Safety
    /// `base .. base + RingLayout::new(offset, size).end` is static memory reserved for this
    /// queue alone, zeroed, identity-mapped.
    pub unsafe fn new(transport: Transport, index: u16, base: *mut u8, offset: usize, size: u16) -> Self {
        let l = RingLayout::new(offset, usize::from(size));
        // SAFETY: the caller reserved the whole range for this queue.
        let (desc, avail, used) = unsafe { (base.add(l.desc), base.add(l.avail), base.add(l.used)) };
        transport.write(reg::QUEUE_SEL, u32::from(index));
        transport.write(reg::QUEUE_NUM, u32::from(size));
        transport.write_addr(reg::QUEUE_DESC_LOW, desc as u64);
        transport.write_addr(reg::QUEUE_DRIVER_LOW, avail as u64);
        transport.write_addr(reg::QUEUE_DEVICE_LOW, used as u64);
        transport.write(reg::QUEUE_READY, 1);
        Self {
            index,
            size,
            desc: desc.cast(),
            avail: avail.cast(),
            used: used.cast(),
            next_avail: 0,
            last_used: 0,
            notify: transport,
        }
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Writes descriptor `i` (which the driver owns).
    pub fn set_desc(&mut self, i: u16, desc: Desc) {
        assert!(i < self.size, "descriptor index out of range");
        // SAFETY: `i` is within the table this queue owns.
        unsafe { self.desc.add(usize::from(i)).write_volatile(desc) }
    }

    /// Offers the chain starting at `head` to the device (visible at once).
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.next_avail % self.size);
        // SAFETY: ring entry `slot` (< size) lies at avail + 4 + 2 * slot within the ring.
        unsafe { self.avail.add(2 + slot).write_volatile(head) };
        self.next_avail = self.next_avail.wrapping_add(1);
        self.publish(self.next_avail);
    }

    /// Writes the available index. Only the hardening test guest passes anything other than
    /// the driver's own count.
    pub fn publish(&mut self, idx: u16) {
        // The ring entries must be visible before the index that covers them.
        fence(Ordering::Release);
        // SAFETY: avail.idx is the second u16 of the available ring.
        unsafe { self.avail.add(1).write_volatile(idx) };
    }

    /// The driver's available index (for the test hooks, which publish another).
    #[cfg(feature = "test-hooks")]
    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: used.idx is the second u16 of the used ring, written by the device.
        let idx = unsafe { self.used.add(1).read_volatile() };
        fence(Ordering::Acquire);
        idx
    }

    /// Whether the device has returned buffers not yet popped.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// The next used element: (descriptor id, bytes written). The id is the device's word:
    /// callers check it.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: used ring element `slot` (< size) lies at used + 4 + 8 * slot.
        let (id, len) = unsafe {
            let elem = self.used.add(2 + 4 * slot).cast::<u32>();
            (elem.read_volatile(), elem.add(1).read_volatile())
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// Notifies the device unless it said (VRING_USED_F_NO_NOTIFY) that it polls: the mu2
    /// device polls at every WAIT, so under mu2 this costs nothing.
    pub fn kick(&self) {
        // SAFETY: used.flags is the first u16 of the used ring.
        let flags = unsafe { self.used.read_volatile() };
        if flags & USED_F_NO_NOTIFY == 0 {
            self.notify();
        }
    }

    /// Notifies the device unconditionally (one exit).
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        self.notify.write(reg::QUEUE_NOTIFY, u32::from(self.index));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_rings_share_one_page() {
        let rx = RingLayout::new(0, 64);
        let tx = RingLayout::new(rx.end, 64);
        let ev = RingLayout::new(tx.end, 4);
        assert_eq!((rx.desc, rx.avail, rx.used, rx.end), (0, 1024, 1160, 1678));
        assert_eq!(tx.desc, 1680);
        assert!(ev.end <= 4096);
    }
}
