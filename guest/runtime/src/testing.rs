//! Test-guest support: deliberately malformed virtqueue submissions, for hardening tests of
//! the VMM (the `badchain` guest). Not for functions.

/// One way to break a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformation {
    /// TX header descriptor address beyond guest memory.
    Addr,
    /// TX descriptor marked device-writable.
    Dir,
    /// TX header descriptor of 8 bytes.
    Short,
    /// Header `len` field of 16 MiB with no data.
    Len,
    /// A descriptor whose `next` is itself, with F_NEXT.
    Cycle,
    /// TX avail idx advanced by 1000 past the queue size.
    Avail,
    /// RX buffers made device-readable only.
    RxDir,
}

impl Malformation {
    /// Parses the request text naming one (surrounding whitespace ignored).
    pub fn parse(text: &[u8]) -> Option<Self> {
        Some(match text.trim_ascii() {
            b"addr" => Self::Addr,
            b"dir" => Self::Dir,
            b"short" => Self::Short,
            b"len" => Self::Len,
            b"cycle" => Self::Cycle,
            b"avail" => Self::Avail,
            b"rxdir" => Self::RxDir,
            _ => return None,
        })
    }
}

/// Submits `bad` on the connection being handled (call from inside a function). Notifies
/// the device unconditionally. Returns false if there is no connection or no free slot.
pub fn inject(bad: Malformation) -> bool {
    crate::serve::with_driver(|dev| dev.inject(bad)).unwrap_or(false)
}

/// WAITs forever (or spins without a system device): the VMM is expected to stop the VM.
pub fn wait_forever() -> ! {
    loop {
        if crate::sysdev::wait().is_none() {
            crate::arch::spin_forever();
        }
    }
}

/// Raises an invalid-instruction exception on purpose (x86_64 `ud2`, aarch64 `udf`).
pub fn fault_invalid_opcode() {
    crate::arch::fault_invalid_opcode();
}

/// Raises a privilege fault on purpose (x86_64: `hlt` at CPL 3, #GP; aarch64: `brk`).
pub fn fault_privileged() {
    crate::arch::fault_privileged();
}

/// Raises a divide error on purpose (x86_64: #DE; aarch64, whose division does not trap:
/// `svc`).
pub fn fault_divide() {
    crate::arch::fault_divide();
}

/// Writes to address 0, which is unmapped: a page fault (x86_64) or data abort (aarch64).
pub fn fault_null_write() {
    crate::arch::fault_null_write();
}
