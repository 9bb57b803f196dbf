//! The 8250 UART console: vm-superio's model behind the x86 COM1 ports (or an MMIO window).
//!
//! Output goes to any writer: the VMM's stdout, a log file, or a buffer for tests. The guest
//! gets no interrupts from it (mu2 guests poll), so the interrupt trigger does nothing.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::persist::Persist;

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

/// The saved state of a [`SerialConsole`]: vm-superio's `SerialState`, register by register.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received for the guest and not yet read (at most the 64-byte FIFO).
    pub in_buffer: Vec<u8>,
}

/// Why a saved console state was refused.
#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    /// vm-superio refused the state (a receive buffer larger than its FIFO).
    #[error("invalid UART state")]
    Uart(#[source] vm_superio::serial::Error<std::convert::Infallible>),
}

impl Persist for SerialConsole {
    type State = SerialConsoleState;
    /// Where the restored console writes.
    type Args = ConsoleOutput;
    type Error = SerialRestoreError;

    fn save(&self) -> SerialConsoleState {
        let s = self.uart.state();
        SerialConsoleState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A console in the saved register state, writing to `out`. Nothing is written to `out`.
    fn restore(out: ConsoleOutput, state: &SerialConsoleState) -> Result<Self, SerialRestoreError> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, NoInterrupt, NoEvents, out).map_err(SerialRestoreError::Uart)?;
        Ok(SerialConsole { uart })
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

    /// Register offsets.
    const IER: u64 = 1;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const SCR: u64 = 7;
    const DLAB: u8 = 0x80;

    fn registers(c: &mut SerialConsole) -> Vec<u8> {
        let mut regs: Vec<u8> = (1..8).map(|r| c.read(r)).collect();
        // Divisor latch, behind DLAB.
        let lcr = c.read(LCR);
        c.write(LCR, lcr | DLAB);
        regs.extend([c.read(0), c.read(1)]);
        c.write(LCR, lcr);
        regs
    }

    #[test]
    fn registers_survive_save_and_restore() {
        let mut console = SerialConsole::sink();
        console.write(LCR, DLAB);
        console.write(0, 0x0c); // 9600 baud
        console.write(1, 0x00);
        console.write(LCR, 0x1b); // 8 data bits, even parity, 1 stop bit
        console.write(IER, 0x03);
        console.write(MCR, 0x0b);
        console.write(SCR, 0x5a);
        let state = console.save();
        // Reading IIR acknowledges the THR-empty interrupt: compare what both read after the
        // save.
        let before = registers(&mut console);

        assert_eq!((state.line_control, state.interrupt_enable, state.scratch), (0x1b, 0x03, 0x5a));
        assert_eq!((state.baud_divisor_low, state.baud_divisor_high), (0x0c, 0));
        let bytes = postcard::to_stdvec(&state).unwrap();
        let decoded: SerialConsoleState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, state);

        let buf = SharedBuffer::new();
        let mut restored = SerialConsole::restore(Box::new(buf.clone()), &decoded).unwrap();
        assert_eq!(restored.save(), state);
        assert_eq!(registers(&mut restored), before);
        // Output goes to the new writer, and only what the guest writes after restore.
        assert!(buf.contents().is_empty());
        restored.write(0, b'!');
        assert_eq!(buf.contents(), b"!");
    }

    #[test]
    fn oversized_receive_buffer_is_refused() {
        let mut state = SerialConsole::sink().save();
        state.in_buffer = vec![b'x'; 64];
        assert!(SerialConsole::restore(Box::new(std::io::sink()), &state).is_ok());
        state.in_buffer.push(b'x');
        let err = SerialConsole::restore(Box::new(std::io::sink()), &state).unwrap_err();
        assert!(matches!(err, SerialRestoreError::Uart(vm_superio::serial::Error::FullFifo)));
    }

    /// Part of the snapshot image format: see `state_encoding_is_stable` in the vsock tests.
    #[test]
    fn state_encoding_is_stable() {
        let state = SerialConsoleState { line_control: 3, scratch: 0x5a, in_buffer: vec![b'a'], ..Default::default() };
        assert_eq!(postcard::to_stdvec(&state).unwrap(), [0, 0, 0, 0, 3, 0, 0, 0, 0x5a, 1, b'a']);
    }
}
