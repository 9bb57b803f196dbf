//! Hooks for the VMM's test guests (`guest/test-guests`), compiled only with the
//! `test-hooks` feature, which the example functions are built without: deliberately
//! malformed virtqueue submissions (the `badchain` guest), a forced TX notification (`hang`),
//! waiting forever.

use crate::serve::with_driver;
use crate::virtio::queue::{F_NEXT, F_WRITE};

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
    with_driver(|dev| match bad {
        Malformation::Addr => dev.submit_raw_rw(0, |desc, _| desc.addr = 1 << 40),
        Malformation::Dir => dev.submit_raw_rw(0, |desc, _| desc.flags = F_WRITE),
        Malformation::Short => dev.submit_raw_rw(0, |desc, _| desc.len = 8),
        Malformation::Len => dev.submit_raw_rw(16 << 20, |_, _| {}),
        Malformation::Cycle => dev.submit_raw_rw(0, |desc, head| {
            desc.flags = F_NEXT;
            desc.next = head;
        }),
        Malformation::Avail => {
            dev.publish_tx_ahead(1000);
            true
        }
        Malformation::RxDir => dev.make_rx_device_readable(),
    })
    .unwrap_or(false)
}

/// Notifies the TX queue now (one exit), whatever the device asked: lets a function that
/// will not return (the `hang` test guest) still get the connection's RESPONSE delivered.
pub fn notify_host() {
    with_driver(|dev| dev.notify_tx());
}

/// WAITs forever (or spins without a system device): the VMM is expected to stop the VM.
pub fn wait_forever() -> ! {
    loop {
        if crate::sysdev::wait().is_none() {
            crate::arch::spin_forever();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformations_parse_by_name() {
        assert_eq!(Malformation::parse(b" cycle\n"), Some(Malformation::Cycle));
        assert_eq!(Malformation::parse(b"rxdir"), Some(Malformation::RxDir));
        assert_eq!(Malformation::parse(b"Cycle"), None);
        assert_eq!(Malformation::parse(b""), None);
    }
}
