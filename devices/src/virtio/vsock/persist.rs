//! Saving and restoring the vsock device ([`Persist`] for [`Vsock`]).
//!
//! Saved: the configuration, the accepted features, the device's copies of its queues (with
//! their ring positions), whether a queue broke, the connection-id and host-port allocators,
//! and the RSTs owed to the guest.
//!
//! Not saved: the host side of connections. A saved device has no connections, listeners or
//! pending accepts; a restored one starts with none, and the host connects (or listens)
//! again. Each connection that was open and that the guest knew about (its REQUEST or
//! RESPONSE was sent) is turned into an RST owed to the guest, so the restored guest's socket
//! is reset rather than left waiting for a host that no longer exists. The host-port
//! allocator continues where it was, so new connections do not reuse the port pair of a
//! connection the guest may still remember. Also not saved: the recorded errors
//! ([`HostEndpoint::take_errors`]) and the counters ([`HostEndpoint::stats`] restart at zero,
//! counting the restored device's own traffic).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

use super::device::{Queues, FEATURES};
use super::endpoint::{HostEndpoint, FIRST_EPHEMERAL_PORT, MAX_PENDING_RSTS};
use super::{Vsock, VsockConfig, EVENT_QUEUE, HOST_CID, QUEUE_MAX_SIZE, RX_QUEUE, TX_QUEUE};
use crate::persist::{Persist, QueueRestoreError, QueueSnapshot};

/// Largest connection-id counter a state may hold: far beyond anything a device reaches, and
/// far enough from `u64::MAX` that counting on cannot overflow.
const MAX_NEXT_ID: u64 = 1 << 62;

/// The saved state of a [`Vsock`] device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The device configuration.
    pub config: VsockConfig,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// RX, TX and event queues when the device is active.
    pub queues: Option<[QueueSnapshot; 3]>,
    /// A queue broke; the device waits for a reset.
    pub failed: bool,
    /// Next connection id.
    pub next_id: u64,
    /// Next host port to try for a host-initiated connection.
    pub next_port: u32,
    /// RSTs owed to the guest, as (host port, guest port).
    pub pending_rsts: Vec<(u32, u32)>,
}

/// Why a saved vsock state was refused.
#[derive(Debug, thiserror::Error)]
pub enum VsockRestoreError {
    /// A reserved CID (0, 1, 2, or not below 2^32 - 1).
    #[error("invalid guest cid {0}")]
    GuestCid(u64),
    /// A buffer or connection limit outside what the device allows: the limits bound host
    /// memory, so an image may not raise them.
    #[error("vsock limit {name} of {value} is out of range (at most {max})")]
    Limit {
        /// Which limit.
        name: &'static str,
        /// The saved value.
        value: u64,
        /// The most allowed.
        max: u64,
    },
    /// Accepted features the device does not offer.
    #[error("accepted features {acked:#x} not offered (device offers {offered:#x})")]
    UnknownFeatures {
        /// Saved accepted features.
        acked: u64,
        /// What the device offers.
        offered: u64,
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
    /// The RX or TX queue of an active device is not ready.
    #[error("queue {0} of the active device is not ready")]
    QueueNotReady(usize),
    /// Failed without being active.
    #[error("device failed without being active")]
    FailedInactive,
    /// The connection-id counter is out of range.
    #[error("invalid next connection id {0}")]
    NextId(u64),
    /// The host-port allocator is outside the ephemeral range.
    #[error("invalid next host port {0:#x}")]
    NextPort(u32),
    /// More pending RSTs than the device keeps.
    #[error("{0} pending resets (at most {MAX_PENDING_RSTS})")]
    TooManyResets(usize),
}

impl Persist for Vsock {
    type State = VsockState;
    type Args = ();
    type Error = VsockRestoreError;

    /// The device's state. Host-side connections are not recorded: see the module docs.
    fn save(&self) -> VsockState {
        let host = self.host().save();
        VsockState {
            config: *self.config(),
            acked_features: self.acked_features(),
            queues: self.queues().map(|q| [(&q.rx).into(), (&q.tx).into(), (&q.event).into()]),
            failed: self.is_failed(),
            next_id: host.next_id,
            next_port: host.next_port,
            pending_rsts: host.pending_rsts,
        }
    }

    fn restore((): (), state: &VsockState) -> Result<Self, VsockRestoreError> {
        let cid = state.config.guest_cid;
        if cid <= HOST_CID || cid >= u64::from(u32::MAX) {
            return Err(VsockRestoreError::GuestCid(cid));
        }
        if let Some((name, value, max)) = state.config.out_of_range() {
            return Err(VsockRestoreError::Limit { name, value, max });
        }
        let offered = FEATURES;
        if state.acked_features & !offered != 0 {
            return Err(VsockRestoreError::UnknownFeatures { acked: state.acked_features, offered });
        }
        if !(1..=MAX_NEXT_ID).contains(&state.next_id) {
            return Err(VsockRestoreError::NextId(state.next_id));
        }
        if state.next_port < FIRST_EPHEMERAL_PORT || state.next_port == u32::MAX {
            return Err(VsockRestoreError::NextPort(state.next_port));
        }
        if state.pending_rsts.len() > MAX_PENDING_RSTS {
            return Err(VsockRestoreError::TooManyResets(state.pending_rsts.len()));
        }
        if state.failed && state.queues.is_none() {
            return Err(VsockRestoreError::FailedInactive);
        }
        let queues = match &state.queues {
            None => None,
            Some([rx, tx, event]) => {
                // The device offers no VIRTIO_F_RING_EVENT_IDX.
                let restore = |index: usize, q: &QueueSnapshot| -> Result<Queue, VsockRestoreError> {
                    let q = q
                        .restore(QUEUE_MAX_SIZE, false)
                        .map_err(|source| VsockRestoreError::Queue { index, source })?;
                    if index != EVENT_QUEUE && !q.ready() {
                        return Err(VsockRestoreError::QueueNotReady(index));
                    }
                    Ok(q)
                };
                // Activation's side effect (NO_NOTIFY in the used rings) is in guest memory
                // already.
                Some(Queues {
                    rx: restore(RX_QUEUE, rx)?,
                    tx: restore(TX_QUEUE, tx)?,
                    event: restore(EVENT_QUEUE, event)?,
                })
            }
        };
        let host = HostEndpoint::restore(state.config, state.next_id, state.next_port, &state.pending_rsts);
        Ok(Vsock::from_parts(state.config, state.acked_features, queues, state.failed, host))
    }
}

#[cfg(test)]
mod tests {
    use mu2_abi::vsock::{op, shutdown};
    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET};
    use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
    use vm_memory::{Address, Bytes, GuestAddress};

    use super::super::tests::{active, config, established, memory, ops, Guest, Pkt, GUEST_CID, GUEST_PORT};
    use super::super::{CloseReason, ConnPhase, VsockError};
    use super::*;
    use crate::persist::QueueRestoreError;
    use crate::virtio::mmio::{regs, MmioRestoreError, MmioTransport, MmioTransportState};
    use crate::virtio::test_utils::{drive_to_driver_ok, read_reg, write_reg, DriverQueue};
    use crate::virtio::VirtioDevice;
    use crate::GuestMemoryMmap;

    type Transport = MmioTransport<Vsock>;
    type TransportState = MmioTransportState<VsockState>;

    fn transport<'m>(mem: &'m GuestMemoryMmap) -> (Transport, Guest<'m>) {
        let g = Guest::new(mem);
        let mut t = MmioTransport::new(Vsock::new(config()));
        drive_to_driver_ok(&mut t, mem, &[&g.rx, &g.tx, &g.event]);
        (t, g)
    }

    /// Through postcard, the snapshot image's encoding.
    fn reencode<T: Serialize + serde::de::DeserializeOwned>(state: &T) -> T {
        let bytes = postcard::to_stdvec(state).unwrap();
        postcard::from_bytes(&bytes).unwrap()
    }

    fn used_idx(mem: &GuestMemoryMmap, q: &DriverQueue<'_>) -> u16 {
        u16::from_le(mem.read_obj(q.used_addr().unchecked_add(2)).unwrap())
    }

    /// Registers a driver can read, with queue `sel` selected at the end.
    fn registers(t: &mut Transport, mem: &GuestMemoryMmap, sel: u32) -> Vec<u32> {
        let fixed = [
            regs::STATUS,
            regs::DEVICE_ID,
            regs::DEVICE_FEATURES,
            regs::INTERRUPT_STATUS,
            regs::CONFIG_GENERATION,
            regs::CONFIG,
            regs::CONFIG + 4,
        ];
        let mut out: Vec<u32> = fixed.iter().map(|&r| read_reg(t, r)).collect();
        for q in 0..4 {
            write_reg(t, mem, regs::QUEUE_SEL, q);
            out.extend([read_reg(t, regs::QUEUE_NUM_MAX), read_reg(t, regs::QUEUE_READY)]);
        }
        write_reg(t, mem, regs::QUEUE_SEL, sel);
        out
    }

    #[test]
    fn restored_transport_continues_on_the_same_memory() {
        let mem = memory();
        let (mut t, mut g) = transport(&mem);

        // A whole exchange: connect, data both ways, both sides close.
        let id = t.device_mut().host_mut().connect(GUEST_PORT, 0).unwrap();
        g.post_rx(4, 4096);
        assert!(t.poll(&mem));
        let req = g.recv();
        assert_eq!(ops(&req), [op::REQUEST]);
        let port = req[0].src_port;
        g.send(&g.pkt(op::RESPONSE, port));
        t.device_mut().host_mut().send(id, b"request").unwrap();
        t.device_mut().host_mut().shutdown_send(id).unwrap();
        assert!(t.poll(&mem));
        let pkts = g.recv();
        assert_eq!(ops(&pkts), [op::RW, op::SHUTDOWN]);
        assert_eq!(pkts[0].data, b"request");
        g.send(&g.rw(port, b"response"));
        g.send(&Pkt { flags: shutdown::RCV | shutdown::SEND, ..g.pkt(op::SHUTDOWN, port) });
        assert!(t.poll(&mem));
        let mut got = Vec::new();
        t.device_mut().host_mut().recv(id, &mut got).unwrap();
        assert_eq!(got, b"response");
        assert_eq!(t.device().host().state(id).unwrap().phase, ConnPhase::Closed(CloseReason::GuestClosed));
        assert_eq!(ops(&g.recv()), [op::RST]);
        t.device_mut().host_mut().remove(id);
        assert_eq!((used_idx(&mem, &g.rx), used_idx(&mem, &g.tx)), (4, 3));
        // Registers away from their defaults.
        write_reg(&mut t, &mem, regs::DEVICE_FEATURES_SEL, 1);
        let before = registers(&mut t, &mem, 2);
        assert!(t.take_errors().is_empty() && t.device_mut().host_mut().take_errors().is_empty());

        let state = t.save();
        let queues = state.device.queues.unwrap();
        assert_eq!((queues[RX_QUEUE].next_avail, queues[RX_QUEUE].next_used), (4, 4));
        assert_eq!((queues[TX_QUEUE].next_avail, queues[TX_QUEUE].next_used), (3, 3));
        assert!(state.wakeup);
        let decoded = reencode(&state);
        assert_eq!(decoded, state);
        drop(t);

        let mut r = Transport::restore((), &decoded).unwrap();
        r.check_memory(&mem).unwrap();
        assert_eq!(r.save(), state);
        assert!(r.is_activated());
        assert_eq!(registers(&mut r, &mem, 2), before);
        assert!(r.take_wakeup(), "a pending wake-up survives");
        assert!(r.device().host().state(id).is_none());

        // A new connection (the helper's credit counter is per connection): its REQUEST lands in the next RX buffer, at used index 5, from the
        // next host port.
        g.fwd_cnt = 0;
        let id2 = r.device_mut().host_mut().connect(GUEST_PORT, 0).unwrap();
        assert_ne!(id2, id);
        g.post_rx(4, 4096);
        assert!(r.poll(&mem));
        assert_eq!(used_idx(&mem, &g.rx), 5);
        let req = g.recv();
        assert_eq!(ops(&req), [op::REQUEST]);
        assert_eq!(req[0].src_port, port + 1);
        assert_eq!(req[0].dst_cid, GUEST_CID);
        let port2 = req[0].src_port;
        g.send(&g.pkt(op::RESPONSE, port2));
        r.device_mut().host_mut().send(id2, b"second request").unwrap();
        assert!(r.poll(&mem));
        assert_eq!((used_idx(&mem, &g.rx), used_idx(&mem, &g.tx)), (6, 4));
        let pkts = g.recv();
        assert_eq!(ops(&pkts), [op::RW]);
        assert_eq!(pkts[0].data, b"second request");
        // A guest TX packet is consumed.
        g.send(&g.rw(port2, b"second response"));
        assert!(r.poll(&mem));
        assert_eq!(used_idx(&mem, &g.tx), 5);
        let mut got = Vec::new();
        r.device_mut().host_mut().recv(id2, &mut got).unwrap();
        assert_eq!(got, b"second response");
        // Notifications stay off; nothing went wrong.
        for q in [&g.rx, &g.tx, &g.event] {
            assert_eq!(q.used_flags(), VRING_USED_F_NO_NOTIFY as u16);
        }
        assert!(r.take_errors().is_empty());
        assert!(r.device_mut().host_mut().take_errors().is_empty());
        assert_eq!(r.device().host().stats().connections, 1, "counters restart at restore");
    }

    #[test]
    fn open_connections_are_not_saved() {
        let mem = memory();
        let (mut dev, mut g) = active(&mem, config());
        let (id, port) = established(&mut dev, &mut g, &mem);
        dev.host_mut().send(id, b"never delivered").unwrap();
        // Its REQUEST has not reached the guest: the guest does not know it.
        let unknown = dev.host_mut().connect(GUEST_PORT + 1, 0).unwrap();
        let state = dev.save();
        assert_eq!(state.pending_rsts, [(port, GUEST_PORT)]);

        let mut r = Vsock::restore((), &reencode(&state)).unwrap();
        assert!(r.host().state(id).is_none() && r.host().state(unknown).is_none());
        assert!(matches!(r.host_mut().send(id, b"x"), Err(VsockError::UnknownConnection(_))));
        // The guest's socket is reset; nothing else of the old connections reaches it.
        g.post_rx(4, 4096);
        assert!(r.process(&mem));
        let pkts = g.recv();
        assert_eq!(ops(&pkts), [op::RST]);
        assert_eq!((pkts[0].src_port, pkts[0].dst_port), (port, GUEST_PORT));
        // New connections get new ids and ports.
        let id2 = r.host_mut().connect(GUEST_PORT, 0).unwrap();
        assert!(id2 > unknown);
        assert!(r.process(&mem));
        let req = g.recv();
        assert_eq!(ops(&req), [op::REQUEST]);
        assert_eq!(req[0].src_port, port + 2);
        // Saving the restored device again: only the new connection, now known to the guest.
        assert_eq!(r.save().pending_rsts, [(port + 2, GUEST_PORT)]);
    }

    #[test]
    fn unactivated_transport_round_trip() {
        let mem = memory();
        let mut t = MmioTransport::new(Vsock::new(config()));
        write_reg(&mut t, &mem, regs::STATUS, 1);
        let state = t.save();
        assert!(state.device.queues.is_none());
        let mut r = Transport::restore((), &reencode(&state)).unwrap();
        assert_eq!(r.status(), 1);
        assert!(!r.is_activated());
        // The driver carries on from ACKNOWLEDGE.
        write_reg(&mut r, &mem, regs::STATUS, 0);
        let g = Guest::new(&mem);
        drive_to_driver_ok(&mut r, &mem, &[&g.rx, &g.tx, &g.event]);
        assert_eq!(g.rx.used_flags(), VRING_USED_F_NO_NOTIFY as u16);
    }

    #[test]
    fn failed_device_stays_failed_until_reset() {
        let mem = memory();
        let (mut t, mut g) = transport(&mem);
        g.tx.set_avail_idx(1000); // too far ahead: the TX ring is broken
        t.poll(&mem);
        assert!(t.device().is_failed());
        let state = reencode(&t.save());
        assert!(state.device.failed);
        let mut r = Transport::restore((), &state).unwrap();
        assert_ne!(r.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(r.device().is_failed());
        g.post_rx(1, 4096);
        assert!(!r.poll(&mem));
        write_reg(&mut r, &mem, regs::STATUS, 0);
        assert!(!r.device().is_failed() && !r.is_activated());
    }

    #[test]
    fn invalid_states_are_refused() {
        let mem = memory();
        let (t, _g) = transport(&mem);
        let good = t.save();
        let refuse = |f: &dyn Fn(&mut TransportState)| {
            let mut s = good.clone();
            f(&mut s);
            Transport::restore((), &s).map(|_| ()).unwrap_err()
        };
        use virtio_queue::Error as Q;
        use MmioRestoreError as M;
        use QueueRestoreError as R;
        use VsockRestoreError as V;

        // The transport's own queue copies.
        assert!(matches!(refuse(&|s| s.queues[0].size = 3), M::Queue { index: 0, source: R::Config(Q::InvalidSize) }));
        assert!(matches!(
            refuse(&|s| s.queues[1].size = 512),
            M::Queue { index: 1, source: R::Config(Q::InvalidSize) }
        ));
        assert!(matches!(refuse(&|s| s.queues[2].max_size = 512), M::Queue { index: 2, source: R::MaxSize { .. } }));
        assert!(matches!(
            refuse(&|s| s.queues[0].desc_table = 0x1_0008),
            M::Queue { source: R::Config(Q::InvalidDescTableAlign), .. }
        ));
        assert!(matches!(
            refuse(&|s| s.queues[0].used_ring = !3_u64),
            M::Queue { source: R::AddressOverflow { area: "used ring", .. }, .. }
        ));
        assert!(matches!(refuse(&|s| s.queues[0].event_idx_enabled = true), M::Queue { source: R::EventIdx, .. }));
        assert!(matches!(
            refuse(&|s| {
                s.queues.pop();
            }),
            M::QueueCount { expected: 3, got: 2 }
        ));
        // Registers.
        assert!(matches!(refuse(&|s| s.driver_features |= 1 << 5), M::Features { .. }));
        assert!(matches!(refuse(&|s| s.driver_features = 0), M::Features { .. }));
        assert!(matches!(refuse(&|s| s.unknown_features = true), M::Features { .. }));
        assert!(matches!(refuse(&|s| s.status |= 0x10), M::Status { .. }));
        assert!(matches!(refuse(&|s| s.status &= !VIRTIO_CONFIG_S_FEATURES_OK), M::Status { .. }));
        assert!(matches!(refuse(&|s| s.activated = false), M::Status { .. }));
        assert!(matches!(refuse(&|s| s.interrupt_status = 4), M::InterruptStatus(4)));
        // The device.
        let dev = |f: &dyn Fn(&mut VsockState)| match refuse(&|s| f(&mut s.device)) {
            M::Device(e) => e,
            other => panic!("not a device error: {other:?}"),
        };
        let queue = |s: &mut VsockState, f: &dyn Fn(&mut QueueSnapshot)| {
            if let Some(q) = s.queues.as_mut() {
                f(&mut q[RX_QUEUE]);
            }
        };
        assert!(matches!(
            dev(&|s| queue(s, &|q| q.size = 100)),
            V::Queue { index: 0, source: R::Config(Q::InvalidSize) }
        ));
        assert!(matches!(dev(&|s| queue(s, &|q| q.size = 1024)), V::Queue { source: R::Config(Q::InvalidSize), .. }));
        assert!(matches!(dev(&|s| queue(s, &|q| q.avail_ring = 0x1_0001)), V::Queue { .. }));
        assert!(matches!(dev(&|s| queue(s, &|q| q.desc_table = !0xf_u64)), V::Queue { .. }));
        assert!(matches!(dev(&|s| queue(s, &|q| q.ready = false)), V::QueueNotReady(0)));
        assert!(matches!(dev(&|s| s.acked_features |= 1), V::UnknownFeatures { .. }));
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            assert!(matches!(dev(&|s| s.config.guest_cid = cid), V::GuestCid(c) if c == cid));
        }
        assert!(matches!(
            dev(&|s| s.config.host_buf_alloc = u32::MAX),
            V::Limit { name: "host_buf_alloc", value, .. } if value == u64::from(u32::MAX)
        ));
        assert!(matches!(dev(&|s| s.config.max_packet_data = 1 << 20), V::Limit { name: "max_packet_data", .. }));
        assert!(matches!(dev(&|s| s.config.max_packet_data = 0), V::Limit { name: "max_packet_data", .. }));
        assert!(matches!(dev(&|s| s.config.max_connections = usize::MAX), V::Limit { name: "max_connections", .. }));
        assert!(matches!(dev(&|s| s.next_id = 0), V::NextId(0)));
        assert!(matches!(dev(&|s| s.next_id = u64::MAX), V::NextId(_)));
        assert!(matches!(dev(&|s| s.next_port = 80), V::NextPort(80)));
        assert!(matches!(dev(&|s| s.next_port = u32::MAX), V::NextPort(_)));
        assert!(matches!(dev(&|s| s.pending_rsts = vec![(1, 2); MAX_PENDING_RSTS + 1]), V::TooManyResets(_)));
        assert!(matches!(
            dev(&|s| {
                s.queues = None;
                s.failed = true;
            }),
            V::FailedInactive
        ));

        // Valid state, but not for this memory.
        let r = Transport::restore((), &good).unwrap();
        r.check_memory(&mem).unwrap();
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        assert!(matches!(r.check_memory(&small), Err(M::QueueOutsideMemory(0))));
    }

    #[test]
    fn corrupted_state_bytes_never_panic() {
        let mem = memory();
        let (mut t, mut g) = transport(&mem);
        t.device_mut().host_mut().connect(GUEST_PORT, 0).unwrap();
        g.post_rx(2, 4096);
        t.poll(&mem);
        let bytes = postcard::to_stdvec(&t.save()).unwrap();
        let (mut decoded, mut restored) = (0, 0);
        for i in 0..bytes.len() {
            for v in [0, 1, 0x7f, 0x80, 0xff, bytes[i] ^ 0x04] {
                let mut m = bytes.clone();
                m[i] = v;
                let Ok(state) = postcard::from_bytes::<TransportState>(&m) else {
                    continue;
                };
                decoded += 1;
                let Ok(mut r) = Transport::restore((), &state) else {
                    continue;
                };
                restored += 1;
                // Whatever was accepted must run without panicking.
                let _ = r.check_memory(&mem);
                r.device_mut().host_mut().connect(GUEST_PORT, 0).ok();
                r.poll(&mem);
                let _ = registers(&mut r, &mem, 0);
            }
        }
        assert!(decoded > restored && restored > 0, "{decoded} decoded, {restored} restored");
    }

    /// The encoding of the states is part of the snapshot image format (postcard: field order
    /// and types are the format). If this fails, the image format changed: bump
    /// mu2_snapshot::FORMAT_VERSION (with the VMM's payload schema) and update the bytes here.
    #[test]
    fn state_encoding_is_stable() {
        let q = |i: u64| QueueSnapshot {
            max_size: 256,
            size: 64,
            ready: true,
            desc_table: 0x1000 * i,
            avail_ring: 0x1000 * i + 0x400,
            used_ring: 0x1000 * i + 0x800,
            next_avail: 7,
            next_used: 5,
            event_idx_enabled: false,
        };
        let state = TransportState {
            status: 0xf,
            device_features_sel: 1,
            driver_features_sel: 1,
            driver_features: 1 << 32,
            unknown_features: false,
            queue_sel: 2,
            queues: vec![q(1), q(2), q(3)],
            interrupt_status: 1,
            config_generation: 0,
            activated: true,
            wakeup: false,
            device: VsockState {
                config: config(),
                acked_features: 1 << 32,
                queues: Some([q(1), q(2), q(3)]),
                failed: false,
                next_id: 3,
                next_port: FIRST_EPHEMERAL_PORT + 2,
                pending_rsts: vec![(FIRST_EPHEMERAL_PORT, GUEST_PORT)],
            },
        };
        let hex: String = postcard::to_stdvec(&state).unwrap().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, GOLDEN, "the device state encoding changed: see this test's docs");
        assert!(Transport::restore((), &state).is_ok());
    }

    const GOLDEN: &str = concat!(
        "0f0101808080801000020380024001802080288030070500800240018040804880500705008002400180608068807007050001",
        "000100038080108080048002808080801001800240018020802880300705008002400180408048805007050080024001806080",
        "688070070500000382808080040180808080048827",
    );
}
