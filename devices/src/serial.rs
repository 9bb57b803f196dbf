//! The 8250 UART console: vm-superio's model behind the x86 COM1 ports (or an MMIO window).
//!
//! Output goes to any writer: the VMM's stdout, a log file, or a buffer for tests. The guest
//! gets no interrupts from it (mu2 guests poll), so the interrupt trigger does nothing.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

/// Where a console's bytes go.
pub type ConsoleOutput = Box<dyn Write + Send>;

/// The serial console device.
pub struct SerialConsole {
    uart: Serial<NoInterrupt, NoEvents, ConsoleOutput>,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").finish_non_exhaustive()
    }
}

/// The UART's interrupt line, unconnected.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Number of registers (bytes of address space) the UART occupies.
pub const SERIAL_REGISTERS: u64 = 8;

impl SerialConsole {
    /// A console writing to `out`.
    pub fn new(out: ConsoleOutput) -> Self {
        SerialConsole { uart: Serial::new(NoInterrupt, out) }
    }

    /// A console whose output is discarded.
    pub fn sink() -> Self {
        Self::new(Box::new(std::io::sink()))
    }

    /// A guest read of register `offset` (0..8).
    pub fn read(&mut self, offset: u64) -> u8 {
        match u8::try_from(offset) {
            Ok(offset) if u64::from(offset) < SERIAL_REGISTERS => self.uart.read(offset),
            _ => 0xff,
        }
    }

    /// A guest write of register `offset` (0..8). A failing output (a closed pipe) loses the
    /// byte, not the VM.
    pub fn write(&mut self, offset: u64, value: u8) {
        if let Ok(offset) = u8::try_from(offset) {
            if u64::from(offset) < SERIAL_REGISTERS {
                if let Err(e) = self.uart.write(offset, value) {
                    log::debug!("console output failed: {e}");
                }
            }
        }
    }

    /// Writes bytes to the console output directly (the system device's LOG register).
    pub fn write_text(&mut self, text: &[u8]) {
        let out = self.uart.writer_mut();
        if let Err(e) = out.write_all(text).and_then(|()| out.flush()) {
            log::debug!("console output failed: {e}");
        }
    }
}

/// A cloneable in-memory console output, for capturing what a guest printed.
#[derive(Debug, Clone, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        match self.0.lock() {
            Ok(buf) => buf.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut buf) => buf.extend_from_slice(data),
            Err(poisoned) => poisoned.into_inner().extend_from_slice(data),
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let buf = SharedBuffer::new();
        let mut console = SerialConsole::new(Box::new(buf.clone()));
        for b in b"hi\n" {
            console.write(0, *b);
        }
        assert_eq!(buf.contents(), b"hi\n");
        // Line status register: transmitter empty, so a polling driver never waits.
        assert_ne!(console.read(5) & 0x20, 0);
        // Out-of-range registers read as floating bus and ignore writes.
        assert_eq!(console.read(8), 0xff);
        console.write(9, b'x');
        assert_eq!(buf.contents(), b"hi\n");
    }
}
