//! The fuzz targets' corpus (fuzz/corpus/<target>/) as a regression suite: every input, the
//! committed seeds and any crash a fuzz run found (which goes there with a name saying what it
//! found), runs through its target's entry point on every `cargo test`, without cargo fuzz.

use std::path::Path;

fn each_input(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        run(&bytes);
        inputs += 1;
    }
    assert!(inputs >= 4, "{target}: a handful of inputs, found {inputs}");
}

#[test]
fn vsock_queues() {
    each_input("vsock_queues", mu2_devices::fuzzing::vsock_queues);
}

#[test]
fn mmio_registers() {
    each_input("mmio_registers", mu2_devices::fuzzing::mmio_registers);
}

#[test]
fn image_state() {
    each_input("image_state", mu2_vmm::fuzzing::image_state);
}

#[test]
fn http_request() {
    each_input("http_request", mu2_vmm::fuzzing::http_request);
}

#[test]
fn dispatch_response() {
    each_input("dispatch_response", mu2_vmm::fuzzing::dispatch_response);
}
