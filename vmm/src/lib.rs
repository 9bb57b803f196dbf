//! mu2: a KVM virtual machine monitor that runs every request in a brand-new micro-VM.
//!
//! See ARCHITECTURE.md at the repository root for the code map and the request flow.

pub mod api;
pub mod arch;
pub mod dispatch;
pub mod error;
pub mod floor;
pub mod fork;
pub mod guests;
pub mod hypervisor;
pub mod image;
pub mod invoke;
pub mod kick;
pub mod memory;
pub mod source;
pub mod uds;
pub mod vm;

pub use hypervisor::{Hypervisor, HypervisorError};
pub use vm::{BuildError, ExitStats, GuestError, ResetKind, RunStop, Vm, VmConfig};
