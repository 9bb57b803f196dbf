//! Entry points for the fuzz targets (`fuzz/`): a guest driving the virtio-mmio transport and
//! the vsock device with bytes it chose. Only with the `fuzzing` feature; not part of what the
//! VMM uses. Every entry point must return without panicking whatever the bytes.

use vm_memory::{Bytes, GuestAddress};

use crate::virtio::mmio::{regs, MmioTransport, WINDOW_SIZE};
use crate::virtio::test_utils::{drive_to_driver_ok, DriverQueue};
use crate::virtio::vsock::{Vsock, VsockConfig};
use crate::GuestMemoryMmap;

/// Guest memory of the fuzzed machine: queues in the first pages, buffers after them.
const MEM_SIZE: usize = 1 << 20;
/// Where the queues lie (rx, tx, event), and their size.
const QUEUES: [u64; 3] = [0x0000, 0x2000, 0x4000];
const QUEUE_SIZE: u16 = 16;
/// The guest port the host connects to.
const GUEST_PORT: u32 = 1234;

fn memory() -> Option<GuestMemoryMmap> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()
}

/// Reads little-endian values off the front of the fuzz input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([self.byte()?, self.byte()?, self.byte()?, self.byte()?]))
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        taken
    }
}

/// The vsock device behind a working transport, its three queues set up by a well-behaved
/// driver; then the input, as a guest would, overwrites guest memory (descriptors, rings,
/// packets), publishes chains, notifies and lets the device run, while the host side connects,
/// sends, receives and shuts down.
pub fn vsock_queues(data: &[u8]) {
    let Some(mem) = memory() else { return };
    let mut transport = MmioTransport::new(Vsock::new(VsockConfig::default()));
    let mut queues: Vec<DriverQueue<'_>> =
        QUEUES.iter().map(|&base| DriverQueue::new(&mem, base, QUEUE_SIZE)).collect();
    {
        let refs: Vec<&DriverQueue<'_>> = queues.iter().collect();
        drive_to_driver_ok(&mut transport, &mem, &refs);
    }
    transport.device_mut().host_mut().listen(GUEST_PORT + 1);
    let mut conns = Vec::new();
    let mut input = Input(data);
    while let Some(op) = input.byte() {
        match op % 8 {
            // Guest memory written at an offset: descriptors, rings, packet headers, data.
            0 => {
                let (Some(at), Some(len)) = (input.u32(), input.byte()) else { break };
                let bytes = input.bytes(usize::from(len)).to_vec();
                let _ = mem.write_slice(&bytes, GuestAddress(u64::from(at) % MEM_SIZE as u64));
            }
            // A chain of one to three descriptors into a queue's available ring.
            1 => {
                let Some(q) = input.byte() else { break };
                let queue = &mut queues[usize::from(q) % QUEUES.len()];
                let n = usize::from(q >> 4) % 3 + 1;
                let mut descs = Vec::with_capacity(n);
                for _ in 0..n {
                    let (Some(addr), Some(len), Some(flags)) = (input.u32(), input.u16(), input.byte()) else { break };
                    descs.push((u64::from(addr) % MEM_SIZE as u64, u32::from(len), flags & 1 != 0));
                }
                if !descs.is_empty() {
                    queue.add_chain(&descs);
                }
            }
            // A broken available index.
            2 => {
                let (Some(q), Some(idx)) = (input.byte(), input.u16()) else { break };
                queues[usize::from(q) % QUEUES.len()].set_avail_idx(idx);
            }
            // A register write (a notify, mostly).
            3 => {
                let (Some(offset), Some(value)) = (input.u16(), input.u32()) else { break };
                transport.write(&mem, u64::from(offset) % WINDOW_SIZE, &value.to_le_bytes());
            }
            // Host side: connect, send, shut down, receive.
            4 => {
                if let Ok(id) = transport.device_mut().host_mut().connect(GUEST_PORT, 1 << 16) {
                    conns.push(id);
                }
            }
            5 => {
                let (Some(c), Some(len)) = (input.byte(), input.byte()) else { break };
                let bytes = input.bytes(usize::from(len)).to_vec();
                if let Some(&id) = conns.get(usize::from(c) % conns.len().max(1)) {
                    let _ = transport.device_mut().host_mut().send(id, &bytes);
                }
            }
            6 => {
                let Some(c) = input.byte() else { break };
                if let Some(&id) = conns.get(usize::from(c) % conns.len().max(1)) {
                    let host = transport.device_mut().host_mut();
                    let mut out = Vec::new();
                    let _ = host.recv(id, &mut out);
                    if c & 1 == 0 {
                        let _ = host.shutdown_send(id);
                    }
                }
                let _ = transport.device_mut().host_mut().accept();
            }
            // The device runs, as at a WAIT exit.
            _ => {
                transport.poll(&mem);
                let _ = transport.take_errors();
            }
        }
    }
    transport.poll(&mem);
    for queue in &mut queues {
        let _ = queue.take_used();
    }
}

/// The transport's registers read and written in any order, widths and offsets included,
/// over memory whose contents the input also sets.
pub fn mmio_registers(data: &[u8]) {
    let Some(mem) = memory() else { return };
    let mut input = Input(data);
    let fill = input.bytes(4096).to_vec();
    let _ = mem.write_slice(&fill, GuestAddress(0));
    let mut transport = MmioTransport::new(Vsock::new(VsockConfig::default()));
    while let Some(op) = input.byte() {
        let Some(offset) = input.u16() else { break };
        let offset = u64::from(offset) % (WINDOW_SIZE + 16);
        let width = [1, 2, 4, 8][usize::from(op >> 1) % 4];
        match op & 1 {
            0 => {
                let mut out = vec![0u8; width];
                transport.read(offset, &mut out);
            }
            _ => {
                let value = input.bytes(width).to_vec();
                transport.write(&mem, offset, &value);
            }
        }
        if op & 0x80 != 0 {
            transport.poll(&mem);
        }
    }
    let _ = transport.take_errors();
    let mut status = [0u8; 4];
    transport.read(regs::STATUS, &mut status);
}
