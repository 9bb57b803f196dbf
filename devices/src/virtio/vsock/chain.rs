//! Validation of the descriptor chains the guest hands over, before virtio-vsock parses them.
//!
//! `VsockPacket` checks the header and data descriptors it uses; this adds what it does not
//! look at (chain shape, zero lengths, every descriptor's direction and bounds) so a hostile
//! chain is reported precisely instead of half-used.

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::PKT_HEADER_SIZE;
use vm_memory::{GuestMemory, Permissions};

use crate::GuestMemoryMmap;

/// Longest chain a vsock packet may use: a header descriptor and a data descriptor.
pub(crate) const MAX_DESCRIPTORS: usize = 2;

/// Which way the buffers of a queue go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// TX: the device only reads.
    DeviceReads,
    /// RX: the device only writes.
    DeviceWrites,
}

/// What is wrong with a descriptor chain.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The head index is outside the descriptor table (the chain has no descriptor).
    #[error("head descriptor index is out of range")]
    BadHead,
    /// The chain has more descriptors than a vsock packet uses.
    #[error("chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    /// A descriptor's `next` points back into the chain.
    #[error("descriptor chain loops back to descriptor {0}")]
    Cycle(u16),
    /// A descriptor's `next` is outside the table, or the chain could not be followed.
    #[error("descriptor chain is truncated")]
    Truncated,
    /// A descriptor of length 0.
    #[error("descriptor {0} of the chain has length 0")]
    ZeroLength(usize),
    /// A write-only descriptor on TX or a read-only one on RX.
    #[error("descriptor {0} of the chain has the wrong direction")]
    WrongDirection(usize),
    /// A buffer not entirely inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfBounds {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The head descriptor cannot hold a packet header.
    #[error("header descriptor of {0} bytes is shorter than a packet header")]
    ShortHeader(u32),
    /// An RX chain with no room for data.
    #[error("rx buffer has no data space")]
    NoDataSpace,
    /// virtio-vsock refused the packet.
    #[error("malformed packet")]
    Packet(#[source] virtio_vsock::packet::Error),
}

/// Checks the shape of `chain` without consuming it.
pub(crate) fn validate(
    chain: &DescriptorChain<&GuestMemoryMmap>,
    direction: Direction,
    mem: &GuestMemoryMmap,
) -> Result<(), ChainError> {
    // Indices of the descriptors walked so far, to recognise a loop.
    let mut seen = [chain.head_index(); MAX_DESCRIPTORS];
    let mut count = 0;
    let mut more = true;
    for desc in chain.clone() {
        // The iterator itself stops after queue-size descriptors; stop far earlier.
        if count >= MAX_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        if desc.len() == 0 {
            return Err(ChainError::ZeroLength(count));
        }
        if count == 0 && (desc.len() as usize) < PKT_HEADER_SIZE {
            return Err(ChainError::ShortHeader(desc.len()));
        }
        if desc.is_write_only() != (direction == Direction::DeviceWrites) {
            return Err(ChainError::WrongDirection(count));
        }
        let len = usize::try_from(desc.len()).unwrap_or(usize::MAX);
        let access = match direction {
            Direction::DeviceReads => Permissions::Read,
            Direction::DeviceWrites => Permissions::Write,
        };
        if !mem.check_range(desc.addr(), len, access) {
            return Err(ChainError::OutOfBounds { addr: desc.addr().0, len: desc.len() });
        }
        count += 1;
        more = desc.has_next();
        if more {
            let next = desc.next();
            if seen.iter().take(count).any(|&i| i == next) {
                return Err(ChainError::Cycle(next));
            }
            if let Some(slot) = seen.get_mut(count) {
                *slot = next;
            }
        }
    }
    if count == 0 {
        return Err(ChainError::BadHead);
    }
    if more {
        return Err(ChainError::Truncated);
    }
    Ok(())
}
