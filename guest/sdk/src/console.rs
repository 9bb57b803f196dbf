//! The serial console: an 8250 UART (x86_64: port 0x3f8; aarch64: MMIO at
//! `layout::SERIAL_MMIO`), written one VM exit (~45 µs at CPL 3) per byte. For boot messages and errors only: the serve path never prints.

use core::fmt;

/// Writes raw bytes to the console.
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        crate::arch::console_byte(b);
    }
}

/// `core::fmt` sink for [`print!`](crate::print).
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    // Console output cannot fail.
    let _ = fmt::Write::write_fmt(&mut Console, args);
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
