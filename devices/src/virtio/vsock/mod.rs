//! The virtio-vsock device (virtio 1.2 §5.10) with an in-VMM host endpoint.
//!
//! Every connection's host side is a pair of in-memory byte buffers: the VMM queues bytes for
//! the guest with [`Vsock::send`] and takes the guest's bytes with [`Vsock::recv`]. Stream
//! sockets only. The device polls (see [`crate::virtio`]): [`VirtioDevice::process`] moves TX
//! packets into connections, then fills RX buffers with control packets first and data
//! second, round-robin across connections.
//!
//! Everything the guest hands over is validated; a bad chain is returned with length 0 and
//! recorded ([`Vsock::take_errors`]), and a queue broken beyond recovery stops the device
//! until the driver resets it.

mod chain;
mod connection;
mod persist;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;

use mu2_abi::vsock::{op, shutdown, TYPE_STREAM};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, VolatileSlice};

pub use self::chain::ChainError;
use self::chain::Direction;
use self::connection::Connection;
pub use self::connection::{CloseReason, ConnPhase, ConnState};
pub use self::persist::{VsockRestoreError, VsockState};
use super::{driver_wants_interrupt, VirtioDevice, VirtioError};
use crate::GuestMemoryMmap;

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

/// Most errors kept for [`Vsock::take_errors`]; later ones are counted in
/// [`VsockStats::errors_dropped`].
const MAX_RECORDED_ERRORS: usize = 256;
/// Most RSTs waiting for RX buffers that belong to no connection; more are dropped, so a guest
/// spraying packets at unknown ports cannot make the device grow.
const MAX_PENDING_RSTS: usize = 256;
/// First host port handed to host-initiated connections.
const FIRST_EPHEMERAL_PORT: u32 = 0x4000_0000;

/// Device configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's CID, shown in config space; guest packets must come from it.
    pub guest_cid: u64,
    /// Receive buffer the host grants each connection: the guest may have at most this many
    /// bytes not yet taken by [`Vsock::recv`].
    pub host_buf_alloc: u32,
    /// Largest data payload of one packet, either way.
    pub max_packet_data: u32,
    /// Most connections (open or closed but not yet removed) at a time.
    pub max_connections: usize,
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

/// Identifies a connection for the host side. Never reused while the device lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnId(u64);

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
    /// Errors not kept for [`Vsock::take_errors`] because too many were pending.
    pub errors_dropped: u64,
}

/// Errors of the host API, and guest misbehaviour reported by [`Vsock::take_errors`].
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

/// The header fields of a guest packet, copied out of guest memory once.
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

/// A packet for the guest, chosen before it is written to an RX buffer. Its data (if any) is
/// in `Vsock::scratch`.
#[derive(Clone, Copy, Debug)]
struct Outgoing {
    host_port: u32,
    guest_port: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

/// The device's queues while it is active.
#[derive(Debug)]
struct Queues {
    rx: Queue,
    tx: Queue,
    /// Kept so that its configuration is saved with the device; never used.
    _event: Queue,
}

/// The virtio-vsock device and its host endpoint.
#[derive(Debug)]
pub struct Vsock {
    config: VsockConfig,
    acked_features: u64,
    queues: Option<Queues>,
    /// A queue broke: nothing is processed until the driver resets the device.
    failed: bool,
    /// The driver wants an interrupt for the last `process`.
    interrupt: bool,
    conns: BTreeMap<ConnId, Connection>,
    /// Open connections by (host port, guest port). Closed ones leave it, so the guest can
    /// reuse a port pair while the host still reads the old connection's last bytes.
    by_ports: BTreeMap<(u32, u32), ConnId>,
    listening: BTreeSet<u32>,
    accept_queue: VecDeque<(ConnId, u32)>,
    /// RSTs owed to the guest for port pairs that have no connection (any more).
    pending_rsts: VecDeque<(u32, u32)>,
    next_id: u64,
    next_port: u32,
    /// Last connection served by the control / data passes, for round-robin fairness.
    control_cursor: Option<ConnId>,
    data_cursor: Option<ConnId>,
    errors: Vec<VsockError>,
    stats: VsockStats,
    /// Reused buffer for packet data in both directions; never larger than max_packet_data.
    scratch: Vec<u8>,
    /// Guest traffic changed something the host side sees (data, a close, an accept) since
    /// the last [`Vsock::take_host_news`]. Transient: not part of the saved state.
    host_news: bool,
}

impl Vsock {
    /// A device with no connections, not yet activated by a driver.
    pub fn new(config: VsockConfig) -> Self {
        Vsock {
            config,
            acked_features: 0,
            queues: None,
            failed: false,
            interrupt: false,
            conns: BTreeMap::new(),
            by_ports: BTreeMap::new(),
            listening: BTreeSet::new(),
            accept_queue: VecDeque::new(),
            pending_rsts: VecDeque::new(),
            next_id: 1,
            next_port: FIRST_EPHEMERAL_PORT,
            control_cursor: None,
            data_cursor: None,
            errors: Vec::new(),
            stats: VsockStats::default(),
            scratch: Vec::new(),
            host_news: false,
        }
    }

    /// The configuration the device was created with.
    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// Host-initiated connection to a guest port. The REQUEST is queued for the guest.
    ///
    /// `assumed_peer_credit`: bytes the host may send before the guest's RESPONSE arrives (the
    /// guest runtime announces its per-connection buf_alloc in advance; 0 = strict: wait for
    /// the RESPONSE). Data queued with [`Vsock::send`] goes into RX right after the REQUEST, so
    /// a whole request can reach the guest in one batch.
    pub fn connect(&mut self, guest_port: u32, assumed_peer_credit: u32) -> Result<ConnId, VsockError> {
        if self.conns.len() >= self.config.max_connections {
            return Err(VsockError::TooManyConnections(self.config.max_connections));
        }
        let host_port = self.free_host_port(guest_port)?;
        let id = self.add_connection(Connection::outgoing(host_port, guest_port, assumed_peer_credit));
        Ok(id)
    }

    /// Appends bytes to send to the guest (delivered as RW packets as RX buffers and credit
    /// allow).
    pub fn send(&mut self, id: ConnId, data: &[u8]) -> Result<(), VsockError> {
        let conn = self.conns.get_mut(&id).ok_or(VsockError::UnknownConnection(id))?;
        if !conn.is_open() || conn.host_shutdown || conn.guest_shutdown_recv {
            return Err(VsockError::NotWritable(id));
        }
        conn.to_guest.extend(data);
        Ok(())
    }

    /// Half-close: after all queued data, tell the guest the host sends no more (SHUTDOWN
    /// flag 2).
    pub fn shutdown_send(&mut self, id: ConnId) -> Result<(), VsockError> {
        let conn = self.conns.get_mut(&id).ok_or(VsockError::UnknownConnection(id))?;
        if !conn.is_open() {
            return Err(VsockError::NotWritable(id));
        }
        conn.host_shutdown = true;
        Ok(())
    }

    /// Moves the bytes the guest sent out of the connection into `out`; returns how many.
    /// Advances fwd_cnt and may queue a CREDIT_UPDATE. Works on closed connections too.
    pub fn recv(&mut self, id: ConnId, out: &mut Vec<u8>) -> Result<usize, VsockError> {
        let conn = self.conns.get_mut(&id).ok_or(VsockError::UnknownConnection(id))?;
        let n = conn.from_guest.len();
        out.extend(conn.from_guest.drain(..));
        // n <= host_buf_alloc, a u32.
        conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
        conn.consumed(self.config.host_buf_alloc);
        Ok(n)
    }

    /// The connection's state, or `None` if it does not exist.
    pub fn state(&self, id: ConnId) -> Option<ConnState> {
        self.conns.get(&id).map(Connection::state)
    }

    /// Aborts the connection with RST (unless already closed) and forgets it.
    pub fn abort(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.remove(&id) {
            if conn.is_open() {
                self.by_ports.remove(&(conn.host_port, conn.guest_port));
                self.queue_rst(conn.host_port, conn.guest_port);
            }
        }
    }

    /// Forgets a connection. One that is not closed yet is reset first, as by [`Vsock::reset`].
    pub fn remove(&mut self, id: ConnId) {
        self.abort(id);
    }

    /// Guest-initiated connections to this host port are accepted (queued for
    /// [`Vsock::accept`]); others get RST.
    pub fn listen(&mut self, host_port: u32) {
        self.listening.insert(host_port);
    }

    /// The oldest guest-initiated connection not yet accepted, and the host port it went to.
    pub fn accept(&mut self) -> Option<(ConnId, u32)> {
        while let Some((id, port)) = self.accept_queue.pop_front() {
            if self.conns.contains_key(&id) {
                return Some((id, port));
            }
        }
        None
    }

    /// Whether guest traffic changed anything the host side sees (data to read, a connection
    /// accepted, established or closed) since the last call. The VMM returns control to the
    /// host side on that instead of waking the guest for bookkeeping it can do later.
    pub fn take_host_news(&mut self) -> bool {
        std::mem::take(&mut self.host_news)
    }

    /// Malformed chains and protocol violations since the last call (each also logged).
    pub fn take_errors(&mut self) -> Vec<VsockError> {
        std::mem::take(&mut self.errors)
    }

    /// Counters since the device was created.
    pub fn stats(&self) -> VsockStats {
        self.stats
    }

    /// Whether a queue broke and the device waits for a reset.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    fn add_connection(&mut self, conn: Connection) -> ConnId {
        let id = ConnId(self.next_id);
        self.next_id += 1;
        self.by_ports.insert((conn.host_port, conn.guest_port), id);
        self.conns.insert(id, conn);
        self.stats.connections += 1;
        id
    }

    fn free_host_port(&mut self, guest_port: u32) -> Result<u32, VsockError> {
        // Every open connection and listener rules out at most one port, so this many tries
        // find a free one.
        let tries = self.by_ports.len() + self.listening.len() + 1;
        for _ in 0..tries {
            let port = self.next_port;
            // u32::MAX is VMADDR_PORT_ANY; stay in the ephemeral range.
            self.next_port = if port >= u32::MAX - 1 { FIRST_EPHEMERAL_PORT } else { port + 1 };
            if !self.listening.contains(&port) && !self.by_ports.contains_key(&(port, guest_port)) {
                return Ok(port);
            }
        }
        Err(VsockError::NoFreePort)
    }

    fn record(&mut self, e: VsockError) {
        log::warn!("virtio-vsock: {}", error_chain(&e));
        match e {
            VsockError::BadChain { .. } => self.stats.bad_chains += 1,
            VsockError::QueueBroken { .. } => {}
            _ => self.stats.protocol_errors += 1,
        }
        if self.errors.len() < MAX_RECORDED_ERRORS {
            self.errors.push(e);
        } else {
            self.stats.errors_dropped += 1;
        }
    }

    fn queue_rst(&mut self, host_port: u32, guest_port: u32) {
        if self.pending_rsts.len() < MAX_PENDING_RSTS {
            self.pending_rsts.push_back((host_port, guest_port));
        } else {
            self.stats.resets_dropped += 1;
        }
    }

    /// Closes an open connection, optionally telling the guest with RST.
    fn close(&mut self, id: ConnId, reason: CloseReason, send_rst: bool) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.close(reason);
        let (host_port, guest_port) = (conn.host_port, conn.guest_port);
        self.by_ports.remove(&(host_port, guest_port));
        if send_rst {
            self.queue_rst(host_port, guest_port);
        }
    }

    /// Reads the TX queue until it is empty. Returns whether chains were used.
    fn process_tx(&mut self, mem: &GuestMemoryMmap, tx: &mut Queue) -> bool {
        let mut used = false;
        // A guest vCPU running concurrently could keep adding buffers; one lap is enough.
        for _ in 0..tx.size() {
            let chain = match pop_chain(tx, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(source) => {
                    self.fail(VsockError::QueueBroken { queue: "tx", source });
                    break;
                }
            };
            let head = chain.head_index();
            if let Err(source) = self.handle_tx_chain(mem, chain) {
                self.record(VsockError::BadChain { queue: "tx", head, source });
            }
            // TX buffers are only read: the used length is 0 whether the chain was good or not.
            if !self.add_used(mem, tx, "tx", head, 0) {
                break;
            }
            used = true;
        }
        used
    }

    fn handle_tx_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        mut chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<(), ChainError> {
        chain::validate(&chain, Direction::DeviceReads, mem)?;
        // VsockPacket copies the header once: the guest cannot change it under us.
        let pkt = VsockPacket::from_tx_virtq_chain(mem, &mut chain, self.config.max_packet_data)
            .map_err(ChainError::Packet)?;
        let hdr = Header {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        };
        self.handle_packet(hdr, pkt.data_slice());
        Ok(())
    }

    /// Acts on one well-formed guest packet.
    fn handle_packet(&mut self, hdr: Header, data: Option<&VolatileSlice<'_, ()>>) {
        if hdr.src_cid != self.config.guest_cid {
            return self.record(VsockError::BadSrcCid(hdr.src_cid));
        }
        if hdr.dst_cid != HOST_CID {
            return self.record(VsockError::BadDstCid(hdr.dst_cid));
        }
        if hdr.type_ != TYPE_STREAM {
            return self.record(VsockError::UnsupportedType(hdr.type_));
        }
        if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&hdr.op) {
            return self.record(VsockError::UnknownOp(hdr.op));
        }
        self.stats.tx_packets += 1;
        let (host_port, guest_port) = (hdr.dst_port, hdr.src_port);
        let Some(&id) = self.by_ports.get(&(host_port, guest_port)) else {
            match hdr.op {
                op::REQUEST => self.guest_connect(hdr),
                // Never answer an RST, or two sides could bounce RSTs forever.
                op::RST => {}
                // The spec's answer to anything for a connection that does not exist.
                _ => self.queue_rst(host_port, guest_port),
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&id) else {
            // by_ports only names existing connections; treat a mismatch as unknown.
            self.by_ports.remove(&(host_port, guest_port));
            return self.queue_rst(host_port, guest_port);
        };
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        if hdr.op != op::CREDIT_UPDATE && hdr.op != op::CREDIT_REQUEST {
            self.host_news = true;
        }
        let unexpected = VsockError::UnexpectedOp { guest_port, host_port, op: hdr.op };
        match hdr.op {
            op::RESPONSE if conn.phase == ConnPhase::Connecting => {
                conn.phase = ConnPhase::Established;
            }
            op::RST => {
                let reason =
                    if conn.phase == ConnPhase::Connecting { CloseReason::Refused } else { CloseReason::GuestReset };
                self.close(id, reason, false);
            }
            op::SHUTDOWN if conn.phase == ConnPhase::Established => {
                conn.guest_shutdown_recv |= hdr.flags & shutdown::RCV != 0;
                conn.guest_shutdown_send |= hdr.flags & shutdown::SEND != 0;
                if conn.guest_shutdown_recv {
                    // Nobody will read it.
                    conn.to_guest.clear();
                }
                if conn.guest_shutdown_recv && conn.guest_shutdown_send {
                    // Clean disconnect: the peer that receives a full SHUTDOWN answers RST.
                    self.close(id, CloseReason::GuestClosed, true);
                }
            }
            op::RW if conn.phase == ConnPhase::Established && !conn.guest_shutdown_send => {
                let Some(data) = data else {
                    return; // len 0: only credit information
                };
                let buffered = u32::try_from(conn.from_guest.len()).unwrap_or(u32::MAX);
                let credit = self.config.host_buf_alloc.saturating_sub(buffered);
                if hdr.len > credit {
                    self.record(VsockError::CreditExceeded { guest_port, host_port, len: hdr.len, credit });
                    return self.close(id, CloseReason::ProtocolError, true);
                }
                // hdr.len <= max_packet_data (VsockPacket checked) and <= the credit left.
                self.scratch.resize(data.len(), 0);
                if data.copy_to(&mut self.scratch[..]) != data.len() {
                    return;
                }
                conn.from_guest.extend(&self.scratch);
                self.stats.tx_bytes += data.len() as u64;
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => conn.credit_update_pending = true,
            _ => {
                // REQUEST on an existing port pair, RESPONSE out of turn, data before the
                // handshake or after SHUTDOWN.
                self.record(unexpected);
                self.close(id, CloseReason::ProtocolError, true);
            }
        }
    }

    fn guest_connect(&mut self, hdr: Header) {
        let (host_port, guest_port) = (hdr.dst_port, hdr.src_port);
        if !self.listening.contains(&host_port) || self.conns.len() >= self.config.max_connections {
            return self.queue_rst(host_port, guest_port);
        }
        let conn = Connection::incoming(host_port, guest_port, hdr.buf_alloc, hdr.fwd_cnt);
        let id = self.add_connection(conn);
        self.accept_queue.push_back((id, host_port));
        self.host_news = true;
    }

    /// Whether a packet is waiting for an RX buffer.
    fn has_rx_work(&self) -> bool {
        !self.pending_rsts.is_empty() || self.conns.values().any(|c| c.has_control() || c.has_data_work())
    }

    /// The first connection after `cursor` (wrapping around) that satisfies `pred`.
    fn next_conn(&self, cursor: Option<ConnId>, pred: impl Fn(&Connection) -> bool) -> Option<ConnId> {
        let start = cursor.map_or(Bound::Unbounded, Bound::Excluded);
        let end = cursor.map_or(Bound::Excluded(ConnId(0)), Bound::Included);
        self.conns
            .range((start, Bound::Unbounded))
            .chain(self.conns.range((Bound::Unbounded, end)))
            .find(|(_, c)| pred(c))
            .map(|(&id, _)| id)
    }

    /// Chooses the next packet for the guest, with at most `capacity` data bytes, and updates
    /// the connection as if sent. Data goes to `self.scratch`.
    fn next_outgoing(&mut self, capacity: usize) -> Option<Outgoing> {
        self.scratch.clear();
        if let Some((host_port, guest_port)) = self.pending_rsts.pop_front() {
            self.stats.resets_sent += 1;
            let (buf_alloc, fwd_cnt) = (0, 0);
            return Some(Outgoing { host_port, guest_port, op: op::RST, flags: 0, buf_alloc, fwd_cnt });
        }
        let buf_alloc = self.config.host_buf_alloc;
        let max_data = usize::try_from(self.config.max_packet_data).unwrap_or(usize::MAX);
        let (id, op, flags) = if let Some(id) = self.next_conn(self.control_cursor, Connection::has_control) {
            self.control_cursor = Some(id);
            let conn = self.conns.get_mut(&id)?;
            let op = if std::mem::take(&mut conn.request_pending) {
                op::REQUEST
            } else if std::mem::take(&mut conn.response_pending) {
                op::RESPONSE
            } else {
                op::CREDIT_UPDATE
            };
            (id, op, 0)
        } else {
            let id = self.next_conn(self.data_cursor, Connection::has_data_work)?;
            self.data_cursor = Some(id);
            let conn = self.conns.get_mut(&id)?;
            if conn.can_send_data() {
                let credit = usize::try_from(conn.peer_credit()).unwrap_or(usize::MAX);
                let n = conn.to_guest.len().min(capacity).min(credit).min(max_data);
                self.scratch.extend(conn.to_guest.drain(..n));
                // n <= max_packet_data, a u32.
                conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                (id, op::RW, 0)
            } else {
                conn.host_shutdown_sent = true;
                (id, op::SHUTDOWN, shutdown::SEND)
            }
        };
        let conn = self.conns.get_mut(&id)?;
        // Every header carries our fwd_cnt: no separate CREDIT_UPDATE needed after this one.
        conn.reported_fwd_cnt = conn.fwd_cnt;
        conn.credit_update_pending = false;
        Some(Outgoing {
            host_port: conn.host_port,
            guest_port: conn.guest_port,
            op,
            flags,
            buf_alloc,
            fwd_cnt: conn.fwd_cnt,
        })
    }

    /// Fills RX buffers while there is something to send. Returns whether chains were used.
    fn fill_rx(&mut self, mem: &GuestMemoryMmap, rx: &mut Queue) -> bool {
        let mut used = false;
        for _ in 0..rx.size() {
            if !self.has_rx_work() {
                break;
            }
            let chain = match pop_chain(rx, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(source) => {
                    self.fail(VsockError::QueueBroken { queue: "rx", source });
                    break;
                }
            };
            let head = chain.head_index();
            let len = match self.write_rx_chain(mem, chain) {
                Ok(len) => len,
                Err(source) => {
                    self.record(VsockError::BadChain { queue: "rx", head, source });
                    0
                }
            };
            if !self.add_used(mem, rx, "rx", head, len) {
                break;
            }
            used = true;
        }
        used
    }

    /// Writes the next packet into an RX chain; returns the bytes written.
    fn write_rx_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        mut chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, ChainError> {
        chain::validate(&chain, Direction::DeviceWrites, mem)?;
        // Any RX data buffer size is fine: at most max_packet_data bytes go into it, and
        // nothing is allocated for it.
        let mut pkt = VsockPacket::from_rx_virtq_chain(mem, &mut chain, u32::MAX).map_err(ChainError::Packet)?;
        let capacity = pkt.data_slice().map_or(0, VolatileSlice::len);
        if capacity == 0 {
            return Err(ChainError::NoDataSpace);
        }
        // Validated before choosing the packet, so a bad buffer never loses one.
        let Some(out) = self.next_outgoing(capacity) else {
            return Ok(0);
        };
        let data_len = self.scratch.len();
        if let Some(slice) = pkt.data_slice() {
            if data_len > 0 {
                slice
                    .write_slice(&self.scratch, 0)
                    .map_err(|e| ChainError::Packet(virtio_vsock::packet::Error::InvalidVolatileAccess(e)))?;
            }
        }
        // data_len <= capacity and <= max_packet_data.
        let data_len = data_len as u32;
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.config.guest_cid)
            .set_src_port(out.host_port)
            .set_dst_port(out.guest_port)
            .set_len(data_len)
            .set_type(TYPE_STREAM)
            .set_op(out.op)
            .set_flags(out.flags)
            .set_buf_alloc(out.buf_alloc)
            .set_fwd_cnt(out.fwd_cnt);
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += u64::from(data_len);
        Ok(virtio_vsock::packet::PKT_HEADER_SIZE as u32 + data_len)
    }

    /// Returns a chain to the used ring. False when the queue broke.
    fn add_used(&mut self, mem: &GuestMemoryMmap, q: &mut Queue, queue: &'static str, head: u16, len: u32) -> bool {
        match q.add_used(mem, head, len) {
            Ok(()) => true,
            // A head index out of range cannot be returned: the guest's loss, not ours.
            Err(virtio_queue::Error::InvalidDescriptorIndex) => true,
            Err(source) => {
                self.fail(VsockError::QueueBroken { queue, source });
                false
            }
        }
    }

    fn fail(&mut self, e: VsockError) {
        self.failed = true;
        self.record(e);
    }
}

/// The next available chain; an error when the ring is broken.
fn pop_chain<'m>(
    q: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    // `iter` (unlike `pop_descriptor_chain`) reports an available index too far ahead.
    Ok(q.iter(mem)?.next())
}

/// An error and its sources on one line, for the log.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE; 3]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config.guest_cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
        log::debug!("virtio-vsock: ignored config write at {offset:#x}");
    }

    fn activate(&mut self, mem: &GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), VirtioError> {
        let got = queues.len();
        let [mut rx, mut tx, mut event]: [Queue; 3] =
            queues.try_into().map_err(|_| VirtioError::QueueCount { expected: 3, got })?;
        for (index, q) in [&mut rx, &mut tx, &mut event].into_iter().enumerate() {
            if !q.ready() {
                // The event queue is never used, so a driver may leave it out.
                if index == EVENT_QUEUE {
                    continue;
                }
                return Err(VirtioError::QueueNotReady(index));
            }
            // The device polls: the driver need not notify (VRING_USED_F_NO_NOTIFY).
            q.disable_notification(mem).map_err(|source| VirtioError::Queue { index, source })?;
        }
        self.queues = Some(Queues { rx, tx, _event: event });
        self.failed = false;
        Ok(())
    }

    fn process(&mut self, mem: &GuestMemoryMmap) -> bool {
        self.interrupt = false;
        if self.failed {
            return false;
        }
        let Some(mut queues) = self.queues.take() else {
            return false;
        };
        let tx_used = self.process_tx(mem, &mut queues.tx);
        let rx_used = !self.failed && self.fill_rx(mem, &mut queues.rx);
        // Both queues are asked, so that each one's notification state stays current.
        let tx_irq = tx_used && driver_wants_interrupt(&mut queues.tx, mem);
        let rx_irq = rx_used && driver_wants_interrupt(&mut queues.rx, mem);
        self.interrupt = tx_irq || rx_irq;
        self.queues = Some(queues);
        tx_used || rx_used
    }

    fn reset(&mut self) {
        self.queues = None;
        self.failed = false;
        self.interrupt = false;
        self.acked_features = 0;
        self.conns.clear();
        self.by_ports.clear();
        self.accept_queue.clear();
        self.pending_rsts.clear();
        self.control_cursor = None;
        self.data_cursor = None;
    }

    fn interrupt_wanted(&mut self) -> bool {
        self.interrupt
    }

    fn needs_reset(&self) -> bool {
        self.failed
    }
}
