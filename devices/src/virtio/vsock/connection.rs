//! One vsock stream connection between the guest and the host endpoint: its state machine
//! and credit accounting (virtio 1.2 §5.10.6.3).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

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
    /// Bytes [`super::Vsock::recv`] would return now.
    pub readable: usize,
    /// Bytes queued with [`super::Vsock::send`] not yet delivered to the guest.
    pub unsent: usize,
}

/// A connection. Plain data, so that it can be saved with the device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Connection {
    pub host_port: u32,
    pub guest_port: u32,
    pub phase: ConnPhase,
    /// A REQUEST (host-initiated) still has to go to the guest.
    pub request_pending: bool,
    /// A RESPONSE (guest-initiated) still has to go to the guest.
    pub response_pending: bool,
    /// The guest should hear about our fwd_cnt (CREDIT_UPDATE) when nothing else carries it.
    pub credit_update_pending: bool,
    /// The host asked to shut down its send side ...
    pub host_shutdown: bool,
    /// ... and the SHUTDOWN went out (after all queued data).
    pub host_shutdown_sent: bool,
    /// The guest sent SHUTDOWN with "no more send".
    pub guest_shutdown_send: bool,
    /// The guest sent SHUTDOWN with "no more receive".
    pub guest_shutdown_recv: bool,
    /// Host → guest bytes not yet in an RX buffer.
    pub to_guest: VecDeque<u8>,
    /// Host → guest bytes sent so far (wrapping).
    pub tx_cnt: u32,
    /// The guest's receive buffer size, from its latest header.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has consumed, from its latest header (wrapping).
    pub peer_fwd_cnt: u32,
    /// Guest → host bytes not yet taken by `recv`; never more than the host's buf_alloc.
    pub from_guest: VecDeque<u8>,
    /// Guest → host bytes taken by `recv` so far (wrapping).
    pub fwd_cnt: u32,
    /// The fwd_cnt in the last header sent to the guest.
    pub reported_fwd_cnt: u32,
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
            host_shutdown: false,
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

    pub fn is_open(&self) -> bool {
        !matches!(self.phase, ConnPhase::Closed(_))
    }

    /// Bytes the guest can still take: `buf_alloc - (tx_cnt - fwd_cnt)`. A guest claiming to
    /// have consumed more than it was sent gets no credit rather than a wrapped-around one.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Takes the credit information every guest header carries.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// A control packet (REQUEST, RESPONSE, CREDIT_UPDATE) is waiting for an RX buffer.
    pub fn has_control(&self) -> bool {
        self.is_open() && (self.request_pending || self.response_pending || self.credit_update_pending)
    }

    /// Data can go to the guest now (handshake packet out, guest receiving, credit left).
    pub fn can_send_data(&self) -> bool {
        self.is_open()
            && !self.request_pending
            && !self.response_pending
            && !self.guest_shutdown_recv
            && !self.to_guest.is_empty()
            && self.peer_credit() > 0
    }

    /// The host's SHUTDOWN can go: everything queued before it has been delivered.
    pub fn shutdown_ready(&self) -> bool {
        self.is_open()
            && self.host_shutdown
            && !self.host_shutdown_sent
            && !self.request_pending
            && !self.response_pending
            && (self.to_guest.is_empty() || self.guest_shutdown_recv)
    }

    /// Something for the data pass of RX filling.
    pub fn has_data_work(&self) -> bool {
        self.can_send_data() || self.shutdown_ready()
    }

    /// After the host consumed bytes: ask for a CREDIT_UPDATE when the consumption not yet
    /// reported exceeds half the buffer, or when the guest's view of its credit is low enough
    /// that it may be blocked.
    pub fn consumed(&mut self, buf_alloc: u32) {
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
    pub fn close(&mut self, reason: CloseReason) {
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
            host_send_closed: self.host_shutdown,
            readable: self.from_guest.len(),
            unsent: self.to_guest.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
