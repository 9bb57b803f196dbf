//! Why a VM could not be built or could not go on.

use mu2_devices::sysdev::SysdevError;

use super::bus::BusError;
use crate::arch::{self, GuestFault};
use crate::error::{kvm_kind, Classify, FailureKind};
use crate::kick::KickError;
use crate::memory::MemoryError;

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The memory size is out of range.
    #[error(
        "memory must be a multiple of 2 MiB between {} MiB and {} MiB, not {bytes} bytes",
        mu2_abi::layout::MIN_MEM >> 20,
        mu2_abi::layout::MAX_MEM >> 20
    )]
    MemorySize {
        /// The size asked for.
        bytes: u64,
    },
    /// The vCPU count is out of range.
    #[error("vCPUs must be between 1 and {max} on this host, not {asked}")]
    VcpuCount {
        /// The count asked for.
        asked: u8,
        /// The most this host allows.
        max: usize,
    },
    /// A vsock buffer or connection limit is out of range.
    #[error("vsock limit {name} of {value} is out of range (at most {max})")]
    VsockLimit {
        /// Which limit.
        name: &'static str,
        /// The value asked for.
        value: u64,
        /// The most allowed.
        max: u64,
    },
    /// A KVM call failed.
    #[error("KVM could not {what}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created.
    #[error("creating guest memory")]
    Memory(#[source] MemoryError),
    /// Architecture setup failed.
    #[error("setting up the virtual machine")]
    Arch(#[source] arch::ArchError),
    /// The command line does not fit.
    #[error("building the kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The devices could not be placed on the bus.
    #[error("attaching devices")]
    Bus(#[source] BusError),
}

impl Classify for BuildError {
    fn kind(&self) -> FailureKind {
        match self {
            BuildError::MemorySize { .. }
            | BuildError::VcpuCount { .. }
            | BuildError::VsockLimit { .. }
            | BuildError::Cmdline(_) => FailureKind::BadInput,
            BuildError::Kvm { source, .. } => kvm_kind(source),
            BuildError::Memory(e) => e.kind(),
            BuildError::Arch(e) => e.kind(),
            BuildError::Bus(_) => FailureKind::Internal,
        }
    }
}

/// A guest that broke the contract between it and the VMM.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// An exit the VMM has no use for.
    #[error("unexpected VM exit {exit}")]
    UnexpectedExit {
        /// KVM's description of it.
        exit: String,
    },
    /// A malformed access to the system device.
    #[error("misusing the system device")]
    Sysdev(#[source] SysdevError),
    /// The readiness report's address is not in guest memory.
    #[error("unreadable readiness report")]
    UnreadableReady(#[source] vm_memory::GuestMemoryError),
    /// The guest speaks another ABI version.
    #[error("guest speaks ABI version {guest}, this VMM {vmm}")]
    AbiVersion {
        /// The guest's version.
        guest: u32,
        /// This VMM's.
        vmm: u32,
    },
    /// The readiness report announces a largest request beyond the guest's memory.
    #[error("guest announced requests of up to {max_request} bytes with {mem_size} bytes of memory")]
    MaxRequest {
        /// What the guest announced.
        max_request: u32,
        /// Its memory.
        mem_size: u64,
    },
    /// KVM ran guest code where it was asked only to finish the last exit.
    #[error("the vCPU ran instead of stopping")]
    RanInsteadOfStopping,
}

/// Why the guest stopped against its will, or could not go on.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A CPU exception in the guest.
    #[error("guest fault: {0}")]
    Fault(GuestFault),
    /// The guest runtime panicked.
    #[error("guest panicked: {0}")]
    Panic(String),
    /// A triple fault: the CPU shut down.
    #[error("guest triple-faulted (CPU shutdown) at RIP {rip:#x}")]
    TripleFault {
        /// Instruction pointer when it happened, or 0 if unknown.
        rip: u64,
    },
    /// The guest halted with no way to be woken (mu2 VMs have no interrupt controller).
    #[error("guest halted at RIP {rip:#x} with interrupts unavailable")]
    Halted {
        /// Instruction pointer of the `hlt`.
        rip: u64,
    },
    /// KVM could not enter the guest.
    #[error("KVM failed to enter the guest (hardware reason {reason:#x})")]
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// KVM could not emulate something the guest did.
    #[error("KVM internal error (suberror {suberror}) at RIP {rip:#x}")]
    Internal {
        /// KVM's suberror code.
        suberror: u32,
        /// Instruction pointer.
        rip: u64,
    },
    /// The guest asked for a reset or power-off through a system event.
    #[error("guest requested system event {0}")]
    SystemEvent(u32),
    /// The guest did something the VMM cannot serve.
    #[error("guest protocol error")]
    Protocol(#[source] ProtocolError),
    /// The deadline passed while the guest ran.
    #[error("timed out")]
    Timeout,
    /// The guest has already stopped.
    #[error("the guest has already stopped")]
    Stopped,
    /// A KVM call failed while running.
    #[error("KVM could not {what}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The deadline timer could not be armed.
    #[error("arming the deadline")]
    Kick(#[source] KickError),
}

impl Classify for GuestError {
    fn kind(&self) -> FailureKind {
        match self {
            GuestError::Fault(_)
            | GuestError::Panic(_)
            | GuestError::TripleFault { .. }
            | GuestError::Halted { .. }
            | GuestError::FailEntry { .. }
            | GuestError::Internal { .. }
            | GuestError::SystemEvent(_) => FailureKind::GuestCrash,
            GuestError::Protocol(_) => FailureKind::GuestProtocol,
            GuestError::Timeout => FailureKind::Timeout,
            GuestError::Stopped => FailureKind::Internal,
            GuestError::Kvm { source, .. } => kvm_kind(source),
            GuestError::Kick(e) => e.kind(),
        }
    }
}
