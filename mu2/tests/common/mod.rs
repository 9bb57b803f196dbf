//! What the `mu2` binary's integration tests share.

/// Whether /dev/kvm can be opened. Where it cannot, the calling test is skipped with a message,
/// unless `MU2_REQUIRE_KVM=1` (CI), where that is a failure.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("MU2_REQUIRE_KVM").is_ok_and(|v| v == "1") {
                panic!("{test}: KVM is required (MU2_REQUIRE_KVM=1) but /dev/kvm cannot be opened: {e}");
            }
            eprintln!("SKIPPED {test}: needs /dev/kvm ({e}); set MU2_REQUIRE_KVM=1 to make this a failure");
            false
        }
    }
}

/// `kvm_or_skip!();` at the top of a test that needs KVM.
#[macro_export]
macro_rules! kvm_or_skip {
    () => {
        if !common::kvm_available(module_path!()) {
            return;
        }
    };
}
