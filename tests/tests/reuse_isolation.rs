//! Reuse mode keeps one KVM VM and resets it to the image between requests. This proves a
//! request cannot observe its predecessor: whatever the predecessor changed — here changed
//! from the host side, to cover what a guest could reach through ring 0 too — is back to the
//! image's value after the reset: memory, general and control registers, segment bases, MSRs,
//! FPU/SSE state, debug registers and device state.
// x86_64 register state; tests/tests/aarch64.rs covers aarch64.
#![cfg(target_arch = "x86_64")]

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_debugregs, kvm_fpu, kvm_msr_entry, Msrs};
use mu2_tests::{guest, kvm_or_skip};
use mu2_vmm::fork::{Engine, EngineConfig, Mode};
use mu2_vmm::image::{self, Image};
use mu2_vmm::{invoke, ResetKind, Vm, VmConfig};
use vm_memory::{Bytes, GuestAddress};

const TIMEOUT: Duration = Duration::from_secs(20);
/// MSR_KERNEL_GS_BASE: writable, never touched by the guest runtime.
const KERNEL_GS_BASE: u32 = 0xc000_0102;

fn image_dir(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("mu2-test-isolation-{tag}-{}", std::process::id()))
}

fn image_bytes(image: &Image, addr: u64, len: usize) -> Vec<u8> {
    let mut file = image.memory_file();
    let mut buf = vec![0u8; len];
    file.seek(SeekFrom::Start(addr)).expect("seek");
    file.read_exact(&mut buf).expect("read image memory");
    buf
}

#[test]
fn a_reset_vm_holds_nothing_of_its_previous_request() {
    let hv = kvm_or_skip!();
    let dir = image_dir("state");
    let mut config = VmConfig::new(guest("echo"));
    config.cmdline = "quiet".into();
    image::create(&hv, &config, &dir, Some(Instant::now() + TIMEOUT)).expect("image");
    let image = Image::load(&hv, &dir).expect("load");
    let mut vm = Vm::restore(&hv, &image).expect("restore");
    // Both ways of resetting memory: a control register changed forces the full remap;
    // without that the written pages are copied back.
    scribble_reset_and_check(&mut vm, &image, true);
    scribble_reset_and_check(&mut vm, &image, false);
    drop(vm);
    std::fs::remove_dir_all(&dir).ok();
}

fn scribble_reset_and_check(vm: &mut Vm, image: &Image, change_cr0: bool) {
    let saved = &image.state().vcpus[0];
    vm.hand_out(image).expect("hand out");
    let port = image.state().port;
    let deadline = Some(Instant::now() + TIMEOUT);
    assert_eq!(invoke::invoke(vm, port, b"first", 1 << 20, deadline).expect("first"), b"first");

    // The predecessor changes everything it can reach, and more.
    let vcpu = vm.vcpu_fd();
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rax = 0x1111;
    regs.rbx = 0x2222;
    regs.r15 = 0x3333;
    regs.rsp = 0x4444_0000;
    vcpu.set_regs(&regs).expect("set regs");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    if change_cr0 {
        sregs.cr0 |= 1 << 3; // TS: the next SSE instruction would fault
    }
    sregs.cr2 = 0xdead_b000;
    sregs.fs.base = 0x5555_0000;
    sregs.gs.base = 0x6666_0000;
    vcpu.set_sregs(&sregs).expect("set sregs");
    let mut msrs =
        Msrs::from_entries(&[kvm_msr_entry { index: KERNEL_GS_BASE, data: 0x7777_0000, ..Default::default() }])
            .expect("msrs");
    assert_eq!(vcpu.set_msrs(&msrs).expect("set msrs"), 1);
    let fpu = kvm_fpu { fcw: 0x27f, mxcsr: 0x7f80, xmm: [[0xab; 16]; 16], ..Default::default() };
    vcpu.set_fpu(&fpu).expect("set fpu");
    let debug = kvm_debugregs { db: [0x1000, 0x2000, 0, 0], ..Default::default() };
    vcpu.set_debug_regs(&debug).expect("set debug registers");
    let scribbled_pages = [0x20_0000u64, 0x28_0000, 0x100_0000, mu2_abi::layout::HOST_INFO];
    for addr in scribbled_pages {
        vm.memory().write_slice(&[0xcc; 4096], GuestAddress(addr)).expect("scribble memory");
    }
    let conn = vm.vsock().connect(port, 0).expect("a host connection");
    vm.vsock().send(conn, b"leftover").expect("queued data");

    let kind = vm.reset_to(image, true).expect("reset");
    if change_cr0 {
        assert_eq!(kind, ResetKind::Remapped, "a changed CR0 forbids the fast reset");
    } else {
        assert!(matches!(kind, ResetKind::CopiedBack(n) if n >= scribbled_pages.len()), "{kind:?}");
    }

    // Every piece of vCPU state is the image's again.
    let now = &vm.vcpu_states().expect("state")[0];
    assert_eq!(now.regs, saved.regs, "general registers");
    assert_eq!(now.sregs, saved.sregs, "segment, control and descriptor registers");
    assert_eq!(now.xsave, saved.xsave, "FPU/SSE/AVX state");
    assert_eq!(now.xcrs, saved.xcrs, "XCRs");
    assert_eq!(now.debugregs, saved.debugregs, "debug registers");
    assert_eq!(now.events, saved.events, "pending events");
    let unresettable = saved.unresettable_msrs(&image.restore_plans()[0].reset);
    assert!(!unresettable.contains(&KERNEL_GS_BASE));
    for (index, value) in &saved.msrs {
        if unresettable.contains(index) {
            continue;
        }
        let current = now.msrs.iter().find(|(i, _)| i == index).map(|(_, v)| *v);
        assert_eq!(current, Some(*value), "MSR {index:#x}");
    }
    msrs = Msrs::from_entries(&[kvm_msr_entry { index: KERNEL_GS_BASE, ..Default::default() }]).expect("msrs");
    vm.vcpu_fd().get_msrs(&mut msrs).expect("read msr");
    assert_ne!(msrs.as_slice()[0].data, 0x7777_0000, "the scribbled MSR is back");

    // Memory: the pages read like the image again.
    for addr in scribbled_pages {
        let mut now = vec![0u8; 4096];
        vm.memory().read_slice(&mut now, GuestAddress(addr)).expect("read memory");
        assert!(now == image_bytes(image, addr, 4096), "page {addr:#x}");
    }
    // Device state: the transport and vsock device are the image's, no connection survives.
    let encode = |s| postcard::to_stdvec(s).expect("encode");
    assert_eq!(encode(&vm.vsock_state()), encode(&image.state().vsock), "device state");
    assert!(vm.vsock().state(conn).is_none(), "host connections do not survive a reset");

    // And the reset VM serves like a fresh one.
    vm.hand_out(image).expect("hand out");
    let deadline = Some(Instant::now() + TIMEOUT);
    assert_eq!(invoke::invoke(vm, port, b"second", 1 << 20, deadline).expect("second"), b"second");
    assert_eq!(vm.reset_to(image, true).expect("reset"), ResetKind::CopiedBack(vm_written_pages(vm)), "clean again");
}

fn vm_written_pages(vm: &Vm) -> usize {
    vm.private_pages().map(|p| p.len()).unwrap_or(0)
}

#[test]
fn a_reused_vm_looks_new_to_the_guest() {
    let hv = kvm_or_skip!();
    let dir = image_dir("guest");
    let mut config = VmConfig::new(guest("random"));
    config.cmdline = "quiet".into();
    image::create(&hv, &config, &dir, Some(Instant::now() + TIMEOUT)).expect("image");
    let image = Arc::new(Image::load(&hv, &dir).expect("load"));
    let engine = Engine::new(Arc::new(hv), image, EngineConfig { mode: Mode::Reuse, ..EngineConfig::default() });
    let mut generations = Vec::new();
    let mut values = std::collections::HashSet::new();
    for _ in 0..20 {
        let response = String::from_utf8(engine.serve(b"", TIMEOUT).expect("serve").response).expect("utf-8");
        let generation: u64 = response
            .split("\"generation\":")
            .nth(1)
            .and_then(|g| g.trim_end_matches('}').parse().ok())
            .unwrap_or_else(|| panic!("generation in {response}"));
        generations.push(generation);
        assert!(values.insert(response.split('"').nth(3).unwrap_or("").to_string()), "a repeated random value");
    }
    // Each request resumed as a restore (the guest saw RESTORED and read its HostInfo).
    assert!(generations.windows(2).all(|w| w[1] > w[0]), "generations {generations:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Writing a paging or exception structure, or a request that did not end cleanly, makes the
/// reset remap the whole memory file instead of copying pages back.
#[test]
fn a_changed_page_table_or_an_unclean_end_forces_a_full_remap() {
    let hv = kvm_or_skip!();
    let dir = image_dir("structural");
    let mut config = VmConfig::new(guest("echo"));
    config.cmdline = "quiet".into();
    image::create(&hv, &config, &dir, Some(Instant::now() + TIMEOUT)).expect("image");
    let image = Image::load(&hv, &dir).expect("load");
    let structural = image.structural_pages().expect("a native image allows the fast reset").to_vec();
    let cr3 = image.state().vcpus[0].sregs.cr3 & !0xfff;
    assert!(structural.contains(&cr3), "the PML4 is structural");
    let port = image.state().port;

    let mut vm = Vm::restore(&hv, &image).expect("restore");
    for (case, page) in [("page table", cr3), ("exception structures", 0x1000)] {
        vm.hand_out(&image).expect("hand out");
        let deadline = Some(Instant::now() + TIMEOUT);
        assert_eq!(invoke::invoke(&mut vm, port, b"x", 1 << 20, deadline).expect("request"), b"x");
        // A (would-be) hostile request rewrote a structure its successor relies on.
        vm.memory().write_slice(&[0x5a; 64], GuestAddress(page + 0x800)).expect("scribble");
        assert_eq!(vm.reset_to(&image, true).expect("reset"), ResetKind::Remapped, "{case}");
        let mut now = vec![0u8; 4096];
        vm.memory().read_slice(&mut now, GuestAddress(page)).expect("read");
        assert!(now == image_bytes(&image, page, 4096), "{case}: the page is the image's again");
    }
    vm.hand_out(&image).expect("hand out");
    let deadline = Some(Instant::now() + TIMEOUT);
    invoke::invoke(&mut vm, port, b"y", 1 << 20, deadline).expect("request");
    assert_eq!(vm.reset_to(&image, false).expect("reset"), ResetKind::Remapped, "an unclean end");
    vm.hand_out(&image).expect("hand out");
    let deadline = Some(Instant::now() + TIMEOUT);
    assert_eq!(invoke::invoke(&mut vm, port, b"z", 1 << 20, deadline).expect("request"), b"z");
    drop(vm);
    std::fs::remove_dir_all(&dir).ok();
}
