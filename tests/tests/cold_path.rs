//! The cold path on real KVM: boot our guest, answer requests over virtio-vsock.

use std::time::{Duration, Instant};

use mu2_devices::virtio::vsock::VsockError;
use mu2_tests::{boot, invoke_cold, invoke_cold_with, kvm_or_skip};
use mu2_vmm::invoke::{self, InvokeError};
use mu2_vmm::EntryMode;
use mu2_vmm::{GuestError, RunStop};
use sha2::{Digest, Sha256};

const TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn boot_prints_to_the_serial_console_and_exits() {
    let hv = kvm_or_skip!();
    let (mut vm, console) = boot(&hv, "hello", EntryMode::Native, "");
    let stop = vm.run(Some(Instant::now() + TIMEOUT)).expect("guest runs");
    assert_eq!(stop, RunStop::Exited(0));
    let text = String::from_utf8_lossy(&console.contents()).into_owned();
    assert!(text.contains("hello from the mu2 guest"), "console: {text:?}");
    assert!(vm.stats().pio > 0, "the console is port I/O on x86_64");
    assert!(matches!(vm.run(None), Err(GuestError::Stopped)), "a stopped guest stays stopped");
}

#[test]
fn echo_guest_prints_a_banner_unless_quiet() {
    let hv = kvm_or_skip!();
    let (mut vm, console) = boot(&hv, "echo", EntryMode::Native, "");
    let ready = invoke::run_until_ready(&mut vm, Some(Instant::now() + TIMEOUT)).expect("ready");
    assert_eq!(ready.port, mu2_abi::DEFAULT_PORT);
    assert_eq!(ready.abi_version, mu2_abi::ABI_VERSION);
    let text = String::from_utf8_lossy(&console.contents()).into_owned();
    assert!(text.contains("listening on vsock 3:5000"), "banner names the port: {text:?}");

    let (mut quiet, quiet_console) = boot(&hv, "echo", EntryMode::Native, "quiet");
    invoke::run_until_ready(&mut quiet, Some(Instant::now() + TIMEOUT)).expect("ready");
    assert!(quiet_console.contents().is_empty(), "quiet guests print nothing");
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn echo_returns_exactly_its_input() {
    let hv = kvm_or_skip!();
    for len in [0, 1, 4096, 1 << 20] {
        let request = pattern(len);
        let response = invoke_cold(&hv, "echo", &request, TIMEOUT).unwrap_or_else(|e| panic!("{len} bytes: {e}"));
        assert_eq!(response.len(), request.len(), "length for a {len}-byte request");
        assert!(response == request, "content for a {len}-byte request");
    }
}

#[test]
fn one_vm_serves_requests_one_after_another() {
    let hv = kvm_or_skip!();
    let (mut vm, _console) = boot(&hv, "echo", EntryMode::Native, "quiet");
    let deadline = Some(Instant::now() + TIMEOUT);
    let ready = invoke::run_until_ready(&mut vm, deadline).expect("ready");
    for i in 0..5 {
        let request = format!("request {i}");
        let response = invoke::invoke(&mut vm, ready.port, request.as_bytes(), 1 << 20, deadline).expect("answer");
        assert_eq!(response, request.as_bytes());
    }
}

/// A request takes one exit under mu2: the request and its frame header are in the RX ring
/// before the vCPU runs, and the guest answers before its next WAIT.
#[test]
fn a_framed_request_costs_one_exit() {
    let hv = kvm_or_skip!();
    let (mut vm, _console) = boot(&hv, "echo", EntryMode::Native, "quiet");
    let deadline = Some(Instant::now() + TIMEOUT);
    let ready = invoke::run_until_ready(&mut vm, deadline).expect("ready");
    invoke::invoke(&mut vm, ready.port, b"warm", 1 << 20, deadline).expect("first request");
    for len in [0, 100, 4000] {
        let before = vm.stats();
        let response = invoke::invoke(&mut vm, ready.port, &pattern(len), 1 << 20, deadline).expect("answer");
        let after = vm.stats();
        assert_eq!(response, pattern(len));
        assert_eq!((after.entries - before.entries, after.waits - before.waits), (1, 1), "{len} bytes: {after:?}");
        assert_eq!(after.virtio_mmio, before.virtio_mmio, "no notification on the request path");
    }
}

/// Firecracker's hybrid vsock turns a host's half-close into a full SHUTDOWN (both flags): a
/// framed request followed by one is answered all the same.
#[test]
fn a_full_shutdown_after_a_framed_request_still_gets_the_answer() {
    use mu2_abi::frame::{outcome, RequestHeader, ResponseHeader};
    let hv = kvm_or_skip!();
    let (mut vm, _console) = boot(&hv, "echo", EntryMode::Native, "quiet");
    let deadline = Some(Instant::now() + TIMEOUT);
    let ready = invoke::run_until_ready(&mut vm, deadline).expect("ready");
    let request = pattern(10_000);
    let vsock = vm.vsock();
    let conn = vsock.connect(ready.port, ready.buf_alloc).expect("connect");
    vsock.send(conn, &RequestHeader { len: request.len() as u32 }.encode()).expect("frame header");
    vsock.send(conn, &request).expect("request");
    vsock.shutdown(conn, true).expect("full shutdown");
    let mut answer = Vec::new();
    loop {
        let stop = vm.run(deadline).expect("guest runs");
        vm.vsock().recv(conn, &mut answer).expect("recv");
        let state = vm.vsock().state(conn).expect("connection");
        if state.guest_eof && state.readable == 0 {
            break;
        }
        assert_eq!(stop, RunStop::Idle);
    }
    assert!(vm.vsock().take_errors().is_empty());
    let (head, body) = answer.split_at(ResponseHeader::SIZE);
    let header = ResponseHeader::decode(head.try_into().expect("8 bytes")).expect("a known outcome");
    assert_eq!((header.outcome, header.len as usize), (outcome::OK, request.len()));
    assert!(body == request, "the echo, whole, after a full SHUTDOWN");
}

/// Firecracker's transport refuses a status write that adds more than one bit, and so does
/// ours: through either entry, the guest brings its device up without one.
#[test]
fn the_guest_sets_one_device_status_bit_per_write() {
    use mu2_abi::virtio_mmio::status;
    let hv = kvm_or_skip!();
    for entry in [EntryMode::Native, EntryMode::Linux] {
        let (mut vm, _console) = boot(&hv, "echo", entry, "quiet");
        invoke::run_until_ready(&mut vm, Some(Instant::now() + Duration::from_secs(60))).expect("ready");
        assert!(vm.vsock_transport_errors().is_empty(), "{entry:?}: the transport refused nothing");
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        assert_eq!(vm.vsock_state().status, all, "{entry:?}");
    }
}

#[test]
fn sha256_matches_the_host_digest() {
    let hv = kvm_or_skip!();
    for request in [&b""[..], b"abc", &pattern(300_000)] {
        let response = invoke_cold(&hv, "sha256", request, TIMEOUT).expect("sha256 answers");
        let expected: String = Sha256::digest(request).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(String::from_utf8_lossy(&response).trim(), expected);
    }
}

#[test]
fn work_touches_pages_and_spins() {
    let hv = kvm_or_skip!();
    let response = invoke_cold(&hv, "work", b"pages=16 spin_us=2000", TIMEOUT).expect("work answers");
    assert_eq!(String::from_utf8_lossy(&response).trim(), "pages=16 spin_us=2000");
}

fn expect_fault(request: &str, vector: u32) {
    let hv = kvm_or_skip!();
    match invoke_cold(&hv, "crash", request.as_bytes(), TIMEOUT) {
        Err(InvokeError::Guest(GuestError::Fault(fault))) => {
            assert_eq!(fault.vector, vector, "{request}: {fault}");
            let rip = fault.rip.expect("the fault names its RIP");
            assert!(rip >= mu2_abi::layout::IMAGE_BASE, "{request}: RIP {rip:#x} is in the guest image");
            let text = InvokeError::Guest(GuestError::Fault(fault)).to_string();
            assert!(text.contains("RIP") && text.contains(&format!("vector {vector}")), "{text}");
        }
        other => panic!("{request}: expected a fault with vector {vector}, got {other:?}"),
    }
}

#[test]
fn crash_page_fault_names_vector_rip_and_address() {
    expect_fault("pf", 14);
    let hv = kvm_or_skip!();
    if let Err(InvokeError::Guest(GuestError::Fault(fault))) = invoke_cold(&hv, "crash", b"pf", TIMEOUT) {
        assert_eq!(fault.fault_address, Some(0), "the null write faults at address 0");
    }
}

#[test]
fn crash_invalid_opcode() {
    expect_fault("ud", 6);
}

#[test]
fn crash_general_protection() {
    expect_fault("gp", 13);
}

#[test]
fn crash_divide_error() {
    expect_fault("de", 0);
}

#[test]
fn crash_panic_reports_the_message() {
    let hv = kvm_or_skip!();
    match invoke_cold(&hv, "crash", b"panic", TIMEOUT) {
        Err(InvokeError::Guest(GuestError::Panic(message))) => assert!(!message.is_empty()),
        other => panic!("expected a guest panic, got {other:?}"),
    }
}

#[test]
fn a_guest_that_never_answers_hits_the_timeout() {
    let hv = kvm_or_skip!();
    let started = Instant::now();
    let result = invoke_cold(&hv, "hang", b"anything", Duration::from_millis(500));
    assert!(matches!(&result, Err(e) if e.is_timeout()), "expected a timeout, got {result:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "the deadline stops a spinning guest");
}

#[test]
fn malformed_descriptor_chains_fail_the_request_not_the_vmm() {
    let hv = kvm_or_skip!();
    for kind in ["addr", "dir", "short", "len", "cycle", "avail", "rxdir"] {
        let result = invoke_cold(&hv, "badchain", kind.as_bytes(), Duration::from_secs(5));
        match result {
            Err(InvokeError::Device(e)) => {
                let text = e.to_string();
                assert!(!text.is_empty(), "{kind}");
                let _: &VsockError = &e;
            }
            other => panic!("{kind}: expected a device error, got {other:?}"),
        }
    }
    // The VMM is unharmed: a good guest still answers.
    assert_eq!(invoke_cold(&hv, "echo", b"still fine", TIMEOUT).expect("echo"), b"still fine");
}

#[test]
fn linux_boot_protocol_entry_reaches_the_same_guest() {
    let hv = kvm_or_skip!();
    let (mut vm, console) = boot(&hv, "hello", EntryMode::Linux, "");
    let stop = vm.run(Some(Instant::now() + Duration::from_secs(60))).expect("guest runs");
    assert_eq!(stop, RunStop::Exited(0));
    assert!(String::from_utf8_lossy(&console.contents()).contains("hello from the mu2 guest"));
    let response =
        invoke_cold_with(&hv, "echo", EntryMode::Linux, b"via cpl 0", Duration::from_secs(60)).expect("echo");
    assert_eq!(response, b"via cpl 0");
}

#[test]
fn a_fault_after_linux_entry_is_reported_by_the_guests_own_handlers() {
    let hv = kvm_or_skip!();
    match invoke_cold_with(&hv, "crash", EntryMode::Linux, b"ud", Duration::from_secs(60)) {
        Err(InvokeError::Guest(GuestError::Fault(fault))) => {
            assert_eq!(fault.vector, 6);
            assert!(fault.rip.is_some_and(|rip| rip >= mu2_abi::layout::IMAGE_BASE), "{fault}");
        }
        other => panic!("expected #UD, got {other:?}"),
    }
}

#[test]
fn cold_booted_guests_draw_different_random_values() {
    let hv = kvm_or_skip!();
    let a = invoke_cold(&hv, "random", b"", TIMEOUT).expect("random");
    let b = invoke_cold(&hv, "random", b"", TIMEOUT).expect("random");
    assert_ne!(a, b);
    assert!(String::from_utf8_lossy(&a).contains("\"random\":\""));
}

#[test]
fn bad_configurations_are_refused() {
    let hv = kvm_or_skip!();
    let mut config = mu2_vmm::VmConfig::new(mu2_tests::guest("echo"));
    use mu2_vmm::error::{Classify, FailureKind};
    let boot = |config: &mu2_vmm::VmConfig| mu2_vmm::Vm::boot(&hv, config, Box::new(std::io::sink())).map(|_| ());
    config.mem_size = 3 << 20;
    let e = boot(&config).unwrap_err();
    assert!(matches!(e, mu2_vmm::BuildError::MemorySize { bytes } if bytes == 3 << 20), "{e}");
    assert_eq!(e.kind(), FailureKind::BadInput);
    config.mem_size = 64 << 20;
    config.vcpus = 0;
    let e = boot(&config).unwrap_err();
    assert!(matches!(e, mu2_vmm::BuildError::VcpuCount { asked: 0, .. }), "{e}");
    assert_eq!(e.kind(), FailureKind::BadInput);
    let not_elf = mu2_vmm::VmConfig::new(&b"definitely not an ELF file"[..]);
    let e = boot(&not_elf).unwrap_err();
    assert!(matches!(e, mu2_vmm::BuildError::Arch(_)), "{e}");
    assert_eq!(e.kind(), FailureKind::BadInput);
}
