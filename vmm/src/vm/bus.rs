//! The device bus: guest address ranges, in port I/O and MMIO space, mapped to the devices
//! that answer them. Exits reach devices only through here, so adding a device is one
//! [`Bus::register`] call, and this is the only place (with `arch/`) that decodes a guest
//! address.

use std::any::Any;

use mu2_devices::serial::SerialConsole;
use mu2_devices::sysdev::{SysdevError, SysdevRequest};
use mu2_devices::virtio::mmio::MmioTransport;
use mu2_devices::virtio::VirtioDevice;
use vm_memory::GuestMemoryMmap;

/// An address space a device can sit in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoSpace {
    /// x86 I/O ports.
    Pio,
    /// Memory-mapped I/O: guest-physical addresses no memory slot covers.
    Mmio,
}

/// Which [`super::ExitStats`] counter an access to a device counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitCounter {
    /// The serial console.
    Console,
    /// A virtio-mmio transport.
    VirtioMmio,
    /// The mu2 system device.
    Sysdev,
}

/// What an access asks of the VM beyond the device's own answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BusAction {
    /// Nothing: the device answered.
    Done,
    /// The system device decoded a request for the VM (readiness, exit, a WAIT …).
    Sysdev(SysdevRequest),
    /// The guest accessed the system device in a way it does not allow.
    SysdevMisuse(SysdevError),
}

/// A device on the bus. `offset` is relative to the start of the device's range; `mem` is
/// guest memory, for devices that reach into it (virtio queues).
pub(crate) trait BusDevice: Send {
    /// A guest read of `data.len()` bytes; `data` arrives zeroed.
    fn read(&mut self, mem: &GuestMemoryMmap, offset: u64, data: &mut [u8]) -> BusAction;
    /// A guest write.
    fn write(&mut self, mem: &GuestMemoryMmap, offset: u64, data: &[u8]) -> BusAction;
    /// For [`Bus::get_mut`]: the device as `Any`.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A typed reference to a registered device, for the VM's own calls into it.
#[derive(Debug)]
pub(crate) struct DeviceHandle<T> {
    index: usize,
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T> Clone for DeviceHandle<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DeviceHandle<T> {}

struct Slot {
    space: IoSpace,
    base: u64,
    len: u64,
    counter: ExitCounter,
    device: Box<dyn BusDevice>,
}

/// Devices by address range. A VM has a handful, so a linear scan beats any index.
#[derive(Default)]
pub(crate) struct Bus {
    slots: Vec<Slot>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.slots.iter().map(|s| (s.space, s.base, s.len, s.counter)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

/// Why a registration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The range is empty, wraps around, or overlaps a registered one.
    #[error("device range {base:#x}+{len:#x} is empty, wraps or overlaps another device")]
    Overlap {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
}

impl Bus {
    /// Puts `device` at `base..base + len` of `space`.
    pub(crate) fn register<T: BusDevice + 'static>(
        &mut self,
        space: IoSpace,
        base: u64,
        len: u64,
        counter: ExitCounter,
        device: T,
    ) -> Result<DeviceHandle<T>, BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::Overlap { base, len })?;
        if self.slots.iter().any(|s| s.space == space && base < s.base + s.len && s.base < end) {
            return Err(BusError::Overlap { base, len });
        }
        self.slots.push(Slot { space, base, len, counter, device: Box::new(device) });
        Ok(DeviceHandle { index: self.slots.len() - 1, _type: std::marker::PhantomData })
    }

    /// The registered device `handle` names.
    pub(crate) fn get_mut<T: BusDevice + 'static>(&mut self, handle: DeviceHandle<T>) -> &mut T {
        // A handle is only made by `register` for a `T` at that index, and slots are never
        // removed or replaced, so the slot holds a `T`.
        match self.slots[handle.index].device.as_any_mut().downcast_mut::<T>() {
            Some(device) => device,
            None => unreachable!("device handle {} does not name its device's type", handle.index),
        }
    }

    fn find(&mut self, space: IoSpace, addr: u64) -> Option<(&mut Slot, u64)> {
        self.slots.iter_mut().find(|s| s.space == space && addr >= s.base && addr - s.base < s.len).map(|s| {
            let offset = addr - s.base;
            (s, offset)
        })
    }

    /// A guest read at `addr`. `None`: no device is there (`data` is then filled the way an
    /// empty bus reads: all ones for ports, zeros for memory).
    pub(crate) fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        space: IoSpace,
        addr: u64,
        data: &mut [u8],
    ) -> Option<(ExitCounter, BusAction)> {
        data.fill(0);
        match self.find(space, addr) {
            Some((slot, offset)) => Some((slot.counter, slot.device.read(mem, offset, data))),
            None => {
                if space == IoSpace::Pio {
                    data.fill(0xff);
                }
                None
            }
        }
    }

    /// A guest write at `addr`. `None`: no device is there, and the write is dropped.
    pub(crate) fn write(
        &mut self,
        mem: &GuestMemoryMmap,
        space: IoSpace,
        addr: u64,
        data: &[u8],
    ) -> Option<(ExitCounter, BusAction)> {
        let (slot, offset) = self.find(space, addr)?;
        Some((slot.counter, slot.device.write(mem, offset, data)))
    }
}

/// The mu2 system device: stateless decoding of its registers into requests for the VM.
#[derive(Debug, Default)]
pub(crate) struct Sysdev;

impl BusDevice for Sysdev {
    fn read(&mut self, _mem: &GuestMemoryMmap, offset: u64, data: &mut [u8]) -> BusAction {
        match mu2_devices::sysdev::read(offset, data) {
            Ok(request) => BusAction::Sysdev(request),
            Err(e) => BusAction::SysdevMisuse(e),
        }
    }

    fn write(&mut self, _mem: &GuestMemoryMmap, offset: u64, data: &[u8]) -> BusAction {
        match mu2_devices::sysdev::write(offset, data) {
            Ok(request) => BusAction::Sysdev(request),
            Err(e) => BusAction::SysdevMisuse(e),
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, _mem: &GuestMemoryMmap, offset: u64, data: &mut [u8]) -> BusAction {
        if let Some(first) = data.first_mut() {
            *first = SerialConsole::read(self, offset);
        }
        BusAction::Done
    }

    fn write(&mut self, _mem: &GuestMemoryMmap, offset: u64, data: &[u8]) -> BusAction {
        // String I/O (`rep outsb`) writes several bytes to the same register.
        for byte in data {
            SerialConsole::write(self, offset, *byte);
        }
        BusAction::Done
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl<D: VirtioDevice + Send + 'static> BusDevice for MmioTransport<D> {
    fn read(&mut self, _mem: &GuestMemoryMmap, offset: u64, data: &mut [u8]) -> BusAction {
        MmioTransport::read(self, offset, data);
        BusAction::Done
    }

    fn write(&mut self, mem: &GuestMemoryMmap, offset: u64, data: &[u8]) -> BusAction {
        MmioTransport::write(self, mem, offset, data);
        BusAction::Done
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, _mem: &GuestMemoryMmap, offset: u64, data: &mut [u8]) -> BusAction {
            data.fill(offset as u8);
            BusAction::Done
        }
        fn write(&mut self, _mem: &GuestMemoryMmap, offset: u64, data: &[u8]) -> BusAction {
            self.writes.push((offset, data.to_vec()));
            BusAction::Done
        }
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 4096)]).unwrap()
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let mem = memory();
        let mut bus = Bus::default();
        let handle = bus.register(IoSpace::Mmio, 0x1000, 0x100, ExitCounter::VirtioMmio, Recorder::default()).unwrap();
        let mut data = [0u8; 4];
        assert_eq!(bus.read(&mem, IoSpace::Mmio, 0x1010, &mut data), Some((ExitCounter::VirtioMmio, BusAction::Done)));
        assert_eq!(data, [0x10; 4]);
        assert!(bus.write(&mem, IoSpace::Mmio, 0x10ff, &[7]).is_some());
        assert_eq!(bus.get_mut(handle).writes, vec![(0xff, vec![7])]);
    }

    #[test]
    fn unclaimed_addresses_read_as_an_empty_bus() {
        let mem = memory();
        let mut bus = Bus::default();
        bus.register(IoSpace::Mmio, 0x1000, 0x100, ExitCounter::VirtioMmio, Recorder::default()).unwrap();
        let mut data = [5u8; 2];
        assert_eq!(bus.read(&mem, IoSpace::Mmio, 0x1100, &mut data), None);
        assert_eq!(data, [0, 0]);
        // The same address in the other space is another address.
        assert_eq!(bus.read(&mem, IoSpace::Pio, 0x1010, &mut data), None);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(bus.write(&mem, IoSpace::Mmio, 0xfff, &[1]), None);
    }

    #[test]
    fn overlapping_or_empty_ranges_are_refused() {
        let mut bus = Bus::default();
        bus.register(IoSpace::Pio, 0x3f8, 8, ExitCounter::Console, Recorder::default()).unwrap();
        assert!(bus.register(IoSpace::Pio, 0x3ff, 8, ExitCounter::Console, Recorder::default()).is_err());
        assert!(bus.register(IoSpace::Pio, 0x400, 0, ExitCounter::Console, Recorder::default()).is_err());
        assert!(bus.register(IoSpace::Pio, u64::MAX, 2, ExitCounter::Console, Recorder::default()).is_err());
        // Adjacent, and the same range in the other space, are fine.
        assert!(bus.register(IoSpace::Pio, 0x400, 8, ExitCounter::Console, Recorder::default()).is_ok());
        assert!(bus.register(IoSpace::Mmio, 0x3f8, 8, ExitCounter::Console, Recorder::default()).is_ok());
    }
}
