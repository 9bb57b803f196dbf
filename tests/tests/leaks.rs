//! Resource leaks over many forks. A test binary of its own: other tests running in the same
//! process would open and close descriptors and move RSS while this one counts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mu2_tests::{guest, kvm_or_skip};
use mu2_vmm::fork::{Engine, EngineConfig, Mode};
use mu2_vmm::image::{self, Image};
use mu2_vmm::VmConfig;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Open file descriptors of this process. Panics where /proc cannot be read: counting zero
/// before and after would pass without measuring anything.
fn open_fds() -> usize {
    let count = std::fs::read_dir("/proc/self/fd").expect("reading /proc/self/fd").count();
    // At least stdin, stdout, stderr and the directory being read.
    assert!(count >= 3, "/proc/self/fd lists only {count} descriptors");
    count
}

/// Resident memory of this process in KiB; panics where it cannot be read, for the same
/// reason.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    assert!(rss > 0, "VmRSS of 0 kB");
    rss
}

// One test function: two running in parallel in this process would disturb each other's counts.
#[test]
fn a_thousand_forks_and_a_thousand_reused_requests_leak_nothing() {
    fresh_forks_leak_nothing();
    reused_requests_leak_nothing();
}

fn fresh_forks_leak_nothing() {
    let hv = kvm_or_skip!();
    let dir = std::env::temp_dir().join(format!("mu2-test-leaks-{}", std::process::id()));
    let mut config = VmConfig::new(guest("echo"));
    config.cmdline = "quiet".into();
    image::create(&hv, &config, &dir, Some(Instant::now() + TIMEOUT)).expect("image");
    let image = Arc::new(Image::load(&hv, &dir).expect("image loads"));
    let hv = Arc::new(hv);
    // Warm up: the first forks allocate what the process keeps (thread stacks, caches).
    {
        let engine = Engine::new(hv.clone(), image.clone(), EngineConfig::default());
        for _ in 0..50 {
            engine.serve(b"warm", TIMEOUT).expect("serve");
        }
    }
    let (fds_before, rss_before) = (open_fds(), rss_kib());
    {
        let engine = Engine::new(hv.clone(), image.clone(), EngineConfig::default());
        for i in 0..1000 {
            let served = engine.serve(b"leak?", TIMEOUT).unwrap_or_else(|e| panic!("fork {i}: {e}"));
            assert_eq!(served.response, b"leak?");
        }
        // Dropping the engine joins its reaper: every VM is destroyed.
    }
    let (fds_after, rss_after) = (open_fds(), rss_kib());
    assert_eq!(fds_after, fds_before, "file descriptors after 1000 forks");
    std::fs::remove_dir_all(&dir).ok();
    // Each leaked VM would hold at least its vCPU mapping and kernel objects; allow the
    // allocator some slack, far below what 1000 VMs would leak.
    assert!(rss_after < rss_before + 8 * 1024, "RSS grew from {rss_before} KiB to {rss_after} KiB over 1000 forks");
}

fn reused_requests_leak_nothing() {
    let hv = kvm_or_skip!();
    let dir = std::env::temp_dir().join(format!("mu2-test-leaks-reuse-{}", std::process::id()));
    let mut config = VmConfig::new(guest("echo"));
    config.cmdline = "quiet".into();
    image::create(&hv, &config, &dir, Some(Instant::now() + TIMEOUT)).expect("image");
    let image = Arc::new(Image::load(&hv, &dir).expect("image loads"));
    let hv = Arc::new(hv);
    // At most one VM kept (requests wait for its reset): how many VMs reuse mode keeps
    // otherwise depends on how far the resetter lags, so any growth here is a leak.
    let engine = Engine::new(hv, image, EngineConfig { mode: Mode::Reuse, pool_size: 1, ..EngineConfig::default() });
    for _ in 0..50 {
        engine.serve(b"warm", TIMEOUT).expect("serve");
    }
    // Count while no reset runs: a reset briefly opens /proc/self/pagemap.
    assert!(engine.wait_for_resets(TIMEOUT));
    let (fds_before, rss_before) = (open_fds(), rss_kib());
    for i in 0..1000 {
        let served = engine.serve(b"again", TIMEOUT).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(served.response, b"again");
    }
    assert!(engine.wait_for_resets(TIMEOUT));
    let (fds_after, rss_after) = (open_fds(), rss_kib());
    drop(engine);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(fds_after, fds_before, "file descriptors after 1000 reused requests");
    assert!(rss_after < rss_before + 8 * 1024, "RSS grew from {rss_before} KiB to {rss_after} KiB");
}
