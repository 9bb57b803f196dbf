//! KVM register identifiers for KVM_{GET,SET}_ONE_REG on arm64.

use kvm_bindings::{
    kvm_regs, user_pt_regs, KVM_REG_ARM64, KVM_REG_ARM64_SYSREG, KVM_REG_ARM_CORE, KVM_REG_SIZE_MASK,
    KVM_REG_SIZE_SHIFT, KVM_REG_SIZE_U64,
};
use std::mem::offset_of;

/// A 64-bit core register at byte `offset` of `struct kvm_regs`.
const fn core(offset: usize) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE as u64 | (offset / 4) as u64
}

/// General register Xn.
pub const fn x(n: usize) -> u64 {
    core(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, regs) + n * 8)
}
pub const PC: u64 = core(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, pc));
pub const PSTATE: u64 = core(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, pstate));
pub const SP_EL1: u64 = core(offset_of!(kvm_regs, sp_el1));
pub const ELR_EL1: u64 = core(offset_of!(kvm_regs, elr_el1));

/// A 64-bit system register by its encoding.
pub const fn sys(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG as u64
        | (op0 << 14)
        | (op1 << 11)
        | (crn << 7)
        | (crm << 3)
        | op2
}
pub const SCTLR_EL1: u64 = sys(3, 0, 1, 0, 0);
pub const CPACR_EL1: u64 = sys(3, 0, 1, 0, 2);
pub const TTBR0_EL1: u64 = sys(3, 0, 2, 0, 0);
pub const TCR_EL1: u64 = sys(3, 0, 2, 0, 2);
pub const FAR_EL1: u64 = sys(3, 0, 6, 0, 0);
pub const MAIR_EL1: u64 = sys(3, 0, 10, 2, 0);
pub const VBAR_EL1: u64 = sys(3, 0, 12, 0, 0);
/// The virtual counter (KVM_REG_ARM_TIMER_CNT): writing it moves the VM's counter offset.
pub const TIMER_CNT: u64 = sys(3, 3, 14, 3, 2);

/// Size in bytes of the register `id` names.
pub fn size(id: u64) -> usize {
    1usize << ((id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)
}

/// Whether `id` is an ID register (op0 3, op1 0, CRn 0): fixed per VM, refused once it ran.
pub fn is_id_register(id: u64) -> bool {
    (id & 0x0fff_0000) == u64::from(KVM_REG_ARM64_SYSREG) && (id & 0xffff) >> 7 == 3 << 7
}

/// Whether `id` is a KVM firmware pseudo-register (PSCI version, SMCCC bitmaps): fixed per VM.
pub fn is_firmware_register(id: u64) -> bool {
    let coproc = (id >> 16) & 0xfff;
    coproc == 0x14 || coproc == 0x16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_match_the_kernel_headers() {
        assert_eq!(PC, 0x6030_0000_0010_0040);
        assert_eq!(x(0), 0x6030_0000_0010_0000);
        assert_eq!(SP_EL1, 0x6030_0000_0010_0044);
        assert_eq!(TIMER_CNT, 0x6030_0000_0013_df1a);
        assert_eq!(size(PC), 8);
        assert!(is_id_register(sys(3, 0, 0, 4, 0)));
        assert!(!is_id_register(SCTLR_EL1));
    }
}
