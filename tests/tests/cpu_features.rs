//! The CPU features an image needs, on real KVM with real guests: refused for real through a
//! hypervisor handle that lacks some, CPU templates, and the record checked as untrusted input.
//! x86_64 only: aarch64 images record no CPU features yet (see `arch/aarch64/features.rs`).

#![cfg(target_arch = "x86_64")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use mu2_tests::{kvm_or_skip, make_image, quiet_config, TempDir};
use mu2_vmm::error::{error_chain, Classify, FailureKind};
use mu2_vmm::fork::{Engine, EngineConfig, Mode};
use mu2_vmm::image::{self, Image, ImageError, ImageInfo};
use mu2_vmm::{CpuTemplate, Hypervisor};

const TIMEOUT: Duration = Duration::from_secs(20);

/// Freezes `name` with `template` into a new directory.
fn image_with(hv: &Hypervisor, name: &str, template: CpuTemplate) -> TempDir {
    let dir = TempDir::new(name);
    let mut config = quiet_config(name);
    config.cpu_template = template;
    image::create(hv, &config, dir.path(), Some(Instant::now() + TIMEOUT)).expect("image");
    dir
}

/// One echo request on a VM forked from `dir`, through `hv`.
fn echo_through(hv: Hypervisor, dir: &std::path::Path) -> Vec<u8> {
    let hv = Arc::new(hv);
    let image = Arc::new(Image::load(&hv, dir).expect("the image loads"));
    let engine = Engine::new(hv, image, EngineConfig { mode: Mode::Fresh, ..EngineConfig::default() });
    engine.serve(b"moved", TIMEOUT).expect("a request is served").response
}

#[test]
fn an_image_needs_the_cpu_features_its_guest_saw_and_a_host_without_them_refuses_it() {
    let hv = kvm_or_skip!();
    let host = image_with(&hv, "echo", CpuTemplate::Host);
    let baseline = image_with(&hv, "echo", CpuTemplate::Baseline);
    let host_info = ImageInfo::read(host.path()).expect("info");
    let baseline_info = ImageInfo::read(baseline.path()).expect("info");
    assert_eq!((host_info.cpu_template, baseline_info.cpu_template), (CpuTemplate::Host, CpuTemplate::Baseline));
    for feature in ["sse2", "cx16", "sse4_2", "popcnt", "lm"] {
        assert!(baseline_info.cpu_features.iter().any(|f| f == feature), "baseline lacks {feature}");
    }
    // What the host image needs beyond the baseline one: what the template hid from the guest
    // (AVX and friends under hardware KVM; on PVM, which shows guests the hardware's features
    // whatever the VMM sets, only the features KVM itself adds, such as x2apic).
    let needed: Vec<String> =
        host_info.cpu_features.iter().filter(|f| !baseline_info.cpu_features.contains(f)).cloned().collect();
    assert!(!needed.is_empty(), "the baseline template hid nothing: {:?}", baseline_info.cpu_features);
    assert!(
        baseline_info.cpu_features.iter().all(|f| host_info.cpu_features.contains(f)),
        "the baseline guest saw features the host guest did not"
    );

    // A host that lacks them refuses the host image, naming exactly them...
    let names: Vec<&str> = needed.iter().map(String::as_str).collect();
    let lacking = Hypervisor::open().expect("kvm").without_cpu_features(&names).expect("known names");
    let error = Image::load(&lacking, host.path()).expect_err("an image needing missing features loaded");
    assert_eq!(error.kind(), FailureKind::BadInput);
    let ImageError::CpuIncompatible { missing, .. } = &error else { panic!("{}", error_chain(&error)) };
    assert_eq!(missing, &needed);
    let text = error_chain(&error);
    assert!(text.contains(&format!("needs {}; this host lacks", needed.join(", "))), "{text}");
    // ...while the baseline image loads there and serves.
    assert_eq!(echo_through(lacking, baseline.path()), b"moved");
    assert_eq!(echo_through(Hypervisor::open().expect("kvm"), host.path()), b"moved");

    // A feature both need: both are refused.
    let no_sse2 = Hypervisor::open().expect("kvm").without_cpu_features(&["sse2"]).expect("known name");
    for dir in [&host, &baseline] {
        match Image::load(&no_sse2, dir.path()) {
            Err(ImageError::CpuIncompatible { missing, .. }) => assert_eq!(missing, ["sse2"]),
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(
        Hypervisor::open().expect("kvm").without_cpu_features(&["warp_drive"]),
        Err(mu2_vmm::HypervisorError::Arch(_))
    ));
}

#[test]
fn a_cpu_record_that_does_not_match_the_vcpus_is_refused() {
    let hv = kvm_or_skip!();
    let (dir, image) = make_image(&hv, "echo");
    let memory = std::fs::read(dir.path().join(mu2_snapshot::MEMORY_FILE)).expect("memory");
    let rewrite = |state: &mu2_vmm::VmState| {
        mu2_snapshot::write_image(dir.path(), mu2_snapshot::Arch::host(), state, &memory).expect("write");
    };
    let refused = || match Image::load(&hv, dir.path()) {
        Err(e @ ImageError::CpuRecord { .. }) => {
            assert_eq!(e.kind(), FailureKind::BadInput);
            error_chain(&e)
        }
        other => panic!("{other:?}"),
    };

    // A record that hides a feature the guest's CPUID table shows: the image would load on a
    // host without it, so it is refused.
    let mut state = image.state().clone();
    let real = state.cpu_features;
    state.cpu_features = real.without(&["sse2"]).expect("known name");
    rewrite(&state);
    assert!(refused().contains("CPU features are not those of vCPU 0"));
    // A table changed under the record, the same.
    let mut state = image.state().clone();
    state.vcpus[0].cpuid.retain(|e| e.function != 1);
    rewrite(&state);
    refused();
    // Restored, it loads again.
    rewrite(image.state());
    Image::load(&hv, dir.path()).expect("loads");
}
