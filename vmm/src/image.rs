//! Frozen images: a booted guest, frozen when it is ready, stored as a state file and a
//! memory file (see docs/image-format.md), and loaded once to serve many forks; what an image
//! says about itself ([`ImageInfo`]: its content id, CPU features, readiness flags); and packs,
//! which move an image between hosts as one file.
//!
//! What is checked when: [`Image::load`] (the request path) checks the state file's header and
//! CRC, the recorded CPU features against the vCPUs' CPUID tables and against this host's, and
//! the memory file's size, but takes the content id as recorded. [`verify`] and [`unpack`]
//! recompute the content id from every data page.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub use mu2_snapshot::{ContentId, PackSummary};

use crate::arch::{self, CpuId, RestorePlan, VcpuState};
use crate::cpu::CpuTemplate;
use crate::hypervisor::Hypervisor;
use crate::invoke::{self, InvokeError};
use crate::vm::{BuildError, FreezeError, GuestError, RunStop, Vm, VmConfig, VmState};
use mu2_abi::ReadyInfo;
use mu2_snapshot::StateHeader;

/// Errors making or loading an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Booting the guest failed.
    #[error("booting the guest")]
    Build(#[from] BuildError),
    /// The guest did not become ready.
    #[error("the guest did not become ready")]
    Boot(#[source] InvokeError),
    /// The guest did something other than wait after becoming ready.
    #[error("the guest did not settle into waiting after becoming ready (it stopped with {stop:?})")]
    NotIdle {
        /// How it stopped instead.
        stop: RunStop,
    },
    /// The guest failed after becoming ready.
    #[error("the guest failed after becoming ready")]
    Settle(#[source] GuestError),
    /// Freezing failed.
    #[error("freezing the guest")]
    Freeze(#[from] FreezeError),
    /// The image could not be written or read.
    #[error("image {path}")]
    Snapshot {
        /// The image directory.
        path: PathBuf,
        /// What went wrong (boxed: it is large, and errors travel by value).
        #[source]
        source: Box<mu2_snapshot::SnapshotError>,
    },
    /// The image's state is inconsistent.
    #[error("image {path}: {reason}")]
    Invalid {
        /// The image directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The image's CPU record does not agree with its vCPUs' state.
    #[error("image {path}: its CPU record is inconsistent")]
    CpuRecord {
        /// The image directory.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: arch::ArchError,
    },
    /// This host lacks CPU features the image's guest saw (and may use).
    #[error(
        "image {path} needs {}; this host lacks {}",
        missing.join(", "),
        if missing.len() == 1 { "it" } else { "them" }
    )]
    CpuIncompatible {
        /// The image directory.
        path: PathBuf,
        /// The features, by name.
        missing: Vec<String>,
    },
    /// The image could not be packed.
    #[error("packing image {path}")]
    Pack {
        /// The image directory.
        path: PathBuf,
        /// Why (boxed: it is large).
        #[source]
        source: Box<mu2_snapshot::PackError>,
    },
    /// The pack could not be unpacked.
    #[error("unpacking {path}")]
    Unpack {
        /// The pack file.
        path: PathBuf,
        /// Why (boxed: it is large).
        #[source]
        source: Box<mu2_snapshot::PackError>,
    },
    /// KVM refused something while preparing restores.
    #[error("preparing restores")]
    Arch(#[source] arch::ArchError),
}

/// Boots `config`, waits until the guest is ready and idle, freezes it and writes the image
/// to `dir` (see [`Image`] for an example). Returns what the guest reported when it became
/// ready (its port, receive buffer and capability flags, which the image records too).
pub fn create(
    hv: &Hypervisor,
    config: &VmConfig,
    dir: &Path,
    deadline: Option<Instant>,
) -> Result<ReadyInfo, ImageError> {
    let mut vm = Vm::boot(hv, config, Box::new(std::io::sink()))?;
    let ready = invoke::run_until_ready(&mut vm, deadline).map_err(ImageError::Boot)?;
    match vm.run(deadline) {
        Ok(RunStop::Idle) => {}
        Ok(stop) => return Err(ImageError::NotIdle { stop }),
        Err(e) => return Err(ImageError::Settle(e)),
    }
    let state = vm.freeze()?;
    mu2_snapshot::write_image(dir, mu2_snapshot::Arch::host(), &state, vm.frozen_memory())
        .map_err(|source| ImageError::Snapshot { path: dir.to_path_buf(), source: Box::new(source) })?;
    Ok(ready)
}

/// What restoring one vCPU takes, prepared once per image.
#[derive(Debug)]
pub struct VcpuRestore {
    /// The CPUID table.
    pub cpuid: CpuId,
    /// What differs from a fresh vCPU.
    pub plan: RestorePlan,
    /// Everything that can be put back into a used vCPU (reuse mode).
    pub reset: RestorePlan,
}

/// A loaded image, ready to restore VMs from.
///
/// ```no_run
/// use std::time::{Duration, Instant};
/// use mu2_vmm::image::{self, Image};
/// use mu2_vmm::{guests, Hypervisor, VmConfig};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let hv = Hypervisor::open()?;
/// let dir = std::path::Path::new("/tmp/echo.img");
/// // Boot the built-in echo guest once and freeze it when it is ready...
/// let elf = guests::find("echo").ok_or("no echo guest")?;
/// image::create(&hv, &VmConfig::new(elf), dir, Some(Instant::now() + Duration::from_secs(30)))?;
/// // ...then load the image, once, to serve many forks (see `fork::Engine`).
/// let image = Image::load(&hv, dir)?;
/// println!("{} MiB of guest memory", image.state().mem_size >> 20);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Image {
    dir: PathBuf,
    header: StateHeader,
    state: VmState,
    memory: File,
    restores: Vec<VcpuRestore>,
    msr_indices: Vec<u32>,
    /// Sorted; `None` when the image is not confined to CPL 3 (no fast reset).
    structural_pages: Option<Vec<u64>>,
    generation: AtomicU64,
}

impl Image {
    /// Reads and validates the image in `dir`, checks that this host has the CPU features it
    /// needs, and works out the cheapest restore. The content id is taken as recorded (the
    /// header's CRC covers it); [`verify`] recomputes it.
    pub fn load(hv: &Hypervisor, dir: &Path) -> Result<Image, ImageError> {
        let snapshot = |source| ImageError::Snapshot { path: dir.to_path_buf(), source: Box::new(source) };
        let invalid = |reason: String| ImageError::Invalid { path: dir.to_path_buf(), reason };
        let (header, state): (_, VmState) =
            mu2_snapshot::read_state(dir, mu2_snapshot::Arch::host()).map_err(snapshot)?;
        validate(dir, &header, &state)?;
        if state.vcpus.len() > hv.max_vcpus() {
            return Err(invalid(format!("{} vCPUs (this host allows 1 to {})", state.vcpus.len(), hv.max_vcpus())));
        }
        let missing = state.cpu_features.missing_on(hv.cpu_features());
        if !missing.is_empty() {
            return Err(ImageError::CpuIncompatible { path: dir.to_path_buf(), missing });
        }
        let memory = mu2_snapshot::open_memory(dir, state.mem_size).map_err(snapshot)?;
        let restores = Self::plan(hv, &state)?;
        let structural_pages = {
            use std::os::unix::fs::FileExt;
            let mut read_page = |addr: u64| {
                let mut page = vec![0u8; 4096];
                memory.read_exact_at(&mut page, addr).ok().map(|()| page)
            };
            arch::structural_pages(&state.vcpus[0], &mut read_page)
        };
        let msr_indices = state.vcpus[0].msr_indices();
        Ok(Image {
            dir: dir.to_path_buf(),
            header,
            state,
            memory,
            restores,
            msr_indices,
            structural_pages,
            generation: AtomicU64::new(0),
        })
    }

    /// Compares the saved vCPUs with fresh ones made the way a restore makes them.
    fn plan(hv: &Hypervisor, state: &VmState) -> Result<Vec<VcpuRestore>, ImageError> {
        let kvm_err = |what| move |source| ImageError::Arch(arch::ArchError::Kvm { what, source });
        let mut restores = Vec::with_capacity(state.vcpus.len());
        for saved in &state.vcpus {
            // A template VM per vCPU: the template and its probe take two vCPU ids, which the
            // next saved vCPU's template would otherwise collide with.
            let vm = hv.kvm().create_vm().map_err(kvm_err("create a template VM"))?;
            let cpuid = saved.cpuid().map_err(ImageError::Arch)?;
            let vcpu = vm.create_vcpu(saved.index.into()).map_err(kvm_err("create a template vCPU"))?;
            arch::set_cpuid(&vcpu, &cpuid).map_err(kvm_err("set the CPUID table"))?;
            let indices = saved.msr_indices();
            let fresh = VcpuState::save(&vcpu, saved.index, &cpuid, &indices).map_err(ImageError::Arch)?;
            let plan = saved.plan(&fresh);
            // Probing writes MSRs, so it uses a vCPU of its own, with the other of ids 0 and 1
            // (a host may allow no more than two).
            let probe_id = if saved.index == 0 { 1 } else { 0 };
            let probe = vm.create_vcpu(probe_id).map_err(kvm_err("create a probe vCPU"));
            let reset = match probe {
                Ok(probe) => {
                    arch::set_cpuid(&probe, &cpuid).map_err(kvm_err("set the CPUID table"))?;
                    saved.reset_plan(&probe)
                }
                Err(_) => saved.reset_plan(&vcpu),
            };
            let skipped = saved.unresettable_msrs(&reset);
            if !skipped.is_empty() {
                log::debug!("MSRs KVM will not take back from the host, not reset in reuse mode: {skipped:x?}");
            }
            restores.push(VcpuRestore { plan, reset, cpuid });
        }
        Ok(restores)
    }

    /// The image directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The frozen VM's state.
    pub fn state(&self) -> &VmState {
        &self.state
    }

    /// The image's content id, as recorded when it was written.
    pub fn content_id(&self) -> ContentId {
        self.header.content_id
    }

    /// What the image says about itself.
    pub fn info(&self) -> ImageInfo {
        ImageInfo::of(&self.header, &self.state)
    }

    /// The memory file, for copy-on-write mappings.
    pub fn memory_file(&self) -> &File {
        &self.memory
    }

    /// Per-vCPU restore preparations.
    pub fn restore_plans(&self) -> &[VcpuRestore] {
        &self.restores
    }

    /// The MSRs the image saved.
    pub fn msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }

    /// The pages that decide translation and CPL 0 (see `arch::structural_pages`), sorted;
    /// `None` when the image does not allow a fast reset.
    pub fn structural_pages(&self) -> Option<&[u64]> {
        self.structural_pages.as_deref()
    }

    /// The next fork's generation number (1, 2, …).
    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Ioctls a fresh-mode restore issues per vCPU beyond VM and vCPU creation.
    pub fn restore_ioctls(&self) -> usize {
        self.restores.iter().map(|r| 1 + r.plan.ioctls()).sum()
    }
}

/// Checks a decoded state as untrusted input, as far as that needs no KVM: the memory size (in
/// range, and the header's), at least one vCPU, and the CPU record against the vCPUs.
fn validate(dir: &Path, header: &StateHeader, state: &VmState) -> Result<(), ImageError> {
    let invalid = |reason: String| ImageError::Invalid { path: dir.to_path_buf(), reason };
    let layout = mu2_abi::layout::MIN_MEM..=mu2_abi::layout::MAX_MEM;
    if !layout.contains(&state.mem_size) || state.mem_size % (2 << 20) != 0 {
        return Err(invalid(format!("guest memory of {} bytes", state.mem_size)));
    }
    if header.memory_size != state.mem_size {
        return Err(invalid(format!(
            "the header records {} bytes of memory, the state {}",
            header.memory_size, state.mem_size
        )));
    }
    if state.vcpus.is_empty() {
        return Err(invalid("no vCPUs".to_string()));
    }
    // Each vCPU is created under its saved index: they must be 0, 1, … in order.
    if let Some((position, vcpu)) = state.vcpus.iter().enumerate().find(|(i, v)| usize::from(v.index) != *i) {
        return Err(invalid(format!("vCPU {position} is saved with index {}", vcpu.index)));
    }
    if u64::from(state.max_request) > state.mem_size {
        return Err(invalid(format!("a largest request of {} bytes, beyond guest memory", state.max_request)));
    }
    arch::check_recorded(&state.cpu_features, state.cpu_template, &state.vcpus)
        .map_err(|source| ImageError::CpuRecord { path: dir.to_path_buf(), source })
}

/// What an image says about itself: read from its state file alone (no KVM, no memory read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The content id recorded when the image was written.
    pub content_id: ContentId,
    /// The architecture it was taken on.
    pub arch: mu2_snapshot::Arch,
    /// Its format version.
    pub format_version: u32,
    /// Guest memory, bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// The CPU template its guest was booted with.
    pub cpu_template: CpuTemplate,
    /// The CPU features its guest saw, by name (what a host must have to load it).
    pub cpu_features: Vec<String>,
    /// Those of them outside the template: features the hypervisor showed the guest although
    /// the template leaves them out (PVM shows the hardware's own), which the image needs too.
    pub beyond_template: Vec<String>,
    /// The flags its guest announced when it became ready (`mu2_abi::ready_flags`).
    pub ready_flags: u32,
    /// The vsock port its guest listens on.
    pub port: u32,
}

impl ImageInfo {
    /// Reads and validates the state of the image in `dir` (of this architecture).
    pub fn read(dir: &Path) -> Result<ImageInfo, ImageError> {
        let (header, state): (_, VmState) = mu2_snapshot::read_state(dir, mu2_snapshot::Arch::host())
            .map_err(|source| ImageError::Snapshot { path: dir.to_path_buf(), source: Box::new(source) })?;
        validate(dir, &header, &state)?;
        Ok(ImageInfo::of(&header, &state))
    }

    fn of(header: &StateHeader, state: &VmState) -> ImageInfo {
        ImageInfo {
            content_id: header.content_id,
            arch: header.arch,
            format_version: header.version,
            mem_size: state.mem_size,
            vcpus: state.vcpus.len(),
            cpu_template: state.cpu_template,
            cpu_features: state.cpu_features.names(),
            beyond_template: state.cpu_features.beyond(state.cpu_template),
            ready_flags: state.ready_flags,
            port: state.port,
        }
    }

    /// Whether the guest speaks the HTTP framing (`ready_flags::HTTP`).
    pub fn http(&self) -> bool {
        self.ready_flags & mu2_abi::ready_flags::HTTP != 0
    }

    /// The readiness flags by name; bits without one as `bitN`.
    pub fn ready_flag_names(&self) -> Vec<String> {
        (0..32)
            .filter(|bit| self.ready_flags & (1 << bit) != 0)
            .map(|bit| match 1u32 << bit {
                mu2_abi::ready_flags::HTTP => "http".to_string(),
                _ => format!("bit{bit}"),
            })
            .collect()
    }
}

/// Recomputes the content id of the image in `dir` from its state and every data page of its
/// memory, and checks it against the recorded one; returns it.
pub fn verify(dir: &Path) -> Result<ContentId, ImageError> {
    mu2_snapshot::verify_image(dir)
        .map_err(|source| ImageError::Snapshot { path: dir.to_path_buf(), source: Box::new(source) })
}

/// Packs the image in `dir` into one file, `out` (see docs/image-format.md): sparse-aware,
/// compressed, carrying the content id, which is checked against the image on the way.
pub fn pack(dir: &Path, out: &Path) -> Result<PackSummary, ImageError> {
    mu2_snapshot::pack(dir, out)
        .map_err(|source| ImageError::Pack { path: dir.to_path_buf(), source: Box::new(source) })
}

/// Unpacks the pack `file` into `dir` (new or empty), checking everything [`ImageInfo::read`]
/// checks and the content id before anything is in place; on failure `dir` is left as it was.
pub fn unpack(file: &Path, dir: &Path) -> Result<ImageInfo, ImageError> {
    let mut info = None;
    let check = |header: &StateHeader, state: &VmState| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        validate(dir, header, state)?;
        info = Some(ImageInfo::of(header, state));
        Ok(())
    };
    let unpack_error = |source| ImageError::Unpack { path: file.to_path_buf(), source: Box::new(source) };
    mu2_snapshot::unpack(file, dir, mu2_snapshot::Arch::host(), mu2_abi::layout::MAX_MEM, check)
        .map_err(unpack_error)?;
    // `check` ran on success.
    info.ok_or_else(|| ImageError::Invalid { path: dir.to_path_buf(), reason: "no state was checked".into() })
}

impl crate::error::Classify for ImageError {
    fn kind(&self) -> crate::error::FailureKind {
        use crate::error::FailureKind;
        match self {
            ImageError::Build(e) => e.kind(),
            ImageError::Boot(e) => e.kind(),
            ImageError::NotIdle { .. } => FailureKind::GuestProtocol,
            ImageError::Settle(e) => e.kind(),
            ImageError::Freeze(e) => e.kind(),
            ImageError::Snapshot { source, .. } => snapshot_kind(source),
            ImageError::Invalid { .. } | ImageError::CpuRecord { .. } | ImageError::CpuIncompatible { .. } => {
                FailureKind::BadInput
            }
            ImageError::Pack { source, .. } | ImageError::Unpack { source, .. } => pack_kind(source),
            ImageError::Arch(e) => e.kind(),
        }
    }
}

/// A frozen image that cannot be read or is not valid is the caller's input; failing to write
/// one is the VMM's own failure (or a full disk).
fn snapshot_kind(e: &mu2_snapshot::SnapshotError) -> crate::error::FailureKind {
    use crate::error::FailureKind;
    use mu2_snapshot::SnapshotError;
    match e {
        SnapshotError::Io { op, source, .. } => file_kind(op, source),
        SnapshotError::Encode { .. } | SnapshotError::EncodedTooLarge { .. } => FailureKind::Internal,
        _ => FailureKind::BadInput,
    }
}

/// A pack or an image that is damaged, hostile or the wrong thing is the caller's input; so is
/// a destination that is in use or unusable. A full disk is a resource limit.
fn pack_kind(e: &mu2_snapshot::PackError) -> crate::error::FailureKind {
    use mu2_snapshot::PackError;
    match e {
        PackError::Image { source, .. } => snapshot_kind(source),
        PackError::Io { op, source, .. } => file_kind(op, source),
        _ => crate::error::FailureKind::BadInput,
    }
}

/// A file operation's failure: reading the caller's files, or a destination they named that
/// cannot be used, is bad input; anything else is classified as the VMM's own I/O error.
fn file_kind(op: &str, source: &std::io::Error) -> crate::error::FailureKind {
    use crate::error::FailureKind;
    if matches!(op, "read" | "open" | "stat") {
        return FailureKind::BadInput;
    }
    match source.raw_os_error() {
        Some(libc::ENOENT | libc::EACCES | libc::EPERM | libc::EROFS | libc::ENOTDIR | libc::EEXIST | libc::EISDIR) => {
            FailureKind::BadInput
        }
        _ => crate::error::io_kind(source),
    }
}
