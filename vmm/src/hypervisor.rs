//! The host's KVM: opened once, shared by every VM a process creates.

use std::sync::OnceLock;

use kvm_ioctls::Kvm;

use crate::arch::{self, CpuFeatures, CpuId};

/// Errors opening KVM.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// /dev/kvm does not exist.
    #[error("/dev/kvm does not exist: this host offers no KVM (load kvm, or run where virtualization is enabled)")]
    Missing,
    /// /dev/kvm exists but may not be opened by this user.
    #[error("permission denied opening /dev/kvm: run as root or join the group that owns it (usually `kvm`)")]
    PermissionDenied,
    /// Opening /dev/kvm failed otherwise.
    #[error("opening /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    /// KVM speaks an API version mu2 does not.
    #[error("KVM API version {0} is not supported (mu2 needs 12)")]
    ApiVersion(i32),
    /// KVM refused a query.
    #[error("KVM setup")]
    Arch(#[source] arch::ArchError),
}

/// The host's KVM and what it supports. Open it once per process and share it (it is `Sync`);
/// every VM, image and engine takes it by reference or `Arc`.
///
/// ```no_run
/// use mu2_vmm::error::{Classify, FailureKind};
/// use mu2_vmm::Hypervisor;
///
/// match Hypervisor::open() {
///     Ok(hv) => println!("KVM allows {} vCPUs per VM", hv.max_vcpus()),
///     Err(e) if e.kind() == FailureKind::KvmUnavailable => eprintln!("no KVM here: {e}"),
///     Err(e) => eprintln!("KVM setup failed: {e}"),
/// }
/// ```
#[derive(Debug)]
pub struct Hypervisor {
    kvm: Kvm,
    cpuid: CpuId,
    max_vcpus: usize,
    /// The MSRs KVM lists and lets a vCPU read, probed on a throwaway VM when first needed.
    msr_indices: OnceLock<Vec<u32>>,
    /// The CPU features a guest given everything KVM supports sees, probed on a throwaway VM
    /// when first needed. That is the supported table on most hosts; some hypervisors (PVM)
    /// also show guests the hardware's own features, whatever the table says.
    features: OnceLock<CpuFeatures>,
    /// Features a test pretends this host lacks (see `without_cpu_features`).
    removed: Vec<String>,
}

impl Hypervisor {
    /// Opens /dev/kvm and reads what it supports.
    pub fn open() -> Result<Self, HypervisorError> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT => HypervisorError::Missing,
            libc::EACCES | libc::EPERM => HypervisorError::PermissionDenied,
            _ => HypervisorError::Open(e),
        })?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(HypervisorError::ApiVersion(version));
        }
        let cpuid = arch::supported_cpuid(&kvm).map_err(HypervisorError::Arch)?;
        let max_vcpus = arch::max_vcpus(&kvm);
        Ok(Hypervisor {
            kvm,
            cpuid,
            max_vcpus,
            msr_indices: OnceLock::new(),
            features: OnceLock::new(),
            removed: Vec::new(),
        })
    }

    /// This handle with the named CPU features removed from what KVM supports, as if the host
    /// lacked them: guests booted through it are not shown them (where KVM honours the table),
    /// and images that need them are refused. For tests of CPU compatibility; names as
    /// [`CpuFeatures::names`] spells them.
    #[cfg(feature = "inspect")]
    pub fn without_cpu_features(mut self, names: &[&str]) -> Result<Self, HypervisorError> {
        arch::remove_features(&mut self.cpuid, names).map_err(HypervisorError::Arch)?;
        self.removed.extend(names.iter().map(|n| n.to_string()));
        self.features = OnceLock::new();
        Ok(self)
    }

    /// Whether /dev/kvm can be opened here; `Err` says why not.
    pub fn check() -> Result<(), HypervisorError> {
        Self::open().map(|_| ())
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The CPU features a guest on this host can be shown: what a fresh vCPU given everything
    /// KVM supports reports (probed once, on a throwaway VM, the first time it is asked).
    pub fn cpu_features(&self) -> &CpuFeatures {
        self.features.get_or_init(|| {
            let features = self.probe_vcpu(|vcpu| Ok(arch::vcpu_features(vcpu)?)).unwrap_or_else(|e| {
                log::warn!("reading a vCPU's CPUID failed ({e}); using KVM's supported table");
                arch::table_features(&self.cpuid)
            });
            // The names were checked when they were removed from the table.
            let removed: Vec<&str> = self.removed.iter().map(String::as_str).collect();
            features.without(&removed).unwrap_or(features)
        })
    }

    /// The most vCPUs one VM may have.
    pub fn max_vcpus(&self) -> usize {
        self.max_vcpus
    }

    /// The MSRs a frozen image saves: those KVM lists and lets a vCPU read. Probed once, on a
    /// throwaway VM, the first time an image is made.
    pub fn msr_indices(&self) -> &[u32] {
        self.msr_indices.get_or_init(|| {
            self.probe_vcpu(|vcpu| Ok(arch::saved_msr_indices(&self.kvm, vcpu)?)).unwrap_or_else(|e| {
                log::warn!("listing MSRs failed ({e}); images will save none");
                Vec::new()
            })
        })
    }

    /// Runs `probe` on vCPU 0 of a throwaway VM, given this host's CPUID table.
    fn probe_vcpu<T>(
        &self,
        probe: impl FnOnce(&kvm_ioctls::VcpuFd) -> Result<T, Box<dyn std::error::Error>>,
    ) -> Result<T, Box<dyn std::error::Error>> {
        let vm = self.kvm.create_vm()?;
        let vcpu = vm.create_vcpu(0)?;
        arch::set_cpuid(&vcpu, &self.vcpu_cpuid(0, 1))?;
        probe(&vcpu)
    }

    /// The CPUID table for vCPU `index` of `count`.
    pub fn vcpu_cpuid(&self, index: u8, count: u8) -> CpuId {
        arch::vcpu_cpuid(&self.cpuid, index, count)
    }
}

impl crate::error::Classify for HypervisorError {
    fn kind(&self) -> crate::error::FailureKind {
        use crate::error::FailureKind;
        match self {
            HypervisorError::Missing | HypervisorError::PermissionDenied => FailureKind::KvmUnavailable,
            HypervisorError::ApiVersion(_) => FailureKind::KvmUnavailable,
            HypervisorError::Open(e) => crate::error::kvm_kind(e),
            HypervisorError::Arch(e) => e.kind(),
        }
    }
}
