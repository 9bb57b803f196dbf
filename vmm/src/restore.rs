//! A VM's life from an image: restoring one ([`Vm::restore`]), warming it up before it is
//! handed out ([`Vm::warm_up`]), handing it out ([`Vm::hand_out`]) and resetting it to the
//! image for its next request ([`Vm::reset_to`]). The machine itself is `crate::vm`; this
//! module is the workflow above it and above images.

use std::time::Instant;

use mu2_abi::layout;
use mu2_devices::persist::Persist;
use mu2_devices::serial::{SerialConsole, SerialRestoreError};
use mu2_devices::virtio::mmio::MmioTransport;
use mu2_devices::virtio::vsock::Vsock;
use vm_memory::{Bytes, GuestAddress};

use crate::arch;
use crate::error::{io_kind, kvm_kind, Classify, FailureKind};
use crate::hypervisor::Hypervisor;
use crate::image::Image;
use crate::memory::{GuestRam, MemoryError};
use crate::vm::{BuildError, GuestError, RestoredParts, RunStop, Vm, VmState};

/// Why a VM could not be restored, reset or handed out.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A KVM call failed.
    #[error("KVM could not {what}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be mapped.
    #[error("mapping the image's memory")]
    Memory(#[source] MemoryError),
    /// A vCPU's state was refused.
    #[error("restoring a vCPU")]
    Arch(#[source] arch::ArchError),
    /// The serial console's state was refused.
    #[error("restoring the serial console")]
    Serial(#[source] SerialRestoreError),
    /// The vsock device's state was refused.
    #[error("restoring the vsock device")]
    Vsock(#[source] <MmioTransport<Vsock> as Persist>::Error),
    /// The devices could not be attached.
    #[error("attaching the restored devices")]
    Devices(#[source] BuildError),
    /// A reset to an image of another shape.
    #[error("the image does not match this VM's layout")]
    LayoutMismatch,
    /// The vCPU's last exit could not be finished before a reset.
    #[error("completing the last exit")]
    CompleteExit(#[source] GuestError),
    /// Copying written pages back from the image failed.
    #[error("copying pages back from the image")]
    CopyBack(#[source] std::io::Error),
    /// No entropy for the guest.
    #[error("reading host entropy")]
    Entropy(#[source] std::io::Error),
    /// The HostInfo page could not be written.
    #[error("writing the host info page")]
    HostInfo(#[source] vm_memory::GuestMemoryError),
    /// The guest failed while warming up.
    #[error("warming up")]
    WarmUp(#[source] GuestError),
    /// The guest did something other than wait while warming up.
    #[error("warming up: the guest stopped with {stop:?} instead of waiting")]
    WarmUpStopped {
        /// How it stopped.
        stop: RunStop,
    },
    /// Only a VM restored and not yet run can be warmed up.
    #[error("only a freshly restored VM can be warmed up")]
    NotFreshlyRestored,
}

impl Classify for RestoreError {
    fn kind(&self) -> FailureKind {
        match self {
            RestoreError::Kvm { source, .. } => kvm_kind(source),
            RestoreError::Memory(e) => e.kind(),
            RestoreError::Arch(e) => e.kind(),
            // A state file is the caller's input.
            RestoreError::Serial(_) | RestoreError::Vsock(_) => FailureKind::BadInput,
            RestoreError::Devices(e) => e.kind(),
            RestoreError::CompleteExit(e) | RestoreError::WarmUp(e) => e.kind(),
            RestoreError::CopyBack(e) => io_kind(e),
            RestoreError::WarmUpStopped { .. } => FailureKind::GuestProtocol,
            RestoreError::LayoutMismatch
            | RestoreError::Entropy(_)
            | RestoreError::HostInfo(_)
            | RestoreError::NotFreshlyRestored => FailureKind::Internal,
        }
    }
}

/// How a reuse-mode reset put guest memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetKind {
    /// This many written pages were copied back from the image; all mappings kept.
    CopiedBack(usize),
    /// The memory file was remapped over the whole range.
    Remapped,
}

/// The image's devices, rebuilt from its state (validated: a state file is untrusted input).
fn devices_of(state: &VmState) -> Result<(SerialConsole, MmioTransport<Vsock>), RestoreError> {
    let serial = SerialConsole::restore(Box::new(std::io::sink()), &state.serial).map_err(RestoreError::Serial)?;
    let vsock = MmioTransport::restore((), &state.vsock).map_err(RestoreError::Vsock)?;
    Ok((serial, vsock))
}

impl Vm {
    /// Creates a VM restored from a frozen image: a new KVM VM whose memory is the image's
    /// memory file mapped copy-on-write, its vCPUs set with the image's restore plans.
    pub fn restore(hv: &Hypervisor, image: &Image) -> Result<Vm, RestoreError> {
        let state = image.state();
        let kvm_err = |what| move |source| RestoreError::Kvm { what, source };
        let ram = GuestRam::from_file(image.memory_file(), state.mem_size as usize).map_err(RestoreError::Memory)?;
        let vm_fd = hv.kvm().create_vm().map_err(kvm_err("create a VM"))?;
        // SAFETY: every KVM fd of this VM (`vm_fd`, and the vCPUs made below) is declared after
        // `ram`, so an early return drops them first; on success they move into the `Vm`,
        // whose field order drops the vCPUs and the VM before the memory.
        unsafe { ram.register(&vm_fd) }.map_err(kvm_err("register guest memory"))?;
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for (saved, restore) in state.vcpus.iter().zip(image.restore_plans()) {
            let vcpu = vm_fd.create_vcpu(saved.index.into()).map_err(kvm_err("create a vCPU"))?;
            arch::set_cpuid(&vcpu, &restore.cpuid).map_err(kvm_err("set the CPUID table"))?;
            saved.restore(&vcpu, &restore.plan).map_err(RestoreError::Arch)?;
            vcpus.push(vcpu);
        }
        let (serial, vsock) = devices_of(state)?;
        Vm::from_restored(RestoredParts {
            vcpus,
            vm_fd,
            ram,
            serial,
            vsock,
            ready: state.ready_info(),
            tsc_khz: state.tsc_khz,
            msr_indices: image.msr_indices().to_vec(),
            cpu_template: state.cpu_template,
        })
        .map_err(RestoreError::Devices)
    }

    /// Lets a freshly restored VM run until its guest waits for work, before it is handed
    /// out: the guest takes its HostInfo, polls its rings and parks in WAIT, so the pages that
    /// path touches are mapped by then instead of faulting on the request path. Its next WAIT
    /// answer carries `RESTORED` again, so the guest takes the HostInfo written at hand-out.
    pub fn warm_up(&mut self, deadline: Option<Instant>) -> Result<(), RestoreError> {
        if !self.is_freshly_restored() {
            return Err(RestoreError::NotFreshlyRestored);
        }
        match self.run(deadline).map_err(RestoreError::WarmUp)? {
            RunStop::Idle if self.announce_restore_on_wake() => Ok(()),
            stop => Err(RestoreError::WarmUpStopped { stop }),
        }
    }

    /// What every VM restored from an image gets right before it serves: fresh entropy, the
    /// current time, and its generation number (see `mu2_abi::HostInfo`).
    pub fn hand_out(&mut self, image: &Image) -> Result<(), RestoreError> {
        let mut info = mu2_abi::HostInfo { generation: image.next_generation(), ..Default::default() };
        crate::sys::fill_random(&mut info.entropy).map_err(RestoreError::Entropy)?;
        info.unix_time_ns =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        self.ram()
            .memory()
            .write_slice(&info.to_le_bytes(), GuestAddress(layout::HOST_INFO))
            .map_err(RestoreError::HostInfo)
    }

    /// Resets this VM to `image` for its next request (reuse mode): guest memory back to the
    /// image's, every piece of vCPU and device state put back.
    ///
    /// Memory is reset one of two ways. The full way remaps the memory file copy-on-write over
    /// the same range: every page the guest touched must then be faulted in again. The fast
    /// way copies back only the pages written since the image was mapped and keeps every
    /// mapping; it is taken only when `clean` (the request ended normally), the image is
    /// confined to CPL 3, and neither the paging and exception structures nor the registers
    /// that locate them changed — so the request cannot have changed how memory is
    /// translated (see `arch::structural_pages`).
    pub fn reset_to(&mut self, image: &Image, clean: bool) -> Result<ResetKind, RestoreError> {
        let state = image.state();
        if state.mem_size != self.ram().size() as u64 || state.vcpus.len() != self.vcpus().len() {
            return Err(RestoreError::LayoutMismatch);
        }
        // The previous request left the vCPU in an exit (a WAIT read, or wherever it was
        // stopped): finish it first, or KVM would complete it over the restored registers.
        self.complete_pending_exit().map_err(RestoreError::CompleteExit)?;
        let kind = match self.pages_to_copy_back(image, clean) {
            Some(pages) => {
                self.ram_mut().restore_pages(image.memory_file(), &pages).map_err(RestoreError::CopyBack)?;
                ResetKind::CopiedBack(pages.len())
            }
            None => {
                self.ram_mut().remap_file(image.memory_file()).map_err(RestoreError::Memory)?;
                ResetKind::Remapped
            }
        };
        for ((saved, vcpu), restore) in state.vcpus.iter().zip(self.vcpus()).zip(image.restore_plans()) {
            saved.restore(vcpu, &restore.reset).map_err(RestoreError::Arch)?;
        }
        let (serial, vsock) = devices_of(state)?;
        self.rearm(serial, vsock, state.ready_info()).map_err(RestoreError::Devices)?;
        Ok(kind)
    }

    /// The pages a fast reset copies back, or `None` when only a full remap is safe.
    fn pages_to_copy_back(&self, image: &Image, clean: bool) -> Option<Vec<u64>> {
        let structural = image.structural_pages().filter(|_| clean)?;
        if !arch::same_translation(image.state().vcpus.first()?, self.vcpus().first()?) {
            return None;
        }
        let written = self.ram().private_pages().ok()?;
        if written.iter().any(|page| structural.binary_search(page).is_ok()) {
            return None;
        }
        Some(written)
    }

    /// Makes this VM's private copy of each of `pages` now, so that neither the host nor the
    /// hypervisor copies it on the guest's first write (a pooled VM, before it is handed out).
    /// Call it only while no vCPU runs.
    pub fn copy_in_advance(&mut self, pages: &[u64]) {
        self.ram_mut().copy_in_advance(pages);
    }

    /// Pages this VM holds a private copy of (see `GuestRam::private_pages`).
    pub(crate) fn written_pages(&self) -> std::io::Result<Vec<u64>> {
        self.ram().private_pages()
    }

    /// KiB of guest memory this VM holds privately (pages it wrote).
    pub fn private_kib(&self) -> Option<u64> {
        self.ram().private_kib()
    }
}
