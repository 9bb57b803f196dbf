//! Saving and restoring an x86_64 vCPU.
//!
//! Saved: general and special registers, FPU/SSE/AVX state (XSAVE), XCRs, every MSR KVM
//! lists that it also lets us read, vCPU events, debug registers, MP state and the CPUID
//! table. The VM has no in-kernel irqchip or PIT, so there is no LAPIC/PIC/PIT state.
//!
//! Restoring is the hot path of a fork, and each ioctl costs 10–80 µs on the hosts we run
//! on. So a [`RestorePlan`] is computed once per image by comparing the saved state with a
//! freshly created vCPU: a fork then sets only what differs from what a new vCPU already has.
//! KVM's ordering rules are kept: CPUID first, special registers before MSRs, events after
//! the registers they refer to.

use kvm_bindings::{
    kvm_debugregs, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::ArchError;

/// MSRs never restored: the TSC (a restored guest rebases its clock on the host time it is
/// handed, so the fresh vCPU's counter is fine and setting it would cost an ioctl) and
/// MSRs whose value is derived from others.
const SKIPPED_MSRS: &[u32] = &[
    0x10,  // IA32_TSC
    0x3b,  // IA32_TSC_ADJUST
    0x6e0, // IA32_TSC_DEADLINE: no LAPIC
];

/// One vCPU's state, as plain data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VcpuState {
    /// Index of the vCPU in its VM.
    pub index: u8,
    /// CPUID table the vCPU was given.
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state: the legacy 4 KiB XSAVE region.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// MSRs as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> ArchError {
    move |source| ArchError::Kvm { what, source }
}

/// The MSRs worth saving on this host: KVM's list, minus those it will not let us read.
pub fn saved_msr_indices(kvm: &Kvm, probe: &VcpuFd) -> Result<Vec<u32>, ArchError> {
    let list = kvm.get_msr_index_list().map_err(kvm_err("listing MSRs"))?;
    let mut readable = Vec::new();
    for &index in list.as_slice() {
        if SKIPPED_MSRS.contains(&index) {
            continue;
        }
        if read_msrs(probe, &[index]).is_ok_and(|v| v.len() == 1) {
            readable.push(index);
        }
    }
    Ok(readable)
}

fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, ArchError> {
    let entries: Vec<kvm_bindings::kvm_msr_entry> =
        indices.iter().map(|&index| kvm_bindings::kvm_msr_entry { index, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| ArchError::TooManyMsrs(indices.len()))?;
    let read = vcpu.get_msrs(&mut msrs).map_err(kvm_err("reading MSRs"))?;
    Ok(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)).collect())
}

fn write_msrs(vcpu: &VcpuFd, values: &[(u32, u64)]) -> Result<(), ArchError> {
    if values.is_empty() {
        return Ok(());
    }
    let entries: Vec<kvm_bindings::kvm_msr_entry> =
        values.iter().map(|&(index, data)| kvm_bindings::kvm_msr_entry { index, data, ..Default::default() }).collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| ArchError::TooManyMsrs(values.len()))?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm_err("setting MSRs"))?;
    if written != values.len() {
        let failed = values.get(written).map_or(0, |v| v.0);
        return Err(ArchError::MsrRefused(failed));
    }
    Ok(())
}

impl VcpuState {
    /// Reads the state of a vCPU that is stopped at a consistent point (no exit pending).
    pub fn save(vcpu: &VcpuFd, index: u8, cpuid: &CpuId, msr_indices: &[u32]) -> Result<Self, ArchError> {
        Ok(VcpuState {
            index,
            cpuid: cpuid.as_slice().to_vec(),
            regs: vcpu.get_regs().map_err(kvm_err("reading registers"))?,
            sregs: vcpu.get_sregs().map_err(kvm_err("reading special registers"))?,
            xsave: vcpu.get_xsave().map_err(kvm_err("reading the XSAVE area"))?.region.to_vec(),
            xcrs: vcpu.get_xcrs().map_err(kvm_err("reading XCRs"))?,
            msrs: read_msrs(vcpu, msr_indices)?,
            events: vcpu.get_vcpu_events().map_err(kvm_err("reading vCPU events"))?,
            debugregs: vcpu.get_debug_regs().map_err(kvm_err("reading debug registers"))?,
            mp_state: vcpu.get_mp_state().map_err(kvm_err("reading the MP state"))?,
        })
    }

    /// The indices of the MSRs this state saved.
    pub fn msr_indices(&self) -> Vec<u32> {
        self.msrs.iter().map(|(i, _)| *i).collect()
    }

    /// The CPUID table to give the vCPU before anything else.
    pub fn cpuid(&self) -> Result<CpuId, ArchError> {
        CpuId::from_entries(&self.cpuid).map_err(ArchError::CpuidTable)
    }

    /// Compares with a fresh vCPU of the same VM layout and keeps only what differs.
    pub fn plan(&self, fresh: &VcpuState) -> RestorePlan {
        let msrs: Vec<(u32, u64)> = self
            .msrs
            .iter()
            .filter(|(index, value)| fresh.msrs.iter().find(|(i, _)| i == index).is_none_or(|(_, v)| v != value))
            .copied()
            .collect();
        RestorePlan {
            xsave: self.xsave != fresh.xsave,
            xcrs: self.xcrs != fresh.xcrs,
            msrs,
            events: self.events != fresh.events,
            debugregs: self.debugregs != fresh.debugregs,
            mp_state: self.mp_state.mp_state != KVM_MP_STATE_RUNNABLE && self.mp_state != fresh.mp_state,
        }
    }

    /// Puts the state into a fresh vCPU, setting only what `plan` says a fresh vCPU lacks.
    /// CPUID must have been set already (see [`VcpuState::cpuid`]).
    pub fn restore(&self, vcpu: &VcpuFd, plan: &RestorePlan) -> Result<(), ArchError> {
        vcpu.set_sregs(&self.sregs).map_err(kvm_err("setting special registers"))?;
        if plan.xsave {
            let mut xsave = kvm_xsave::default();
            if self.xsave.len() != xsave.region.len() {
                return Err(ArchError::BadState(format!("XSAVE region of {} words", self.xsave.len())));
            }
            xsave.region.copy_from_slice(&self.xsave);
            // SAFETY: KVM_SET_XSAVE reads as many bytes as this vCPU's XSAVE buffer holds in
            // KVM (the size KVM_CAP_XSAVE2 reports), which exceeds the 4 KiB `kvm_xsave` only
            // when the process granted the guest dynamically enabled features (AMX) with
            // ARCH_REQ_XCOMP_GUEST_PERM; mu2 never does, so a whole `kvm_xsave` is as large as
            // KVM reads. Its contents may come from an image made on another host: KVM checks
            // them (unknown features, reserved bits) and refuses what this vCPU cannot take.
            unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm_err("setting the XSAVE area"))?;
        }
        if plan.xcrs {
            vcpu.set_xcrs(&self.xcrs).map_err(kvm_err("setting XCRs"))?;
        }
        write_msrs(vcpu, &plan.msrs)?;
        if plan.debugregs {
            vcpu.set_debug_regs(&self.debugregs).map_err(kvm_err("setting debug registers"))?;
        }
        if plan.mp_state {
            vcpu.set_mp_state(self.mp_state).map_err(kvm_err("setting the MP state"))?;
        }
        vcpu.set_regs(&self.regs).map_err(kvm_err("setting registers"))?;
        if plan.events {
            vcpu.set_vcpu_events(&self.events).map_err(kvm_err("setting vCPU events"))?;
        }
        Ok(())
    }

    /// The plan that puts every saved piece of state back, whatever the vCPU holds now (to
    /// reset a kept vCPU between requests, where a request may have changed anything).
    /// `probe` is a fresh vCPU of the same layout: MSRs that KVM refuses to take back from
    /// the host (some paravirtual ones) are found there once and left out.
    pub fn reset_plan(&self, probe: &VcpuFd) -> RestorePlan {
        let msrs = self.msrs.iter().filter(|&&msr| write_msrs(probe, &[msr]).is_ok()).copied().collect();
        RestorePlan {
            xsave: true,
            xcrs: true,
            msrs,
            events: true,
            debugregs: true,
            mp_state: self.mp_state.mp_state != KVM_MP_STATE_RUNNABLE,
        }
    }

    /// The MSRs a reset plan leaves out (not writable by the host), for reports.
    pub fn unresettable_msrs(&self, plan: &RestorePlan) -> Vec<u32> {
        self.msrs.iter().map(|(i, _)| *i).filter(|i| !plan.msrs.iter().any(|(j, _)| j == i)).collect()
    }
}

/// Which parts of a [`VcpuState`] a fresh vCPU lacks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestorePlan {
    xsave: bool,
    xcrs: bool,
    msrs: Vec<(u32, u64)>,
    events: bool,
    debugregs: bool,
    mp_state: bool,
}

impl RestorePlan {
    /// How many ioctls a restore with this plan issues (for reports).
    pub fn ioctls(&self) -> usize {
        2 + usize::from(self.xsave)
            + usize::from(self.xcrs)
            + usize::from(!self.msrs.is_empty())
            + usize::from(self.events)
            + usize::from(self.debugregs)
            + usize::from(self.mp_state)
    }
}
