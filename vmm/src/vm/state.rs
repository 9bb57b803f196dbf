//! Freezing: a ready, idle guest turned into plain data ([`VmState`]) for an image.

use mu2_abi::ReadyInfo;
use mu2_devices::persist::Persist;
use mu2_devices::serial::SerialConsole;
use mu2_devices::virtio::mmio::MmioTransport;
use mu2_devices::virtio::vsock::Vsock;

use super::{GuestError, Phase, Vm};
use crate::arch;
use crate::cpu::CpuTemplate;
use crate::error::{Classify, FailureKind};

/// Why a VM could not be frozen.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// The guest never reported readiness.
    #[error("the guest is not ready")]
    NotReady,
    /// The guest is not waiting idle (it runs, or it stopped).
    #[error("the guest is not idle in a wait")]
    NotIdle,
    /// Completing the guest's WAIT failed.
    #[error("completing the guest's wait")]
    CompleteWait(#[source] GuestError),
    /// Reading vCPU state failed.
    #[error("saving vCPU state")]
    Arch(#[source] arch::ArchError),
}

impl Classify for FreezeError {
    fn kind(&self) -> FailureKind {
        match self {
            FreezeError::NotReady | FreezeError::NotIdle => FailureKind::GuestProtocol,
            FreezeError::CompleteWait(e) => e.kind(),
            FreezeError::Arch(e) => e.kind(),
        }
    }
}

/// Everything about a frozen VM but its memory: plain data, stored in an image's state file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// Guest RAM size in bytes (the memory file's size).
    pub mem_size: u64,
    /// Each vCPU.
    pub vcpus: Vec<arch::VcpuState>,
    /// The serial console.
    pub serial: <SerialConsole as Persist>::State,
    /// The vsock device and its transport.
    pub vsock: <MmioTransport<Vsock> as Persist>::State,
    /// The vsock port the guest listens on.
    pub port: u32,
    /// The receive buffer the guest grants a new connection.
    pub buf_alloc: u32,
    /// The largest request the guest can hold, as it announced when it became ready; a fork
    /// does not announce it again.
    pub max_request: u32,
    /// The TSC frequency the guest was told.
    pub tsc_khz: Option<u32>,
    /// The flags the guest announced when it became ready (`mu2_abi::ready_flags`), which a
    /// restored guest does not announce again.
    pub ready_flags: u32,
    /// The CPU template the guest was booted with.
    pub cpu_template: CpuTemplate,
    /// The CPU features the guest saw (of vCPU 0's CPUID table; every vCPU's must be the same),
    /// which a host must have to restore it.
    pub cpu_features: arch::CpuFeatures,
}

// The image format's tripwire: describing every field that reaches the encoding, in order.
// Changing `VmState`, `VcpuState` or a device state without updating this text and bumping
// `mu2_snapshot::FORMAT_VERSION` is a build error.
impl mu2_snapshot::Versioned for VmState {
    // Each architecture describes its own vCPU state (see `arch::VM_STATE_SCHEMA`).
    const SCHEMA: &'static str = arch::VM_STATE_SCHEMA;
    const RECORDED_VERSION: u32 = 2;
    const RECORDED_FINGERPRINT: u64 = arch::VM_STATE_FINGERPRINT;
}
mu2_snapshot::assert_schema!(VmState);

impl VmState {
    /// The readiness report the frozen guest made.
    pub fn ready_info(&self) -> ReadyInfo {
        ReadyInfo {
            abi_version: mu2_abi::ABI_VERSION,
            port: self.port,
            buf_alloc: self.buf_alloc,
            flags: self.ready_flags,
            max_request: self.max_request,
        }
    }
}

impl Vm {
    /// Freezes an idle, ready guest: completes its pending WAIT so that the guest will see
    /// `RESTORED` and device work when an image of it resumes, and returns its whole state.
    /// The VM cannot run afterwards; `image::create` then writes its memory.
    pub fn freeze(&mut self) -> Result<VmState, FreezeError> {
        let ready = self.ready.ok_or(FreezeError::NotReady)?;
        if !matches!(self.phase, Phase::Parked { .. }) {
            return Err(FreezeError::NotIdle);
        }
        self.complete_wait(mu2_abi::wait::RESTORED | 1);
        self.complete_pending_exit().map_err(FreezeError::CompleteWait)?;
        self.phase = Phase::Stopped;
        let vcpus = self.save_vcpus().map_err(FreezeError::Arch)?;
        let serial = self.serial().save();
        let vsock = self.save_vsock();
        // A VM always has a vCPU (checked when it is built).
        let cpu_features = vcpus.first().map(arch::guest_features).unwrap_or_default();
        Ok(VmState {
            mem_size: self.ram.size() as u64,
            vcpus,
            serial,
            vsock,
            port: ready.port,
            buf_alloc: ready.buf_alloc,
            max_request: ready.max_request,
            tsc_khz: self.tsc_khz,
            ready_flags: ready.flags,
            cpu_template: self.cpu_template,
            cpu_features,
        })
    }

    /// Guest RAM as bytes, for writing an image of a frozen VM.
    pub(crate) fn frozen_memory(&self) -> &[u8] {
        self.ram.as_slice()
    }

    /// Reads every vCPU's state the way freezing does (without completing a pending exit).
    pub(crate) fn save_vcpus(&self) -> Result<Vec<arch::VcpuState>, arch::ArchError> {
        self.vcpus
            .iter()
            .enumerate()
            .map(|(index, vcpu)| {
                let cpuid = arch::get_cpuid(vcpu)
                    .map_err(|source| arch::ArchError::Kvm { what: "reading the CPUID table", source })?;
                arch::VcpuState::save(vcpu, index as u8, &cpuid, &self.msr_indices)
            })
            .collect()
    }

    /// The vsock device's and its transport's state now.
    pub(crate) fn save_vsock(&mut self) -> <MmioTransport<Vsock> as Persist>::State {
        self.vsock_transport().save()
    }
}

/// Inspection of device and vCPU state, for tests.
#[cfg(feature = "inspect")]
impl Vm {
    /// Every vCPU's state now (see [`Vm::freeze`]).
    pub fn vcpu_states(&self) -> Result<Vec<arch::VcpuState>, arch::ArchError> {
        self.save_vcpus()
    }

    /// The vsock device's and its transport's state now.
    pub fn vsock_state(&mut self) -> <MmioTransport<Vsock> as Persist>::State {
        self.save_vsock()
    }
}
