//! The virtio-vsock driver (virtio 1.2 §5.10) and the server side of the stream protocol.
//!
//! Queues: RX (0) is kept full of device-writable buffers, TX (1) carries header + data
//! descriptor pairs (data straight from the response buffer: no copy), the event queue (2)
//! holds a few buffers and only a transport reset matters there.
//!
//! One connection is served at a time, one request per connection, framed as
//! `mu2_abi::frame` says: a length, then the request; an outcome and a length, then the
//! response. The frame, not a SHUTDOWN, ends the request, so a peer that shuts the connection
//! down (even fully) after a whole request still gets its answer. The host may send the
//! request right behind its REQUEST (up to the `buf_alloc` announced in `ReadyInfo`), so the
//! connection counts as established as soon as the REQUEST arrives; the RESPONSE goes out with
//! the next batch. Every packet is host-controlled data: a malformed one, a request longer
//! than the guest announced it can hold, or bytes past the request are answered with RST,
//! never a panic.

use alloc::vec::Vec;
use mu2_abi::frame::{RequestHeader, ResponseHeader};
use mu2_abi::vsock::{op, shutdown, TYPE_STREAM};

use crate::virtio::mmio::{reg, status, Transport, MAGIC_VALUE, VERSION};
use crate::virtio::queue::{Desc, Queue, RingLayout, F_NEXT, F_WRITE};
use crate::virtio::{Dma, Page};

/// Virtio device ID of vsock.
pub const DEVICE_ID: u32 = 19;
/// VIRTIO_F_VERSION_1 (feature bit 32): the only feature the driver accepts.
const F_VERSION_1_HIGH: u32 = 1;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const EVENT_QUEUE: u16 = 2;
/// RX buffers. The first `RX_SMALL` share one page: a small request (REQUEST, RW,
/// SHUTDOWN) lands in those, touching one buffer page instead of three.
const RX_SIZE: u16 = 64;
const RX_SMALL: u16 = 4;
const RX_SMALL_LEN: usize = 1024;
const RX_LEN: usize = 4096;
const RX_PAGES: usize = 1 + (RX_SIZE - RX_SMALL) as usize;
/// TX descriptors: slot `k` uses descriptors `2k` (header) and `2k + 1` (data).
const TX_SIZE: u16 = 64;
const TX_SLOTS: usize = TX_SIZE as usize / 2;
/// TX slots only control packets (RESPONSE, SHUTDOWN, credit, RST) may take.
const TX_CONTROL_RESERVE: usize = 3;
const EVENT_SIZE: u16 = 4;
const EVENT_LEN: usize = 8;

/// Receive buffer granted to each connection (vsock `buf_alloc`).
pub const BUF_ALLOC: u32 = 256 << 10;
/// Largest RW payload sent in one packet.
const MAX_CHUNK: usize = 64 << 10;

const RINGS_END: usize = {
    let rx = RingLayout::new(0, RX_SIZE as usize);
    let tx = RingLayout::new(rx.end, TX_SIZE as usize);
    RingLayout::new(tx.end, EVENT_SIZE as usize).end
};
const _: () = assert!(RINGS_END <= 4096, "the vsock rings must fit in one page");
const _: () = assert!(TX_SLOTS * HDR_STRIDE + EVENT_SIZE as usize * EVENT_LEN <= 4096);

/// All three rings.
static RINGS: Dma<Page> = Dma::new(Page::ZERO);
/// RX buffers.
static RX_BUFFERS: Dma<[Page; RX_PAGES]> = Dma::new([Page::ZERO; RX_PAGES]);
/// TX packet headers (one per slot, each followed by room for a small inline payload: the
/// response's frame header), then the event buffers.
static TX_HEADERS: Dma<Page> = Dma::new(Page::ZERO);
const HDR_STRIDE: usize = 56;
/// Where a slot's inline payload starts.
const INLINE_OFFSET: usize = 48;
const _: () = assert!(INLINE_OFFSET >= Header::SIZE && INLINE_OFFSET + ResponseHeader::SIZE <= HDR_STRIDE);

/// The 44-byte little-endian packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// Size on the wire.
    pub const SIZE: usize = 44;

    /// Decodes the header at the front of `b`, if `b` is long enough.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; Self::SIZE] = b.get(..Self::SIZE)?.try_into().ok()?;
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
        Some(Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The RST that answers this packet.
    fn reset_reply(&self) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            kind: TYPE_STREAM,
            op: op::RST,
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Taking the request's frame header, then its bytes.
    Receiving,
    /// The request is whole (as long as its frame header said); the function has not run yet.
    Complete,
    /// The function is running.
    Handling,
    /// Sending the response (then SHUTDOWN).
    Responding,
}

/// The connection being served.
#[derive(Debug)]
struct Conn {
    peer_cid: u64,
    peer_port: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent.
    tx_cnt: u32,
    /// Payload bytes received (and consumed: moved into `request`).
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the peer.
    fwd_reported: u32,
    phase: Phase,
    /// The request's frame header, as much of it as arrived.
    request_header: [u8; RequestHeader::SIZE],
    request_header_len: usize,
    /// The request's length, once its frame header is whole.
    request_len: Option<usize>,
    request: Vec<u8>,
    /// The response's frame header, then its bytes.
    response_header: ResponseHeader,
    response_header_sent: bool,
    response: Vec<u8>,
    sent: usize,
    need_response: bool,
    need_credit_update: bool,
    credit_requested: bool,
    shutdown_sent: bool,
}

impl Conn {
    fn new(hdr: &Header) -> Self {
        Self {
            peer_cid: hdr.src_cid,
            peer_port: hdr.src_port,
            peer_buf_alloc: hdr.buf_alloc,
            peer_fwd_cnt: hdr.fwd_cnt,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_reported: 0,
            phase: Phase::Receiving,
            request_header: [0; RequestHeader::SIZE],
            request_header_len: 0,
            request_len: None,
            request: Vec::new(),
            response_header: ResponseHeader { outcome: 0, len: 0 },
            response_header_sent: false,
            response: Vec::new(),
            sent: 0,
            need_response: true,
            need_credit_update: false,
            credit_requested: false,
            shutdown_sent: false,
        }
    }

    /// Bytes the peer can still take: its buf_alloc less what is in flight (wrapping u32
    /// counters, as the specification has them).
    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Takes request bytes of an RW packet: the frame header first, then the request, which
    /// is allocated once, at the length the header gives, if that is at most `max_request`.
    /// The request is complete when it has that length.
    fn take_request_bytes(&mut self, mut data: &[u8], max_request: u32) -> Result<(), RequestRefused> {
        let len = match self.request_len {
            Some(len) => len,
            None => {
                let n = (RequestHeader::SIZE - self.request_header_len).min(data.len());
                let (head, rest) = data.split_at(n);
                self.request_header[self.request_header_len..self.request_header_len + n].copy_from_slice(head);
                self.request_header_len += n;
                data = rest;
                if self.request_header_len < RequestHeader::SIZE {
                    return Ok(());
                }
                let len = RequestHeader::decode(self.request_header).len;
                if len > max_request {
                    return Err(RequestRefused::TooLarge);
                }
                let len = len as usize;
                self.request.try_reserve_exact(len).map_err(|_| RequestRefused::TooLarge)?;
                self.request_len = Some(len);
                len
            }
        };
        if data.len() > len - self.request.len() {
            return Err(RequestRefused::PastTheFrame);
        }
        self.request.extend_from_slice(data);
        if self.request.len() == len {
            self.phase = Phase::Complete;
        }
        Ok(())
    }
}

/// Why a request's bytes end its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestRefused {
    /// Its frame header names more than the guest can hold.
    TooLarge,
    /// Bytes past the length its frame header named.
    PastTheFrame,
}

/// What a TX packet carries after its header.
#[derive(Debug, Clone, Copy)]
enum Payload {
    /// Nothing.
    None,
    /// Bytes in memory that stays untouched until the device has used the packet.
    At(u64, usize),
    /// A few bytes, copied into the slot beside the header.
    Inline([u8; ResponseHeader::SIZE]),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::None => 0,
            Payload::At(_, len) => *len,
            Payload::Inline(bytes) => bytes.len(),
        }
    }
}

/// The vsock device and the connection it serves.
#[derive(Debug)]
pub(crate) struct Vsock {
    transport: Transport,
    rx: Queue,
    tx: Queue,
    event: Queue,
    cid: u64,
    port: u32,
    /// Bit `k` set: TX slot `k` is free.
    tx_free: u64,
    tx_slots: usize,
    conn: Option<Conn>,
    /// The largest request accepted (what `ReadyInfo::max_request` announces).
    max_request: u32,
    /// Responses whose data descriptors may still be in flight; freed once TX is idle.
    retired: Vec<Vec<u8>>,
    rx_kick: bool,
    tx_kick: bool,
}

/// Why the device could not be brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitError {
    /// Not a virtio-mmio version 2 window.
    NotVirtioMmio,
    /// A virtio device, but not vsock.
    NotVsock,
    /// The device's status did not read back as 0 after a reset.
    Reset,
    /// The device lacks VIRTIO_F_VERSION_1 or refused FEATURES_OK.
    Features,
    /// A queue is missing.
    Queue,
}

/// Whether the window at `base` is a virtio-mmio v2 vsock device (three exits).
pub(crate) fn probe(transport: Transport) -> Result<(), InitError> {
    if transport.read(reg::MAGIC_VALUE) != MAGIC_VALUE || transport.read(reg::VERSION) != VERSION {
        return Err(InitError::NotVirtioMmio);
    }
    if transport.read(reg::DEVICE_ID) != DEVICE_ID {
        return Err(InitError::NotVsock);
    }
    Ok(())
}

fn rx_buffer(id: u16) -> (u64, usize) {
    let base = RX_BUFFERS.addr();
    if id < RX_SMALL {
        (base + u64::from(id) * RX_SMALL_LEN as u64, RX_SMALL_LEN)
    } else {
        (base + u64::from(id - RX_SMALL + 1) * 4096, RX_LEN)
    }
}

fn header_addr(slot: usize) -> u64 {
    TX_HEADERS.addr() + (slot * HDR_STRIDE) as u64
}

fn event_buffer(i: u16) -> u64 {
    TX_HEADERS.addr() + (TX_SLOTS * HDR_STRIDE) as u64 + u64::from(i) * EVENT_LEN as u64
}

/// How many status reads a reset may take before the device counts as broken.
const RESET_POLLS: u32 = 1000;

/// Largest power of two ≤ min(wanted, device maximum), or None if the queue is missing.
fn queue_size(transport: Transport, index: u16, wanted: u16) -> Option<u16> {
    transport.write(reg::QUEUE_SEL, u32::from(index));
    let max = transport.read(reg::QUEUE_NUM_MAX).min(u32::from(wanted));
    (max > 0).then(|| 1u16 << (31 - max.leading_zeros()))
}

impl Vsock {
    /// Brings the device up in the order of virtio 1.2 §3.1.1, one status bit per write (a
    /// transport may refuse more, as Firecracker's does), and fills the RX and event queues.
    /// Takes requests of at most `max_request` bytes. Call once: the rings are static.
    pub(crate) fn init(transport: Transport, port: u32, max_request: u32) -> Result<Self, InitError> {
        probe(transport)?;
        // 1. Reset; a virtio-mmio driver waits until the status reads back as 0 (§4.2.3.1).
        transport.write(reg::STATUS, 0);
        let mut polls = 0;
        while transport.read(reg::STATUS) != 0 {
            polls += 1;
            if polls == RESET_POLLS {
                return Err(InitError::Reset);
            }
            core::hint::spin_loop();
        }
        // 2. ACKNOWLEDGE, 3. DRIVER.
        let mut status = status::ACKNOWLEDGE;
        transport.write(reg::STATUS, status);
        status |= status::DRIVER;
        transport.write(reg::STATUS, status);
        // 4. Read the device's features, accept the subset understood: VERSION_1 alone.
        transport.write(reg::DEVICE_FEATURES_SEL, 1);
        if transport.read(reg::DEVICE_FEATURES) & F_VERSION_1_HIGH == 0 {
            transport.write(reg::STATUS, status::FAILED);
            return Err(InitError::Features);
        }
        transport.write(reg::DRIVER_FEATURES_SEL, 1);
        transport.write(reg::DRIVER_FEATURES, F_VERSION_1_HIGH);
        transport.write(reg::DRIVER_FEATURES_SEL, 0);
        transport.write(reg::DRIVER_FEATURES, 0);
        // 5. FEATURES_OK, 6. read back: the device may not accept the features.
        status |= status::FEATURES_OK;
        transport.write(reg::STATUS, status);
        if transport.read(reg::STATUS) & status::FEATURES_OK == 0 {
            transport.write(reg::STATUS, status::FAILED);
            return Err(InitError::Features);
        }

        // 7. Device-specific setup: the queues, the configuration (the CID), the buffers.
        let sizes = [(RX_QUEUE, RX_SIZE), (TX_QUEUE, TX_SIZE), (EVENT_QUEUE, EVENT_SIZE)]
            .map(|(index, wanted)| queue_size(transport, index, wanted));
        let [Some(rx_size), Some(tx_size), Some(event_size)] = sizes else {
            transport.write(reg::STATUS, status::FAILED);
            return Err(InitError::Queue);
        };
        let rings = RINGS.ptr().cast::<u8>();
        let rx_end = RingLayout::new(0, RX_SIZE.into()).end;
        let tx_end = RingLayout::new(rx_end, TX_SIZE.into()).end;
        // SAFETY: each queue gets its own part of the rings page, laid out for the largest
        // size (a smaller queue needs less); the page is zeroed static memory used for
        // nothing else, and this runs once.
        let (rx, tx, event) = unsafe {
            (
                Queue::new(transport, RX_QUEUE, rings, 0, rx_size),
                Queue::new(transport, TX_QUEUE, rings, rx_end, tx_size),
                Queue::new(transport, EVENT_QUEUE, rings, tx_end, event_size),
            )
        };
        let tx_slots = usize::from(tx_size) / 2;
        let mut dev = Self {
            transport,
            rx,
            tx,
            event,
            cid: 0,
            port,
            tx_free: (1u64 << tx_slots) - 1,
            tx_slots,
            conn: None,
            max_request,
            retired: Vec::new(),
            rx_kick: true,
            tx_kick: false,
        };
        dev.cid = dev.read_cid();
        for id in 0..rx_size {
            let (addr, len) = rx_buffer(id);
            dev.rx.set_desc(id, Desc { addr, len: len as u32, flags: F_WRITE, next: 0 });
            dev.rx.push(id);
        }
        for id in 0..event_size {
            dev.event.set_desc(id, Desc { addr: event_buffer(id), len: EVENT_LEN as u32, flags: F_WRITE, next: 0 });
            dev.event.push(id);
        }
        // 8. DRIVER_OK: the device is live.
        transport.write(reg::STATUS, status | status::DRIVER_OK);
        dev.rx.kick();
        dev.event.kick();
        Ok(dev)
    }

    fn read_cid(&self) -> u64 {
        let lo = self.transport.read(reg::CONFIG);
        let hi = self.transport.read(reg::CONFIG + 4);
        u64::from(lo) | u64::from(hi) << 32
    }

    /// The guest's CID as the device reports it.
    pub(crate) fn cid(&self) -> u64 {
        self.cid
    }

    /// Whether any queue has used buffers (for polling without the system device).
    pub(crate) fn has_work(&self) -> bool {
        self.rx.has_used() || self.tx.has_used() || self.event.has_used()
    }

    /// Takes back what the device used: TX slots, RX packets (handled), events.
    pub(crate) fn poll(&mut self) {
        while let Some((id, _)) = self.tx.pop_used() {
            let slot = id as usize / 2;
            if id % 2 == 0 && slot < self.tx_slots {
                self.tx_free |= 1 << slot;
            }
        }
        if self.tx_free == (1u64 << self.tx_slots) - 1 && !self.retired.is_empty() {
            self.retired.clear();
        }
        while let Some((id, len)) = self.rx.pop_used() {
            let Ok(id) = u16::try_from(id) else { continue };
            if id >= self.rx.size() {
                continue;
            }
            let (addr, cap) = rx_buffer(id);
            let len = (len as usize).min(cap);
            // SAFETY: the device returned buffer `id`, so the driver owns it until it is
            // pushed again below; it is static memory of at least `cap` bytes.
            let packet = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
            self.handle(packet);
            self.rx.push(id);
            self.rx_kick = true;
        }
        while let Some((id, len)) = self.event.pop_used() {
            let Ok(id) = u16::try_from(id) else { continue };
            if id >= self.event.size() {
                continue;
            }
            if len >= 4 {
                // VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (0): connections are gone, the CID
                // may have changed.
                // SAFETY: the device returned event buffer `id` (static, EVENT_LEN bytes).
                let event = unsafe { (event_buffer(id) as *const u32).read_volatile() };
                if event == 0 {
                    self.drop_conn();
                    self.cid = self.read_cid();
                }
            }
            self.event.push(id);
            self.event.kick();
        }
    }

    fn handle(&mut self, packet: &[u8]) {
        let Some(hdr) = Header::parse(packet) else { return };
        let payload = &packet[Header::SIZE..];
        if hdr.dst_cid != self.cid {
            return;
        }
        if hdr.kind != TYPE_STREAM || hdr.dst_port != self.port {
            self.reset(&hdr);
            return;
        }
        let is_conn = self.conn.as_ref().is_some_and(|c| c.peer_cid == hdr.src_cid && c.peer_port == hdr.src_port);
        if !is_conn {
            let closing = self.conn.as_ref().is_none_or(|c| c.shutdown_sent);
            if hdr.op == op::REQUEST && closing {
                // A new connection; the one whose response is complete is given up (its
                // RST may have been lost).
                self.drop_conn();
                self.conn = Some(Conn::new(&hdr));
            } else {
                // Unknown connection, or one at a time.
                self.reset(&hdr);
            }
            return;
        }
        let Some(conn) = self.conn.as_mut() else { return };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        if conn.credit() > 0 {
            // Ask again only after the peer granted something: answering each credit-less
            // CREDIT_UPDATE with another CREDIT_REQUEST would ping-pong forever.
            conn.credit_requested = false;
        }
        match hdr.op {
            op::REQUEST => conn.need_response = true,
            op::RW => {
                let Some(data) = payload.get(..hdr.len as usize) else {
                    // The header claims more than the buffer holds: bytes are lost.
                    self.reset(&hdr);
                    self.drop_conn();
                    return;
                };
                conn.fwd_cnt = conn.fwd_cnt.wrapping_add(data.len() as u32);
                if conn.fwd_cnt.wrapping_sub(conn.fwd_reported) > BUF_ALLOC / 2 {
                    conn.need_credit_update = true;
                }
                let taken = match conn.phase {
                    Phase::Receiving => conn.take_request_bytes(data, self.max_request),
                    _ if data.is_empty() => Ok(()),
                    _ => Err(RequestRefused::PastTheFrame),
                };
                if taken.is_err() {
                    self.reset(&hdr);
                    self.drop_conn();
                }
            }
            op::SHUTDOWN => {
                // Only a request cut short ends here: one that is whole is answered whatever
                // the peer shut down (Firecracker's hybrid vsock turns a host's half-close into
                // a full SHUTDOWN).
                if hdr.flags & shutdown::SEND != 0 && conn.phase == Phase::Receiving {
                    self.reset(&hdr);
                    self.drop_conn();
                }
            }
            op::CREDIT_REQUEST => conn.need_credit_update = true,
            op::CREDIT_UPDATE => {}
            op::RST => self.drop_conn(),
            _ => {
                self.reset(&hdr);
                self.drop_conn();
            }
        }
    }

    /// Sends RST in answer to `hdr` (never to an RST).
    fn reset(&mut self, hdr: &Header) {
        if hdr.op != op::RST {
            let mut reply = hdr.reset_reply();
            reply.src_cid = self.cid;
            self.send(&reply, Payload::None, true);
        }
    }

    fn drop_conn(&mut self) {
        if let Some(conn) = self.conn.take() {
            if !conn.response.is_empty() {
                self.retired.push(conn.response);
            }
        }
    }

    /// The whole request of the connection, if it just became complete.
    pub(crate) fn take_request(&mut self) -> Option<Vec<u8>> {
        let conn = self.conn.as_mut().filter(|c| c.phase == Phase::Complete)?;
        conn.phase = Phase::Handling;
        Some(core::mem::take(&mut conn.request))
    }

    /// Hands over what the function returned for the connection being handled: `outcome`
    /// (`mu2_abi::frame::outcome`) and the response or error message. A body too long for the
    /// frame's length becomes a function error saying so.
    pub(crate) fn respond(&mut self, outcome: u32, body: Vec<u8>) {
        let (outcome, body) = match u32::try_from(body.len()) {
            Ok(_) => (outcome, body),
            Err(_) => {
                let message = alloc::format!("the response of {} bytes does not fit a frame", body.len());
                self.retired.push(body);
                (mu2_abi::frame::outcome::FUNCTION_ERROR, message.into_bytes())
            }
        };
        match self.conn.as_mut().filter(|c| c.phase == Phase::Handling) {
            Some(conn) => {
                // The length fits: checked above.
                conn.response_header = ResponseHeader { outcome, len: body.len() as u32 };
                conn.response = body;
                conn.phase = Phase::Responding;
            }
            None => self.retired.push(body),
        }
    }

    fn conn_header(&self, op: u16, flags: u32, len: u32) -> Option<Header> {
        let conn = self.conn.as_ref()?;
        Some(Header {
            src_cid: self.cid,
            dst_cid: conn.peer_cid,
            src_port: self.port,
            dst_port: conn.peer_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: conn.fwd_cnt,
        })
    }

    /// Sends a packet of the connection; every one carries our credit.
    fn send_conn(&mut self, op: u16, flags: u32, data: Payload, control: bool) -> bool {
        let len = data.len() as u32;
        let Some(hdr) = self.conn_header(op, flags, len) else { return false };
        if !self.send(&hdr, data, control) {
            return false;
        }
        if let Some(conn) = self.conn.as_mut() {
            conn.fwd_reported = hdr.fwd_cnt;
            conn.need_credit_update = false;
        }
        true
    }

    /// Queues one packet on TX. Data packets leave `TX_CONTROL_RESERVE` slots free.
    fn send(&mut self, hdr: &Header, data: Payload, control: bool) -> bool {
        let free = self.tx_free.count_ones() as usize;
        if free == 0 || (!control && free <= TX_CONTROL_RESERVE) {
            return false;
        }
        let slot = self.tx_free.trailing_zeros() as usize;
        self.tx_free &= !(1 << slot);
        let addr = header_addr(slot);
        // SAFETY: slot `slot` was free, so the device is not reading its header buffer;
        // the buffer is static memory of HDR_STRIDE ≥ 44 bytes.
        unsafe { (addr as *mut [u8; Header::SIZE]).write_volatile(hdr.encode()) };
        let (head, data_desc) = (2 * slot as u16, 2 * slot as u16 + 1);
        let mut desc = Desc { addr, len: Header::SIZE as u32, flags: 0, next: 0 };
        let data = match data {
            Payload::None => None,
            Payload::At(data_addr, len) => Some((data_addr, len)),
            Payload::Inline(bytes) => {
                let inline = addr + INLINE_OFFSET as u64;
                // SAFETY: as for the header: the slot's inline room is static memory the
                // device does not read until the packet is pushed below.
                unsafe { (inline as *mut [u8; ResponseHeader::SIZE]).write_volatile(bytes) };
                Some((inline, bytes.len()))
            }
        };
        if let Some((data_addr, len)) = data {
            desc.flags = F_NEXT;
            desc.next = data_desc;
            self.tx.set_desc(data_desc, Desc { addr: data_addr, len: len as u32, flags: 0, next: 0 });
        }
        self.tx.set_desc(head, desc);
        self.tx.push(head);
        self.tx_kick = true;
        true
    }

    /// Sends what the connection owes the peer: RESPONSE, the response's frame header and
    /// data within the peer's credit, SHUTDOWN, credit updates. Then notifies the queues that
    /// want it.
    pub(crate) fn pump(&mut self) {
        if self.conn.as_ref().is_some_and(|c| c.need_response) && self.send_conn(op::RESPONSE, 0, Payload::None, true) {
            if let Some(conn) = self.conn.as_mut() {
                conn.need_response = false;
            }
        }
        while let Some(conn) = self.conn.as_ref().filter(|c| c.phase == Phase::Responding && !c.need_response) {
            let credit = conn.credit() as usize;
            let remaining = conn.response.len() - conn.sent;
            if !conn.response_header_sent {
                // The frame header goes whole, in a packet of its own (no copy of the response).
                let header = conn.response_header.encode();
                if credit < header.len() {
                    self.request_credit();
                    break;
                }
                if !self.send_conn(op::RW, 0, Payload::Inline(header), false) {
                    break;
                }
                if let Some(conn) = self.conn.as_mut() {
                    conn.response_header_sent = true;
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(header.len() as u32);
                }
                continue;
            }
            if remaining == 0 {
                if !conn.shutdown_sent
                    && self.send_conn(op::SHUTDOWN, shutdown::RCV | shutdown::SEND, Payload::None, true)
                {
                    if let Some(conn) = self.conn.as_mut() {
                        conn.shutdown_sent = true;
                    }
                }
                break;
            }
            if credit == 0 {
                self.request_credit();
                break;
            }
            let chunk = remaining.min(MAX_CHUNK).min(credit);
            let addr = conn.response.as_ptr() as u64 + conn.sent as u64;
            if !self.send_conn(op::RW, 0, Payload::At(addr, chunk), false) {
                break;
            }
            if let Some(conn) = self.conn.as_mut() {
                conn.sent += chunk;
                conn.tx_cnt = conn.tx_cnt.wrapping_add(chunk as u32);
            }
        }
        if self.conn.as_ref().is_some_and(|c| c.need_credit_update) {
            self.send_conn(op::CREDIT_UPDATE, 0, Payload::None, true);
        }
        if core::mem::take(&mut self.rx_kick) {
            self.rx.kick();
        }
        if core::mem::take(&mut self.tx_kick) {
            self.tx.kick();
        }
    }

    /// Asks the peer for credit, once until it grants some.
    fn request_credit(&mut self) {
        let asked = self.conn.as_ref().is_none_or(|c| c.credit_requested);
        if !asked && self.send_conn(op::CREDIT_REQUEST, 0, Payload::None, true) {
            if let Some(conn) = self.conn.as_mut() {
                conn.credit_requested = true;
            }
        }
    }
}

/// What the test hooks (`testing`, feature `test-hooks`) do to the rings: break them on
/// purpose, for the VMM's hardening tests. The driver itself never calls these.
#[cfg(feature = "test-hooks")]
impl Vsock {
    /// Makes every RX buffer device-readable only, then sends a CREDIT_REQUEST, which the
    /// device answers on RX. Notifies TX. False if there is no connection or no free slot.
    pub(crate) fn make_rx_device_readable(&mut self) -> bool {
        for id in 0..self.rx.size() {
            let (addr, len) = rx_buffer(id);
            self.rx.set_desc(id, Desc { addr, len: len as u32, flags: 0, next: 0 });
        }
        let sent = self.send_conn(op::CREDIT_REQUEST, 0, Payload::None, true);
        self.tx.notify();
        sent
    }

    /// Publishes a TX available index `ahead` entries past the real one, and notifies.
    pub(crate) fn publish_tx_ahead(&mut self, ahead: u16) {
        let idx = self.tx.avail_idx().wrapping_add(ahead);
        self.tx.publish(idx);
        self.tx.notify();
    }

    /// Submits an RW header of the connection that claims `len` payload bytes and has no data
    /// descriptor, after `edit` changed its descriptor (given with its own index), and
    /// notifies. False if there is no connection or no free slot.
    pub(crate) fn submit_raw_rw(&mut self, len: u32, edit: impl FnOnce(&mut Desc, u16)) -> bool {
        let Some(hdr) = self.conn_header(op::RW, 0, len) else { return false };
        if self.tx_free == 0 {
            return false;
        }
        let slot = self.tx_free.trailing_zeros() as usize;
        self.tx_free &= !(1 << slot);
        let addr = header_addr(slot);
        // SAFETY: as in `send`.
        unsafe { (addr as *mut [u8; Header::SIZE]).write_volatile(hdr.encode()) };
        let head = 2 * slot as u16;
        let mut desc = Desc { addr, len: Header::SIZE as u32, flags: 0, next: 0 };
        edit(&mut desc, head);
        self.tx.set_desc(head, desc);
        self.tx.push(head);
        self.tx.notify();
        true
    }

    /// Notifies the TX queue now, whatever the device asked.
    pub(crate) fn notify_tx(&self) {
        self.tx.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            src_cid: 2,
            dst_cid: 3,
            src_port: 1234,
            dst_port: 5000,
            len: 7,
            kind: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 99,
        };
        let b = h.encode();
        assert_eq!(&b[16..20], &1234u32.to_le_bytes());
        assert_eq!(Header::parse(&b), Some(h));
        assert_eq!(Header::parse(&b[..43]), None);
        let r = h.reset_reply();
        assert_eq!((r.src_port, r.dst_port, r.op, r.len), (5000, 1234, op::RST, 0));
    }

    #[test]
    fn credit_wraps() {
        let mut c = Conn::new(&Header { buf_alloc: 100, ..Header::default() });
        c.tx_cnt = 5u32.wrapping_sub(10);
        c.peer_fwd_cnt = u32::MAX - 39;
        // 35 bytes in flight across the wrap.
        assert_eq!(c.credit(), 65);
        c.peer_fwd_cnt = c.tx_cnt.wrapping_add(1);
        assert_eq!(c.credit(), 0, "a peer claiming more than was sent grants nothing extra");
    }

    #[test]
    fn a_request_ends_at_its_frame_length_whatever_the_packets() {
        let mut c = Conn::new(&Header::default());
        let mut framed = RequestHeader { len: 5 }.encode().to_vec();
        framed.extend_from_slice(b"hello");
        // Split across packets everywhere, the header included.
        for piece in [&framed[..1], &framed[1..6], &framed[6..]] {
            assert_eq!(c.phase, Phase::Receiving);
            assert_eq!(c.take_request_bytes(piece, 5), Ok(()));
        }
        assert_eq!((c.phase, &c.request[..]), (Phase::Complete, &b"hello"[..]));
        assert_eq!(c.request.capacity(), 5, "allocated once, at the framed length");

        let mut empty = Conn::new(&Header::default());
        assert_eq!(empty.take_request_bytes(&RequestHeader { len: 0 }.encode(), 0), Ok(()));
        assert_eq!(empty.phase, Phase::Complete, "an empty request is whole at its header");
    }

    #[test]
    fn a_request_too_large_or_past_its_frame_is_refused() {
        let mut c = Conn::new(&Header::default());
        assert_eq!(c.take_request_bytes(&RequestHeader { len: 6 }.encode(), 5), Err(RequestRefused::TooLarge));
        assert_eq!(c.request.capacity(), 0, "nothing allocated for a refused length");

        let mut c = Conn::new(&Header::default());
        let mut framed = RequestHeader { len: 2 }.encode().to_vec();
        framed.extend_from_slice(b"abc");
        assert_eq!(c.take_request_bytes(&framed, 10), Err(RequestRefused::PastTheFrame));
    }

    #[test]
    fn rx_buffers_do_not_overlap() {
        let mut spans: Vec<(u64, u64)> = (0..RX_SIZE)
            .map(|i| {
                let (a, l) = rx_buffer(i);
                (a, a + l as u64)
            })
            .collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
        assert!(spans.last().unwrap().1 <= RX_BUFFERS.addr() + (RX_PAGES * 4096) as u64);
    }
}
