//! The serve loop: WAIT, take back used buffers, run the function on a complete request,
//! queue the response, WAIT again. A small request costs one exit: the WAIT that follows
//! the response (the mu2 device polls its queues at that exit, so nothing is notified).

use mu2_abi::{wait, ReadyInfo, ABI_VERSION};

use crate::global::Global;
use crate::outcome::IntoOutcome;
use crate::virtio::mmio::Transport;
use crate::virtio::Dma;
use crate::vsock::{self, Vsock, BUF_ALLOC};

static DRIVER: Global<Option<Vsock>> = Global::new(None);
static READY: Dma<ReadyInfo> = Dma::new(ReadyInfo { abi_version: 0, port: 0, buf_alloc: 0, flags: 0, max_request: 0 });

/// Heap the runtime keeps for itself beside a request and its response (bookkeeping, a
/// function's small allocations).
const HEAP_RESERVE: usize = 64 << 10;

/// The largest request this guest can hold: a request and a response of the same size must
/// fit in the heap at once (the request stays while the function builds its response), so
/// half of what is free now, less a reserve.
fn max_request() -> u32 {
    let usable = crate::heap::free().saturating_sub(HEAP_RESERVE) / 2;
    u32::try_from(usable).unwrap_or(u32::MAX)
}

/// Runs `f` on the vsock driver if it is up.
pub(crate) fn with_driver<R>(f: impl FnOnce(&mut Vsock) -> R) -> Option<R> {
    DRIVER.with(|d| d.as_mut().map(f))
}

/// Finds the vsock device among the command line's virtio-mmio devices, brings it up, and
/// reports readiness to the VMM. Panics (reported to the VMM) if there is none.
fn start(flags: u32) {
    let config = crate::config();
    let port = config.port.unwrap_or(mu2_abi::DEFAULT_PORT);
    let device = config.devices().iter().map(|d| Transport::new(d.addr)).find(|&t| vsock::probe(t).is_ok());
    let Some(transport) = device else { panic!("no virtio-vsock device on the command line") };
    let max_request = max_request();
    let dev = match Vsock::init(transport, port, max_request) {
        Ok(dev) => dev,
        Err(e) => panic!("virtio-vsock at {:#x}: {e:?}", transport.base()),
    };
    if !config.quiet {
        crate::println!("mu2: listening on vsock {}:{port}", dev.cid());
    }
    DRIVER.with(|d| *d = Some(dev));
    let info = ReadyInfo { abi_version: ABI_VERSION, port, buf_alloc: BUF_ALLOC, flags, max_request };
    // SAFETY: READY is static memory nothing else references; written before its address
    // goes to the VMM.
    unsafe { READY.ptr().write_volatile(info) };
    crate::sysdev::ready(READY.ptr());
}

/// Parks until there is work: the system device's WAIT, or (under another VMM) polling the
/// used rings. Returns the WAIT bits (0 when polling).
fn wait_for_work() -> u32 {
    if let Some(bits) = crate::sysdev::wait() {
        return bits;
    }
    while !with_driver(|d| d.has_work()).unwrap_or(false) {
        core::hint::spin_loop();
    }
    0
}

/// Serves requests forever: each request's bytes go to `handler`, whose return value is the
/// response, or an error that goes back as such ([`IntoOutcome`]).
pub fn serve<R: IntoOutcome>(handler: impl FnMut(&[u8]) -> R) -> ! {
    serve_with_flags(0, handler)
}

/// [`serve`], announcing `flags` ([`mu2_abi::ready_flags`]) to the VMM when ready.
pub fn serve_with_flags<R: IntoOutcome>(flags: u32, mut handler: impl FnMut(&[u8]) -> R) -> ! {
    start(flags);
    loop {
        if wait_for_work() & wait::RESTORED != 0 {
            crate::restored();
        }
        let request = with_driver(|d| {
            d.poll();
            // RESPONSE and credit go out now, ahead of the function's result.
            d.pump();
            d.take_request()
        })
        .flatten();
        if let Some(request) = request {
            // The driver is not borrowed while the function runs: it may call back into the
            // runtime (random numbers, the test hooks).
            let (outcome, body) = handler(&request).into_outcome().into_frame();
            drop(request);
            with_driver(|d| d.respond(outcome, body));
        }
        with_driver(Vsock::pump);
    }
}
