//! The raw KVM floors: what the KVM steps of a request cost on this host at the least,
//! measured in the same run as any mu2 figure so that figures compare as ratios.
//!
//! A floor VM has the memory size, the kind of memory file and the CPUID table of the image it
//! is compared with (`FloorImage::like`), but no devices and no guest beyond the page tables
//! and one exiting instruction at the entry point (`arch::floor_code`: an `out` on x86_64, an
//! MMIO write on aarch64). Each floor is the minimum of the work its mode does on the request
//! path:
//! - fresh (`FloorImage::fresh_cycle`): map, KVM_CREATE_VM, the memory slot, a vCPU, CPUID,
//!   entry registers, KVM_RUN to the first exit — each step timed;
//! - pool (`FloorImage::ready_vm`, `FloorVm::run_once`): a VM made and run once beforehand,
//!   then one KVM_RUN to its next exit;
//! - reuse (`FloorVm::reuse_cycle`): a kept VM, mappings left in place, one KVM_RUN to its
//!   next exit.
//!
//! The caller keeps a `FloorVm` alive while it measures, as an engine has VMs alive while it
//! serves: destroying a process's last VM makes the next vCPU creation patch kernel text
//! again, which no request of a running engine pays. And it destroys floor VMs on another
//! thread (`fresh_cycle_kept`), as an engine's reaper does: a destruction right before the
//! next creation on the same thread makes that creation wait for its grace periods.

use std::time::{Duration, Instant};

use mu2_abi::layout;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::{self, EntryMode};
use crate::hypervisor::Hypervisor;
use crate::image::Image;
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

/// How long each KVM step of a floor VM's life took. The steps are those every restored VM
/// takes too (`Vm::restore`), in the same order; a step a floor cycle does not take is zero.
#[derive(Debug, Clone, Copy, Default)]
pub struct FloorSteps {
    /// Mapping the memory file copy-on-write (mmap).
    pub map: Duration,
    /// KVM_CREATE_VM.
    pub create_vm: Duration,
    /// KVM_SET_USER_MEMORY_REGION: the one memory slot.
    pub memory_slot: Duration,
    /// KVM_CREATE_VCPU and mapping its `kvm_run`.
    pub create_vcpu: Duration,
    /// KVM_SET_CPUID2 (KVM_ARM_VCPU_INIT on aarch64).
    pub cpuid: Duration,
    /// The entry registers (special and general registers, FPU; or the one-reg list).
    pub registers: Duration,
    /// KVM_RUN until the guest's first exit.
    pub first_run: Duration,
    /// Closing the vCPU and the VM and unmapping memory.
    pub teardown: Duration,
}

impl FloorSteps {
    /// The steps' names, in order, as reports print them.
    pub const NAMES: [&'static str; 8] =
        ["map", "create_vm", "memory_slot", "create_vcpu", "cpuid", "registers", "first_run", "teardown"];

    /// The steps' durations, in the order of [`FloorSteps::NAMES`].
    pub fn durations(&self) -> [Duration; 8] {
        [
            self.map,
            self.create_vm,
            self.memory_slot,
            self.create_vcpu,
            self.cpuid,
            self.registers,
            self.first_run,
            self.teardown,
        ]
    }
}

/// Durations of one floor cycle.
#[derive(Debug, Clone, Copy)]
pub struct FloorSample {
    /// What the floor compares with a request: for the fresh floor, the mmap through the
    /// first guest exit; for the pool and reuse floors, the one KVM_RUN to the first exit of a
    /// VM made (and run once) beforehand.
    pub create_to_exit: Duration,
    /// Closing the vCPU and VM and unmapping memory.
    pub teardown: Duration,
    /// Every step of the cycle (untimed steps zero).
    pub steps: FloorSteps,
}

/// The floor guest's memory: boot tables and one exiting instruction, in a file mapped
/// copy-on-write by every floor VM, as a frozen image's memory file is; and the CPUID table its
/// vCPU gets.
#[derive(Debug)]
pub struct FloorImage {
    file: std::fs::File,
    mem_size: u64,
    cpuid: arch::CpuId,
    /// Where the memory file lives: `memfd`, or the directory it was made in.
    backing: String,
}

impl FloorImage {
    /// Builds the floor guest's memory file for VMs of `mem_size` bytes, in memory (memfd),
    /// with this host's CPUID table.
    pub fn new(hv: &Hypervisor, mem_size: u64) -> Result<FloorImage, FloorError> {
        let file = crate::sys::memfd(c"mu2-floor").map_err(FloorError::Image)?;
        Self::write(file, mem_size, hv.vcpu_cpuid(0, 1), "memfd".into())
    }

    /// The floor for forks of `image`, under the same conditions: the same memory size, the
    /// memory file on the same file system (an unnamed file in the image's directory, so its
    /// pages come from the same kind of page cache), the image's CPUID table for vCPU 0.
    /// Falls back to a memfd where the file system cannot make unnamed files.
    pub fn like(hv: &Hypervisor, image: &Image) -> Result<FloorImage, FloorError> {
        let mem_size = image.state().mem_size;
        let cpuid = image.restore_plans().first().map(|r| &r.cpuid).cloned().unwrap_or_else(|| hv.vcpu_cpuid(0, 1));
        let dir = image.dir();
        match crate::sys::unnamed_file_in(dir) {
            Ok(file) => Self::write(file, mem_size, cpuid, dir.display().to_string()),
            Err(e) => {
                log::info!("floor image in memory: {} cannot hold an unnamed file ({e})", dir.display());
                let file = crate::sys::memfd(c"mu2-floor").map_err(FloorError::Image)?;
                Self::write(file, mem_size, cpuid, "memfd".into())
            }
        }
    }

    fn write(
        mut file: std::fs::File,
        mem_size: u64,
        cpuid: arch::CpuId,
        backing: String,
    ) -> Result<FloorImage, FloorError> {
        use std::io::{Seek, SeekFrom, Write};
        let io = FloorError::Image;
        let ram = GuestRam::anonymous(mem_size as usize).map_err(FloorError::Memory)?;
        let mem = ram.memory();
        arch::write_boot_data(mem, mem_size, b"\0", EntryMode::Native).map_err(FloorError::Arch)?;
        mem.write_slice(&arch::floor_code(), GuestAddress(layout::IMAGE_BASE)).map_err(FloorError::Code)?;
        file.set_len(mem_size).map_err(io)?;
        let bytes = ram.as_slice();
        // Only the low pages and the code page hold anything.
        for (offset, len) in [(0u64, layout::STACK_BOTTOM as usize), (layout::IMAGE_BASE, 4096)] {
            file.seek(SeekFrom::Start(offset)).map_err(io)?;
            file.write_all(&bytes[offset as usize..offset as usize + len]).map_err(io)?;
        }
        Ok(FloorImage { file, mem_size, cpuid, backing })
    }

    /// Where the memory file lives: `memfd`, or the directory it was made in.
    pub fn backing(&self) -> &str {
        &self.backing
    }

    /// The memory size of its VMs.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The fresh floor: creates a minimal VM on this image, runs it to its first exit and
    /// destroys it, timing each step. What a fresh-mode request does at the least.
    pub fn fresh_cycle(&self, hv: &Hypervisor) -> Result<FloorSample, FloorError> {
        let (mut sample, vm) = self.fresh_cycle_kept(hv)?;
        sample.steps.teardown = vm.destroy();
        sample.teardown = sample.steps.teardown;
        Ok(sample)
    }

    /// [`FloorImage::fresh_cycle`] without the teardown: the VM is handed back alive, for the
    /// caller to destroy elsewhere ([`FloorVm::destroy`]), as an engine's reaper thread
    /// destroys its VMs off the request path. Destroying a VM right before creating the next
    /// one on the same thread makes the creation wait for the destruction's grace periods,
    /// which no request of an engine does.
    pub fn fresh_cycle_kept(&self, hv: &Hypervisor) -> Result<(FloorSample, FloorVm), FloorError> {
        let start = Instant::now();
        let (mut vm, mut steps) = FloorVm::build(hv, self)?;
        let ran = Instant::now();
        vm.run_to_exit()?;
        steps.first_run = ran.elapsed();
        let create_to_exit = start.elapsed();
        Ok((FloorSample { create_to_exit, teardown: Duration::ZERO, steps }, vm))
    }

    /// A VM for the pool floor: made and run to its first exit, its registers put back, as a
    /// pool builder makes and warms up a VM. [`FloorVm::run_once`] is then the pool floor: one
    /// KVM_RUN to one exit on a VM that is ready, what a pooled request does at the least.
    pub fn ready_vm(&self, hv: &Hypervisor) -> Result<FloorVm, FloorError> {
        let (mut vm, _) = FloorVm::build(hv, self)?;
        vm.warm()?;
        Ok(vm)
    }
}

/// A kept floor VM, for the reuse floor; alive, it also keeps the host's KVM state of a
/// process with VMs (static keys enabled), as every engine has while it serves.
#[derive(Debug)]
pub struct FloorVm {
    vcpu: kvm_ioctls::VcpuFd,
    _vm: kvm_ioctls::VmFd,
    // The guest's memory, mapped for as long as the VM lives (dropped after it).
    _ram: GuestRam,
    regs: arch::EntryRegs,
}

impl FloorVm {
    /// A new VM on `image`, set up to run its exiting instruction.
    pub fn new(hv: &Hypervisor, image: &FloorImage) -> Result<FloorVm, FloorError> {
        Self::build(hv, image).map(|(vm, _)| vm)
    }

    /// A new VM on `image` and how long each step of making it took.
    fn build(hv: &Hypervisor, image: &FloorImage) -> Result<(FloorVm, FloorSteps), FloorError> {
        let kvm_err = |what| move |source| FloorError::Kvm { what, source };
        let mut steps = FloorSteps::default();
        let mut lap = Lap(Instant::now());
        // Mapped first, as the engine does (`Vm::restore`), so that it is dropped last.
        let ram = GuestRam::from_file(&image.file, image.mem_size as usize).map_err(FloorError::Memory)?;
        steps.map = lap.next();
        let vm = hv.kvm().create_vm().map_err(kvm_err("create a VM"))?;
        steps.create_vm = lap.next();
        // SAFETY: `vm` and the vCPU made below are declared after `ram`, so an early return
        // drops them first; on success they move into the `FloorVm`, whose field order drops
        // the vCPU and the VM before the memory.
        unsafe { ram.register(&vm) }.map_err(kvm_err("register guest memory"))?;
        steps.memory_slot = lap.next();
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("create a vCPU"))?;
        steps.create_vcpu = lap.next();
        arch::set_cpuid(&vcpu, &image.cpuid).map_err(kvm_err("set the CPUID table"))?;
        steps.cpuid = lap.next();
        arch::setup_registers(&vcpu, &image.cpuid, layout::IMAGE_BASE, EntryMode::Native).map_err(FloorError::Arch)?;
        steps.registers = lap.next();
        let regs = arch::EntryRegs::read(&vcpu).map_err(FloorError::Arch)?;
        Ok((FloorVm { vcpu, _vm: vm, _ram: ram, regs }, steps))
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

    /// The reuse floor: the kept VM's registers put back (untimed in `create_to_exit`, as a
    /// reuse-mode reset happens after the response, off the request path; its time is the
    /// `registers` step), then the timed KVM_RUN to the first exit. Memory is left mapped, as
    /// the engine's fast reset leaves it. What a reused request does at the least.
    pub fn reuse_cycle(&mut self) -> Result<FloorSample, FloorError> {
        let mut steps = FloorSteps::default();
        let reset = Instant::now();
        self.regs.write(&mut self.vcpu).map_err(FloorError::Arch)?;
        steps.registers = reset.elapsed();
        let ran = Instant::now();
        self.run_to_exit()?;
        steps.first_run = ran.elapsed();
        Ok(FloorSample { create_to_exit: steps.first_run, teardown: Duration::ZERO, steps })
    }

    /// The pool floor on a VM from [`FloorImage::ready_vm`]: the timed KVM_RUN to its next exit.
    pub fn run_once(&mut self) -> Result<FloorSample, FloorError> {
        let mut steps = FloorSteps::default();
        let ran = Instant::now();
        self.run_to_exit()?;
        steps.first_run = ran.elapsed();
        Ok(FloorSample { create_to_exit: steps.first_run, teardown: Duration::ZERO, steps })
    }

    /// Closes the vCPU and the VM and unmaps memory; returns how long that took.
    pub fn destroy(self) -> Duration {
        let start = Instant::now();
        drop(self);
        start.elapsed()
    }

    /// Runs the kept VM once, so that its guest pages are mapped before the reuse floor.
    pub fn warm(&mut self) -> Result<(), FloorError> {
        self.run_to_exit()?;
        self.regs.write(&mut self.vcpu).map_err(FloorError::Arch)
    }
}

/// Successive laps of a stopwatch.
struct Lap(Instant);

impl Lap {
    fn next(&mut self) -> Duration {
        let now = Instant::now();
        let lap = now - self.0;
        self.0 = now;
        lap
    }
}

/// Creates a minimal VM with `mem_size` bytes of memory (a memfd), runs it to its first exit
/// and destroys it.
pub fn fresh_cycle(hv: &Hypervisor, mem_size: u64) -> Result<FloorSample, FloorError> {
    FloorImage::new(hv, mem_size)?.fresh_cycle(hv)
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
