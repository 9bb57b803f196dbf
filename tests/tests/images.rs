//! Images that move between hosts, on real KVM with real guests: packs carry an image and its
//! content id, and an image keeps the readiness flags its guest announced.

use std::sync::Arc;
use std::time::Duration;

use mu2_tests::{kvm_or_skip, make_image, TempDir};
use mu2_vmm::error::{error_chain, Classify, FailureKind};
use mu2_vmm::fork::{Engine, EngineConfig, Mode};
use mu2_vmm::image::{self, Image};
use mu2_vmm::Hypervisor;

const TIMEOUT: Duration = Duration::from_secs(20);

/// One echo request on a VM forked from `dir`.
fn echo(dir: &std::path::Path) -> Vec<u8> {
    let hv = Arc::new(Hypervisor::open().expect("kvm"));
    let image = Arc::new(Image::load(&hv, dir).expect("the image loads"));
    let engine = Engine::new(hv, image, EngineConfig { mode: Mode::Fresh, ..EngineConfig::default() });
    engine.serve(b"moved", TIMEOUT).expect("a request is served").response
}

#[test]
fn a_packed_image_unpacks_to_the_same_content_and_serves() {
    let hv = kvm_or_skip!();
    let (dir, image) = make_image(&hv, "echo");
    let scratch = TempDir::new("packs");
    let file = scratch.path().join("echo.pack");
    let summary = image::pack(dir.path(), &file).expect("pack");
    assert_eq!(summary.content_id, image.content_id());
    assert!(summary.pack_bytes < summary.data_bytes, "compressed: {summary:?}");
    assert!(summary.data_bytes < 4 << 20, "only data pages are stored: {summary:?}");

    let moved = scratch.path().join("moved");
    let info = image::unpack(&file, &moved).expect("unpack");
    assert_eq!(info.content_id, image.content_id());
    assert_eq!(image::verify(&moved).expect("verify"), image.content_id());
    let memory = std::fs::metadata(moved.join(mu2_snapshot::MEMORY_FILE)).expect("memory");
    assert_eq!(memory.len(), 64 << 20);
    let allocated = std::os::unix::fs::MetadataExt::blocks(&memory) * 512;
    assert!(allocated < 8 << 20, "the unpacked memory is sparse: {allocated} bytes allocated");
    assert_eq!(echo(&moved), b"moved");

    // A corrupted pack is bad input and leaves nothing behind.
    let mut bytes = std::fs::read(&file).expect("pack");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&file, &bytes).expect("write");
    let again = scratch.path().join("again");
    let error = image::unpack(&file, &again).expect_err("a corrupt pack unpacked");
    assert_eq!(error.kind(), FailureKind::BadInput, "{}", error_chain(&error));
    assert!(!again.exists());
}

#[test]
fn an_image_keeps_the_readiness_flags_its_guest_announced() {
    let hv = kvm_or_skip!();
    let (_http_dir, http) = make_image(&hv, "hello-http");
    assert!(http.info().http());
    assert_eq!(http.info().ready_flag_names(), ["http"]);
    let (_echo_dir, echo) = make_image(&hv, "echo");
    assert!(!echo.info().http());
    assert_eq!(echo.state().ready_info().flags, 0);
}
