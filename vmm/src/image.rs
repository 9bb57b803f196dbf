//! Frozen images: a booted guest, frozen when it is ready, stored as a state file and a
//! memory file (see docs/image-format.md), and loaded once to serve many forks.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::arch::{self, CpuId, RestorePlan, VcpuState};
use crate::hypervisor::Hypervisor;
use crate::invoke::{self, InvokeError};
use crate::vm::{BuildError, FreezeError, GuestError, RunStop, Vm, VmConfig, VmState};
use mu2_abi::ReadyInfo;

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
        /// What went wrong.
        #[source]
        source: mu2_snapshot::SnapshotError,
    },
    /// The image's state is inconsistent.
    #[error("image {path}: {reason}")]
    Invalid {
        /// The image directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// KVM refused something while preparing restores.
    #[error("preparing restores")]
    Arch(#[source] arch::ArchError),
}

/// Boots `config`, waits until the guest is ready and idle, freezes it and writes the image
/// to `dir` (see [`Image`] for an example).
///
/// to `dir`. Returns what the guest reported when it became ready (its port, receive buffer
/// and capability flags).
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
        .map_err(|source| ImageError::Snapshot { path: dir.to_path_buf(), source })?;
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
    state: VmState,
    memory: File,
    restores: Vec<VcpuRestore>,
    msr_indices: Vec<u32>,
    /// Sorted; `None` when the image is not confined to CPL 3 (no fast reset).
    structural_pages: Option<Vec<u64>>,
    generation: AtomicU64,
}

impl Image {
    /// Reads and validates the image in `dir`, and works out the cheapest restore.
    pub fn load(hv: &Hypervisor, dir: &Path) -> Result<Image, ImageError> {
        let snapshot = |source| ImageError::Snapshot { path: dir.to_path_buf(), source };
        let invalid = |reason: String| ImageError::Invalid { path: dir.to_path_buf(), reason };
        let state: VmState = mu2_snapshot::read_state(dir, mu2_snapshot::Arch::host()).map_err(snapshot)?;
        let layout = mu2_abi::layout::MIN_MEM..=mu2_abi::layout::MAX_MEM;
        if !layout.contains(&state.mem_size) || state.mem_size % (2 << 20) != 0 {
            return Err(invalid(format!("guest memory of {} bytes", state.mem_size)));
        }
        if u64::from(state.max_request) > state.mem_size {
            return Err(invalid(format!("a largest request of {} bytes, beyond guest memory", state.max_request)));
        }
        if state.vcpus.is_empty() || state.vcpus.len() > hv.max_vcpus() {
            return Err(invalid(format!("{} vCPUs (this host allows 1 to {})", state.vcpus.len(), hv.max_vcpus())));
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
            ImageError::Invalid { .. } => FailureKind::BadInput,
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
        SnapshotError::Io { op: "read" | "open" | "stat", .. } => FailureKind::BadInput,
        // The destination given is unusable.
        SnapshotError::Io { source, .. }
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOENT | libc::EACCES | libc::EPERM | libc::EROFS | libc::ENOTDIR | libc::EEXIST)
            ) =>
        {
            FailureKind::BadInput
        }
        SnapshotError::Io { source, .. } => crate::error::io_kind(source),
        SnapshotError::Encode { .. } | SnapshotError::EncodedTooLarge { .. } => FailureKind::Internal,
        _ => FailureKind::BadInput,
    }
}
