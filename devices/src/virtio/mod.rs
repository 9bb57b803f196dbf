//! Virtio devices for mu2: the virtio-mmio transport ([`mmio`]) and the virtio-vsock device
//! ([`vsock`]).
//!
//! The guest gets no interrupts: the VMM calls [`mmio::MmioTransport::poll`] whenever the guest
//! waits or notifies, and the device processes all its queues then. Devices therefore disable
//! guest notifications on their queues; an interrupt eventfd is still supported for guests
//! that want one.

pub mod mmio;
pub mod vsock;

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemoryMmap;

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (19 for vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers.
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of [`VirtioDevice::features`]).
    fn ack_features(&mut self, features: u64);
    /// Reads device configuration space; bytes out of range read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; writes to read-only fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK with valid queues: the device takes the queues and starts working.
    fn activate(&mut self, mem: &GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), VirtioError>;
    /// Polls every queue; returns true when buffers were added to a used ring.
    fn process(&mut self, mem: &GuestMemoryMmap) -> bool;
    /// Device reset by the driver (status 0): drop queues and all connection state.
    fn reset(&mut self);
    /// Whether the driver wants an interrupt for the buffers the last
    /// [`VirtioDevice::process`] added (it may have suppressed them). Default: always.
    fn interrupt_wanted(&mut self) -> bool {
        true
    }
    /// The device hit an error it cannot recover from without a reset (DEVICE_NEEDS_RESET).
    fn needs_reset(&self) -> bool {
        false
    }
}

/// Errors of device activation.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The transport handed over a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues it received.
        got: usize,
    },
    /// A queue the device needs was not made ready by the driver.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// A queue could not be set up in guest memory.
    #[error("queue {index}: {source}")]
    Queue {
        /// Queue index.
        index: usize,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
}

/// Whether the driver wants an interrupt for what was just added to `queue`'s used ring.
///
/// `Queue::needs_notification` only looks at `used_event` (EVENT_IDX, which mu2 does not
/// offer), so the avail ring's NO_INTERRUPT flag is checked here too.
pub(crate) fn driver_wants_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    let suppressed = mem
        .read_obj::<u16>(GuestAddress(queue.avail_ring()))
        .map(|flags| u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0)
        .unwrap_or(false);
    // Always call it: it also resets the "added since last notification" count.
    let needed = queue.needs_notification(mem).unwrap_or(true);
    needed && !suppressed
}

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod test_utils;
