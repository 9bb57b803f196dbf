//! Shared helpers for mu2's integration tests.
//!
//! Every test that needs KVM starts with [`kvm_or_skip!`]: where /dev/kvm cannot be opened the
//! test says why and passes as skipped, unless `MU2_REQUIRE_KVM=1` (set by CI), where a
//! missing KVM fails the test instead.

use mu2_vmm::Hypervisor;

/// Opens KVM, or decides that the calling test is skipped (returns `None`).
///
/// # Panics
/// When KVM is unavailable and `MU2_REQUIRE_KVM=1`.
pub fn kvm_or_skip(test: &str) -> Option<Hypervisor> {
    match Hypervisor::open() {
        Ok(hv) => Some(hv),
        Err(e) => {
            if std::env::var("MU2_REQUIRE_KVM").is_ok_and(|v| v == "1") {
                panic!("{test}: KVM is required (MU2_REQUIRE_KVM=1) but unavailable: {e}");
            }
            eprintln!("SKIPPED {test}: needs /dev/kvm ({e}); set MU2_REQUIRE_KVM=1 to make this a failure");
            None
        }
    }
}

/// `let hv = kvm_or_skip!();` at the top of a KVM test.
#[macro_export]
macro_rules! kvm_or_skip {
    () => {
        match $crate::kvm_or_skip(module_path!()) {
            Some(hv) => hv,
            None => return,
        }
    };
}

/// Path of the `mu2` binary built for these tests.
pub fn mu2_binary() -> std::path::PathBuf {
    // Integration tests live in target/<profile>/deps; the binary is one level up.
    let mut path = std::env::current_exe().expect("test binary path");
    path.pop();
    if path.ends_with("deps") {
        path.pop();
    }
    path.join("mu2")
}

use std::time::{Duration, Instant};

use mu2_devices::serial::SharedBuffer;
use mu2_vmm::invoke::{self, InvokeError};
use mu2_vmm::EntryMode;
use mu2_vmm::{guests, Vm, VmConfig};

/// A built-in guest's bytes.
///
/// # Panics
/// If the guest was not built into the VMM.
pub fn guest(name: &str) -> &'static [u8] {
    guests::find(name).unwrap_or_else(|| panic!("guest `{name}` is not embedded"))
}

/// Boots `name` with its console captured.
pub fn boot(hv: &Hypervisor, name: &str, entry: EntryMode, cmdline: &str) -> (Vm, SharedBuffer) {
    let mut config = VmConfig::new(guest(name));
    config.entry = entry;
    config.cmdline = cmdline.to_string();
    let console = SharedBuffer::new();
    let vm = Vm::boot(hv, &config, Box::new(console.clone())).expect("VM boots");
    (vm, console)
}

/// Cold-boots `name`, waits until it is ready, sends `request`, returns its response.
pub fn invoke_cold(hv: &Hypervisor, name: &str, request: &[u8], timeout: Duration) -> Result<Vec<u8>, InvokeError> {
    invoke_cold_with(hv, name, EntryMode::Native, request, timeout)
}

/// [`invoke_cold`] with a chosen entry mode.
pub fn invoke_cold_with(
    hv: &Hypervisor,
    name: &str,
    entry: EntryMode,
    request: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, InvokeError> {
    let (mut vm, _console) = boot(hv, name, entry, "quiet");
    let deadline = Some(Instant::now() + timeout);
    let ready = invoke::run_until_ready(&mut vm, deadline)?;
    invoke::invoke(&mut vm, ready.port, request, invoke::DEFAULT_MAX_RESPONSE, deadline)
}

/// A temporary directory, removed when dropped.
#[derive(Debug)]
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// A new, empty directory whose name contains `tag`.
    ///
    /// # Panics
    /// If the directory cannot be created.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mu2-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The built-in guest `name` with 64 MiB, quiet.
pub fn quiet_config(name: &str) -> VmConfig {
    let mut config = VmConfig::new(guest(name));
    config.cmdline = "quiet".into();
    config
}

/// Freezes `name` into a temporary image and loads it.
///
/// # Panics
/// If the image cannot be made or loaded.
pub fn make_image(hv: &Hypervisor, name: &str) -> (TempDir, std::sync::Arc<mu2_vmm::image::Image>) {
    let dir = TempDir::new(name);
    let deadline = Some(Instant::now() + Duration::from_secs(30));
    mu2_vmm::image::create(hv, &quiet_config(name), dir.path(), deadline).expect("image");
    let image = mu2_vmm::image::Image::load(hv, dir.path()).expect("image loads");
    (dir, std::sync::Arc::new(image))
}

/// A fork engine for `image` in `mode`, with its own KVM handle and a pool of 4.
///
/// # Panics
/// If KVM cannot be opened.
pub fn engine(image: std::sync::Arc<mu2_vmm::image::Image>, mode: mu2_vmm::fork::Mode) -> mu2_vmm::fork::Engine {
    let hv = Hypervisor::open().expect("kvm");
    let config = mu2_vmm::fork::EngineConfig { mode, pool_size: 4, ..mu2_vmm::fork::EngineConfig::default() };
    mu2_vmm::fork::Engine::new(std::sync::Arc::new(hv), image, config)
}

/// Every kind of bad image is refused with an error that names the problem, and the VMM goes
/// on serving: a corrupt state file, a truncated one, an image of the other architecture, a
/// memory file of the wrong size, a missing memory file. Shared by both architectures' suites.
///
/// # Panics
/// When an image is accepted or an error does not name its problem.
pub fn bad_images_are_refused(hv: &Hypervisor) {
    use mu2_snapshot::Arch;
    use mu2_vmm::image::{Image, ImageError};
    let (dir, _image) = make_image(hv, "echo");
    let path = dir.path();
    let state = std::fs::read(path.join("state")).expect("state file");
    let load_error = |what: &str| -> String {
        match Image::load(hv, path) {
            Err(e) => mu2_vmm::error::error_chain(&e),
            Ok(_) => panic!("{what}: a bad image loaded"),
        }
    };

    let mut corrupt = state.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    std::fs::write(path.join("state"), &corrupt).expect("write");
    let text = load_error("corrupt");
    assert!(text.to_lowercase().contains("checksum"), "{text}");

    std::fs::write(path.join("state"), &state[..20]).expect("write");
    let text = load_error("truncated");
    assert!(text.contains("truncated") || text.contains("short"), "{text}");

    let other = match Arch::host() {
        Arch::X86_64 => Arch::Aarch64,
        Arch::Aarch64 => Arch::X86_64,
    };
    let mut other_arch = state.clone();
    other_arch[..8].copy_from_slice(&other.magic());
    std::fs::write(path.join("state"), &other_arch).expect("write");
    let text = load_error("other architecture");
    assert!(text.contains(other.name()), "{text}");

    // A well-formed state whose vCPU claims another index: every fork would fail creating it.
    let (_, mut renumbered): (_, mu2_vmm::VmState) = {
        std::fs::write(path.join("state"), &state).expect("write");
        mu2_snapshot::read_state(path, Arch::host()).expect("read")
    };
    renumbered.vcpus[0].index = 1;
    let memory_bytes = std::fs::read(path.join("memory")).expect("memory");
    let encoded = mu2_snapshot::encode_state(Arch::host(), &renumbered, &memory_bytes).expect("encode");
    std::fs::write(path.join("state"), &encoded).expect("write");
    let text = load_error("vCPU index");
    assert!(text.contains("vCPU 0 is saved with index 1"), "{text}");

    std::fs::write(path.join("state"), &state).expect("write");
    let memory = std::fs::OpenOptions::new().write(true).open(path.join("memory")).expect("memory");
    memory.set_len(32 << 20).expect("truncate memory");
    let text = load_error("memory size");
    assert!(text.contains("33554432") && text.contains("67108864"), "{text}");

    std::fs::remove_file(path.join("memory")).expect("remove");
    assert!(matches!(Image::load(hv, path), Err(ImageError::Snapshot { .. })));

    // The VMM is unharmed.
    assert_eq!(invoke_cold(hv, "echo", b"fine", Duration::from_secs(30)).expect("echo"), b"fine");
}
