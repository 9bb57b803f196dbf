//! The virtio-vsock device (virtio 1.2 §5.10) with an in-VMM host endpoint. Stream sockets
//! only.
//!
//! - [`Vsock`] (`device.rs`) is the virtio device: its queues, the validation of every
//!   descriptor chain the guest hands over (`chain.rs`), and moving packets between the rings
//!   and the endpoint.
//! - [`HostEndpoint`] (`endpoint.rs`) is the VMM's side of the connections: connect, send,
//!   receive, listen, accept, shut down, abort; the connection table, the RSTs owed to the
//!   guest, the errors the guest caused. The VMM reaches it through [`Vsock::host_mut`].
//! - `connection.rs` is one connection's state machine and credit accounting: what each guest
//!   packet does to it, and what it sends next.
//! - `persist.rs` saves and restores the device ([`VsockState`]).

mod chain;
mod connection;
mod device;
mod endpoint;
mod persist;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use self::chain::ChainError;
pub use self::connection::{CloseReason, ConnPhase, ConnState};
pub use self::device::Vsock;
pub use self::endpoint::{ConnId, HostEndpoint};
pub use self::persist::{VsockRestoreError, VsockState};

/// The host's CID.
pub const HOST_CID: u64 = mu2_abi::HOST_CID;
/// Queue size the device offers for each of its queues.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Index of the RX queue (device → guest).
pub const RX_QUEUE: usize = 0;
/// Index of the TX queue (guest → device).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue (unused: mu2 never sends transport events).
pub const EVENT_QUEUE: usize = 2;

/// Device configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's CID, shown in config space; guest packets must come from it.
    pub guest_cid: u64,
    /// Receive buffer the host grants each connection: the guest may have at most this many
    /// bytes not yet taken by [`HostEndpoint::recv`].
    pub host_buf_alloc: u32,
    /// Largest data payload of one packet, either way.
    pub max_packet_data: u32,
    /// Most connections (open or closed but not yet removed) at a time.
    pub max_connections: usize,
}

impl VsockConfig {
    /// The most host receive buffer a connection may be granted.
    pub const MAX_HOST_BUF_ALLOC: u32 = 64 << 20;
    /// The largest packet payload either way.
    pub const MAX_PACKET_DATA: u32 = 64 << 10;
    /// The most connections at a time.
    pub const MAX_CONNECTIONS: usize = 4096;

    /// The first limit out of its range, if any: `(name, value, most allowed)`. Zero packet
    /// data or connections are out of range too.
    pub fn out_of_range(&self) -> Option<(&'static str, u64, u64)> {
        let checks = [
            ("host_buf_alloc", u64::from(self.host_buf_alloc), u64::from(Self::MAX_HOST_BUF_ALLOC), true),
            ("max_packet_data", u64::from(self.max_packet_data), u64::from(Self::MAX_PACKET_DATA), false),
            ("max_connections", self.max_connections as u64, Self::MAX_CONNECTIONS as u64, false),
        ];
        checks
            .into_iter()
            .find(|&(_, value, max, zero_ok)| value > max || (value == 0 && !zero_ok))
            .map(|(name, value, max, _)| (name, value, max))
    }
}

impl Default for VsockConfig {
    fn default() -> Self {
        VsockConfig {
            guest_cid: mu2_abi::GUEST_CID,
            host_buf_alloc: 256 << 10,
            max_packet_data: 64 << 10,
            max_connections: 256,
        }
    }
}

/// Counters. "tx" is guest → host, "rx" is host → guest, as in virtio.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockStats {
    /// Packets taken from the TX queue and accepted.
    pub tx_packets: u64,
    /// Data bytes the guest sent.
    pub tx_bytes: u64,
    /// Packets written to RX buffers.
    pub rx_packets: u64,
    /// Data bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Malformed descriptor chains (either queue).
    pub bad_chains: u64,
    /// Well-formed packets the guest should not have sent.
    pub protocol_errors: u64,
    /// RSTs sent to the guest.
    pub resets_sent: u64,
    /// RSTs not sent because too many were waiting for RX buffers.
    pub resets_dropped: u64,
    /// Connections established (either side initiating).
    pub connections: u64,
    /// Errors not kept for [`HostEndpoint::take_errors`] because too many were pending.
    pub errors_dropped: u64,
}

/// Errors of the host API, and guest misbehaviour reported by [`HostEndpoint::take_errors`].
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// No connection has this id (never existed, removed, or the device was reset).
    #[error("unknown connection {0:?}")]
    UnknownConnection(ConnId),
    /// The connection cannot carry more host data: closed, shut down by the host, or the guest
    /// receives no more.
    #[error("connection {0:?} does not accept data")]
    NotWritable(ConnId),
    /// `max_connections` reached.
    #[error("too many connections ({0})")]
    TooManyConnections(usize),
    /// No host port is free for a new connection to this guest port.
    #[error("no free host port")]
    NoFreePort,
    /// A malformed descriptor chain; it was returned unused.
    #[error("{queue} queue: descriptor chain {head} rejected")]
    BadChain {
        /// "rx" or "tx".
        queue: &'static str,
        /// Head descriptor index.
        head: u16,
        /// What is wrong.
        #[source]
        source: ChainError,
    },
    /// A queue broken beyond recovery (e.g. available index too far ahead): the device stopped
    /// and needs a reset.
    #[error("{queue} queue is broken; device stopped")]
    QueueBroken {
        /// "rx" or "tx".
        queue: &'static str,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// A guest packet whose source CID is not the guest's.
    #[error("packet from cid {0}")]
    BadSrcCid(u64),
    /// A guest packet not addressed to the host.
    #[error("packet to cid {0}")]
    BadDstCid(u64),
    /// A socket type other than stream.
    #[error("unsupported socket type {0}")]
    UnsupportedType(u16),
    /// An unknown operation.
    #[error("unknown operation {0}")]
    UnknownOp(u16),
    /// The guest sent more than its credit allows; the connection was reset.
    #[error("guest port {guest_port} -> host port {host_port}: {len} bytes exceed credit {credit}")]
    CreditExceeded {
        /// Guest-side port.
        guest_port: u32,
        /// Host-side port.
        host_port: u32,
        /// Payload length of the packet.
        len: u32,
        /// Credit the guest had left.
        credit: u32,
    },
    /// A valid operation at the wrong moment (e.g. data after SHUTDOWN, RESPONSE to nothing);
    /// the connection was reset.
    #[error("guest port {guest_port} -> host port {host_port}: unexpected operation {op}")]
    UnexpectedOp {
        /// Guest-side port.
        guest_port: u32,
        /// Host-side port.
        host_port: u32,
        /// The operation.
        op: u16,
    },
}

/// The header fields of a guest packet, copied out of guest memory once by the device.
#[derive(Clone, Copy, Debug)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}
