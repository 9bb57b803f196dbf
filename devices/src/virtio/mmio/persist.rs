//! Saving and restoring the virtio-mmio transport ([`Persist`] for [`MmioTransport`]).
//!
//! Saved: every register the driver can read back or that steers the transport (status,
//! feature selects and accepted features, queue select, each queue's configuration and ring
//! position), interrupt status, configuration generation, whether the device was activated
//! and whether a wake-up is pending, and the device's own state. Failure is saved through the
//! status register (NEEDS_RESET, FAILED) and the device's state.
//!
//! Not saved: the interrupt eventfd (set it again with [`MmioTransport::set_irq`]) and the
//! recorded driver errors ([`MmioTransport::error_count`] restarts at 0).
//!
//! Restoring never re-runs activation: an activated device's queues continue where they were,
//! and guest memory (which already holds what activation wrote, e.g. the used rings'
//! NO_NOTIFY flags) is not touched.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;

use super::{queue_max_size, MmioTransport};
use crate::persist::{Persist, QueueRestoreError, QueueSnapshot};
use crate::virtio::VirtioDevice;
use crate::GuestMemoryMmap;

/// The saved state of a [`MmioTransport`] and its device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState<S> {
    /// Device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The 64 feature bits the driver wrote.
    pub driver_features: u64,
    /// The driver wrote a feature bit above 63.
    pub unknown_features: bool,
    /// QueueSel.
    pub queue_sel: u32,
    /// Each queue's configuration as the driver wrote it (the device keeps its own copies,
    /// with the ring positions, in its state).
    pub queues: Vec<QueueSnapshot>,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// DRIVER_OK was set and the device accepted its queues.
    pub activated: bool,
    /// Used buffers were added since the VMM last asked (see [`MmioTransport::take_wakeup`]).
    pub wakeup: bool,
    /// The device's state.
    pub device: S,
}

/// Why a saved transport state was refused.
#[derive(Debug, thiserror::Error)]
pub enum MmioRestoreError<E: std::error::Error + 'static> {
    /// The device refused its state.
    #[error("device state refused")]
    Device(#[source] E),
    /// The state has another number of queues than the device.
    #[error("{got} saved queues, the device has {expected}")]
    QueueCount {
        /// Queues of the device.
        expected: usize,
        /// Queues in the state.
        got: usize,
    },
    /// A saved queue is invalid.
    #[error("queue {index}")]
    Queue {
        /// Queue index.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: QueueRestoreError,
    },
    /// A status the transport can never reach.
    #[error("invalid status {status:#x}: {reason}")]
    Status {
        /// The saved status.
        status: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// FEATURES_OK with features the device does not offer (or without VERSION_1).
    #[error("accepted features {driver:#x} not acceptable (device offers {device:#x})")]
    Features {
        /// Saved driver features.
        driver: u64,
        /// What the device offers.
        device: u64,
    },
    /// Interrupt status bits that do not exist.
    #[error("invalid interrupt status {0:#x}")]
    InterruptStatus(u32),
    /// A ready queue of the activated device is not inside guest memory (see
    /// [`MmioTransport::check_memory`]).
    #[error("queue {0} is not inside guest memory")]
    QueueOutsideMemory(usize),
}

const KNOWN_STATUS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FAILED
    | VIRTIO_CONFIG_S_NEEDS_RESET;

/// The status invariants `write_status`, `activate` and `needs_reset` maintain.
fn check_status(status: u32, activated: bool) -> Result<(), &'static str> {
    let has = |bit: u32| status & bit != 0;
    if status & !KNOWN_STATUS != 0 {
        return Err("unknown bits");
    }
    let order = [
        (VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE, "DRIVER without ACKNOWLEDGE"),
        (VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER, "FEATURES_OK without DRIVER"),
        (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, "DRIVER_OK without FEATURES_OK"),
        (VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_CONFIG_S_DRIVER_OK, "NEEDS_RESET without DRIVER_OK"),
    ];
    for (bit, required, reason) in order {
        if has(bit) && !has(required) {
            return Err(reason);
        }
    }
    if activated && !has(VIRTIO_CONFIG_S_DRIVER_OK) {
        return Err("activated without DRIVER_OK");
    }
    if has(VIRTIO_CONFIG_S_DRIVER_OK) && !activated && !has(VIRTIO_CONFIG_S_NEEDS_RESET) {
        // DRIVER_OK either activates the device or sets NEEDS_RESET.
        return Err("DRIVER_OK without activation or NEEDS_RESET");
    }
    Ok(())
}

impl<D: VirtioDevice + Persist> Persist for MmioTransport<D> {
    type State = MmioTransportState<D::State>;
    type Args = D::Args;
    type Error = MmioRestoreError<D::Error>;

    fn save(&self) -> Self::State {
        MmioTransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            unknown_features: self.unknown_features,
            queue_sel: self.queue_sel,
            queues: self.queues.iter().map(QueueSnapshot::from).collect(),
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            activated: self.activated,
            wakeup: self.wakeup,
            device: self.device.save(),
        }
    }

    /// Rebuilds the transport and its device (`args` go to the device's restore). The
    /// interrupt eventfd is not restored: see [`MmioTransport::set_irq`]. Call
    /// [`MmioTransport::check_memory`] once guest memory is mapped.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error> {
        let device = D::restore(args, &state.device).map_err(MmioRestoreError::Device)?;
        let status = state.status;
        check_status(status, state.activated).map_err(|reason| MmioRestoreError::Status { status, reason })?;
        let features_ok = status & VIRTIO_CONFIG_S_FEATURES_OK != 0;
        let (driver, offered) = (state.driver_features, device.features());
        if features_ok && (driver & !offered != 0 || driver & (1 << VIRTIO_F_VERSION_1) == 0 || state.unknown_features)
        {
            return Err(MmioRestoreError::Features { driver, device: offered });
        }
        if state.interrupt_status & !(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG) != 0 {
            return Err(MmioRestoreError::InterruptStatus(state.interrupt_status));
        }
        let maxes = device.queue_max_sizes();
        if state.queues.len() != maxes.len() {
            return Err(MmioRestoreError::QueueCount { expected: maxes.len(), got: state.queues.len() });
        }
        let event_idx = features_ok && driver & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let queues = state
            .queues
            .iter()
            .zip(maxes)
            .enumerate()
            .map(|(index, (q, &max))| {
                q.restore(queue_max_size(max), event_idx).map_err(|source| MmioRestoreError::Queue { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mut transport = MmioTransport::new(device);
        transport.queues = queues;
        transport.status = status;
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.driver_features = driver;
        transport.unknown_features = state.unknown_features;
        transport.queue_sel = state.queue_sel;
        transport.interrupt_status = state.interrupt_status;
        transport.config_generation = state.config_generation;
        transport.activated = state.activated;
        transport.wakeup = state.wakeup;
        Ok(transport)
    }
}

impl<D: VirtioDevice + Persist> MmioTransport<D> {
    /// Checks a restored transport against the guest memory it will run on: every ready queue
    /// of an activated device must lie inside it, as DRIVER_OK checked originally. (A queue
    /// outside memory would only make the device fail at its first access; this reports a
    /// mismatched image up front.)
    pub fn check_memory(&self, mem: &GuestMemoryMmap) -> Result<(), MmioRestoreError<D::Error>> {
        if !self.activated {
            return Ok(());
        }
        match self.queues.iter().position(|q| q.ready() && !q.is_valid(mem)) {
            Some(index) => Err(MmioRestoreError::QueueOutsideMemory(index)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_invariants() {
        const A: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        const D: u32 = VIRTIO_CONFIG_S_DRIVER;
        const F: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
        const O: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
        const R: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
        const X: u32 = VIRTIO_CONFIG_S_FAILED;
        for ok in [(0, false), (A, false), (A | D, false), (A | D | F, false), (A | D | F | O, true)] {
            assert_eq!(check_status(ok.0, ok.1), Ok(()), "{ok:?}");
        }
        for ok in [(A | D | F | O | R, true), (A | D | F | O | R, false), (X, false), (A | D | X, false)] {
            assert_eq!(check_status(ok.0, ok.1), Ok(()), "{ok:?}");
        }
        for bad in [(0x10, false), (D, false), (A | F, false), (A | D | O, false), (A | D | F | R, false)] {
            assert!(check_status(bad.0, bad.1).is_err(), "{bad:?}");
        }
        assert!(check_status(A | D | F, true).is_err());
        assert!(check_status(A | D | F | O, false).is_err());
    }
}
