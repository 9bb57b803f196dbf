//! The raw KVM floor: what creating a minimal VM and running it to its first exit costs on
//! this host, measured in the same run as any mu2 figure so that figures compare as ratios.
//!
//! The floor VM has the same memory size and CPU setup as a mu2 VM but no devices, no image
//! and no boot data beyond the page tables: one exiting instruction at the entry point
//! (`arch::floor_code`: an `out` on x86_64, an MMIO write on aarch64).

use std::time::{Duration, Instant};

use mu2_abi::layout;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::{self, EntryMode};
use crate::hypervisor::Hypervisor;
use crate::memory::GuestRam;

/// Why a floor measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
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
    #[error("mapping the floor guest's memory")]
    Memory(#[source] crate::memory::MemoryError),
    /// Boot tables or registers could not be set.
    #[error("setting up the floor guest")]
    Arch(#[source] arch::ArchError),
    /// The floor guest's memory file could not be written.
    #[error("writing the floor image")]
    Image(#[source] std::io::Error),
    /// The floor guest's code could not be written into its memory.
    #[error("writing the floor guest")]
    Code(#[source] vm_memory::GuestMemoryError),
    /// The floor guest stopped at something other than its exiting instruction.
    #[error("floor guest stopped unexpectedly: {exit}")]
    UnexpectedExit {
        /// KVM's description of the exit.
        exit: String,
    },
}

impl crate::error::Classify for FloorError {
    fn kind(&self) -> crate::error::FailureKind {
        use crate::error::FailureKind;
        match self {
            FloorError::Kvm { source, .. } => crate::error::kvm_kind(source),
            FloorError::Memory(e) => e.kind(),
            FloorError::Arch(e) => e.kind(),
            FloorError::Image(e) => crate::error::io_kind(e),
            FloorError::Code(_) | FloorError::UnexpectedExit { .. } => FailureKind::Internal,
        }
    }
}

/// Durations of one floor cycle.
#[derive(Debug, Clone, Copy)]
pub struct FloorSample {
    /// KVM_CREATE_VM through the first guest exit.
    pub create_to_exit: Duration,
    /// Closing the vCPU and VM and unmapping memory.
    pub teardown: Duration,
}

/// The floor guest's memory: boot tables and one exiting instruction, in an in-memory file
/// mapped copy-on-write by every floor VM, as a frozen image's memory file is.
#[derive(Debug)]
pub struct FloorImage {
    file: std::fs::File,
    mem_size: u64,
}

impl FloorImage {
    /// Builds the floor guest's memory file for VMs of `mem_size` bytes.
    pub fn new(mem_size: u64) -> Result<FloorImage, FloorError> {
        use std::io::{Seek, SeekFrom, Write};
        let io = FloorError::Image;
        let ram = GuestRam::anonymous(mem_size as usize).map_err(FloorError::Memory)?;
        let mem = ram.memory();
        arch::write_boot_data(mem, mem_size, b"\0", EntryMode::Native).map_err(FloorError::Arch)?;
        mem.write_slice(&arch::floor_code(), GuestAddress(layout::IMAGE_BASE)).map_err(FloorError::Code)?;
        let mut file = crate::sys::memfd(c"mu2-floor").map_err(io)?;
        file.set_len(mem_size).map_err(io)?;
        let bytes = ram.as_slice();
        // Only the low pages and the code page hold anything.
        for (offset, len) in [(0u64, layout::STACK_BOTTOM as usize), (layout::IMAGE_BASE, 4096)] {
            file.seek(SeekFrom::Start(offset)).map_err(io)?;
            file.write_all(&bytes[offset as usize..offset as usize + len]).map_err(io)?;
        }
        Ok(FloorImage { file, mem_size })
    }

    /// Creates a minimal VM on this image, runs it to its first exit and destroys it.
    pub fn fresh_cycle(&self, hv: &Hypervisor) -> Result<FloorSample, FloorError> {
        let start = Instant::now();
        let vm = FloorVm::new(hv, self)?;
        let mut vm = vm;
        vm.run_to_exit()?;
        let create_to_exit = start.elapsed();
        let torn = Instant::now();
        drop(vm);
        Ok(FloorSample { create_to_exit, teardown: torn.elapsed() })
    }
}

/// A kept floor VM, for the reuse floor.
#[derive(Debug)]
pub struct FloorVm {
    vcpu: kvm_ioctls::VcpuFd,
    _vm: kvm_ioctls::VmFd,
    ram: GuestRam,
    regs: arch::EntryRegs,
}

impl FloorVm {
    /// A new VM on `image`, set up to run its exiting instruction.
    pub fn new(hv: &Hypervisor, image: &FloorImage) -> Result<FloorVm, FloorError> {
        let kvm_err = |what| move |source| FloorError::Kvm { what, source };
        // Mapped first, as the engine does (`Vm::restore`), so that it is dropped last.
        let ram = GuestRam::from_file(&image.file, image.mem_size as usize).map_err(FloorError::Memory)?;
        let vm = hv.kvm().create_vm().map_err(kvm_err("create a VM"))?;
        // SAFETY: `vm` and the vCPU made below are declared after `ram`, so an early return
        // drops them first; on success they move into the `FloorVm`, whose field order drops
        // the vCPU and the VM before the memory.
        unsafe { ram.register(&vm) }.map_err(kvm_err("register guest memory"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("create a vCPU"))?;
        arch::setup_vcpu(&vcpu, &hv.vcpu_cpuid(0, 1), layout::IMAGE_BASE, EntryMode::Native)
            .map_err(FloorError::Arch)?;
        let regs = arch::EntryRegs::read(&vcpu).map_err(FloorError::Arch)?;
        Ok(FloorVm { vcpu, _vm: vm, ram, regs })
    }

    fn run_to_exit(&mut self) -> Result<(), FloorError> {
        loop {
            match self.vcpu.run() {
                Ok(exit) if arch::is_floor_exit(&exit) => return Ok(()),
                Ok(other) => return Err(FloorError::UnexpectedExit { exit: format!("{other:?}") }),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(source) => return Err(FloorError::Kvm { what: "run the floor guest", source }),
            }
        }
    }

    /// The reuse floor: remap the memory file in place, reset the registers, run to the
    /// first exit. Returns the time that took.
    pub fn reuse_cycle(&mut self, image: &FloorImage) -> Result<Duration, FloorError> {
        let start = Instant::now();
        self.ram.remap_file(&image.file).map_err(FloorError::Memory)?;
        self.regs.write(&mut self.vcpu).map_err(FloorError::Arch)?;
        self.run_to_exit()?;
        Ok(start.elapsed())
    }
}

/// Creates a minimal VM with `mem_size` bytes of anonymous memory, runs it to its first
/// exit and destroys it.
pub fn fresh_cycle(hv: &Hypervisor, mem_size: u64) -> Result<FloorSample, FloorError> {
    FloorImage::new(mem_size)?.fresh_cycle(hv)
}

/// Median of a set of durations in microseconds (sorted copy).
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_pick_ranks() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
