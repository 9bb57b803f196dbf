//! mu2: a KVM virtual machine monitor that runs every request in a brand-new micro-VM.
//!
//! See ARCHITECTURE.md at the repository root for the code map and the request flow.

pub mod api;
pub mod arch;
pub mod duration;
pub mod error;
pub mod floor;
pub mod fork;
pub mod guests;
pub mod hypervisor;
pub mod image;
pub mod invoke;
pub mod kick;
pub mod memory;
pub mod restore;
pub mod source;
mod sys;
pub mod uds;
pub mod vm;

pub use hypervisor::{Hypervisor, HypervisorError};
pub use restore::{ResetKind, RestoreError};
pub use vm::{BuildError, ExitStats, GuestError, RunStop, Vm, VmConfig};
