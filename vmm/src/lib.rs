//! mu2: a KVM virtual machine monitor that runs every request in a brand-new micro-VM.
//!
//! An embedder opens the host's KVM once ([`Hypervisor`]), freezes a guest into an image when
//! it is ready ([`image::create`]) or loads one ([`image::Image::load`]), and serves requests
//! through a fork engine ([`fork::Engine`]): each [`fork::Engine::serve`] runs in a VM of its
//! own, restored from the image copy-on-write, and returns a [`fork::Served`] or an error
//! whose [`error::Classify::kind`] says what kind of failure it was. [`source`] turns a
//! built-in guest, an ELF file or an image directory into what those need; [`api`] is the
//! daemon (`mu2 serve`) and its client.
//!
//! Below that, [`Vm`] is one machine (cold boot, run loop, freeze, restore, reset), for the
//! `mu2` command's cold path and for research; [`floor`] measures the raw KVM costs the
//! benchmarks compare against; [`uds`] bridges a long-running VM's vsock to Unix sockets.
//! With the `inspect` feature, [`Vm`] also shows its memory, vCPUs and devices to tests.
//!
//! See ARCHITECTURE.md at the repository root for the code map and a request's path.

pub mod api;
pub mod budget;
pub mod duration;
pub mod error;
pub mod floor;
pub mod fork;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod guests;
pub mod image;
pub mod invoke;
pub mod sandbox;
pub mod source;
pub mod uds;
pub mod worker;

mod arch;
mod cpu;
mod hypervisor;
mod kick;
mod memory;
mod restore;
mod sys;
mod vm;

pub use arch::{ArchError, CpuFeatures, EntryMode, GuestFault, VcpuState};
pub use cpu::CpuTemplate;
pub use hypervisor::{Hypervisor, HypervisorError};
pub use kick::KickError;
pub use memory::MemoryError;
pub use restore::{ResetKind, RestoreError};
pub use vm::{BuildError, BusError, ExitStats, FreezeError, GuestError, ProtocolError, RunStop, Vm, VmConfig, VmState};
