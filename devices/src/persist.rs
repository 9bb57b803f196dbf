//! Saving and restoring device state for snapshots.
//!
//! mu2 freezes a booted guest into an image and forks a fresh VM from it for every request. Each
//! device with state implements [`Persist`]: [`Persist::save`] returns plain serde data (no file
//! descriptors, threads or guest-memory references), and [`Persist::restore`] rebuilds the
//! device from it. A state comes from a file, so it is untrusted input: restore validates every
//! field it depends on and returns an error, never panics.
//!
//! Guest memory is not part of any device state: it is saved separately, and a restored device
//! takes it as an argument as usual. Restoring never writes guest memory.
//!
//! The states are encoded with postcard (no field names or tags: field order and types are the
//! format), so reordering, adding or retyping a field of any state type changes the image
//! format.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

/// A component whose state can be saved into a snapshot and restored from it.
pub trait Persist: Sized {
    /// The saved state: plain data.
    type State: Serialize + DeserializeOwned + Clone + std::fmt::Debug;
    /// What restore needs besides the state: host resources that are not saved (for example
    /// the console's output writer). `()` when nothing is needed.
    type Args;
    /// Why a state was refused.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The component's state now.
    fn save(&self) -> Self::State;

    /// Rebuilds a component from a saved state, which is validated first: a state file is
    /// untrusted input.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Serializable mirror of [`virtio_queue::QueueState`]: a split virtqueue's configuration and
/// its position in the rings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Size the driver selected.
    pub size: u16,
    /// The driver set QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available ring entry the device will read.
    pub next_avail: u16,
    /// Next used ring entry the device will write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX was negotiated.
    pub event_idx_enabled: bool,
}

/// Why a saved queue was refused.
#[derive(Debug, thiserror::Error)]
pub enum QueueRestoreError {
    /// The saved maximum size is not the one the device offers.
    #[error("saved max size {saved} differs from the device's {device}")]
    MaxSize {
        /// In the state.
        saved: u16,
        /// What the device offers.
        device: u16,
    },
    /// Event index suppression enabled without the feature negotiated.
    #[error("event index enabled without VIRTIO_F_RING_EVENT_IDX")]
    EventIdx,
    /// virtio-queue refused the configuration (size not a power of two or above the maximum,
    /// a misaligned ring address).
    #[error("invalid queue configuration")]
    Config(#[source] virtio_queue::Error),
    /// A ready queue whose rings run past the end of the address space.
    #[error("{area} at {addr:#x} runs past the end of the address space")]
    AddressOverflow {
        /// "descriptor table", "available ring" or "used ring".
        area: &'static str,
        /// Its address.
        addr: u64,
    },
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl QueueSnapshot {
    /// Rebuilds the queue after checking it against the device: `max_size` must be what the
    /// device offers, `event_idx_allowed` says whether VIRTIO_F_RING_EVENT_IDX was negotiated.
    ///
    /// Guest memory is not checked here (the state has none); a ready queue outside guest
    /// memory makes the device fail its first access to it, as a driver-configured one would.
    pub fn restore(&self, max_size: u16, event_idx_allowed: bool) -> Result<Queue, QueueRestoreError> {
        if self.max_size != max_size {
            return Err(QueueRestoreError::MaxSize { saved: self.max_size, device: max_size });
        }
        if self.event_idx_enabled && !event_idx_allowed {
            return Err(QueueRestoreError::EventIdx);
        }
        if self.ready {
            self.check_ranges()?;
        }
        let state = QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        let queue = Queue::try_from(state).map_err(QueueRestoreError::Config)?;
        Ok(queue)
    }

    /// The three areas of a ready queue must not wrap around the address space.
    fn check_ranges(&self) -> Result<(), QueueRestoreError> {
        let size = u64::from(self.size);
        // Virtio 1.2 §2.7: 16-byte descriptors; flags, idx, ring, used_event / avail_event.
        let areas = [
            ("descriptor table", self.desc_table, 16 * size),
            ("available ring", self.avail_ring, 6 + 2 * size),
            ("used ring", self.used_ring, 6 + 8 * size),
        ];
        for (area, addr, len) in areas {
            if addr.checked_add(len).is_none() {
                return Err(QueueRestoreError::AddressOverflow { area, addr });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    use super::*;

    fn configured() -> Queue {
        let mut q = Queue::new(256).unwrap();
        q.try_set_size(64).unwrap();
        q.try_set_desc_table_address(GuestAddress(0x1000)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(0x2000)).unwrap();
        q.try_set_used_ring_address(GuestAddress(0x3000)).unwrap();
        q.set_ready(true);
        q.set_next_avail(70);
        q.set_next_used(65);
        q
    }

    #[test]
    fn queue_round_trip() {
        let q = configured();
        let snap = QueueSnapshot::from(&q);
        assert_eq!((snap.size, snap.next_avail, snap.next_used), (64, 70, 65));
        let back = snap.restore(256, false).unwrap();
        assert_eq!(back.state(), q.state());
        assert_eq!(QueueSnapshot::from(&back), snap);
        // An unconfigured queue round-trips too.
        let fresh = QueueSnapshot::from(&Queue::new(16).unwrap());
        assert_eq!(QueueSnapshot::from(&fresh.restore(16, false).unwrap()), fresh);
    }

    #[test]
    fn invalid_queues_are_refused() {
        let good = QueueSnapshot::from(&configured());
        let check = |f: &dyn Fn(&mut QueueSnapshot), max: u16, event_idx: bool| {
            let mut s = good;
            f(&mut s);
            s.restore(max, event_idx).unwrap_err()
        };
        use virtio_queue::Error as E;
        use QueueRestoreError as R;
        assert!(matches!(check(&|_| {}, 128, false), R::MaxSize { saved: 256, device: 128 }));
        assert!(matches!(check(&|s| s.size = 48, 256, false), R::Config(E::InvalidSize)));
        assert!(matches!(check(&|s| s.size = 0, 256, false), R::Config(E::InvalidSize)));
        assert!(matches!(check(&|s| s.size = 512, 256, false), R::Config(E::InvalidSize)));
        assert!(matches!(check(&|s| s.max_size = 100, 100, false), R::Config(E::InvalidMaxSize)));
        assert!(matches!(check(&|s| s.desc_table = 0x1008, 256, false), R::Config(E::InvalidDescTableAlign)));
        assert!(matches!(check(&|s| s.avail_ring = 0x2001, 256, false), R::Config(E::InvalidAvailRingAlign)));
        assert!(matches!(check(&|s| s.used_ring = 0x3002, 256, false), R::Config(E::InvalidUsedRingAlign)));
        let top = !0xf_u64;
        assert!(matches!(
            check(&|s| s.desc_table = top, 256, false),
            R::AddressOverflow { area: "descriptor table", .. }
        ));
        assert!(matches!(check(&|s| s.used_ring = top, 256, false), R::AddressOverflow { area: "used ring", .. }));
        assert!(matches!(check(&|s| s.event_idx_enabled = true, 256, false), R::EventIdx));
        // Not ready: the addresses are not used, only their alignment is checked.
        let mut idle = good;
        idle.ready = false;
        idle.desc_table = top;
        assert!(idle.restore(256, false).is_ok());
        let mut ev = good;
        ev.event_idx_enabled = true;
        assert!(ev.restore(256, true).is_ok());
    }
}
