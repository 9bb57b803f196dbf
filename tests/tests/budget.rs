//! One VM budget shared by engines of every mode, on real KVM: what each counts, who gives
//! VMs back to a waiting request, and what a request gets when there is no room.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mu2_tests::{kvm_or_skip, make_image, TempDir};
use mu2_vmm::budget::{Limits, VmBudget};
use mu2_vmm::error::{Classify, FailureKind};
use mu2_vmm::fork::{Engine, EngineConfig, ForkError, Mode};
use mu2_vmm::Hypervisor;

const TIMEOUT: Duration = Duration::from_secs(20);

fn budget(max_vms: usize) -> Arc<VmBudget> {
    VmBudget::new(Limits { max_vms, max_memory: u64::MAX, max_response_bytes: usize::MAX })
}

/// An engine of a new image of guest `name` on `budget`, and the image's directory.
fn started(
    hv: &Arc<Hypervisor>,
    name: &str,
    mode: Mode,
    pool_size: usize,
    budget: &Arc<VmBudget>,
) -> (TempDir, Engine) {
    let (dir, image) = make_image(hv, name);
    let config = EngineConfig { mode, pool_size, pool_builders: 1, ..EngineConfig::default() };
    (dir, Engine::with_budget(hv.clone(), image, config, budget.clone()))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_full_pool_gives_a_vm_back_to_another_engines_request_and_keeps_one() {
    let hv = Arc::new(kvm_or_skip!());
    let budget = budget(3);
    let (_pooled_dir, pooled) = started(&hv, "echo", Mode::Pool, 2, &budget);
    // Two pooled VMs; the builder leaves the third for requests.
    wait_until("the pool to fill", || pooled.pool_depth() == 2);
    assert_eq!(budget.usage().vms, 2);
    // Another live VM takes that last one...
    let other = budget.take_within(0, Duration::ZERO).expect("the last VM");
    let (_fresh_dir, fresh) = started(&hv, "echo", Mode::Fresh, 1, &budget);
    // ...so a fresh request waits, and the pool gives one of its two back.
    let served = fresh.serve(b"room was made", TIMEOUT).expect("a VM given back by the pool");
    assert_eq!(served.response, b"room was made");
    assert_eq!(pooled.pool_depth(), 1, "the pool gave one VM, and keeps its last");
    assert!(budget.usage().vms <= 3, "{:?}", budget.usage());
    // The pooled image still serves from what it kept.
    drop(other);
    assert_eq!(pooled.serve(b"still pooled", TIMEOUT).expect("pooled").response, b"still pooled");
}

#[test]
fn a_pool_request_with_the_pool_empty_restores_now_or_is_refused_at_once() {
    let hv = Arc::new(kvm_or_skip!());
    let budget = budget(1);
    // Every VM of the budget is held elsewhere: the builder can make none.
    let held = budget.take_within(0, Duration::ZERO).expect("the only VM");
    let (_pooled_dir, pooled) = started(&hv, "echo", Mode::Pool, 1, &budget);
    let start = Instant::now();
    let refused = pooled.serve(b"no room", TIMEOUT).expect_err("no VM can be made");
    assert!(matches!(refused, ForkError::Budget(_)), "{refused:?}");
    assert_eq!(refused.kind(), FailureKind::ResourceExhausted);
    assert!(start.elapsed() < TIMEOUT, "refused after the admission wait, not after the request's deadline");
    drop(held);
    // Room again: served, from the pool or restored on the spot.
    assert_eq!(pooled.serve(b"room", TIMEOUT).expect("served").response, b"room");
}

#[test]
fn reuse_modes_idle_vms_are_given_back_to_a_waiting_request() {
    let hv = Arc::new(kvm_or_skip!());
    let budget = budget(2);
    let (_reused_dir, reused) = started(&hv, "work", Mode::Reuse, 2, &budget);
    let reused = Arc::new(reused);
    // Two requests at once keep two VMs.
    let both: Vec<_> = (0..2)
        .map(|_| {
            let reused = reused.clone();
            std::thread::spawn(move || reused.serve(b"spin_us=300000", TIMEOUT).map(|s| s.vm_id))
        })
        .collect();
    let ids: Vec<u64> = both.into_iter().map(|t| t.join().expect("thread").expect("served")).collect();
    assert_ne!(ids[0], ids[1], "two VMs were kept");
    assert!(reused.wait_for_resets(TIMEOUT));
    assert_eq!(budget.usage().vms, 2);
    // A fresh request of another image: the reuse engine gives one idle VM back.
    let (_fresh_dir, fresh) = started(&hv, "echo", Mode::Fresh, 1, &budget);
    assert_eq!(fresh.serve(b"from a kept VM's room", TIMEOUT).expect("served").response, b"from a kept VM's room");
    assert!(budget.usage().vms <= 2, "{:?}", budget.usage());
    reused.serve(b"pages=1", TIMEOUT).expect("the kept VM still serves");
}
