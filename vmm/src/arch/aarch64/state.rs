//! Saving and restoring an aarch64 vCPU: every register KVM_GET_REG_LIST names (general,
//! FP/SIMD, system registers, the timer's CTL/CVAL, firmware pseudo-registers), read and
//! written through ONE_REG, plus the MP state. The VM has no in-kernel GIC, so there is no
//! interrupt-controller state.
//!
//! As on x86_64, a [`RestorePlan`] computed once per image against a fresh vCPU keeps only
//! the registers whose values differ, and the virtual counter is never restored: a fresh VM's
//! counter starts near zero, and the guest rebases its clock on the host time it is handed.

use kvm_bindings::{kvm_mp_state, RegList, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::{regs, ArchError, CpuId};

/// Registers never restored (see the module documentation).
const SKIPPED: &[u64] = &[regs::TIMER_CNT];
/// The most registers kvm-bindings' `RegList` holds (about twice what arm64 KVM lists
/// without SVE).
const REG_LIST_CAPACITY: usize = 500;

/// One vCPU's state, as plain data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VcpuState {
    /// Index of the vCPU in its VM.
    pub index: u8,
    /// How the vCPU was initialised (KVM_ARM_VCPU_INIT).
    pub init: CpuId,
    /// Every listed register KVM let us read, as (id, little-endian value), in list order.
    pub regs: Vec<(u64, Vec<u8>)>,
    /// Multiprocessing state (runnable, stopped).
    pub mp_state: u32,
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> ArchError {
    move |source| ArchError::Kvm { what, source }
}

/// Nothing to probe on aarch64: the registers are listed per vCPU when it is saved.
pub fn saved_msr_indices(_kvm: &Kvm, _probe: &VcpuFd) -> Result<Vec<u32>, ArchError> {
    Ok(Vec::new())
}

fn reg_list(vcpu: &VcpuFd) -> Result<Vec<u64>, ArchError> {
    let mut list = RegList::new(REG_LIST_CAPACITY).map_err(ArchError::RegisterList)?;
    vcpu.get_reg_list(&mut list).map_err(kvm_err("listing registers"))?;
    Ok(list.as_slice().to_vec())
}

fn write(vcpu: &VcpuFd, id: u64, value: &[u8]) -> Result<(), ArchError> {
    if value.len() != regs::size(id) {
        return Err(ArchError::BadState(format!("register {id:#x} saved with {} bytes", value.len())));
    }
    vcpu.set_one_reg(id, value).map(|_| ()).map_err(|source| ArchError::Register { id, source })
}

impl VcpuState {
    /// Reads the state of a vCPU that is stopped at a consistent point (no exit pending).
    pub fn save(vcpu: &VcpuFd, index: u8, cpuid: &CpuId, _msr_indices: &[u32]) -> Result<Self, ArchError> {
        let mut saved = Vec::new();
        for id in reg_list(vcpu)? {
            let mut value = vec![0u8; regs::size(id)];
            match vcpu.get_one_reg(id, &mut value) {
                Ok(_) => saved.push((id, value)),
                Err(e) => log::debug!("register {id:#x} not readable ({e}); not saved"),
            }
        }
        let mp_state = vcpu.get_mp_state().map_err(kvm_err("reading the MP state"))?.mp_state;
        Ok(VcpuState { index, init: *cpuid, regs: saved, mp_state })
    }

    /// How to initialise the vCPU before anything else.
    pub fn cpuid(&self) -> Result<CpuId, ArchError> {
        Ok(self.init)
    }

    /// aarch64 has no MSRs; registers are listed when saved.
    pub fn msr_indices(&self) -> Vec<u32> {
        Vec::new()
    }

    /// Compares with a fresh vCPU of the same VM layout and keeps only what differs.
    pub fn plan(&self, fresh: &VcpuState) -> RestorePlan {
        let regs = self
            .regs
            .iter()
            .filter(|(id, value)| {
                !SKIPPED.contains(id) && fresh.regs.iter().find(|(f, _)| f == id).is_none_or(|(_, v)| v != value)
            })
            .cloned()
            .collect();
        RestorePlan { regs, mp_state: self.mp_state != fresh.mp_state }
    }

    /// Puts the state into a vCPU initialised with [`VcpuState::cpuid`], setting only what
    /// `plan` lists.
    pub fn restore(&self, vcpu: &VcpuFd, plan: &RestorePlan) -> Result<(), ArchError> {
        for (id, value) in &plan.regs {
            write(vcpu, *id, value)?;
        }
        if plan.mp_state {
            vcpu.set_mp_state(kvm_mp_state { mp_state: self.mp_state }).map_err(kvm_err("setting the MP state"))?;
        }
        Ok(())
    }

    /// The plan that puts back everything a request may have changed (reuse mode): every
    /// register but the counter, the ID registers and the firmware pseudo-registers (fixed
    /// per VM, and refused once it ran), and those `probe` (a fresh vCPU) refuses.
    pub fn reset_plan(&self, probe: &VcpuFd) -> RestorePlan {
        let regs = self
            .regs
            .iter()
            .filter(|(id, value)| {
                !SKIPPED.contains(id)
                    && !regs::is_id_register(*id)
                    && !regs::is_firmware_register(*id)
                    && write(probe, *id, value).is_ok()
            })
            .cloned()
            .collect();
        RestorePlan { regs, mp_state: self.mp_state != KVM_MP_STATE_RUNNABLE }
    }

    /// Nothing is left out of a reset plan the way x86 MSRs can be.
    pub fn unresettable_msrs(&self, _plan: &RestorePlan) -> Vec<u32> {
        Vec::new()
    }
}

/// Which registers a restore writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestorePlan {
    regs: Vec<(u64, Vec<u8>)>,
    mp_state: bool,
}

impl RestorePlan {
    /// How many ioctls a restore with this plan issues (for reports).
    pub fn ioctls(&self) -> usize {
        self.regs.len() + usize::from(self.mp_state)
    }
}
