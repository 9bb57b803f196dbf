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

/// A scratch directory of one test, removed when it ends; traversable by everyone, since the
/// sandboxed daemon runs as `nobody` and must reach its socket here. (Not every test binary
/// that includes this module uses it.)
#[allow(dead_code)]
pub struct Scratch(std::path::PathBuf);

#[allow(dead_code)]
impl Scratch {
    /// `$TMPDIR/mu2-SUITE-TAG-PID`, made empty.
    pub fn new(suite: &str, tag: &str) -> Scratch {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mu2-{suite}-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Scratch(dir)
    }

    /// `name` in it.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
