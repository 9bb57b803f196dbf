//! The virtio side of the vsock device: queues, descriptor chains, and moving packets between
//! the rings and the host endpoint.
//!
//! The device polls (see [`crate::virtio`]): [`VirtioDevice::process`] hands every TX packet
//! to the endpoint, then fills RX buffers with what the endpoint has for the guest. A bad
//! chain is returned with length 0 and recorded with the endpoint's errors; a queue broken
//! beyond recovery stops the device until the driver resets it.

use mu2_abi::vsock::TYPE_STREAM;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, VolatileSlice};

use super::chain::{self, ChainError, Direction};
use super::endpoint::HostEndpoint;
use super::{Header, VsockConfig, VsockError, EVENT_QUEUE, HOST_CID, QUEUE_MAX_SIZE};
use crate::virtio::{driver_wants_interrupt, VirtioDevice, VirtioError};
use crate::GuestMemoryMmap;

/// The features the device offers: VIRTIO_F_VERSION_1 only.
pub(super) const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

/// The device's queues while it is active.
#[derive(Debug)]
pub(super) struct Queues {
    pub rx: Queue,
    pub tx: Queue,
    /// Kept so that its configuration is saved with the device; never used.
    pub event: Queue,
}

/// The virtio-vsock device. The host side of its connections is its [`HostEndpoint`]
/// ([`Vsock::host`], [`Vsock::host_mut`]).
#[derive(Debug)]
pub struct Vsock {
    config: VsockConfig,
    acked_features: u64,
    queues: Option<Queues>,
    /// A queue broke: nothing is processed until the driver resets the device.
    failed: bool,
    /// The driver wants an interrupt for the last `process`.
    interrupt: bool,
    /// Reused buffer for packet data in both directions; never larger than max_packet_data.
    scratch: Vec<u8>,
    host: HostEndpoint,
}

impl Vsock {
    /// A device with no connections, not yet activated by a driver.
    pub fn new(config: VsockConfig) -> Self {
        Self::from_parts(config, 0, None, false, HostEndpoint::new(config))
    }

    /// A device from its parts (a new or a restored one).
    pub(super) fn from_parts(
        config: VsockConfig,
        acked_features: u64,
        queues: Option<Queues>,
        failed: bool,
        host: HostEndpoint,
    ) -> Self {
        Vsock { config, acked_features, queues, failed, interrupt: false, scratch: Vec::new(), host }
    }

    /// The configuration the device was created with.
    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// The host side of the connections.
    pub fn host(&self) -> &HostEndpoint {
        &self.host
    }

    /// The host side of the connections: connect, send, receive, listen, accept, …
    pub fn host_mut(&mut self) -> &mut HostEndpoint {
        &mut self.host
    }

    /// Whether a queue broke and the device waits for a reset.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// The features the driver accepted.
    pub(super) fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The queues, while the device is active.
    pub(super) fn queues(&self) -> Option<&Queues> {
        self.queues.as_ref()
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
                self.host.record(VsockError::BadChain { queue: "tx", head, source });
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
        self.host.on_guest_packet(&hdr, pkt.data_slice(), &mut self.scratch);
        Ok(())
    }

    /// Fills RX buffers while there is something to send. Returns whether chains were used.
    fn fill_rx(&mut self, mem: &GuestMemoryMmap, rx: &mut Queue) -> bool {
        let mut used = false;
        for _ in 0..rx.size() {
            if !self.host.has_rx_packet() {
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
                    self.host.record(VsockError::BadChain { queue: "rx", head, source });
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
        let Some(out) = self.host.next_rx_packet(capacity, &mut self.scratch) else {
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
        self.host.count_delivered(data_len);
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
        self.host.record(e);
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

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE; 3]
    }

    fn features(&self) -> u64 {
        FEATURES
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
        self.queues = Some(Queues { rx, tx, event });
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
        self.host.reset();
    }

    fn interrupt_wanted(&mut self) -> bool {
        self.interrupt
    }

    fn needs_reset(&self) -> bool {
        self.failed
    }
}
