//! Vsock device tests: a guest driver played on top of virtio-queue's mock queues.

use std::collections::HashMap;

use mu2_abi::vsock::{op, shutdown, TYPE_STREAM};
use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::endpoint::{MAX_PENDING_RSTS, MAX_RECORDED_ERRORS};
use super::*;
use crate::virtio::test_utils::{Desc, DriverQueue};
use crate::virtio::{VirtioDevice, VirtioError};
use crate::GuestMemoryMmap;

pub(super) const GUEST_CID: u64 = 3;
pub(super) const GUEST_PORT: u32 = 5000;
pub(super) const MEM_SIZE: usize = 64 << 20;
pub(super) const QSIZE: u16 = 64;
pub(super) const HDR: u32 = virtio_vsock::packet::PKT_HEADER_SIZE as u32;

pub(super) fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A packet as the guest sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Pkt {
    pub(super) src_cid: u64,
    pub(super) dst_cid: u64,
    pub(super) src_port: u32,
    pub(super) dst_port: u32,
    pub(super) len: u32,
    pub(super) type_: u16,
    pub(super) op: u16,
    pub(super) flags: u32,
    pub(super) buf_alloc: u32,
    pub(super) fwd_cnt: u32,
    pub(super) data: Vec<u8>,
}

impl Pkt {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(HDR as usize);
        h.extend(self.src_cid.to_le_bytes());
        h.extend(self.dst_cid.to_le_bytes());
        h.extend(self.src_port.to_le_bytes());
        h.extend(self.dst_port.to_le_bytes());
        h.extend(self.len.to_le_bytes());
        h.extend(self.type_.to_le_bytes());
        h.extend(self.op.to_le_bytes());
        h.extend(self.flags.to_le_bytes());
        h.extend(self.buf_alloc.to_le_bytes());
        h.extend(self.fwd_cnt.to_le_bytes());
        h
    }

    pub(super) fn decode(h: &[u8]) -> Pkt {
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(h[o..o + 2].try_into().unwrap());
        Pkt {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
            data: Vec::new(),
        }
    }
}

/// The guest driver: posts RX buffers, submits TX packets, reads used rings.
pub(super) struct Guest<'a> {
    pub(super) mem: &'a GuestMemoryMmap,
    pub(super) rx: DriverQueue<'a>,
    pub(super) tx: DriverQueue<'a>,
    pub(super) event: DriverQueue<'a>,
    /// RX head → (header address, data address or None for single-descriptor buffers).
    pub(super) rx_bufs: HashMap<u32, (u64, u64)>,
    pub(super) next_buf: u64,
    pub(super) buf_alloc: u32,
    pub(super) fwd_cnt: u32,
}

impl<'a> Guest<'a> {
    pub(super) fn new(mem: &'a GuestMemoryMmap) -> Self {
        Guest {
            mem,
            rx: DriverQueue::new(mem, 0x1_0000, QSIZE),
            tx: DriverQueue::new(mem, 0x2_0000, QSIZE),
            event: DriverQueue::new(mem, 0x3_0000, QSIZE),
            rx_bufs: HashMap::new(),
            next_buf: 0x10_0000,
            buf_alloc: 64 << 10,
            fwd_cnt: 0,
        }
    }

    pub(super) fn queues(&self) -> Vec<Queue> {
        [&self.rx, &self.tx, &self.event].iter().map(|q| q.device_queue(QUEUE_MAX_SIZE)).collect()
    }

    pub(super) fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_buf;
        self.next_buf += len.next_multiple_of(16);
        assert!(self.next_buf < MEM_SIZE as u64);
        addr
    }

    /// Posts `n` RX buffers: a header descriptor and a `cap`-byte data descriptor.
    pub(super) fn post_rx(&mut self, n: usize, cap: u32) {
        for _ in 0..n {
            let hdr = self.alloc(u64::from(HDR));
            let data = self.alloc(u64::from(cap));
            let head = self.rx.add_chain(&[(hdr, HDR, true), (data, cap, true)]);
            self.rx_bufs.insert(u32::from(head), (hdr, data));
        }
    }

    /// Posts one RX buffer holding header and `cap` data bytes in one descriptor.
    pub(super) fn post_rx_single(&mut self, cap: u32) {
        let hdr = self.alloc(u64::from(HDR + cap));
        let head = self.rx.add_chain(&[(hdr, HDR + cap, true)]);
        self.rx_bufs.insert(u32::from(head), (hdr, hdr + u64::from(HDR)));
    }

    /// A stream packet from the guest port to a host port.
    pub(super) fn pkt(&self, op: u16, host_port: u32) -> Pkt {
        Pkt {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: GUEST_PORT,
            dst_port: host_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
            ..Pkt::default()
        }
    }

    pub(super) fn rw(&self, host_port: u32, data: &[u8]) -> Pkt {
        Pkt { len: data.len() as u32, data: data.to_vec(), ..self.pkt(op::RW, host_port) }
    }

    /// Submits a packet on TX: header descriptor, then data descriptor if any.
    pub(super) fn send(&mut self, pkt: &Pkt) {
        let hdr = self.alloc(u64::from(HDR));
        self.mem.write_slice(&pkt.encode(), GuestAddress(hdr)).unwrap();
        let mut descs: Vec<Desc> = vec![(hdr, HDR, false)];
        if !pkt.data.is_empty() {
            let data = self.alloc(pkt.data.len() as u64);
            self.mem.write_slice(&pkt.data, GuestAddress(data)).unwrap();
            descs.push((data, pkt.data.len() as u32, false));
        }
        self.tx.add_chain(&descs);
    }

    /// Packets the device put in RX buffers since the last call.
    pub(super) fn recv(&mut self) -> Vec<Pkt> {
        let mut out = Vec::new();
        for (head, len) in self.rx.take_used() {
            let (hdr_addr, data_addr) = self.rx_bufs.remove(&head).expect("unknown rx head");
            if len == 0 {
                continue; // rejected buffer
            }
            let mut h = [0u8; HDR as usize];
            self.mem.read_slice(&mut h, GuestAddress(hdr_addr)).unwrap();
            let mut p = Pkt::decode(&h);
            assert_eq!(len, HDR + p.len, "used length matches header");
            p.data = vec![0; p.len as usize];
            self.mem.read_slice(&mut p.data, GuestAddress(data_addr)).unwrap();
            self.fwd_cnt = self.fwd_cnt.wrapping_add(p.len);
            out.push(p);
        }
        out
    }
}

pub(super) fn config() -> VsockConfig {
    VsockConfig { guest_cid: GUEST_CID, ..VsockConfig::default() }
}

pub(super) fn active(mem: &GuestMemoryMmap, config: VsockConfig) -> (Vsock, Guest<'_>) {
    let guest = Guest::new(mem);
    let mut dev = Vsock::new(config);
    dev.activate(mem, guest.queues()).unwrap();
    (dev, guest)
}

/// A host-initiated connection the guest accepted; returns its id and host port.
pub(super) fn established(dev: &mut Vsock, g: &mut Guest, mem: &GuestMemoryMmap) -> (ConnId, u32) {
    let id = dev.host_mut().connect(GUEST_PORT, 0).unwrap();
    g.post_rx(1, 4096);
    dev.process(mem);
    let req = g.recv();
    assert_eq!(req.len(), 1);
    assert_eq!(req[0].op, op::REQUEST);
    let host_port = req[0].src_port;
    g.send(&g.pkt(op::RESPONSE, host_port));
    dev.process(mem);
    assert_eq!(dev.host().state(id).unwrap().phase, ConnPhase::Established);
    (id, host_port)
}

pub(super) fn ops(pkts: &[Pkt]) -> Vec<u16> {
    pkts.iter().map(|p| p.op).collect()
}

#[test]
fn config_space_and_features() {
    let dev = Vsock::new(config());
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.features(), 1 << 32);
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let mut tail = [0xffu8; 4];
    dev.read_config(6, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0]);
    dev.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 4]);
}

#[test]
fn activation_disables_notifications_and_needs_rx_tx() {
    let mem = memory();
    let (_dev, g) = active(&mem, config());
    for q in [&g.rx, &g.tx, &g.event] {
        assert_eq!(q.used_flags(), VRING_USED_F_NO_NOTIFY as u16);
    }
    let mut dev = Vsock::new(config());
    let mut queues = g.queues();
    queues[TX_QUEUE].set_ready(false);
    assert!(matches!(dev.activate(&mem, queues), Err(VirtioError::QueueNotReady(1))));
    let queues = g.queues().into_iter().take(2).collect();
    assert!(matches!(dev.activate(&mem, queues), Err(VirtioError::QueueCount { got: 2, .. })));
}

#[test]
fn full_exchange_host_initiated() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    let id = dev.host_mut().connect(GUEST_PORT, 0).unwrap();
    assert_eq!(dev.host().state(id).unwrap().phase, ConnPhase::Connecting);
    // Nothing happens without RX buffers.
    assert!(!dev.process(&mem));
    g.post_rx(8, 4096);
    assert!(dev.process(&mem));
    let req = g.recv();
    assert_eq!(ops(&req), [op::REQUEST]);
    let host_port = req[0].src_port;
    assert_eq!((req[0].src_cid, req[0].dst_cid, req[0].dst_port), (HOST_CID, GUEST_CID, GUEST_PORT));
    assert_eq!(req[0].type_, TYPE_STREAM);
    assert_eq!(req[0].buf_alloc, 256 << 10);

    g.send(&g.pkt(op::RESPONSE, host_port));
    assert!(dev.process(&mem)); // the TX chain was used
    assert_eq!(g.tx.take_used().len(), 1);
    assert_eq!(dev.host().state(id).unwrap().phase, ConnPhase::Established);

    dev.host_mut().send(id, b"hello").unwrap();
    dev.process(&mem);
    let data = g.recv();
    assert_eq!(ops(&data), [op::RW]);
    assert_eq!(data[0].data, b"hello");

    g.send(&g.rw(host_port, b"world"));
    dev.process(&mem);
    let mut out = Vec::new();
    assert_eq!(dev.host_mut().recv(id, &mut out).unwrap(), 5);
    assert_eq!(out, b"world");

    dev.host_mut().shutdown_send(id).unwrap();
    assert!(matches!(dev.host_mut().send(id, b"late"), Err(VsockError::NotWritable(_))));
    dev.process(&mem);
    let shut = g.recv();
    assert_eq!(ops(&shut), [op::SHUTDOWN]);
    assert_eq!(shut[0].flags, shutdown::SEND);

    // The guest sends its last bytes and closes: SHUTDOWN both ways, the host answers RST.
    g.send(&g.rw(host_port, b"bye"));
    g.send(&Pkt { flags: shutdown::RCV | shutdown::SEND, ..g.pkt(op::SHUTDOWN, host_port) });
    dev.process(&mem);
    let rst = g.recv();
    assert_eq!(ops(&rst), [op::RST]);
    assert_eq!((rst[0].src_port, rst[0].dst_port), (host_port, GUEST_PORT));
    let state = dev.host().state(id).unwrap();
    assert_eq!(state.phase, ConnPhase::Closed(CloseReason::GuestClosed));
    assert!(state.guest_eof);
    assert_eq!(state.readable, 3);
    out.clear();
    dev.host_mut().recv(id, &mut out).unwrap();
    assert_eq!(out, b"bye");
    dev.host_mut().remove(id);
    assert!(dev.host().state(id).is_none());
    // Removing a closed connection sends nothing.
    dev.process(&mem);
    assert!(g.recv().is_empty());
    assert!(dev.host_mut().take_errors().is_empty());
    let stats = dev.host().stats();
    assert_eq!(stats.rx_bytes, 5);
    assert_eq!(stats.tx_bytes, 8);
    assert_eq!(stats.resets_sent, 1);
}

#[test]
fn assumed_credit_sends_request_and_data_in_one_batch() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    let eager = dev.host_mut().connect(GUEST_PORT, 4096).unwrap();
    dev.host_mut().send(eager, &[7; 100]).unwrap();
    let strict = dev.host_mut().connect(GUEST_PORT + 1, 0).unwrap();
    dev.host_mut().send(strict, &[8; 100]).unwrap();
    g.post_rx(8, 4096);
    dev.process(&mem);
    let pkts = g.recv();
    // Control first (both REQUESTs), then the data the eager connection may already send.
    assert_eq!(ops(&pkts), [op::REQUEST, op::REQUEST, op::RW]);
    assert_eq!(pkts[2].dst_port, GUEST_PORT);
    assert_eq!(pkts[2].data, [7; 100]);
    // The strict one waits for the RESPONSE.
    let strict_port = pkts[1].src_port;
    // (The helper counts fwd_cnt across connections; this one has consumed nothing.)
    g.send(&Pkt { src_port: GUEST_PORT + 1, fwd_cnt: 0, ..g.pkt(op::RESPONSE, strict_port) });
    dev.process(&mem);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), [op::RW]);
    assert_eq!(pkts[0].data, [8; 100]);
}

#[test]
fn host_stops_at_guest_credit_and_resumes_on_credit_update() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    g.buf_alloc = 1000;
    let (id, host_port) = established(&mut dev, &mut g, &mem);
    let payload: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
    dev.host_mut().send(id, &payload).unwrap();
    g.post_rx(16, 300);
    dev.process(&mem);
    let mut got: Vec<u8> = g.recv().into_iter().flat_map(|p| p.data).collect();
    assert_eq!(got.len(), 1000, "stops at the credit");
    assert_eq!(dev.host().state(id).unwrap().unsent, 1500);
    // More buffers do not help without credit.
    dev.process(&mem);
    assert!(g.recv().is_empty());
    // The guest consumed everything: CREDIT_UPDATE carries fwd_cnt = 1000.
    g.send(&g.pkt(op::CREDIT_UPDATE, host_port));
    dev.process(&mem);
    got.extend(g.recv().into_iter().flat_map(|p| p.data));
    assert_eq!(got.len(), 2000);
    g.send(&g.pkt(op::CREDIT_UPDATE, host_port));
    dev.process(&mem);
    got.extend(g.recv().into_iter().flat_map(|p| p.data));
    assert_eq!(got, payload);
    assert!(dev.host_mut().take_errors().is_empty());
}

#[test]
fn packets_respect_buffer_size_and_max_packet_data() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, VsockConfig { max_packet_data: 1000, ..config() });
    let (id, _) = established(&mut dev, &mut g, &mem);
    dev.host_mut().send(id, &[1; 5000]).unwrap();
    g.post_rx(1, 300);
    g.post_rx(1, 4000);
    g.post_rx_single(700);
    dev.process(&mem);
    let sizes: Vec<usize> = g.recv().iter().map(|p| p.data.len()).collect();
    assert_eq!(sizes, [300, 1000, 700]);
}

#[test]
fn guest_exceeding_host_credit_is_reset() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, VsockConfig { host_buf_alloc: 1024, ..config() });
    let (id, host_port) = established(&mut dev, &mut g, &mem);
    g.post_rx(4, 4096);
    g.send(&g.rw(host_port, &[1; 800]));
    g.send(&g.rw(host_port, &[2; 300]));
    dev.process(&mem);
    assert_eq!(ops(&g.recv()), [op::RST]);
    let errors = dev.host_mut().take_errors();
    assert!(matches!(errors.as_slice(), [VsockError::CreditExceeded { len: 300, credit: 224, .. }]), "{errors:?}");
    let state = dev.host().state(id).unwrap();
    assert_eq!(state.phase, ConnPhase::Closed(CloseReason::ProtocolError));
    assert_eq!(state.readable, 800, "data within the credit is kept");
    // Later packets for the old port pair get RST (the connection is gone for the guest).
    g.send(&g.rw(host_port, b"x"));
    dev.process(&mem);
    assert_eq!(ops(&g.recv()), [op::RST]);
}

#[test]
fn credit_request_and_credit_update_after_consumption() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, VsockConfig { host_buf_alloc: 1024, ..config() });
    let (id, host_port) = established(&mut dev, &mut g, &mem);
    g.post_rx(4, 4096);
    g.send(&g.pkt(op::CREDIT_REQUEST, host_port));
    dev.process(&mem);
    let upd = g.recv();
    assert_eq!(ops(&upd), [op::CREDIT_UPDATE]);
    assert_eq!((upd[0].buf_alloc, upd[0].fwd_cnt), (1024, 0));

    g.send(&g.rw(host_port, &[0; 600]));
    dev.process(&mem);
    assert!(g.recv().is_empty());
    dev.host_mut().recv(id, &mut Vec::new()).unwrap();
    dev.process(&mem);
    let upd = g.recv();
    assert_eq!(ops(&upd), [op::CREDIT_UPDATE]);
    assert_eq!(upd[0].fwd_cnt, 600);
}

#[test]
fn unknown_connections_get_rst() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    g.post_rx(4, 4096);
    g.send(&g.rw(1234, b"data"));
    g.send(&g.pkt(op::RST, 1235)); // never answered
    g.send(&g.pkt(op::SHUTDOWN, 1236));
    dev.process(&mem);
    let rst = g.recv();
    assert_eq!(ops(&rst), [op::RST, op::RST]);
    assert_eq!((rst[0].src_port, rst[0].dst_port), (1234, GUEST_PORT));
    assert_eq!((rst[1].src_port, rst[1].dst_port), (1236, GUEST_PORT));
    assert_eq!(dev.host().stats().tx_bytes, 0);
}

#[test]
fn listen_and_accept() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    dev.host_mut().listen(7000);
    g.post_rx(4, 4096);
    g.send(&g.pkt(op::REQUEST, 7000));
    g.send(&Pkt { src_port: 4001, ..g.pkt(op::REQUEST, 7001) });
    dev.process(&mem);
    let replies = g.recv();
    assert_eq!(ops(&replies), [op::RST, op::RESPONSE]);
    assert_eq!(replies[0].src_port, 7001);
    assert_eq!((replies[1].src_port, replies[1].dst_port), (7000, GUEST_PORT));
    let (id, port) = dev.host_mut().accept().unwrap();
    assert_eq!(port, 7000);
    assert!(dev.host_mut().accept().is_none());
    assert_eq!(dev.host().state(id).unwrap().phase, ConnPhase::Established);

    g.send(&g.rw(7000, b"ping"));
    dev.process(&mem);
    let mut out = Vec::new();
    dev.host_mut().recv(id, &mut out).unwrap();
    assert_eq!(out, b"ping");
    dev.host_mut().send(id, b"pong").unwrap();
    dev.process(&mem);
    assert_eq!(g.recv()[0].data, b"pong");

    // The guest resets; the host sees why.
    g.send(&g.pkt(op::RST, 7000));
    dev.process(&mem);
    assert_eq!(dev.host().state(id).unwrap().phase, ConnPhase::Closed(CloseReason::GuestReset));
    assert!(g.recv().is_empty());
}

#[test]
fn guest_refusal_and_host_reset() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    let id = dev.host_mut().connect(GUEST_PORT, 0).unwrap();
    g.post_rx(4, 4096);
    dev.process(&mem);
    let host_port = g.recv()[0].src_port;
    g.send(&g.pkt(op::RST, host_port));
    dev.process(&mem);
    assert_eq!(dev.host().state(id).unwrap().phase, ConnPhase::Closed(CloseReason::Refused));
    assert!(matches!(dev.host_mut().send(id, b"x"), Err(VsockError::NotWritable(_))));

    let (id, host_port) = established(&mut dev, &mut g, &mem);
    dev.host_mut().abort(id);
    assert!(dev.host().state(id).is_none());
    assert!(matches!(dev.host_mut().send(id, b"x"), Err(VsockError::UnknownConnection(_))));
    g.post_rx(1, 4096);
    dev.process(&mem);
    let rst = g.recv();
    assert_eq!(ops(&rst), [op::RST]);
    assert_eq!(rst[0].src_port, host_port);
}

#[test]
fn rx_is_fair_across_connections() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    let a = dev.host_mut().connect(GUEST_PORT, 1 << 20).unwrap();
    let b = dev.host_mut().connect(GUEST_PORT + 1, 1 << 20).unwrap();
    dev.host_mut().send(a, &[0xa; 10000]).unwrap();
    dev.host_mut().send(b, &[0xb; 10000]).unwrap();
    g.post_rx(8, 1000);
    dev.process(&mem);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), [op::REQUEST, op::REQUEST, op::RW, op::RW, op::RW, op::RW, op::RW, op::RW]);
    let owners: Vec<u8> = pkts[2..].iter().map(|p| p.data[0]).collect();
    assert_eq!(owners, [0xa, 0xb, 0xa, 0xb, 0xa, 0xb]);
}

#[test]
fn max_connections_and_device_reset() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, VsockConfig { max_connections: 1, ..config() });
    let id = dev.host_mut().connect(GUEST_PORT, 0).unwrap();
    assert!(matches!(dev.host_mut().connect(GUEST_PORT, 0), Err(VsockError::TooManyConnections(1))));
    dev.host_mut().listen(7000);
    g.post_rx(2, 4096);
    g.send(&g.pkt(op::REQUEST, 7000));
    dev.process(&mem);
    assert_eq!(ops(&g.recv()), [op::RST, op::REQUEST], "no room for the guest's connection");

    VirtioDevice::reset(&mut dev);
    assert!(dev.host().state(id).is_none());
    assert!(!dev.process(&mem), "nothing to do without queues");
    dev.host_mut().connect(GUEST_PORT, 0).unwrap();
}

/// Where malformed TX chains put their header.
const BAD_HDR: u64 = 0x80_0000;

/// Writes `hdr` at [`BAD_HDR`], submits a TX chain, processes, and returns the errors; the
/// chain must come back with length 0 and the device must keep working.
fn reject_tx(hdr: &Pkt, descs: &[Desc]) -> Vec<VsockError> {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    mem.write_slice(&hdr.encode(), GuestAddress(BAD_HDR)).unwrap();
    g.tx.add_chain(descs);
    assert!(dev.process(&mem));
    assert_eq!(g.tx.take_used().iter().map(|u| u.1).collect::<Vec<_>>(), [0]);
    let errors = dev.host_mut().take_errors();
    // Still working: a good packet afterwards is answered.
    g.post_rx(1, 4096);
    g.send(&g.rw(1, b"x"));
    dev.process(&mem);
    assert_eq!(ops(&g.recv()), [op::RST]);
    assert!(!dev.is_failed());
    assert_eq!(dev.host().stats().bad_chains, 1);
    errors
}

fn bad_chain(errors: &[VsockError]) -> &ChainError {
    match errors {
        [VsockError::BadChain { source, .. }] => source,
        other => panic!("expected one bad chain, got {other:?}"),
    }
}

#[test]
fn malformed_tx_chains() {
    let mem = memory();
    let g = Guest::new(&mem);
    let rw = |len: u32| Pkt { len, ..g.pkt(op::RW, 1) };
    let outside = MEM_SIZE as u64 - 16;

    let e = reject_tx(&rw(0), &[(outside, HDR, false)]);
    assert!(matches!(bad_chain(&e), ChainError::OutOfBounds { .. }), "{e:?}");
    let e = reject_tx(&rw(0), &[(BAD_HDR, HDR, true)]);
    assert!(matches!(bad_chain(&e), ChainError::WrongDirection(0)), "{e:?}");
    let e = reject_tx(&rw(4), &[(BAD_HDR, HDR, false), (0x90_0000, 4, true)]);
    assert!(matches!(bad_chain(&e), ChainError::WrongDirection(1)), "{e:?}");
    let e = reject_tx(&rw(0), &[(BAD_HDR, HDR - 1, false)]);
    assert!(matches!(bad_chain(&e), ChainError::ShortHeader(43)), "{e:?}");
    // A `len` beyond max_packet_data: refused before anything is allocated.
    let e = reject_tx(&rw(100 << 20), &[(BAD_HDR, HDR, false), (0x90_0000, 4096, false)]);
    assert!(matches!(bad_chain(&e), ChainError::Packet(virtio_vsock::packet::Error::InvalidHeaderLen(_))), "{e:?}");
    let e = reject_tx(&rw(4), &[(BAD_HDR, HDR, false), (0x90_0000, 0, false)]);
    assert!(matches!(bad_chain(&e), ChainError::ZeroLength(1)), "{e:?}");
    let e = reject_tx(&rw(4), &[(BAD_HDR, HDR, false), (0x90_0000, 2, false)]);
    assert!(matches!(bad_chain(&e), ChainError::Packet(_)), "data shorter than len: {e:?}");
    let e = reject_tx(&rw(4), &[(BAD_HDR, HDR, false), (0x90_0000, 2, false), (0x90_0010, 2, false)]);
    assert!(matches!(bad_chain(&e), ChainError::TooLong), "{e:?}");
    // Data descriptor crossing the end of memory.
    let e = reject_tx(&rw(4096), &[(BAD_HDR, HDR, false), (MEM_SIZE as u64 - 100, 4096, false)]);
    assert!(matches!(bad_chain(&e), ChainError::OutOfBounds { .. }), "{e:?}");
}

#[test]
fn descriptor_cycles_and_bad_indices() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    let h = BAD_HDR;
    mem.write_slice(&g.rw(1, b"abcd").encode(), GuestAddress(h)).unwrap();
    let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    // 10 -> 11 -> 10
    g.tx.write_desc(10, Descriptor::new(h, HDR, next, 11));
    g.tx.write_desc(11, Descriptor::new(0x90_0000, 4, next, 10));
    g.tx.publish(10);
    // 12 -> 12
    g.tx.write_desc(12, Descriptor::new(h, HDR, next, 12));
    g.tx.publish(12);
    // 13 -> out of the table
    g.tx.write_desc(13, Descriptor::new(h, HDR, next, 1000));
    g.tx.publish(13);
    // head out of the table
    g.tx.publish(500);
    dev.process(&mem);
    let errors = dev.host_mut().take_errors();
    let kinds: Vec<String> = errors.iter().map(|e| format!("{:?}", bad_chain(std::slice::from_ref(e)))).collect();
    assert_eq!(kinds, ["Cycle(10)", "Cycle(12)", "Truncated", "BadHead"]);
    // All but the out-of-range head came back with length 0.
    assert_eq!(g.tx.take_used(), [(10, 0), (12, 0), (13, 0)]);
    assert!(!dev.is_failed());
}

#[test]
fn malformed_rx_chains() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    let id = dev.host_mut().connect(GUEST_PORT, 0).unwrap();
    g.rx.add_chain(&[(0x80_0000, HDR, false), (0x80_1000, 100, true)]); // read-only header
    g.rx.add_chain(&[(0x80_0000, HDR, true), (0x80_1000, 100, false)]); // read-only data
    g.rx.add_chain(&[(0x80_0000, HDR, true)]); // no data space
    g.rx.add_chain(&[(0x80_0000, HDR, true), (0x80_1000, 0, true)]); // zero-length data
    g.rx.add_chain(&[(MEM_SIZE as u64 - 8, HDR, true), (0x80_1000, 100, true)]); // outside
    g.rx.add_chain(&[(0x80_0000, 20, true), (0x80_1000, 100, true)]); // short header
    g.post_rx(1, 4096);
    dev.process(&mem);
    let used = g.rx.take_used();
    assert_eq!(used.len(), 7);
    assert!(used[..6].iter().all(|u| u.1 == 0));
    assert_eq!(used[6].1, HDR, "the REQUEST went into the first good buffer");
    let errors = dev.host_mut().take_errors();
    assert_eq!(errors.len(), 6, "{errors:?}");
    assert!(errors.iter().all(|e| matches!(e, VsockError::BadChain { queue: "rx", .. })));
    assert!(matches!(bad_chain(&errors[2..3]), ChainError::Packet(_)));
    assert!(matches!(bad_chain(&errors[3..4]), ChainError::ZeroLength(1)));
    assert!(matches!(bad_chain(&errors[4..5]), ChainError::OutOfBounds { .. }));
    assert!(matches!(bad_chain(&errors[5..6]), ChainError::ShortHeader(20)));
    assert_eq!(dev.host().state(id).unwrap().phase, ConnPhase::Connecting);
}

#[test]
fn bad_addresses_and_types_are_dropped() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    dev.host_mut().listen(7000);
    g.post_rx(4, 4096);
    g.send(&Pkt { src_cid: 99, ..g.pkt(op::REQUEST, 7000) });
    g.send(&Pkt { dst_cid: 42, ..g.pkt(op::REQUEST, 7000) });
    g.send(&Pkt { type_: 2, ..g.pkt(op::REQUEST, 7000) });
    g.send(&g.pkt(99, 7000));
    dev.process(&mem);
    assert!(g.recv().is_empty());
    assert!(dev.host_mut().accept().is_none());
    let errors = dev.host_mut().take_errors();
    assert!(matches!(
        errors.as_slice(),
        [
            VsockError::BadSrcCid(99),
            VsockError::BadDstCid(42),
            VsockError::UnsupportedType(2),
            VsockError::UnknownOp(99)
        ]
    ));
    assert_eq!(g.tx.take_used().len(), 4);
    assert_eq!(dev.host().stats().protocol_errors, 4);
}

#[test]
fn protocol_violations_reset_the_connection() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    let (id, host_port) = established(&mut dev, &mut g, &mem);
    g.post_rx(2, 4096);
    g.send(&Pkt { flags: shutdown::SEND, ..g.pkt(op::SHUTDOWN, host_port) });
    g.send(&g.rw(host_port, b"after shutdown"));
    dev.process(&mem);
    assert_eq!(ops(&g.recv()), [op::RST]);
    assert!(matches!(dev.host_mut().take_errors().as_slice(), [VsockError::UnexpectedOp { op: op::RW, .. }]));
    let state = dev.host().state(id).unwrap();
    assert_eq!(state.phase, ConnPhase::Closed(CloseReason::ProtocolError));
    assert_eq!(state.readable, 0);
}

#[test]
fn avail_index_too_far_ahead_fails_the_device() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    g.tx.set_avail_idx(QSIZE + 1);
    assert!(!dev.process(&mem));
    assert!(dev.is_failed());
    assert!(dev.needs_reset());
    assert!(matches!(dev.host_mut().take_errors().as_slice(), [VsockError::QueueBroken { queue: "tx", .. }]));
    // Processing stopped.
    g.tx.set_avail_idx(0);
    g.post_rx(1, 4096);
    dev.host_mut().connect(GUEST_PORT, 0).unwrap();
    assert!(!dev.process(&mem));
    assert!(g.recv().is_empty());
    // A reset and reactivation recover.
    VirtioDevice::reset(&mut dev);
    let g = Guest::new(&mem);
    dev.activate(&mem, g.queues()).unwrap();
    assert!(!dev.is_failed());
}

#[test]
fn error_list_is_bounded() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    for _ in 0..(MAX_RECORDED_ERRORS + 10) {
        g.send(&Pkt { src_cid: 1, ..g.pkt(op::RW, 1) });
        dev.process(&mem);
        g.tx.take_used();
    }
    assert_eq!(dev.host_mut().take_errors().len(), MAX_RECORDED_ERRORS);
    assert_eq!(dev.host().stats().errors_dropped, 10);
}

#[test]
fn pending_rsts_are_bounded() {
    let mem = memory();
    let (mut dev, mut g) = active(&mem, config());
    for round in 0..10u32 {
        for i in 0..u32::from(QSIZE) / 2 {
            g.send(&g.rw(round * 1000 + i, b"x"));
        }
        dev.process(&mem);
        g.tx.take_used();
    }
    let errors = dev.host_mut().take_errors();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(dev.host().stats().resets_dropped, 10 * 32 - MAX_PENDING_RSTS as u64);
}
