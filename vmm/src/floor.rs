//! The raw KVM floor: what creating a minimal VM and running it to its first exit costs on
//! this host, measured in the same run as any mu2 figure so that figures compare as ratios.
//!
//! The floor VM has the same memory size and CPU setup as a mu2 VM but no devices, no image
//! and no boot data beyond the page tables: one `out` instruction at the entry point.

use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use mu2_abi::layout;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::{self, EntryMode};
use crate::hypervisor::Hypervisor;
use crate::memory::GuestRam;
use crate::vm::BuildError;

/// The port the floor guest writes to; any exit would do.
const FLOOR_PORT: u8 = 0x80;

/// Durations of one floor cycle.
#[derive(Debug, Clone, Copy)]
pub struct FloorSample {
    /// KVM_CREATE_VM through the first guest exit.
    pub create_to_exit: Duration,
    /// Closing the vCPU and VM and unmapping memory.
    pub teardown: Duration,
}

/// Creates a minimal VM with `mem_size` bytes of memory, runs it to its first exit and
/// destroys it.
pub fn fresh_cycle(hv: &Hypervisor, mem_size: u64) -> Result<FloorSample, BuildError> {
    let kvm_err = |what| move |source| BuildError::Kvm { what, source };
    let start = Instant::now();
    let vm_fd = hv.kvm().create_vm().map_err(kvm_err("create a VM"))?;
    let ram = GuestRam::anonymous(mem_size as usize).map_err(BuildError::Memory)?;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem_size,
        userspace_addr: ram.host_address(),
    };
    // SAFETY: `ram` maps `mem_size` bytes and outlives the VM (dropped after it below).
    unsafe { vm_fd.set_user_memory_region(region) }.map_err(kvm_err("register guest memory"))?;
    let mem = ram.memory();
    arch::write_boot_data(mem, mem_size, b"\0", EntryMode::Native).map_err(BuildError::Arch)?;
    // out FLOOR_PORT, al
    mem.write_slice(&[0xe6, FLOOR_PORT], GuestAddress(layout::IMAGE_BASE))
        .map_err(|e| BuildError::Config(format!("writing the floor guest: {e}")))?;
    let mut vcpu = vm_fd.create_vcpu(0).map_err(kvm_err("create a vCPU"))?;
    arch::setup_vcpu(&vcpu, &hv.vcpu_cpuid(0, 1), layout::IMAGE_BASE, EntryMode::Native).map_err(BuildError::Arch)?;
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, _)) if port == u16::from(FLOOR_PORT) => break,
            Ok(other) => return Err(BuildError::Config(format!("floor guest stopped unexpectedly: {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(source) => return Err(BuildError::Kvm { what: "run the floor guest", source }),
        }
    }
    let create_to_exit = start.elapsed();
    let torn = Instant::now();
    drop(vcpu);
    drop(vm_fd);
    drop(ram);
    Ok(FloorSample { create_to_exit, teardown: torn.elapsed() })
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
