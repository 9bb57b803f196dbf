//! One vsock stream connection between the guest and the host endpoint: its state machine
//! and credit accounting (virtio 1.2 §5.10.6.3).
//!
//! Only this module changes a connection. The endpoint asks it what a guest packet does
//! ([`Connection::on_guest_packet`], answered with a [`Transition`]), what to send the guest
//! next ([`Connection::take_control_packet`], [`Connection::take_data_packet`]), and passes on
//! the host's calls (send, shutdown, receive).

use std::collections::VecDeque;

use mu2_abi::vsock::{op, shutdown};
use serde::{Deserialize, Serialize};

use super::Header;

/// Why a connection closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CloseReason {
    /// The guest answered the host's REQUEST with RST (nobody listening).
    Refused,
    /// The guest reset the connection.
    GuestReset,
    /// The guest shut down both directions and the host answered RST: a clean disconnect.
    GuestClosed,
    /// The guest broke the protocol (e.g. sent more than its credit); the host reset it.
    ProtocolError,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConnPhase {
    /// Host-initiated, waiting for the guest's RESPONSE.
    Connecting,
    /// Connected (possibly half-closed: see [`ConnState`]).
    Established,
    /// Closed; bytes received before remain readable.
    Closed(CloseReason),
}

/// A connection's state as the host sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnState {
    /// Connecting, established or closed (and why).
    pub phase: ConnPhase,
    /// The host-side port.
    pub host_port: u32,
    /// The guest-side port.
    pub guest_port: u32,
    /// The guest will send nothing more (it shut down its send side, or the connection
    /// closed): once `readable` is 0 the host has reached end of stream.
    pub guest_eof: bool,
    /// The guest will receive nothing more.
    pub guest_recv_closed: bool,
    /// The host called `shutdown_send`.
    pub host_send_closed: bool,
    /// Bytes [`super::HostEndpoint::recv`] would return now.
    pub readable: usize,
    /// Bytes queued with [`super::HostEndpoint::send`] not yet delivered to the guest.
    pub unsent: usize,
}

/// What a guest packet did to its connection, for the endpoint to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Only credit information changed (CREDIT_UPDATE, CREDIT_REQUEST): nothing the host
    /// side needs to look at.
    Credit,
    /// Something the host side sees changed: the handshake completed, a half SHUTDOWN, an
    /// RW without payload.
    Changed,
    /// An RW whose payload fits the host's credit: the caller hands the payload over with
    /// [`Connection::push_from_guest`].
    Data,
    /// The connection closed. `reset_guest`: the host owes the guest an RST (the answer to a
    /// full SHUTDOWN).
    Closed {
        /// Send the guest an RST.
        reset_guest: bool,
    },
    /// The guest broke the protocol: the connection closed with
    /// [`CloseReason::ProtocolError`] and the host owes the guest an RST.
    Violation(Violation),
}

/// How the guest broke the protocol on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Violation {
    /// An RW with more payload than the host's credit left.
    CreditExceeded {
        /// Payload length of the packet.
        len: u32,
        /// Credit the guest had left.
        credit: u32,
    },
    /// A valid operation at the wrong moment: REQUEST on an existing connection, RESPONSE
    /// out of turn, SHUTDOWN before the handshake, data before the handshake or after the
    /// guest's SHUTDOWN(send).
    UnexpectedOp,
}

/// A packet for the guest that a connection gave up (its data, if any, went to the caller's
/// buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Outbound {
    pub op: u16,
    pub flags: u32,
    /// The host's fwd_cnt, which every header carries.
    pub fwd_cnt: u32,
}

/// A connection. Plain data, so that it can be saved with the device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Connection {
    host_port: u32,
    guest_port: u32,
    phase: ConnPhase,
    /// A REQUEST (host-initiated) still has to go to the guest.
    request_pending: bool,
    /// A RESPONSE (guest-initiated) still has to go to the guest.
    response_pending: bool,
    /// The guest should hear about our fwd_cnt (CREDIT_UPDATE) when nothing else carries it.
    credit_update_pending: bool,
    /// The SHUTDOWN flags the host asked for (0: none; always with "no more send") ...
    host_shutdown: u32,
    /// ... and the SHUTDOWN went out (after all queued data).
    host_shutdown_sent: bool,
    /// The guest sent SHUTDOWN with "no more send".
    guest_shutdown_send: bool,
    /// The guest sent SHUTDOWN with "no more receive".
    guest_shutdown_recv: bool,
    /// Host → guest bytes not yet in an RX buffer.
    to_guest: VecDeque<u8>,
    /// Host → guest bytes sent so far (wrapping).
    tx_cnt: u32,
    /// The guest's receive buffer size, from its latest header.
    peer_buf_alloc: u32,
    /// Bytes the guest has consumed, from its latest header (wrapping).
    peer_fwd_cnt: u32,
    /// Guest → host bytes not yet taken by `recv`; never more than the host's buf_alloc.
    from_guest: VecDeque<u8>,
    /// Guest → host bytes taken by `recv` so far (wrapping).
    fwd_cnt: u32,
    /// The fwd_cnt in the last header sent to the guest.
    reported_fwd_cnt: u32,
}

impl Connection {
    /// A host-initiated connection; `assumed_credit` is what the host may send before the
    /// guest's RESPONSE tells the real buf_alloc.
    pub fn outgoing(host_port: u32, guest_port: u32, assumed_credit: u32) -> Self {
        let mut c = Self::new(host_port, guest_port, ConnPhase::Connecting);
        c.request_pending = true;
        c.peer_buf_alloc = assumed_credit;
        c
    }

    /// A guest-initiated connection the host accepted.
    pub fn incoming(host_port: u32, guest_port: u32, buf_alloc: u32, fwd_cnt: u32) -> Self {
        let mut c = Self::new(host_port, guest_port, ConnPhase::Established);
        c.response_pending = true;
        c.peer_buf_alloc = buf_alloc;
        c.peer_fwd_cnt = fwd_cnt;
        c
    }

    fn new(host_port: u32, guest_port: u32, phase: ConnPhase) -> Self {
        Connection {
            host_port,
            guest_port,
            phase,
            request_pending: false,
            response_pending: false,
            credit_update_pending: false,
            host_shutdown: 0,
            host_shutdown_sent: false,
            guest_shutdown_send: false,
            guest_shutdown_recv: false,
            to_guest: VecDeque::new(),
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            from_guest: VecDeque::new(),
            fwd_cnt: 0,
            reported_fwd_cnt: 0,
        }
    }

    pub fn host_port(&self) -> u32 {
        self.host_port
    }

    pub fn guest_port(&self) -> u32 {
        self.guest_port
    }

    pub fn is_open(&self) -> bool {
        !matches!(self.phase, ConnPhase::Closed(_))
    }

    /// Open, and the guest knows of it (its REQUEST went out, or the guest initiated it): a
    /// restored guest must be told it is gone.
    pub fn is_open_for_guest(&self) -> bool {
        self.is_open() && !self.request_pending
    }

    /// What a packet from the guest does to this (open) connection. `host_buf_alloc` is the
    /// receive buffer the host grants, against which RW payloads are checked.
    pub fn on_guest_packet(&mut self, hdr: &Header, host_buf_alloc: u32) -> Transition {
        if !self.is_open() {
            // The endpoint sends packets to open connections only; a closed one keeps its
            // reason and takes nothing more.
            return Transition::Closed { reset_guest: false };
        }
        // Every header carries the guest's credit information, whatever else it says.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            op::RESPONSE if self.phase == ConnPhase::Connecting => {
                self.phase = ConnPhase::Established;
                Transition::Changed
            }
            op::RST => {
                let reason =
                    if self.phase == ConnPhase::Connecting { CloseReason::Refused } else { CloseReason::GuestReset };
                self.close(reason);
                Transition::Closed { reset_guest: false }
            }
            op::SHUTDOWN if self.phase == ConnPhase::Established => {
                self.guest_shutdown_recv |= hdr.flags & shutdown::RCV != 0;
                self.guest_shutdown_send |= hdr.flags & shutdown::SEND != 0;
                if self.guest_shutdown_recv {
                    // Nobody will read it.
                    self.to_guest.clear();
                }
                if self.guest_shutdown_recv && self.guest_shutdown_send {
                    // Clean disconnect: the peer that receives a full SHUTDOWN answers RST.
                    self.close(CloseReason::GuestClosed);
                    return Transition::Closed { reset_guest: true };
                }
                Transition::Changed
            }
            op::RW if self.phase == ConnPhase::Established && !self.guest_shutdown_send => {
                if hdr.len == 0 {
                    // Only credit information, but an RW all the same.
                    return Transition::Changed;
                }
                let buffered = u32::try_from(self.from_guest.len()).unwrap_or(u32::MAX);
                let credit = host_buf_alloc.saturating_sub(buffered);
                if hdr.len > credit {
                    self.close(CloseReason::ProtocolError);
                    return Transition::Violation(Violation::CreditExceeded { len: hdr.len, credit });
                }
                Transition::Data
            }
            op::CREDIT_UPDATE => Transition::Credit,
            op::CREDIT_REQUEST => {
                self.credit_update_pending = true;
                Transition::Credit
            }
            _ => {
                self.close(CloseReason::ProtocolError);
                Transition::Violation(Violation::UnexpectedOp)
            }
        }
    }

    /// Takes the payload of an RW that [`Connection::on_guest_packet`] accepted
    /// ([`Transition::Data`]), so within the host's credit.
    pub fn push_from_guest(&mut self, data: &[u8]) {
        self.from_guest.extend(data);
    }

    /// Bytes the guest can still take: `buf_alloc - (tx_cnt - fwd_cnt)`. A guest claiming to
    /// have consumed more than it was sent gets no credit rather than a wrapped-around one.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// A control packet (REQUEST, RESPONSE, CREDIT_UPDATE) is waiting for an RX buffer.
    pub fn has_control(&self) -> bool {
        self.is_open() && (self.request_pending || self.response_pending || self.credit_update_pending)
    }

    /// Data can go to the guest now (handshake packet out, guest receiving, credit left).
    fn can_send_data(&self) -> bool {
        self.is_open()
            && !self.request_pending
            && !self.response_pending
            && !self.guest_shutdown_recv
            && !self.to_guest.is_empty()
            && self.peer_credit() > 0
    }

    /// The host's SHUTDOWN can go: everything queued before it has been delivered.
    fn shutdown_ready(&self) -> bool {
        self.is_open()
            && self.host_shutdown != 0
            && !self.host_shutdown_sent
            && !self.request_pending
            && !self.response_pending
            && (self.to_guest.is_empty() || self.guest_shutdown_recv)
    }

    /// Something for the data pass of RX filling.
    pub fn has_data_work(&self) -> bool {
        self.can_send_data() || self.shutdown_ready()
    }

    /// The control packet due (see [`Connection::has_control`]), marked as sent: REQUEST,
    /// else RESPONSE, else CREDIT_UPDATE.
    pub fn take_control_packet(&mut self) -> Outbound {
        let op = if std::mem::take(&mut self.request_pending) {
            op::REQUEST
        } else if std::mem::take(&mut self.response_pending) {
            op::RESPONSE
        } else {
            op::CREDIT_UPDATE
        };
        self.outbound(op, 0)
    }

    /// The data-pass packet due (see [`Connection::has_data_work`]), marked as sent: an RW of
    /// at most `limit` bytes within the guest's credit, appended to `data`, or else the
    /// host's SHUTDOWN with the flags it asked for.
    pub fn take_data_packet(&mut self, limit: usize, data: &mut Vec<u8>) -> Outbound {
        if self.can_send_data() {
            let credit = usize::try_from(self.peer_credit()).unwrap_or(usize::MAX);
            let n = self.to_guest.len().min(limit).min(credit);
            data.extend(self.to_guest.drain(..n));
            // n <= credit, a u32.
            self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
            self.outbound(op::RW, 0)
        } else {
            self.host_shutdown_sent = true;
            self.outbound(op::SHUTDOWN, self.host_shutdown)
        }
    }

    /// A packet going out: every header carries our fwd_cnt, so no separate CREDIT_UPDATE
    /// is owed after it.
    fn outbound(&mut self, op: u16, flags: u32) -> Outbound {
        self.reported_fwd_cnt = self.fwd_cnt;
        self.credit_update_pending = false;
        Outbound { op, flags, fwd_cnt: self.fwd_cnt }
    }

    /// Queues host bytes for the guest. False when the connection takes no more: closed,
    /// shut down by the host, or the guest receives no more.
    pub fn queue_for_guest(&mut self, data: &[u8]) -> bool {
        if !self.is_open() || self.host_shutdown != 0 || self.guest_shutdown_recv {
            return false;
        }
        self.to_guest.extend(data);
        true
    }

    /// The host sends no more: its SHUTDOWN goes after the queued data, with the send flag and
    /// `also_rcv`'s receive flag. (The host still collects what the guest sends after a
    /// receive shutdown: a peer may answer a request all the same.) False when the connection
    /// is closed.
    pub fn shutdown_host(&mut self, also_rcv: bool) -> bool {
        if !self.is_open() {
            return false;
        }
        self.host_shutdown = shutdown::SEND | if also_rcv { shutdown::RCV } else { 0 };
        true
    }

    /// Moves at most `limit` of the guest's bytes into `out` (closed connections too) and
    /// returns how many; advances fwd_cnt and may make a CREDIT_UPDATE due. `host_buf_alloc`
    /// as in [`Connection::on_guest_packet`].
    pub fn take_from_guest(&mut self, out: &mut Vec<u8>, limit: usize, host_buf_alloc: u32) -> usize {
        let n = self.from_guest.len().min(limit);
        out.extend(self.from_guest.drain(..n));
        // n <= host_buf_alloc, a u32.
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        self.consumed(host_buf_alloc);
        n
    }

    /// After the host consumed bytes: ask for a CREDIT_UPDATE when the consumption not yet
    /// reported exceeds half the buffer, or when the guest's view of its credit is low enough
    /// that it may be blocked.
    fn consumed(&mut self, buf_alloc: u32) {
        if !self.is_open() || self.guest_shutdown_send {
            return;
        }
        let unreported = self.fwd_cnt.wrapping_sub(self.reported_fwd_cnt);
        if unreported == 0 {
            return;
        }
        let buffered = u32::try_from(self.from_guest.len()).unwrap_or(u32::MAX);
        let guest_view = buf_alloc.saturating_sub(buffered.saturating_add(unreported));
        if unreported >= buf_alloc / 2 || guest_view < buf_alloc / 4 {
            self.credit_update_pending = true;
        }
    }

    /// Marks the connection closed and drops what can no longer be delivered.
    fn close(&mut self, reason: CloseReason) {
        self.phase = ConnPhase::Closed(reason);
        self.to_guest = VecDeque::new();
        self.request_pending = false;
        self.response_pending = false;
        self.credit_update_pending = false;
    }

    pub fn state(&self) -> ConnState {
        ConnState {
            phase: self.phase,
            host_port: self.host_port,
            guest_port: self.guest_port,
            guest_eof: self.guest_shutdown_send || !self.is_open(),
            guest_recv_closed: self.guest_shutdown_recv || !self.is_open(),
            host_send_closed: self.host_shutdown != 0,
            readable: self.from_guest.len(),
            unsent: self.to_guest.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST_BUF: u32 = 1000;

    /// A guest packet on the connection, granting 500 bytes and having consumed nothing.
    fn pkt(op: u16) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 2,
            dst_port: 1,
            len: 0,
            type_: mu2_abi::vsock::TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 500,
            fwd_cnt: 0,
        }
    }

    fn rw(len: u32) -> Header {
        Header { len, ..pkt(op::RW) }
    }

    fn shut(flags: u32) -> Header {
        Header { flags, ..pkt(op::SHUTDOWN) }
    }

    /// A host-initiated connection the guest accepted.
    fn established() -> Connection {
        let mut c = Connection::outgoing(1, 2, 0);
        c.take_control_packet();
        assert_eq!(c.on_guest_packet(&pkt(op::RESPONSE), HOST_BUF), Transition::Changed);
        c
    }

    fn phase(c: &Connection) -> ConnPhase {
        c.state().phase
    }

    #[test]
    fn credit_wraps_and_saturates() {
        let mut c = Connection::outgoing(1, 2, 100);
        assert_eq!(c.peer_credit(), 100);
        c.tx_cnt = 5u32.wrapping_sub(10); // sent 90 bytes across the wrap ...
        c.peer_fwd_cnt = 5u32.wrapping_sub(100); // ... of which the guest consumed 0
        assert_eq!(c.peer_credit(), 10);
        // A guest claiming to have consumed more than it got has no credit.
        c.peer_fwd_cnt = c.tx_cnt.wrapping_add(1);
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn credit_update_after_half_consumed() {
        let mut c = Connection::incoming(1, 2, 0, 0);
        c.response_pending = false;
        c.fwd_cnt = 100;
        c.consumed(1000);
        assert!(!c.credit_update_pending);
        c.fwd_cnt = 500;
        c.consumed(1000);
        assert!(c.credit_update_pending);
    }

    #[test]
    fn response_establishes_and_rst_refuses() {
        let mut c = Connection::outgoing(1, 2, 0);
        assert_eq!(c.take_control_packet().op, op::REQUEST);
        assert_eq!(phase(&c), ConnPhase::Connecting);
        assert_eq!(c.on_guest_packet(&pkt(op::RESPONSE), HOST_BUF), Transition::Changed);
        assert_eq!(phase(&c), ConnPhase::Established);
        assert_eq!(c.peer_credit(), 500, "the RESPONSE carries the guest's buf_alloc");

        let mut refused = Connection::outgoing(1, 2, 0);
        refused.take_control_packet();
        assert_eq!(refused.on_guest_packet(&pkt(op::RST), HOST_BUF), Transition::Closed { reset_guest: false });
        assert_eq!(phase(&refused), ConnPhase::Closed(CloseReason::Refused));
        // Once closed, nothing changes it.
        assert_eq!(refused.on_guest_packet(&pkt(op::RESPONSE), HOST_BUF), Transition::Closed { reset_guest: false });
        assert_eq!(phase(&refused), ConnPhase::Closed(CloseReason::Refused));
    }

    #[test]
    fn rst_after_the_handshake_is_a_guest_reset() {
        let mut c = established();
        assert!(c.queue_for_guest(b"lost"));
        assert_eq!(c.on_guest_packet(&pkt(op::RST), HOST_BUF), Transition::Closed { reset_guest: false });
        assert_eq!(phase(&c), ConnPhase::Closed(CloseReason::GuestReset));
        assert_eq!(c.state().unsent, 0, "undeliverable data is dropped");
        assert!(!c.queue_for_guest(b"x") && !c.shutdown_host(false));
        assert!(!c.has_control() && !c.has_data_work());
    }

    #[test]
    fn out_of_turn_operations_are_violations() {
        let unexpected = Transition::Violation(Violation::UnexpectedOp);
        // Before the handshake: data, SHUTDOWN, a second REQUEST.
        for hdr in [rw(4), shut(shutdown::SEND), pkt(op::REQUEST)] {
            let mut c = Connection::outgoing(1, 2, 0);
            assert_eq!(c.on_guest_packet(&hdr, HOST_BUF), unexpected, "{hdr:?}");
            assert_eq!(phase(&c), ConnPhase::Closed(CloseReason::ProtocolError));
        }
        // After it: RESPONSE again, REQUEST, an unknown op.
        for hdr in [pkt(op::RESPONSE), pkt(op::REQUEST), pkt(99)] {
            let mut c = established();
            assert_eq!(c.on_guest_packet(&hdr, HOST_BUF), unexpected, "{hdr:?}");
            assert_eq!(phase(&c), ConnPhase::Closed(CloseReason::ProtocolError));
        }
        // Data after the guest's SHUTDOWN(send).
        let mut c = established();
        assert_eq!(c.on_guest_packet(&shut(shutdown::SEND), HOST_BUF), Transition::Changed);
        assert!(c.state().guest_eof);
        assert_eq!(c.on_guest_packet(&rw(1), HOST_BUF), unexpected);
    }

    #[test]
    fn rw_within_credit_is_data_and_beyond_it_a_violation() {
        let mut c = established();
        assert_eq!(c.on_guest_packet(&rw(0), HOST_BUF), Transition::Changed, "no payload");
        assert_eq!(c.on_guest_packet(&rw(600), HOST_BUF), Transition::Data);
        c.push_from_guest(&[7; 600]);
        assert_eq!(c.on_guest_packet(&rw(400), HOST_BUF), Transition::Data);
        c.push_from_guest(&[8; 400]);
        assert_eq!(c.state().readable, 1000);
        assert_eq!(
            c.on_guest_packet(&rw(1), HOST_BUF),
            Transition::Violation(Violation::CreditExceeded { len: 1, credit: 0 })
        );
        assert_eq!(phase(&c), ConnPhase::Closed(CloseReason::ProtocolError));
        let mut out = Vec::new();
        assert_eq!(c.take_from_guest(&mut out, usize::MAX, HOST_BUF), 1000, "what fit the credit stays readable");
        assert!(!c.has_control(), "no CREDIT_UPDATE on a closed connection");
    }

    #[test]
    fn receiving_frees_credit_and_owes_an_update() {
        let mut c = established();
        assert_eq!(c.on_guest_packet(&rw(600), HOST_BUF), Transition::Data);
        c.push_from_guest(&[1; 600]);
        let mut out = Vec::new();
        assert_eq!(c.take_from_guest(&mut out, usize::MAX, HOST_BUF), 600);
        assert!(c.has_control());
        let update = c.take_control_packet();
        assert_eq!(update, Outbound { op: op::CREDIT_UPDATE, flags: 0, fwd_cnt: 600 });
        assert!(!c.has_control());
        // The freed credit takes a full buffer again.
        assert_eq!(c.on_guest_packet(&rw(HOST_BUF), HOST_BUF), Transition::Data);
    }

    #[test]
    fn credit_packets_change_only_credit() {
        let mut c = established();
        assert!(c.queue_for_guest(&[0; 800]));
        let mut data = Vec::new();
        assert_eq!(c.take_data_packet(usize::MAX, &mut data).op, op::RW);
        assert_eq!(data.len(), 500, "the guest's buf_alloc");
        assert!(!c.has_data_work(), "out of credit");
        // The guest consumed it all: data flows again.
        let update = Header { fwd_cnt: 500, ..pkt(op::CREDIT_UPDATE) };
        assert_eq!(c.on_guest_packet(&update, HOST_BUF), Transition::Credit);
        assert!(c.has_data_work());
        assert!(!c.has_control());
        let request = Header { fwd_cnt: 500, ..pkt(op::CREDIT_REQUEST) };
        assert_eq!(c.on_guest_packet(&request, HOST_BUF), Transition::Credit);
        assert!(c.has_control());
        assert_eq!(phase(&c), ConnPhase::Established);
        // A data packet carries the credit too, so it settles the request.
        data.clear();
        assert_eq!(c.take_data_packet(usize::MAX, &mut data).op, op::RW);
        assert_eq!(data.len(), 300);
        assert!(!c.has_control());
    }

    #[test]
    fn shutdown_halves_and_full_close() {
        let mut c = established();
        assert!(c.queue_for_guest(b"unread"));
        assert_eq!(c.on_guest_packet(&shut(shutdown::RCV), HOST_BUF), Transition::Changed);
        let s = c.state();
        assert!(s.guest_recv_closed && !s.guest_eof);
        assert_eq!(s.unsent, 0, "nobody will read it");
        assert!(!c.queue_for_guest(b"more"));
        assert_eq!(c.on_guest_packet(&shut(shutdown::SEND), HOST_BUF), Transition::Closed { reset_guest: true });
        assert_eq!(phase(&c), ConnPhase::Closed(CloseReason::GuestClosed));

        let mut both = established();
        assert_eq!(
            both.on_guest_packet(&shut(shutdown::RCV | shutdown::SEND), HOST_BUF),
            Transition::Closed { reset_guest: true }
        );
        assert_eq!(phase(&both), ConnPhase::Closed(CloseReason::GuestClosed));
    }

    #[test]
    fn host_shutdown_goes_after_the_queued_data() {
        let mut c = Connection::outgoing(1, 2, 100);
        assert!(c.queue_for_guest(b"request") && c.shutdown_host(false));
        assert!(!c.queue_for_guest(b"late"));
        assert!(c.has_control() && !c.has_data_work(), "REQUEST first");
        assert_eq!(c.take_control_packet().op, op::REQUEST);
        let mut data = Vec::new();
        assert_eq!(c.take_data_packet(4, &mut data).op, op::RW);
        assert_eq!(c.take_data_packet(4, &mut data).op, op::RW);
        assert_eq!(data, b"request");
        let shut = c.take_data_packet(4, &mut data);
        assert_eq!((shut.op, shut.flags), (op::SHUTDOWN, shutdown::SEND));
        assert!(!c.has_data_work(), "one SHUTDOWN");
        assert!(c.state().host_send_closed);
    }

    #[test]
    fn a_full_host_shutdown_still_takes_the_guests_answer() {
        let mut c = established();
        assert!(c.queue_for_guest(b"request") && c.shutdown_host(true));
        let mut data = Vec::new();
        assert_eq!(c.take_data_packet(usize::MAX, &mut data).op, op::RW);
        let shut = c.take_data_packet(usize::MAX, &mut data);
        assert_eq!((shut.op, shut.flags), (op::SHUTDOWN, shutdown::SEND | shutdown::RCV));
        assert_eq!(c.on_guest_packet(&rw(6), HOST_BUF), Transition::Data);
        c.push_from_guest(b"answer");
        let mut out = Vec::new();
        assert_eq!(c.take_from_guest(&mut out, 4, HOST_BUF), 4, "at most the limit");
        assert_eq!(c.take_from_guest(&mut out, usize::MAX, HOST_BUF), 2);
        assert_eq!(out, b"answer");
    }

    #[test]
    fn guest_initiated_connection_answers_response_first() {
        let mut c = Connection::incoming(1, 2, 100, 0);
        assert!(c.queue_for_guest(b"hi"));
        assert!(!c.has_data_work(), "no data before the RESPONSE");
        assert_eq!(c.take_control_packet().op, op::RESPONSE);
        assert!(c.is_open_for_guest());
        assert!(c.has_data_work());
        assert!(!Connection::outgoing(1, 2, 0).is_open_for_guest(), "a REQUEST not yet sent");
    }
}
