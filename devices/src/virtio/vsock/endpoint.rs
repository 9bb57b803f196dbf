//! The host endpoint of the vsock device: the VMM's side of every connection, in memory.
//!
//! Each connection's host side is a pair of byte buffers: the VMM queues bytes for the guest
//! with [`HostEndpoint::send`] and takes the guest's with [`HostEndpoint::recv`]. The endpoint
//! owns the connection table (by id and by port pair), the listeners and the accept queue, the
//! RSTs owed to the guest, and the record of guest misbehaviour. The device
//! ([`super::Vsock`]) hands it every well-formed guest packet
//! ([`HostEndpoint::on_guest_packet`]) and asks it for the next packet for the guest
//! ([`HostEndpoint::next_rx_packet`]); what a packet does to a connection is decided in
//! [`super::connection`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;

use mu2_abi::vsock::{op, TYPE_STREAM};
use serde::{Deserialize, Serialize};
use vm_memory::VolatileSlice;

use super::connection::{ConnState, Connection, Transition, Violation};
use super::{Header, VsockConfig, VsockError, VsockStats, HOST_CID};
use crate::throttle::{Throttled, GUEST_WARNING_INTERVAL};

/// Most errors kept for [`HostEndpoint::take_errors`]; later ones are counted in
/// [`VsockStats::errors_dropped`].
pub(super) const MAX_RECORDED_ERRORS: usize = 256;
/// Most RSTs waiting for RX buffers that belong to no connection; more are dropped, so a guest
/// spraying packets at unknown ports cannot make the device grow.
pub(super) const MAX_PENDING_RSTS: usize = 256;
/// First host port handed to host-initiated connections.
pub(super) const FIRST_EPHEMERAL_PORT: u32 = 0x4000_0000;

/// Identifies a connection for the host side. Never reused while the device lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnId(u64);

/// The header of the next packet for the guest, before it is written to an RX buffer. Its
/// data (if any) is in the buffer passed to [`HostEndpoint::next_rx_packet`].
#[derive(Clone, Copy, Debug)]
pub(super) struct RxHeader {
    pub host_port: u32,
    pub guest_port: u32,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// What a saved device keeps of its endpoint: the allocators and the RSTs owed to the guest
/// (see persist.rs).
#[derive(Debug)]
pub(super) struct SavedEndpoint {
    pub next_id: u64,
    pub next_port: u32,
    pub pending_rsts: Vec<(u32, u32)>,
}

/// The host side of the vsock device's connections.
#[derive(Debug)]
pub struct HostEndpoint {
    config: VsockConfig,
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
    /// Guest traffic changed something the host side sees (data, a close, an accept) since
    /// the last [`HostEndpoint::take_host_news`]. Transient: not part of the saved state.
    host_news: bool,
}

impl HostEndpoint {
    /// An endpoint with no connections.
    pub(super) fn new(config: VsockConfig) -> Self {
        HostEndpoint {
            config,
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
            host_news: false,
        }
    }

    /// The configuration of the device.
    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// Host-initiated connection to a guest port. The REQUEST is queued for the guest.
    ///
    /// `assumed_peer_credit`: bytes the host may send before the guest's RESPONSE arrives (the
    /// guest runtime announces its per-connection buf_alloc in advance; 0 = strict: wait for
    /// the RESPONSE). Data queued with [`HostEndpoint::send`] goes into RX right after the
    /// REQUEST, so a whole request can reach the guest in one batch.
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
        if !conn.queue_for_guest(data) {
            return Err(VsockError::NotWritable(id));
        }
        Ok(())
    }

    /// Half-close: after all queued data, tell the guest the host sends no more (SHUTDOWN
    /// flag 2).
    pub fn shutdown_send(&mut self, id: ConnId) -> Result<(), VsockError> {
        self.shutdown(id, false)
    }

    /// After all queued data, SHUTDOWN with "no more send", and with `also_rcv` "no more
    /// receive" too: the full close other hosts send (Firecracker's hybrid vsock turns its
    /// socket's half-close into one). Bytes the guest sends afterwards are still collected.
    pub fn shutdown(&mut self, id: ConnId, also_rcv: bool) -> Result<(), VsockError> {
        let conn = self.conns.get_mut(&id).ok_or(VsockError::UnknownConnection(id))?;
        if !conn.shutdown_host(also_rcv) {
            return Err(VsockError::NotWritable(id));
        }
        Ok(())
    }

    /// Moves the bytes the guest sent out of the connection into `out`; returns how many.
    /// Advances fwd_cnt and may queue a CREDIT_UPDATE. Works on closed connections too.
    pub fn recv(&mut self, id: ConnId, out: &mut Vec<u8>) -> Result<usize, VsockError> {
        self.recv_up_to(id, out, usize::MAX)
    }

    /// [`HostEndpoint::recv`] of at most `limit` bytes; the rest stay readable.
    pub fn recv_up_to(&mut self, id: ConnId, out: &mut Vec<u8>, limit: usize) -> Result<usize, VsockError> {
        let conn = self.conns.get_mut(&id).ok_or(VsockError::UnknownConnection(id))?;
        Ok(conn.take_from_guest(out, limit, self.config.host_buf_alloc))
    }

    /// The connection's state, or `None` if it does not exist.
    pub fn state(&self, id: ConnId) -> Option<ConnState> {
        self.conns.get(&id).map(Connection::state)
    }

    /// Aborts the connection with RST (unless already closed) and forgets it.
    pub fn abort(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.remove(&id) {
            if conn.is_open() {
                self.forget_ports(conn.host_port(), conn.guest_port(), true);
            }
        }
    }

    /// Forgets a connection. One that is not closed yet is reset first, as by
    /// [`HostEndpoint::abort`].
    pub fn remove(&mut self, id: ConnId) {
        self.abort(id);
    }

    /// Guest-initiated connections to this host port are accepted (queued for
    /// [`HostEndpoint::accept`]); others get RST.
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

    /// Logs and keeps an error (up to [`MAX_RECORDED_ERRORS`]), and counts it.
    pub(super) fn record(&mut self, e: VsockError) {
        // A guest can repeat its misuse at will: the log says so once per interval.
        static WARNINGS: Throttled = Throttled::new(GUEST_WARNING_INTERVAL);
        WARNINGS.warn(format_args!("virtio-vsock: {}", error_chain(&e)));
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

    /// Counts a packet the device wrote into an RX buffer.
    pub(super) fn count_delivered(&mut self, data_len: u32) {
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += u64::from(data_len);
    }

    /// The device was reset by its driver: every connection is gone, and with them the RSTs
    /// owed. Listeners, allocators, errors and counters remain.
    pub(super) fn reset(&mut self) {
        self.conns.clear();
        self.by_ports.clear();
        self.accept_queue.clear();
        self.pending_rsts.clear();
        self.control_cursor = None;
        self.data_cursor = None;
    }

    fn add_connection(&mut self, conn: Connection) -> ConnId {
        let id = ConnId(self.next_id);
        self.next_id += 1;
        self.by_ports.insert((conn.host_port(), conn.guest_port()), id);
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

    fn queue_rst(&mut self, host_port: u32, guest_port: u32) {
        if self.pending_rsts.len() < MAX_PENDING_RSTS {
            self.pending_rsts.push_back((host_port, guest_port));
        } else {
            self.stats.resets_dropped += 1;
        }
    }

    /// A connection closed: its port pair is free for the guest again, optionally after an
    /// RST.
    fn forget_ports(&mut self, host_port: u32, guest_port: u32, send_rst: bool) {
        self.by_ports.remove(&(host_port, guest_port));
        if send_rst {
            self.queue_rst(host_port, guest_port);
        }
    }

    /// Acts on one packet from a well-formed TX chain; `data` is its payload, copied through
    /// `scratch` into the connection if the connection takes it.
    pub(super) fn on_guest_packet(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, ()>>,
        scratch: &mut Vec<u8>,
    ) {
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
        let transition = conn.on_guest_packet(hdr, self.config.host_buf_alloc);
        if transition != Transition::Credit {
            self.host_news = true;
        }
        match transition {
            Transition::Credit | Transition::Changed => {}
            Transition::Data => {
                let Some(data) = data else {
                    return;
                };
                // The payload is within max_packet_data (VsockPacket checked) and the credit.
                scratch.resize(data.len(), 0);
                if data.copy_to(&mut scratch[..]) != data.len() {
                    return;
                }
                conn.push_from_guest(scratch);
                self.stats.tx_bytes += data.len() as u64;
            }
            Transition::Closed { reset_guest } => self.forget_ports(host_port, guest_port, reset_guest),
            Transition::Violation(violation) => {
                self.record(match violation {
                    Violation::CreditExceeded { len, credit } => {
                        VsockError::CreditExceeded { guest_port, host_port, len, credit }
                    }
                    Violation::UnexpectedOp => VsockError::UnexpectedOp { guest_port, host_port, op: hdr.op },
                });
                self.forget_ports(host_port, guest_port, true);
            }
        }
    }

    fn guest_connect(&mut self, hdr: &Header) {
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
    pub(super) fn has_rx_packet(&self) -> bool {
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
    /// the connection as if sent: RSTs first, then control packets, then data, each pass
    /// round-robin across connections. The data replaces what `data` held.
    pub(super) fn next_rx_packet(&mut self, capacity: usize, data: &mut Vec<u8>) -> Option<RxHeader> {
        data.clear();
        if let Some((host_port, guest_port)) = self.pending_rsts.pop_front() {
            self.stats.resets_sent += 1;
            return Some(RxHeader { host_port, guest_port, op: op::RST, flags: 0, buf_alloc: 0, fwd_cnt: 0 });
        }
        let max_data = usize::try_from(self.config.max_packet_data).unwrap_or(usize::MAX);
        let (id, control) = if let Some(id) = self.next_conn(self.control_cursor, Connection::has_control) {
            self.control_cursor = Some(id);
            (id, true)
        } else {
            let id = self.next_conn(self.data_cursor, Connection::has_data_work)?;
            self.data_cursor = Some(id);
            (id, false)
        };
        let conn = self.conns.get_mut(&id)?;
        let sent =
            if control { conn.take_control_packet() } else { conn.take_data_packet(capacity.min(max_data), data) };
        Some(RxHeader {
            host_port: conn.host_port(),
            guest_port: conn.guest_port(),
            op: sent.op,
            flags: sent.flags,
            buf_alloc: self.config.host_buf_alloc,
            fwd_cnt: sent.fwd_cnt,
        })
    }

    /// What a saved device keeps of the endpoint. Open connections the guest knows about are
    /// not kept: each becomes an RST owed to the restored guest.
    pub(super) fn save(&self) -> SavedEndpoint {
        let mut pending_rsts: Vec<(u32, u32)> = self.pending_rsts.iter().copied().collect();
        for conn in self.conns.values().filter(|c| c.is_open_for_guest()) {
            if pending_rsts.len() >= MAX_PENDING_RSTS {
                log::warn!("virtio-vsock: too many resets owed; not all saved");
                break;
            }
            pending_rsts.push((conn.host_port(), conn.guest_port()));
        }
        SavedEndpoint { next_id: self.next_id, next_port: self.next_port, pending_rsts }
    }

    /// An endpoint continuing a saved one (see [`HostEndpoint::save`]), from values the
    /// caller validated.
    pub(super) fn restore(config: VsockConfig, next_id: u64, next_port: u32, pending_rsts: &[(u32, u32)]) -> Self {
        let mut host = HostEndpoint::new(config);
        host.next_id = next_id;
        host.next_port = next_port;
        host.pending_rsts = pending_rsts.iter().copied().collect();
        host
    }
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
