//! Test helper: the driver side of a split virtqueue, on top of virtio-queue's mock. The fuzz
//! targets (feature `fuzzing`) use part of it.
#![cfg_attr(not(test), allow(dead_code))]

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::{regs, MmioTransport};
use super::VirtioDevice;

/// A queue as the guest driver sees it.
///
/// The mock provides the descriptor table and available ring. Its used ring is not used:
/// in virtio-queue 0.18 `MockSplitQueue` places it `size` bytes (not `2 * size`) after the
/// available ring entries, overlapping their upper half.
pub(crate) struct DriverQueue<'a> {
    pub mock: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    used: GuestAddress,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// One descriptor of a chain: address, length, device-writable.
pub(crate) type Desc = (u64, u32, bool);

impl<'a> DriverQueue<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
        // flags, idx, ring, used_event; then the used ring, 4-byte aligned.
        let avail_end = mock.avail_addr().0 + 6 + 2 * u64::from(size);
        let used = GuestAddress(avail_end.next_multiple_of(4));
        let used_len = 6 + 8 * usize::from(size);
        mem.write_slice(&vec![0; used_len], used).unwrap();
        DriverQueue { mock, mem, used, size, next_desc: 0, avail_idx: 0, used_seen: 0 }
    }

    /// A device-side queue configured as a driver would, with the device's `max_size`.
    pub fn device_queue(&self, max_size: u16) -> Queue {
        let mut q = Queue::new(max_size).unwrap();
        q.try_set_size(self.size).unwrap();
        q.try_set_desc_table_address(self.mock.desc_table_addr()).unwrap();
        q.try_set_avail_ring_address(self.mock.avail_addr()).unwrap();
        q.try_set_used_ring_address(self.used).unwrap();
        q.set_ready(true);
        q
    }

    /// Writes a chain to free descriptor slots and makes it available; returns its head.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let n = descs.len() as u16;
        let indices: Vec<u16> = (0..n).map(|i| (self.next_desc + i) % self.size).collect();
        self.next_desc = (self.next_desc + n) % self.size;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let next = indices.get(i + 1).copied();
            if next.is_some() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(indices[i], Descriptor::new(addr, len, flags, next.unwrap_or(0)));
        }
        self.publish(indices[0]);
        indices[0]
    }

    /// Stores one raw descriptor (for malformed chains).
    pub fn write_desc(&self, index: u16, desc: Descriptor) {
        self.mock.desc_table().store(index, RawDescriptor::from(desc)).unwrap();
    }

    /// Puts `head` in the available ring.
    pub fn publish(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        self.mock.avail().ring().ref_at(slot).unwrap().store(u16::to_le(head));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mock.avail().idx().store(u16::to_le(self.avail_idx));
    }

    /// Overwrites the available index (for a broken ring).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mock.avail().idx().store(u16::to_le(idx));
    }

    /// Used elements the device added since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(self.used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != u16::from_le(idx) {
            let slot = u64::from(self.used_seen % self.size);
            let e: VirtqUsedElem = self.mem.read_obj(self.used.unchecked_add(4 + 8 * slot)).unwrap();
            out.push((e.id(), e.len()));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// The used ring's flags.
    pub fn used_flags(&self) -> u16 {
        u16::from_le(self.mem.read_obj(self.used).unwrap())
    }

    /// Where the used ring is.
    pub fn used_addr(&self) -> GuestAddress {
        self.used
    }
}

/// Reads a transport register.
pub(crate) fn read_reg<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Writes a transport register.
pub(crate) fn write_reg<D: VirtioDevice>(t: &mut MmioTransport<D>, mem: &GuestMemoryMmap, offset: u64, v: u32) {
    t.write(mem, offset, &v.to_le_bytes());
}

/// Brings the transport to DRIVER_OK as a driver would: VERSION_1 accepted, `queues` set up as
/// queues 0, 1, ...
pub(crate) fn drive_to_driver_ok<D: VirtioDevice>(
    t: &mut MmioTransport<D>,
    mem: &GuestMemoryMmap,
    queues: &[&DriverQueue<'_>],
) {
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRV, VIRTIO_CONFIG_S_DRIVER_OK as DOK,
        VIRTIO_CONFIG_S_FEATURES_OK as FOK,
    };
    write_reg(t, mem, regs::STATUS, ACK);
    write_reg(t, mem, regs::STATUS, ACK | DRV);
    write_reg(t, mem, regs::DRIVER_FEATURES_SEL, 1);
    write_reg(t, mem, regs::DRIVER_FEATURES, 1); // VERSION_1
    write_reg(t, mem, regs::STATUS, ACK | DRV | FOK);
    for (sel, q) in queues.iter().enumerate() {
        write_reg(t, mem, regs::QUEUE_SEL, sel as u32);
        write_reg(t, mem, regs::QUEUE_NUM, u32::from(q.size));
        let addrs = [
            (regs::QUEUE_DESC_LOW, q.mock.desc_table_addr().0),
            (regs::QUEUE_DRIVER_LOW, q.mock.avail_addr().0),
            (regs::QUEUE_DEVICE_LOW, q.used_addr().0),
        ];
        for (reg, addr) in addrs {
            write_reg(t, mem, reg, addr as u32);
            write_reg(t, mem, reg + 4, (addr >> 32) as u32);
        }
        write_reg(t, mem, regs::QUEUE_READY, 1);
    }
    write_reg(t, mem, regs::STATUS, ACK | DRV | FOK | DOK);
    assert!(t.is_activated(), "{:?}", t.take_errors());
}
