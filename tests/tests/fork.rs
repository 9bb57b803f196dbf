//! Frozen images and forks on real KVM.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mu2_tests::{engine, invoke_cold, kvm_or_skip, make_image, quiet_config, TempDir};
use mu2_vmm::fork::{Engine, EngineConfig, ForkError, Mode};
use mu2_vmm::invoke::{self, InvokeError};
use mu2_vmm::{GuestError, Hypervisor, RunStop, Vm};

const TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn the_frozen_state_round_trips_through_the_image_file() {
    let hv = kvm_or_skip!();
    let mut vm = Vm::boot(&hv, &quiet_config("echo"), Box::new(std::io::sink())).expect("boot");
    invoke::run_until_ready(&mut vm, Some(Instant::now() + TIMEOUT)).expect("ready");
    assert_eq!(vm.run(None).expect("idle"), RunStop::Idle);
    let state = vm.freeze().expect("freeze");
    assert!(matches!(vm.run(None), Err(GuestError::Stopped)), "a frozen VM does not run on");
    let dir = TempDir::new("roundtrip");
    let id =
        mu2_snapshot::write_image(dir.path(), mu2_snapshot::Arch::host(), &state, vm.memory_bytes()).expect("write");
    let (header, read): (_, mu2_vmm::VmState) =
        mu2_snapshot::read_state(dir.path(), mu2_snapshot::Arch::host()).expect("read");
    assert_eq!(header.content_id, id);
    assert_eq!(header.memory_size, read.mem_size);
    let encode = |s| mu2_snapshot::encode_state(mu2_snapshot::Arch::host(), s, vm.memory_bytes()).expect("encode");
    assert_eq!(encode(&read), encode(&state), "every component's state survives the file");
    assert_eq!(read.vcpus, state.vcpus);
    assert!(!read.vcpus[0].msr_indices().is_empty(), "MSRs are saved");
    assert_eq!(read.port, mu2_abi::DEFAULT_PORT);
}

#[test]
fn a_fork_answers_like_a_cold_boot_for_every_example_function() {
    let hv = kvm_or_skip!();
    let cases: &[(&str, &[u8])] = &[
        ("echo", b"the same bytes"),
        ("sha256", b"abc"),
        ("work", b"pages=4 spin_us=50"),
        ("crash", b"ud"),
        ("random", b""),
    ];
    for &(name, request) in cases {
        let cold = invoke_cold(&hv, name, request, TIMEOUT);
        let (_dir, image) = make_image(&hv, name);
        let forked = Engine::new(Arc::new(Hypervisor::open().expect("kvm")), image, EngineConfig::default())
            .serve(request, TIMEOUT);
        match (cold, forked) {
            (Ok(c), Ok(f)) if name == "random" => {
                let keys = |r: &[u8]| -> Vec<String> {
                    String::from_utf8_lossy(r).split('"').skip(1).step_by(2).map(String::from).collect()
                };
                assert_ne!(c, f.response, "random values differ");
                assert!(keys(&c).contains(&"random".to_string()) && keys(&f.response).contains(&"random".to_string()));
            }
            (Ok(c), Ok(f)) => assert_eq!(c, f.response, "{name}"),
            (
                Err(InvokeError::Guest(GuestError::Fault(c))),
                Err(ForkError::Invoke(InvokeError::Guest(GuestError::Fault(f)))),
            ) => {
                assert_eq!((c.vector, c.rip), (f.vector, f.rip), "{name}: the same fault at the same place");
            }
            (c, f) => panic!("{name}: cold {c:?} vs fork {f:?}"),
        }
    }
}

#[test]
fn every_mode_serves_requests() {
    let hv = kvm_or_skip!();
    let (_dir, image) = make_image(&hv, "echo");
    for mode in [Mode::Fresh, Mode::Pool, Mode::Reuse] {
        let engine = engine(image.clone(), mode);
        let mut ids = HashSet::new();
        for i in 0..20 {
            let request = format!("{mode:?} request {i}");
            let served = engine.serve(request.as_bytes(), TIMEOUT).unwrap_or_else(|e| panic!("{mode:?} {i}: {e}"));
            assert_eq!(served.response, request.as_bytes());
            assert!(ids.insert(served.vm_id), "{mode:?}: every request gets its own VM identity");
        }
    }
    drop(hv);
}

#[test]
fn a_guest_failure_in_a_fork_leaves_the_engine_serving() {
    let hv = kvm_or_skip!();
    let (_dir, image) = make_image(&hv, "crash");
    for mode in [Mode::Fresh, Mode::Reuse, Mode::Pool] {
        let engine = engine(image.clone(), mode);
        for _ in 0..3 {
            match engine.serve(b"pf", TIMEOUT) {
                Err(ForkError::Invoke(e)) => assert!(e.is_guest_crash(), "{mode:?}: {e}"),
                other => panic!("{mode:?}: expected a crash, got {other:?}"),
            }
        }
    }
    drop(hv);
}

fn random_value(response: &[u8]) -> (String, u64) {
    let text = String::from_utf8_lossy(response).into_owned();
    let field = |key: &str| -> String {
        let start = text.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("{key} in {text}")) + key.len() + 3;
        text[start..].split([',', '}']).next().unwrap_or("").trim_matches('"').to_string()
    };
    (field("random"), field("unix_time_ns").parse().expect("a number"))
}

#[test]
fn a_hundred_forks_draw_a_hundred_different_values_and_know_the_time() {
    let hv = kvm_or_skip!();
    let (_dir, image) = make_image(&hv, "random");
    for mode in [Mode::Fresh, Mode::Pool, Mode::Reuse] {
        let engine = engine(image.clone(), mode);
        let mut seen = HashSet::new();
        for _ in 0..100 {
            let served = engine.serve(b"", TIMEOUT).expect("random answers");
            let (value, guest_ns) = random_value(&served.response);
            assert_eq!(value.len(), 64, "32 random bytes in hex");
            assert!(seen.insert(value), "{mode:?}: a fork repeated another fork's random value");
            let host_ns = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_nanos() as u64;
            let skew = host_ns.abs_diff(guest_ns);
            assert!(skew < 1_000_000_000, "{mode:?}: the fork's clock is {skew} ns off the host's");
        }
    }
    drop(hv);
}

#[test]
fn bad_images_are_refused_with_the_problem_named() {
    let hv = kvm_or_skip!();
    mu2_tests::bad_images_are_refused(&hv);
}
