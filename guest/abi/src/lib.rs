//! The contract between the mu2 VMM and the guests it runs.
//!
//! Both sides depend on this crate: the VMM (a normal host program) and the bare-metal guest
//! runtime (`#![no_std]`). It holds only plain constants and `#[repr(C)]` structures: the
//! guest-physical memory layout, the registers of the mu2 system device, the command-line
//! keys, and the structures the guest hands to the VMM. Changing anything here changes the
//! guest ABI: bump [`ABI_VERSION`].
#![no_std]

/// Version of this contract. The guest reports it when it signals readiness; the VMM refuses
/// a guest that speaks another version.
///
/// 2: requests and responses are framed ([`frame`]: a length before the request, an outcome
/// and a length before the response) instead of ending at a SHUTDOWN; [`ReadyInfo`] announces
/// the largest request the guest can hold (`max_request`).
pub const ABI_VERSION: u32 = 2;

/// The vsock CID of the host, as the virtio-vsock specification reserves it.
pub const HOST_CID: u64 = 2;
/// The vsock CID every mu2 guest gets. Each VM has its own device, so all can share it.
pub const GUEST_CID: u64 = 3;
/// The vsock port the guest runtime listens on unless the command line says otherwise.
pub const DEFAULT_PORT: u32 = 5000;

/// Values of the virtio-vsock packet header (virtio 1.2 §5.10.6) that the VMM's device and the
/// guest's driver both use. They are the specification's, not mu2's: adding them here did not
/// change [`ABI_VERSION`].
pub mod vsock {
    /// `type`: a stream socket, the only type mu2 speaks.
    pub const TYPE_STREAM: u16 = 1;

    /// Values of `op`.
    pub mod op {
        /// Connection request.
        pub const REQUEST: u16 = 1;
        /// Connection accepted.
        pub const RESPONSE: u16 = 2;
        /// Connection reset or refused.
        pub const RST: u16 = 3;
        /// Half or full shutdown; the flags say which ([`super::shutdown`]).
        pub const SHUTDOWN: u16 = 4;
        /// Data.
        pub const RW: u16 = 5;
        /// Unsolicited credit information.
        pub const CREDIT_UPDATE: u16 = 6;
        /// Asks the peer for a CREDIT_UPDATE.
        pub const CREDIT_REQUEST: u16 = 7;
    }

    /// Bits of `flags` in a SHUTDOWN.
    pub mod shutdown {
        /// The sender will receive no more.
        pub const RCV: u32 = 1;
        /// The sender will send no more.
        pub const SEND: u32 = 2;
    }
}

/// Guest-physical memory map shared by both architectures' VMM code and the guest.
pub mod layout {
    /// Where the VMM places the boot-parameter block (x86_64: Linux `boot_params`).
    pub const BOOT_PARAMS: u64 = 0xc000;
    /// Where the VMM places the kernel command line.
    pub const CMDLINE: u64 = 0xd000;
    /// Maximum command-line length, terminating NUL included.
    pub const CMDLINE_MAX: usize = 0x1000;
    /// A page the VMM writes before a forked VM resumes (see [`crate::HostInfo`]).
    pub const HOST_INFO: u64 = 0xe000;
    /// Lowest address of the initial stack the VMM gives a CPL-3 guest.
    pub const STACK_BOTTOM: u64 = 0x10_0000;
    /// Initial stack pointer of a CPL-3 guest (the stack grows down from here).
    pub const STACK_TOP: u64 = 0x20_0000;
    /// Where guest images are linked and loaded.
    pub const IMAGE_BASE: u64 = 0x20_0000;
    /// Start of the MMIO window; guest RAM must end at or below it.
    pub const MMIO_BASE: u64 = 0xd000_0000;
    /// Size of the MMIO window.
    pub const MMIO_SIZE: u64 = 0x1000_0000;
    /// The mu2 system device (see [`crate::sysdev`]).
    pub const SYSDEV: u64 = MMIO_BASE;
    /// Size of each MMIO device's register window.
    pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
    /// First virtio-mmio device; device `i` is at `VIRTIO_MMIO_BASE + i * MMIO_DEVICE_SIZE`.
    pub const VIRTIO_MMIO_BASE: u64 = MMIO_BASE + MMIO_DEVICE_SIZE;
    /// aarch64 only: the serial console, an 8250 with byte-wide registers at stride 1 (x86_64
    /// uses I/O ports 0x3f8..0x400 instead).
    pub const SERIAL_MMIO: u64 = MMIO_BASE + 0x10_0000;
    /// Largest guest RAM: RAM is one block from 0 up to the MMIO window.
    pub const MAX_MEM: u64 = MMIO_BASE;
    /// Smallest guest RAM the VMM accepts.
    pub const MIN_MEM: u64 = 8 << 20;
}

/// Registers of the mu2 system device, a 4 KiB MMIO window at [`layout::SYSDEV`].
///
/// It is the guest's only way to talk to the VMM outside virtio: readiness, exit, panic and
/// fault reports, and the wait that replaces interrupts for a guest running at CPL 3.
pub mod sysdev {
    /// Read (32-bit): [`MAGIC_VALUE`].
    pub const MAGIC: u64 = 0x00;
    /// Read (32-bit): the ABI version the VMM speaks.
    pub const VERSION: u64 = 0x04;
    /// Read (32-bit): parks the vCPU until a virtio device has work for the guest, then
    /// returns a [`crate::wait`] bit set. The device polls its queues at this exit, so a
    /// guest that posted buffers need not notify before waiting.
    pub const WAIT: u64 = 0x08;
    /// Write (64-bit): guest-physical address of a [`crate::ReadyInfo`]; the guest is
    /// listening and idle from its next WAIT on.
    pub const READY: u64 = 0x10;
    /// Write (32-bit): the guest stops with this exit code.
    pub const EXIT: u64 = 0x18;
    /// Write (64-bit): guest-physical address of a [`crate::Text`] holding a panic message;
    /// the guest stops.
    pub const PANIC: u64 = 0x20;
    /// Write (32-bit): exception vector, written by a ring-0 exception stub; the VMM reads
    /// the exception frame at the vCPU's stack pointer. The guest stops.
    pub const FAULT: u64 = 0x28;
    /// Write (64-bit): guest-physical address of a [`crate::Text`]: a console line written
    /// with one exit instead of one per byte.
    pub const LOG: u64 = 0x30;
    /// `"mu2s"` little-endian.
    pub const MAGIC_VALUE: u32 = 0x7332_756d;
}

/// The virtio-mmio transport's register map (virtio 1.2 §4.2.2), which the VMM's device and
/// the guest's driver must agree on.
pub mod virtio_mmio {
    /// "virt" little-endian.
    pub const MAGIC_VALUE: u32 = 0x7472_6976;
    /// The MMIO transport version (virtio 1.x; 1 is the legacy interface).
    pub const VERSION: u32 = 2;

    /// Register offsets (virtio 1.2 §4.2.2).
    pub mod regs {
        /// Magic value "virt" (R).
        pub const MAGIC_VALUE: u64 = 0x000;
        /// Transport version, 2 (R).
        pub const VERSION: u64 = 0x004;
        /// Device type (R).
        pub const DEVICE_ID: u64 = 0x008;
        /// Vendor ID (R).
        pub const VENDOR_ID: u64 = 0x00c;
        /// 32 feature bits selected by DEVICE_FEATURES_SEL (R).
        pub const DEVICE_FEATURES: u64 = 0x010;
        /// Selects the word DEVICE_FEATURES shows (W).
        pub const DEVICE_FEATURES_SEL: u64 = 0x014;
        /// 32 accepted feature bits selected by DRIVER_FEATURES_SEL (W).
        pub const DRIVER_FEATURES: u64 = 0x020;
        /// Selects the word DRIVER_FEATURES writes (W).
        pub const DRIVER_FEATURES_SEL: u64 = 0x024;
        /// Selects the queue the QUEUE_* registers refer to (W).
        pub const QUEUE_SEL: u64 = 0x030;
        /// Maximum size of the selected queue, 0 if it does not exist (R).
        pub const QUEUE_NUM_MAX: u64 = 0x034;
        /// Size of the selected queue (W).
        pub const QUEUE_NUM: u64 = 0x038;
        /// Ready bit of the selected queue (RW).
        pub const QUEUE_READY: u64 = 0x044;
        /// Queue notification (W).
        pub const QUEUE_NOTIFY: u64 = 0x050;
        /// Interrupt status: bit 0 used buffers, bit 1 configuration change (R).
        pub const INTERRUPT_STATUS: u64 = 0x060;
        /// Acknowledges interrupt status bits (W).
        pub const INTERRUPT_ACK: u64 = 0x064;
        /// Device status (RW).
        pub const STATUS: u64 = 0x070;
        /// Descriptor table address, low half (W).
        pub const QUEUE_DESC_LOW: u64 = 0x080;
        /// Descriptor table address, high half (W).
        pub const QUEUE_DESC_HIGH: u64 = 0x084;
        /// Available (driver) ring address, low half (W).
        pub const QUEUE_DRIVER_LOW: u64 = 0x090;
        /// Available (driver) ring address, high half (W).
        pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
        /// Used (device) ring address, low half (W).
        pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
        /// Used (device) ring address, high half (W).
        pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
        /// Configuration generation (R).
        pub const CONFIG_GENERATION: u64 = 0x0fc;
        /// Start of the device configuration space.
        pub const CONFIG: u64 = 0x100;
    }

    /// Device status bits (virtio 1.2 §2.1).
    pub mod status {
        /// The driver found the device.
        pub const ACKNOWLEDGE: u32 = 1;
        /// The driver knows how to drive it.
        pub const DRIVER: u32 = 2;
        /// The driver is ready.
        pub const DRIVER_OK: u32 = 4;
        /// Feature negotiation is complete.
        pub const FEATURES_OK: u32 = 8;
        /// The device hit an error it cannot recover from without a reset.
        pub const DEVICE_NEEDS_RESET: u32 = 64;
        /// The driver gave up on the device.
        pub const FAILED: u32 = 128;
    }
}

/// Bits of the value a WAIT read returns.
pub mod wait {
    /// Virtio device `i` (bit `i`, i < 16) has added buffers to a used ring.
    pub const DEVICE_MASK: u32 = 0xffff;
    /// The VM was just restored from a frozen image: [`crate::HostInfo`] holds fresh entropy
    /// and the wall-clock time, and the guest must reseed before serving.
    pub const RESTORED: u32 = 1 << 31;
}

/// Command-line keys the VMM writes and the guest runtime reads.
pub mod cmdline {
    /// `virtio_mmio.device=<size>@<addr>:<irq>`: one per virtio-mmio device (Linux form).
    pub const VIRTIO_MMIO_DEVICE: &str = "virtio_mmio.device";
    /// `mu2.sysdev=<addr>`: where the system device is; absent under other VMMs.
    pub const SYSDEV: &str = "mu2.sysdev";
    /// `mu2.tsc_khz=<n>`: the TSC frequency, for guest timekeeping.
    pub const TSC_KHZ: &str = "mu2.tsc_khz";
    /// `mu2.port=<n>`: the vsock port to listen on.
    pub const PORT: &str = "mu2.port";
    /// `quiet`: no banner on the console.
    pub const QUIET: &str = "quiet";
}

/// What the guest reports when it is ready (written to [`sysdev::READY`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadyInfo {
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// The vsock port the guest listens on.
    pub port: u32,
    /// The receive buffer the guest grants each new connection (vsock `buf_alloc`). The host
    /// may send this many bytes on a new connection before the guest's first reply.
    pub buf_alloc: u32,
    /// Capabilities of the guest, bits of [`ready_flags`]; 0 for guests that predate them.
    pub flags: u32,
    /// The largest request (the length in its [`frame`] header) the guest can hold; the VMM
    /// refuses a larger one before the guest sees it. At most the guest's RAM size.
    pub max_request: u32,
}

impl ReadyInfo {
    /// Size of the encoded structure.
    pub const SIZE: usize = 20;

    /// Decodes the structure as it lies in guest memory (little-endian).
    pub fn from_le_bytes(b: [u8; Self::SIZE]) -> Self {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        ReadyInfo { abi_version: word(0), port: word(4), buf_alloc: word(8), flags: word(12), max_request: word(16) }
    }
}

/// How a request and its response travel on their vsock connection (one request per
/// connection): each is preceded by a small little-endian header, so that neither side needs
/// the other to shut the stream down to know where a message ends.
///
/// - Host to guest: a [`RequestHeader`] (the request's length, 4 bytes), then the request.
/// - Guest to host: a [`ResponseHeader`] (an [`outcome`] and a length, 8 bytes), then that
///   many bytes: the function's response, or, for [`outcome::FUNCTION_ERROR`], its error
///   message (UTF-8).
///
/// Both sides treat the other's header as hostile: a length beyond what they accept, or an
/// unknown outcome, ends the connection.
pub mod frame {
    /// Values of [`ResponseHeader::outcome`].
    pub mod outcome {
        /// The function returned a response.
        pub const OK: u32 = 0;
        /// The function returned an error; the bytes are its message.
        pub const FUNCTION_ERROR: u32 = 1;
    }

    /// What precedes a request.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct RequestHeader {
        /// The request's length in bytes.
        pub len: u32,
    }

    impl RequestHeader {
        /// Size on the wire.
        pub const SIZE: usize = 4;

        /// Encodes the header.
        pub fn encode(&self) -> [u8; Self::SIZE] {
            self.len.to_le_bytes()
        }

        /// Decodes the header.
        pub fn decode(b: [u8; Self::SIZE]) -> Self {
            RequestHeader { len: u32::from_le_bytes(b) }
        }
    }

    /// What precedes a response.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct ResponseHeader {
        /// [`outcome::OK`] or [`outcome::FUNCTION_ERROR`].
        pub outcome: u32,
        /// The length in bytes of what follows.
        pub len: u32,
    }

    impl ResponseHeader {
        /// Size on the wire.
        pub const SIZE: usize = 8;

        /// Encodes the header.
        pub fn encode(&self) -> [u8; Self::SIZE] {
            let mut b = [0u8; Self::SIZE];
            b[..4].copy_from_slice(&self.outcome.to_le_bytes());
            b[4..].copy_from_slice(&self.len.to_le_bytes());
            b
        }

        /// Decodes the header; `None` for an unknown outcome.
        pub fn decode(b: [u8; Self::SIZE]) -> Option<Self> {
            let outcome = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            matches!(outcome, outcome::OK | outcome::FUNCTION_ERROR).then_some(ResponseHeader { outcome, len })
        }
    }
}

/// Bits of [`ReadyInfo::flags`]. Unknown bits are ignored by the VMM, so adding one does not
/// change [`ABI_VERSION`].
pub mod ready_flags {
    /// The guest speaks the HTTP framing on its port: a request is an HTTP/1.1 request
    /// message and its answer an HTTP/1.1 response message (see docs/guest-abi.md).
    pub const HTTP: u32 = 1 << 0;
}

/// A byte string in guest memory, for [`sysdev::PANIC`] and [`sysdev::LOG`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Text {
    /// Guest-physical address of the bytes.
    pub addr: u64,
    /// Length in bytes; the VMM reads at most [`TEXT_MAX`].
    pub len: u64,
}

impl Text {
    /// Size of the encoded structure.
    pub const SIZE: usize = 16;

    /// Decodes the structure as it lies in guest memory (little-endian).
    pub fn from_le_bytes(b: [u8; Self::SIZE]) -> Self {
        let mut addr = [0u8; 8];
        let mut len = [0u8; 8];
        addr.copy_from_slice(&b[..8]);
        len.copy_from_slice(&b[8..]);
        Text { addr: u64::from_le_bytes(addr), len: u64::from_le_bytes(len) }
    }
}

/// Longest [`Text`] the VMM reads.
pub const TEXT_MAX: u64 = 4096;

/// Written by the VMM at [`layout::HOST_INFO`] before a restored VM resumes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostInfo {
    /// Fresh host entropy, unique to this VM.
    pub entropy: [u8; 32],
    /// Wall-clock time when the VM was handed out, nanoseconds since the Unix epoch.
    pub unix_time_ns: u64,
    /// The guest's TSC value at that same moment, or 0 when the host does not know it: the
    /// guest then takes its own TSC reading, on seeing `RESTORED`, as the matching moment
    /// (microseconds later; a vCPU's TSC would cost the host an ioctl per fork to read).
    pub tsc: u64,
    /// Increments on every restore; zero in a cold-booted VM.
    pub generation: u64,
}

impl HostInfo {
    /// Size of the encoded structure.
    pub const SIZE: usize = 56;

    /// Encodes the structure as the guest reads it (little-endian).
    pub fn to_le_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..32].copy_from_slice(&self.entropy);
        b[32..40].copy_from_slice(&self.unix_time_ns.to_le_bytes());
        b[40..48].copy_from_slice(&self.tsc.to_le_bytes());
        b[48..56].copy_from_slice(&self.generation.to_le_bytes());
        b
    }
}

// The layout's invariants, checked at compile time.
const _: () =
    assert!(layout::VIRTIO_MMIO_BASE + 16 * layout::MMIO_DEVICE_SIZE <= layout::MMIO_BASE + layout::MMIO_SIZE);
const _: () = assert!(layout::IMAGE_BASE >= layout::STACK_TOP);
const _: () = assert!(layout::HOST_INFO + HostInfo::SIZE as u64 <= layout::STACK_BOTTOM);

/// Which exception a fault report names.
pub fn exception_name(vector: u32) -> &'static str {
    match vector {
        0 => "divide error (#DE)",
        1 => "debug (#DB)",
        2 => "NMI",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack fault (#SS)",
        13 => "general protection (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating point (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating point (#XM)",
        20 => "virtualization (#VE)",
        21 => "control protection (#CP)",
        _ => "exception",
    }
}

/// x86_64 exceptions that push an error code.
pub fn exception_has_error_code(vector: u32) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_have_their_documented_sizes() {
        assert_eq!(core::mem::size_of::<ReadyInfo>(), ReadyInfo::SIZE);
        assert_eq!(core::mem::size_of::<HostInfo>(), 56);
        assert_eq!(core::mem::size_of::<Text>(), 16);
    }

    #[test]
    fn encodings_match_the_in_memory_layout() {
        let r = ReadyInfo { abi_version: 2, port: 5000, buf_alloc: 65536, flags: 1, max_request: 7 << 20 };
        let mut b = [0u8; 20];
        b[0..4].copy_from_slice(&2u32.to_le_bytes());
        b[4..8].copy_from_slice(&5000u32.to_le_bytes());
        b[8..12].copy_from_slice(&65536u32.to_le_bytes());
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        b[16..20].copy_from_slice(&(7u32 << 20).to_le_bytes());
        assert_eq!(ReadyInfo::from_le_bytes(b), r);
        let h = HostInfo { entropy: [7; 32], unix_time_ns: 9, tsc: 10, generation: 11 };
        let e = h.to_le_bytes();
        assert_eq!(&e[..32], &[7; 32]);
        assert_eq!(e[32], 9);
        assert_eq!(e[48], 11);
        assert_eq!(core::mem::size_of::<HostInfo>(), HostInfo::SIZE);
    }

    #[test]
    fn frame_headers_round_trip_and_refuse_unknown_outcomes() {
        let request = frame::RequestHeader { len: 0x0102_0304 };
        assert_eq!(request.encode(), [4, 3, 2, 1]);
        assert_eq!(frame::RequestHeader::decode(request.encode()), request);
        let response = frame::ResponseHeader { outcome: frame::outcome::FUNCTION_ERROR, len: 5 };
        assert_eq!(response.encode(), [1, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(frame::ResponseHeader::decode(response.encode()), Some(response));
        assert_eq!(frame::ResponseHeader::decode([2, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn magic_spells_mu2s() {
        assert_eq!(&sysdev::MAGIC_VALUE.to_le_bytes(), b"mu2s");
    }
}
