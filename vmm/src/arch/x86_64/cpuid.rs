//! The guest's CPUID: what KVM supports on this host, filtered to what it also accepts.

use super::ArchError;
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Leaf 7 subleaf 0, EDX bit 29: IA32_ARCH_CAPABILITIES. Some KVM implementations (PVM on
/// these hosts) advertise it yet refuse the MSR, which breaks guests that read it.
const LEAF7_EDX_ARCH_CAPABILITIES: u32 = 1 << 29;
/// Leaf 1, ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1, ECX bit 24: TSC deadline timer, which needs an in-kernel LAPIC mu2 does not create.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// What KVM supports on this host, filtered to what it also accepts from a guest.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, ArchError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| ArchError::Kvm { what: "reporting its supported CPUID", source })?;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                entry.ecx &= !LEAF1_ECX_TSC_DEADLINE;
            }
            7 if entry.index == 0 => entry.edx &= !LEAF7_EDX_ARCH_CAPABILITIES,
            _ => {}
        }
    }
    Ok(cpuid)
}

/// The CPUID table for vCPU `index` of a VM with `count` vCPUs: APIC IDs and counts.
pub fn vcpu_cpuid(base: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            // EBX[31:24]: initial APIC ID; EBX[23:16]: logical processors per package.
            1 => entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16),
            0xb | 0x1f => entry.edx = u32::from(index),
            _ => {}
        }
    }
    cpuid
}
