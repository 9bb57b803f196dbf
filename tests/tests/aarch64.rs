//! The integration tests on aarch64 KVM, in one binary (each test binary costs a boot of
//! the test VM under qemu-system-aarch64; see scripts/test-aarch64): boot, every example
//! function, faults, timeouts, hostile guests, frozen images, fork in every mode, isolation
//! and uniqueness, bad images. The x86_64 suites (`cold_path`, `fork`) hold the same tests
//! with x86 exception vectors and the x86-only Linux entry.
#![cfg(target_arch = "aarch64")]

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mu2_devices::virtio::vsock::VsockError;
use mu2_tests::{boot, engine, guest, invoke_cold, kvm_or_skip, make_image, quiet_config, TempDir};
use mu2_vmm::fork::{ForkError, Mode};
use mu2_vmm::invoke::{self, InvokeError};
use mu2_vmm::EntryMode;
use mu2_vmm::{GuestError, RunStop, Vm, VmConfig};
use sha2::{Digest, Sha256};

const TIMEOUT: Duration = Duration::from_secs(60);

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn boot_prints_to_the_mmio_serial_console_and_exits() {
    let hv = kvm_or_skip!();
    let (mut vm, console) = boot(&hv, "hello", EntryMode::Native, "");
    let stop = vm.run(Some(Instant::now() + TIMEOUT)).expect("guest runs");
    assert_eq!(stop, RunStop::Exited(0));
    let text = String::from_utf8_lossy(&console.contents()).into_owned();
    assert!(text.contains("hello from the mu2 guest"), "console: {text:?}");
    assert!(vm.stats().pio > 0, "console exits are counted");
    assert!(matches!(vm.run(None), Err(GuestError::Stopped)));
}

#[test]
fn echo_banner_unless_quiet_and_one_vm_serves_in_turn() {
    let hv = kvm_or_skip!();
    let (mut vm, console) = boot(&hv, "echo", EntryMode::Native, "");
    let ready = invoke::run_until_ready(&mut vm, Some(Instant::now() + TIMEOUT)).expect("ready");
    assert_eq!(ready.port, mu2_abi::DEFAULT_PORT);
    let text = String::from_utf8_lossy(&console.contents()).into_owned();
    assert!(text.contains("listening on vsock 3:5000"), "banner: {text:?}");
    for i in 0..5 {
        let request = format!("request {i}");
        let response = invoke::invoke(&mut vm, ready.port, request.as_bytes(), 1 << 20, Some(Instant::now() + TIMEOUT))
            .expect("answer");
        assert_eq!(response, request.as_bytes());
    }
    let (mut quiet, quiet_console) = boot(&hv, "echo", EntryMode::Native, "quiet");
    invoke::run_until_ready(&mut quiet, Some(Instant::now() + TIMEOUT)).expect("ready");
    assert!(quiet_console.contents().is_empty(), "quiet guests print nothing");
}

#[test]
fn every_example_function_answers_as_on_x86_64() {
    let hv = kvm_or_skip!();
    for len in [0, 1, 4096, 1 << 20] {
        let request = pattern(len);
        let response = invoke_cold(&hv, "echo", &request, TIMEOUT).unwrap_or_else(|e| panic!("{len} bytes: {e}"));
        assert!(response == request, "echo of {len} bytes");
    }
    for request in [&b""[..], b"abc", &pattern(300_000)] {
        let response = invoke_cold(&hv, "sha256", request, TIMEOUT).expect("sha256 answers");
        let expected: String = Sha256::digest(request).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(String::from_utf8_lossy(&response).trim(), expected);
    }
    let response = invoke_cold(&hv, "work", b"pages=16 spin_us=2000", TIMEOUT).expect("work answers");
    assert_eq!(String::from_utf8_lossy(&response).trim(), "pages=16 spin_us=2000");
    let a = invoke_cold(&hv, "random", b"", TIMEOUT).expect("random");
    let b = invoke_cold(&hv, "random", b"", TIMEOUT).expect("random");
    assert_ne!(a, b, "cold-booted guests draw different values");
    assert!(String::from_utf8_lossy(&a).contains("\"random\":\""));
}

#[test]
fn faults_name_exception_class_pc_and_address() {
    let hv = kvm_or_skip!();
    // pf: data abort; ud: udf; gp: brk; de: svc (aarch64 division does not trap).
    for (request, class) in [("pf", 0x25), ("ud", 0x00), ("gp", 0x3c), ("de", 0x15)] {
        match invoke_cold(&hv, "crash", request.as_bytes(), TIMEOUT) {
            Err(InvokeError::Guest(GuestError::Fault(fault))) => {
                assert_eq!(fault.vector, class, "{request}: {fault}");
                let pc = fault.rip.expect("the fault names its PC");
                assert!(pc >= mu2_abi::layout::IMAGE_BASE, "{request}: PC {pc:#x} in the image");
                let text = InvokeError::Guest(GuestError::Fault(fault)).to_string();
                assert!(text.contains("PC") && text.contains(&format!("EC {class:#04x}")), "{text}");
                if request == "pf" {
                    assert_eq!(fault.fault_address, Some(0), "the null write faults at address 0");
                }
            }
            other => panic!("{request}: expected a fault of class {class:#x}, got {other:?}"),
        }
    }
    match invoke_cold(&hv, "crash", b"panic", TIMEOUT) {
        Err(InvokeError::Guest(GuestError::Panic(message))) => assert!(!message.is_empty()),
        other => panic!("expected a guest panic, got {other:?}"),
    }
}

#[test]
fn hangs_time_out_and_hostile_chains_fail_only_their_request() {
    let hv = kvm_or_skip!();
    let started = Instant::now();
    let result = invoke_cold(&hv, "hang", b"anything", Duration::from_millis(1500));
    assert!(matches!(&result, Err(e) if e.is_timeout()), "expected a timeout, got {result:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "the deadline stops a spinning guest");
    for kind in ["addr", "dir", "short", "len", "cycle", "avail", "rxdir"] {
        match invoke_cold(&hv, "badchain", kind.as_bytes(), Duration::from_secs(20)) {
            Err(InvokeError::Device(e)) => {
                let _: &VsockError = &e;
                assert!(!e.to_string().is_empty(), "{kind}");
            }
            other => panic!("{kind}: expected a device error, got {other:?}"),
        }
    }
    assert_eq!(invoke_cold(&hv, "echo", b"still fine", TIMEOUT).expect("echo"), b"still fine");
}

#[test]
fn bad_configurations_are_refused() {
    let hv = kvm_or_skip!();
    let mut config = VmConfig::new(guest("echo"));
    config.mem_size = 3 << 20;
    assert!(matches!(Vm::boot(&hv, &config, Box::new(std::io::sink())), Err(mu2_vmm::BuildError::MemorySize { .. })));
    let not_elf = VmConfig::new(&b"definitely not an ELF file"[..]);
    assert!(matches!(Vm::boot(&hv, &not_elf, Box::new(std::io::sink())), Err(mu2_vmm::BuildError::Arch(_))));
    let mut linux = VmConfig::new(guest("echo"));
    linux.entry = EntryMode::Linux;
    assert!(Vm::boot(&hv, &linux, Box::new(std::io::sink())).is_err(), "no Linux entry on aarch64");
}

#[test]
fn the_frozen_state_holds_every_listed_register_and_round_trips() {
    let hv = kvm_or_skip!();
    let mut vm = Vm::boot(&hv, &quiet_config("echo"), Box::new(std::io::sink())).expect("boot");
    invoke::run_until_ready(&mut vm, Some(Instant::now() + TIMEOUT)).expect("ready");
    assert_eq!(vm.run(None).expect("idle"), RunStop::Idle);
    let state = vm.freeze().expect("freeze");
    let dir = TempDir::new("roundtrip");
    mu2_snapshot::write_image(dir.path(), mu2_snapshot::Arch::host(), &state, vm.memory_bytes()).expect("write");
    let magic = std::fs::read(dir.path().join("state")).expect("state");
    assert_eq!(&magic[..8], b"MU2IMGa8", "the magic names aarch64");
    let (_, read): (_, mu2_vmm::VmState) =
        mu2_snapshot::read_state(dir.path(), mu2_snapshot::Arch::host()).expect("read");
    assert_eq!(read.vcpus, state.vcpus);
    assert!(read.vcpus[0].regs.len() > 100, "every register KVM lists: {}", read.vcpus[0].regs.len());
    // The timer's control and compare registers are among them.
    let timer_ctl = 0x6030_0000_0013_df19u64;
    assert!(read.vcpus[0].regs.iter().any(|(id, _)| *id == timer_ctl), "timer state saved");
}

#[test]
fn a_fork_answers_like_a_cold_boot_for_every_example_function() {
    let hv = kvm_or_skip!();
    let cases: &[(&str, &[u8])] =
        &[("echo", b"the same bytes"), ("sha256", b"abc"), ("work", b"pages=4 spin_us=50"), ("crash", b"ud")];
    for &(name, request) in cases {
        let cold = invoke_cold(&hv, name, request, TIMEOUT);
        let (_dir, image) = make_image(&hv, name);
        let forked = engine(image, Mode::Fresh).serve(request, TIMEOUT);
        match (cold, forked) {
            (Ok(c), Ok(f)) => assert_eq!(c, f.response, "{name}"),
            (
                Err(InvokeError::Guest(GuestError::Fault(c))),
                Err(ForkError::Invoke(InvokeError::Guest(GuestError::Fault(f)))),
            ) => assert_eq!((c.vector, c.rip), (f.vector, f.rip), "{name}: the same fault at the same place"),
            (c, f) => panic!("{name}: cold {c:?} vs fork {f:?}"),
        }
    }
}

#[test]
fn every_mode_serves_with_a_new_identity_and_survives_crashes() {
    let hv = kvm_or_skip!();
    let (_dir, image) = make_image(&hv, "echo");
    let (_cdir, crash) = make_image(&hv, "crash");
    for mode in [Mode::Fresh, Mode::Pool, Mode::Reuse] {
        let engine = engine(image.clone(), mode);
        let mut ids = HashSet::new();
        for i in 0..10 {
            let request = format!("{mode:?} request {i}");
            let served = engine.serve(request.as_bytes(), TIMEOUT).unwrap_or_else(|e| panic!("{mode:?} {i}: {e}"));
            assert_eq!(served.response, request.as_bytes());
            assert!(ids.insert(served.vm_id), "{mode:?}: every request gets its own VM identity");
        }
        let crashing = self::engine(crash.clone(), mode);
        for _ in 0..2 {
            match crashing.serve(b"pf", TIMEOUT) {
                Err(ForkError::Invoke(e)) => assert!(e.is_guest_crash(), "{mode:?}: {e}"),
                other => panic!("{mode:?}: expected a crash, got {other:?}"),
            }
        }
        assert_eq!(engine.serve(b"after", TIMEOUT).expect("still serving").response, b"after");
    }
}

#[test]
fn forks_draw_different_values_and_know_the_time() {
    let hv = kvm_or_skip!();
    let (_dir, image) = make_image(&hv, "random");
    for mode in [Mode::Fresh, Mode::Pool, Mode::Reuse] {
        let engine = engine(image.clone(), mode);
        let mut seen = HashSet::new();
        for _ in 0..30 {
            let served = engine.serve(b"", TIMEOUT).expect("random answers");
            let text = String::from_utf8_lossy(&served.response).into_owned();
            let field = |key: &str| -> String {
                let start =
                    text.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("{key} in {text}")) + key.len() + 3;
                text[start..].split([',', '}']).next().unwrap_or("").trim_matches('"').to_string()
            };
            let value = field("random");
            assert_eq!(value.len(), 64);
            assert!(seen.insert(value), "{mode:?}: a fork repeated another fork's random value");
            let guest_ns: u64 = field("unix_time_ns").parse().expect("a number");
            let host_ns = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_nanos() as u64;
            assert!(host_ns.abs_diff(guest_ns) < 2_000_000_000, "{mode:?}: the fork's clock is off: {text}");
        }
    }
}

#[test]
fn bad_images_are_refused_with_the_problem_named() {
    let hv = kvm_or_skip!();
    mu2_tests::bad_images_are_refused(&hv);
}

/// Reuse mode on aarch64: whatever the previous request changed is the image's again after a
/// reset — registers (general ones, the thread pointer and the vector base, changed from the
/// host to cover what EL1 code could reach), memory, and device state.
#[test]
fn a_reset_vm_holds_nothing_of_its_previous_request() {
    let hv = kvm_or_skip!();
    let (_dir, image) = make_image(&hv, "echo");
    let saved = image.state().vcpus[0].clone();
    let port = image.state().port;
    let mut vm = Vm::restore(&hv, &image).expect("restore");
    vm.hand_out(&image).expect("hand out");
    let deadline = Some(Instant::now() + TIMEOUT);
    assert_eq!(invoke::invoke(&mut vm, port, b"first", 1 << 20, deadline).expect("first"), b"first");

    // X0..X30 come first in KVM's list; then two system registers EL1 code could change:
    // TPIDR_EL0 and VBAR_EL1 (the VMM's vector table).
    const TPIDR_EL0: u64 = 0x6030_0000_0013_de82;
    const VBAR_EL1: u64 = 0x6030_0000_0013_c600;
    let mut scribbled = Vec::new();
    for (id, value) in
        saved.regs.iter().take(31).chain(saved.regs.iter().filter(|(id, _)| [TPIDR_EL0, VBAR_EL1].contains(id)))
    {
        let junk = vec![0xa5u8; value.len()];
        if vm.vcpu_fd().set_one_reg(*id, &junk).is_ok() {
            scribbled.push((*id, value.clone()));
        }
    }
    assert!(scribbled.len() >= 31, "general registers and system registers were changed");
    let pages = [0x20_0000u64, 0x100_0000, mu2_abi::layout::HOST_INFO];
    for addr in pages {
        vm_memory::Bytes::write_slice(vm.memory(), &[0xcc; 4096], vm_memory::GuestAddress(addr))
            .expect("scribble memory");
    }
    let conn = vm.vsock().connect(port, 0).expect("a host connection");
    vm.vsock().send(conn, b"leftover").expect("queued data");

    vm.reset_to(&image, true).expect("reset");

    for (id, value) in &scribbled {
        let mut now = vec![0u8; value.len()];
        vm.vcpu_fd().get_one_reg(*id, &mut now).expect("read register");
        assert_eq!(&now, value, "register {id:#x}");
    }
    for addr in pages {
        let mut now = vec![0u8; 4096];
        vm_memory::Bytes::read_slice(vm.memory(), &mut now, vm_memory::GuestAddress(addr)).expect("read memory");
        let mut file = image.memory_file();
        let mut original = vec![0u8; 4096];
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(addr)).expect("seek");
        std::io::Read::read_exact(&mut file, &mut original).expect("read image");
        assert!(now == original, "page {addr:#x}");
    }
    let encode = |s| postcard::to_stdvec(s).expect("encode");
    assert_eq!(encode(&vm.vsock_state()), encode(&image.state().vsock), "device state");
    assert!(vm.vsock().state(conn).is_none(), "host connections do not survive a reset");
    vm.hand_out(&image).expect("hand out");
    let deadline = Some(Instant::now() + TIMEOUT);
    assert_eq!(invoke::invoke(&mut vm, port, b"second", 1 << 20, deadline).expect("second"), b"second");
}
