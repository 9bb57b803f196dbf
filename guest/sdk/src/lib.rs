//! The mu2 guest runtime: a bare-metal, `no_std` environment for one function served over
//! virtio-vsock, entered at CPL 3 by the mu2 VMM (or at CPL 0 through the Linux 64-bit boot
//! protocol, after which it drops to CPL 3 itself).
//!
//! A function guest is one line:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! extern crate alloc;
//! mu2_guest::function!(echo);
//! fn echo(request: &[u8]) -> alloc::vec::Vec<u8> { request.to_vec() }
//! ```
//!
//! The runtime provides a heap (`alloc`), [`print!`]/[`println!`] on the serial console (slow:
//! one exit per byte, never on the serve path), [`random_u64`]/[`fill_random`],
//! [`now_unix_ns`], [`exit`], and a panic handler that reports to the VMM. [`entry!`] declares
//! a plain `main` instead; [`fault`] raises CPU exceptions on purpose. The VMM's test guests
//! (`guest/test-guests`) also get the `testing` hooks, behind the `test-hooks` feature.
#![cfg_attr(not(test), no_std)]
// The host unit tests leave out the entry, the panic handler and what only they use.
#![cfg_attr(test, allow(dead_code, unused_imports))]

extern crate alloc;

mod arch;
#[cfg(feature = "c")]
pub mod c;
pub mod cmdline;
pub mod console;
pub mod fault;
pub mod fmt;
mod global;
mod heap;
pub mod http;
#[cfg(not(test))]
mod mem;
mod outcome;
mod random;
mod serve;
mod sysdev;
mod sysdev_addr;
#[cfg(feature = "test-hooks")]
pub mod testing;
mod time;
mod virtio;
mod vsock;

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use global::Global;

pub use heap::{free as heap_free, size as heap_size};
pub use outcome::{IntoOutcome, Outcome};
pub use random::{fill_random, random_u64};
pub use serve::{serve, serve_with_flags};
pub use sysdev::present as sysdev_present;
pub use time::{now_unix_ns, rdtsc, spin_us, ticks_to_ns, tsc_khz};

static CONFIG: Global<cmdline::Config> = Global::new(cmdline::Config {
    sysdev: None,
    tsc_khz: None,
    port: None,
    quiet: false,
    devices: [cmdline::MmioDevice { addr: 0, size: 0 }; cmdline::MAX_DEVICES],
    device_count: 0,
});
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The parsed command line.
pub fn config() -> cmdline::Config {
    CONFIG.with(|c| *c)
}

/// How many times this VM was restored from a frozen image (`HostInfo::generation`); 0 in a
/// cold-booted VM.
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

/// Common Rust entry of both paths, at CPL 3. `linux_entry` says which path it was.
#[cfg(not(test))]
extern "C" fn rust_start(boot_params: u64, linux_entry: u64) -> ! {
    boot(boot_params, linux_entry != 0);
    extern "Rust" {
        fn mu2_main();
    }
    // SAFETY: `mu2_main` is the binary's entry function, defined by `entry!`/`function!`.
    unsafe { mu2_main() };
    exit(0)
}

#[cfg(not(test))]
fn boot(boot_params: u64, linux_entry: bool) {
    extern "C" {
        static __image_start: u8;
        static __image_end: u8;
    }
    let image_start = core::ptr::addr_of!(__image_start) as u64;
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    // x86_64: `boot_params` (the Linux zero page); aarch64: the devicetree.
    let cmdline_addr = arch::cmdline_addr(boot_params);
    let config = if cmdline_addr == 0 {
        cmdline::Config::default()
    } else {
        // SAFETY: the command line is a NUL-terminated string in RAM of at most
        // CMDLINE_MAX bytes, written by the VMM and not modified afterwards.
        let bytes = unsafe { core::slice::from_raw_parts(cmdline_addr as *const u8, mu2_abi::layout::CMDLINE_MAX) };
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        cmdline::parse(&bytes[..len])
    };
    if let Some(addr) = config.sysdev {
        sysdev_addr::set(addr);
    }
    CONFIG.with(|c| *c = config);
    let heap = arch::heap_range(boot_params, image_start, image_end);
    let Some((heap_start, heap_end)) = heap else { panic!("no e820 RAM region holds the image") };
    heap::init(heap_start, heap_end);
    time::init(config.tsc_khz);

    // Seed: rdrand if the CPU has it (one exit for CPUID), the TSC, and the host's entropy
    // if the VMM wrote a HostInfo already.
    let mut seed = [0u8; 32];
    if arch::has_rdrand() {
        for chunk in seed.chunks_exact_mut(8) {
            chunk.copy_from_slice(&arch::rdrand().unwrap_or(0).to_le_bytes());
        }
    }
    for (s, t) in seed.iter_mut().zip(arch::rdtsc().to_le_bytes()) {
        *s ^= t;
    }
    random::reseed(&seed);
    if sysdev::present() {
        let info = sysdev::host_info();
        if info.unix_time_ns != 0 {
            apply_host_info(&info);
        }
    }
    if !config.quiet {
        println!(
            "mu2 guest runtime: {} entry, heap {} KiB at {heap_start:#x}, tsc {} kHz",
            if linux_entry { "linux" } else { "mu2" },
            (heap_end - heap_start) >> 10,
            time::tsc_khz()
        );
    }
}

fn apply_host_info(info: &mu2_abi::HostInfo) {
    time::rebase(info.unix_time_ns, info.tsc);
    random::reseed(&info.entropy);
    GENERATION.store(info.generation, Ordering::Relaxed);
}

/// After a restore from a frozen image: fresh entropy, wall clock and generation from the
/// host, before anything else runs.
fn restored() {
    apply_host_info(&sysdev::host_info());
}

/// Stops the VM with `code`.
pub fn exit(code: u32) -> ! {
    sysdev::exit(code);
    // No system device: say so, then try the platform's power-off (x86_64: the i8042 reset
    // line, on which Firecracker stops the VM; aarch64: PSCI), then spin.
    println!("mu2 guest exited with code {code}");
    arch::power_off();
    arch::spin_forever()
}

static PANICKING: AtomicBool = AtomicBool::new(false);
static PANIC_MESSAGE: virtio::Dma<[u8; 1024]> = virtio::Dma::new([0; 1024]);
static PANIC_TEXT: virtio::Dma<mu2_abi::Text> = virtio::Dma::new(mu2_abi::Text { addr: 0, len: 0 });

/// Formats into a fixed buffer, truncating.
struct Truncating<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl core::fmt::Write for Truncating<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::Relaxed) {
        console::write_bytes(b"mu2 guest: panic while panicking\n");
        exit(102);
    }
    // SAFETY: the PANICKING flag makes this the only reference to the message buffer.
    let buf = unsafe { &mut *PANIC_MESSAGE.ptr() };
    let mut w = Truncating { buf: &mut *buf, len: 0 };
    let _ = core::fmt::Write::write_fmt(&mut w, format_args!("{info}"));
    let len = w.len;
    // SAFETY: the PANICKING flag makes this the only writer of the Text.
    unsafe { PANIC_TEXT.ptr().write_volatile(mu2_abi::Text { addr: PANIC_MESSAGE.addr(), len: len as u64 }) };
    sysdev::panic(PANIC_TEXT.ptr());
    // No system device (or it did not stop us): the console.
    console::write_bytes(&buf[..len]);
    console::write_bytes(b"\n");
    arch::spin_forever()
}

/// Declares the guest's main function: the runtime calls it after boot, then exits with 0.
#[macro_export]
macro_rules! entry {
    ($f:path) => {
        #[no_mangle]
        fn mu2_main() {
            $f()
        }
    };
}

/// Declares an HTTP function, `fn(&http::Request) -> http::Response` or `-> Result<http::Response,
/// E>` with `E: Display`: the guest announces the HTTP framing, so the mu2 dispatcher hands it
/// whole HTTP requests (see [`http`]); an error reaches the client as a 500 with its message.
#[macro_export]
macro_rules! http_function {
    ($f:path) => {
        #[no_mangle]
        fn mu2_main() {
            $crate::http::serve($f)
        }
    };
}

/// Declares the guest's function, `fn(&[u8]) -> Vec<u8>` or `fn(&[u8]) -> Result<Vec<u8>, E>`
/// with `E: Display`: the runtime serves it over vsock, one request per connection, forever.
/// An error goes back to the caller as a function error with its message (a distinct
/// outcome: `mu2 invoke` exits with code 8, the daemon answers 500), not as a response.
#[macro_export]
macro_rules! function {
    ($f:path) => {
        #[no_mangle]
        fn mu2_main() {
            $crate::serve($f)
        }
    };
}
