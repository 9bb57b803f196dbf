//! aarch64: vCPU initialisation, page and vector tables, the devicetree, vCPU registers,
//! guest loading and fault decoding.
//!
//! Exports the same names as `arch::x86_64` so that the VM builder stays free of
//! architecture conditionals. The memory map is the one `mu2_abi::layout` describes for both
//! architectures: KVM/arm64 imposes none (no GIC is created, there is no firmware), so RAM
//! starts at 0 here too and the MMIO window sits at the same place.
//!
//! The guest starts at EL1h with the MMU on: the VMM writes identity-mapped page tables and a
//! vector table (see `tables`) and sets the system registers through ONE_REG, so the guest
//! runs no set-up code. X0 holds the devicetree's address.

mod elf;
mod fdt;
mod features;
mod regs;
mod seccomp;
mod state;
mod tables;

use std::sync::OnceLock;

use kvm_bindings::{kvm_vcpu_init, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use mu2_abi::layout;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use elf::ElfError;
#[cfg(feature = "inspect")]
pub use features::remove_features;
pub use features::{apply_template, check_recorded, guest_features, table_features, vcpu_features, CpuFeatures};
pub use seccomp::{SECCOMP_ARCH, SECCOMP_PATH_SYSCALLS};
pub use state::{saved_msr_indices, RestorePlan, VcpuState};

/// Errors of the aarch64 setup code.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// KVM refused to report or accept a CPU setting.
    #[error("KVM refused {what}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused a register value.
    #[error("KVM refused to set register {id:#x}")]
    Register {
        /// The ONE_REG identifier.
        id: u64,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures into guest memory failed.
    #[error("writing the {what} into guest memory")]
    Memory {
        /// Which structure.
        what: &'static str,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The guest image is not a loadable ELF for this machine.
    #[error("loading the guest ELF image")]
    Load(#[source] ElfError),
    /// The devicetree could not be built.
    #[error("building the devicetree")]
    Devicetree(#[source] vm_fdt::Error),
    /// The command line is not text (the devicetree carries it as a string).
    #[error("the kernel command line is not UTF-8")]
    CmdlineNotText(#[source] std::str::Utf8Error),
    /// The devicetree does not fit where it goes.
    #[error("the devicetree of {len} bytes does not fit below the HostInfo page")]
    DevicetreeTooLarge {
        /// Its size.
        len: usize,
    },
    /// KVM's register list could not be allocated.
    #[error("allocating the register list")]
    RegisterList(#[source] vmm_sys_util::fam::Error),
    /// The entry mode does not exist on this architecture.
    #[error("entry mode {0:?} is not supported on aarch64")]
    Unsupported(EntryMode),
    /// A saved state is inconsistent.
    #[error("invalid saved vCPU state: {0}")]
    BadState(String),
    /// A CPU template that does not exist on this architecture.
    #[error("the {0} CPU template is not supported on aarch64")]
    TemplateUnsupported(crate::cpu::CpuTemplate),
    /// A CPU feature name this build does not know.
    #[error("unknown CPU feature `{0}`")]
    UnknownFeature(String),
    /// The guest image would not fit where guest images go.
    #[error(
        "the guest image must be linked at or above {min:#x} and end below {max:#x}; it spans {start:#x}..{end:#x}"
    )]
    ImagePlacement {
        /// Lowest allowed address.
        min: u64,
        /// End of usable RAM.
        max: u64,
        /// Image start.
        start: u64,
        /// Image end.
        end: u64,
    },
}

/// How the vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryMode {
    /// mu2's own entry: EL1 with the MMU set up by the VMM, X0 = the devicetree.
    #[default]
    Native,
    /// The Linux boot protocol: not offered on aarch64 (refused by `setup_vcpu`).
    Linux,
}

/// How a vCPU is initialised (KVM_ARM_VCPU_INIT): the role CPUID plays on x86_64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuId {
    /// KVM's preferred target CPU on this host.
    pub target: u32,
    /// Feature bitmap (KVM_ARM_VCPU_*).
    pub features: [u32; 7],
}

impl CpuId {
    fn kvm(&self) -> kvm_vcpu_init {
        kvm_vcpu_init { target: self.target, features: self.features }
    }
}

/// aarch64 has no port I/O; the serial console is MMIO.
pub const SERIAL_PIO_BASE: Option<u16> = None;
/// The serial console's MMIO registers.
pub const SERIAL_MMIO_BASE: Option<u64> = Some(layout::SERIAL_MMIO);

/// The host's preferred vCPU configuration, read once per process.
static PREFERRED: OnceLock<CpuId> = OnceLock::new();

/// The vCPU configuration this host's KVM prefers, with PSCI 0.2 (asks a throwaway VM once).
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, ArchError> {
    if let Some(c) = PREFERRED.get() {
        return Ok(*c);
    }
    let vm = kvm.create_vm().map_err(|source| ArchError::Kvm { what: "creating a VM", source })?;
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)
        .map_err(|source| ArchError::Kvm { what: "reporting its preferred target", source })?;
    kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    Ok(*PREFERRED.get_or_init(|| CpuId { target: kvi.target, features: kvi.features }))
}

/// The configuration of vCPU `index`: vCPUs other than 0 start powered off, as secondary
/// CPUs do until the guest starts them through PSCI.
pub fn vcpu_cpuid(base: &CpuId, index: u8, _count: u8) -> CpuId {
    let mut c = *base;
    if index > 0 {
        c.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
    }
    c
}

/// Initialises a new vCPU (KVM_ARM_VCPU_INIT); first thing after creating it.
pub fn set_cpuid(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), kvm_ioctls::Error> {
    vcpu.vcpu_init(&cpuid.kvm())
}

/// The configuration a vCPU was initialised with (KVM cannot report it back: the host's).
pub fn get_cpuid(vcpu: &VcpuFd) -> Result<CpuId, kvm_ioctls::Error> {
    let _ = vcpu;
    PREFERRED.get().copied().ok_or_else(|| kvm_ioctls::Error::new(libc::EINVAL))
}

/// Loads a guest ELF into guest memory; returns (entry point, end of the image).
pub fn load_kernel(mem: &GuestMemoryMmap, image: &[u8], mem_size: u64) -> Result<(u64, u64), ArchError> {
    let (entry, start, end) = match elf::load(mem, image, mem_size) {
        Ok(loaded) => loaded,
        Err(ElfError::Placement { addr, size }) => {
            let end = addr.saturating_add(size);
            return Err(ArchError::ImagePlacement { min: layout::IMAGE_BASE, max: mem_size, start: addr, end });
        }
        Err(e) => return Err(ArchError::Load(e)),
    };
    if start < layout::IMAGE_BASE || end > mem_size || !(start..end).contains(&entry) {
        return Err(ArchError::ImagePlacement { min: layout::IMAGE_BASE, max: mem_size, start, end });
    }
    Ok((entry, end))
}

/// Writes everything the guest finds in memory at entry: tables and the devicetree (which
/// carries the command line as `/chosen/bootargs`).
pub fn write_boot_data(mem: &GuestMemoryMmap, mem_size: u64, cmdline: &[u8], mode: EntryMode) -> Result<(), ArchError> {
    if mode != EntryMode::Native {
        return Err(ArchError::Unsupported(mode));
    }
    tables::write(mem, mem_size)?;
    let text = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let text = std::str::from_utf8(text).map_err(ArchError::CmdlineNotText)?;
    // The vCPU count is not known here; the guest reads only memory and bootargs, and
    // secondary vCPUs stay powered off.
    let blob = fdt::build(mem_size, 1, text)?;
    if blob.len() as u64 > layout::HOST_INFO - layout::BOOT_PARAMS {
        return Err(ArchError::DevicetreeTooLarge { len: blob.len() });
    }
    mem.write_slice(&blob, GuestAddress(layout::BOOT_PARAMS))
        .map_err(|source| ArchError::Memory { what: "devicetree", source })
}

fn set(vcpu: &VcpuFd, id: u64, value: u64) -> Result<(), ArchError> {
    vcpu.set_one_reg(id, &value.to_le_bytes()).map(|_| ()).map_err(|source| ArchError::Register { id, source })
}

fn get(vcpu: &VcpuFd, id: u64) -> Option<u64> {
    let mut value = [0u8; 8];
    vcpu.get_one_reg(id, &mut value).ok()?;
    Some(u64::from_le_bytes(value))
}

/// Initialises a fresh vCPU and sets its registers so that it enters the guest at `entry`.
pub fn setup_vcpu(vcpu: &VcpuFd, cpuid: &CpuId, entry: u64, mode: EntryMode) -> Result<(), ArchError> {
    if mode != EntryMode::Native {
        return Err(ArchError::Unsupported(mode));
    }
    set_cpuid(vcpu, cpuid).map_err(|source| ArchError::Kvm { what: "initialising the vCPU", source })?;
    setup_registers(vcpu, cpuid, entry, mode)
}

/// The part of [`setup_vcpu`] after the vCPU's initialisation (KVM_ARM_VCPU_INIT, the
/// counterpart of x86's CPUID table): the registers that enter the guest at `entry` (the floor
/// times the two apart).
pub fn setup_registers(vcpu: &VcpuFd, cpuid: &CpuId, entry: u64, mode: EntryMode) -> Result<(), ArchError> {
    if mode != EntryMode::Native {
        return Err(ArchError::Unsupported(mode));
    }
    if cpuid.features[0] & (1 << KVM_ARM_VCPU_POWER_OFF) != 0 {
        return Ok(());
    }
    set(vcpu, regs::MAIR_EL1, tables::MAIR)?;
    set(vcpu, regs::TCR_EL1, tables::TCR)?;
    set(vcpu, regs::TTBR0_EL1, tables::L1)?;
    set(vcpu, regs::VBAR_EL1, tables::VECTORS)?;
    set(vcpu, regs::CPACR_EL1, tables::CPACR)?;
    set(vcpu, regs::SCTLR_EL1, tables::SCTLR)?;
    set(vcpu, regs::SP_EL1, layout::STACK_TOP)?;
    set(vcpu, regs::x(0), layout::BOOT_PARAMS)?;
    set(vcpu, regs::PSTATE, tables::PSTATE)?;
    set(vcpu, regs::PC, entry)
}

/// What the guest's vector stub reported, with the registers the VMM read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFault {
    /// Exception class (ESR_EL1 bits 31:26).
    pub vector: u32,
    /// The syndrome the stub reported (ESR_EL1, low 32 bits).
    pub esr: u32,
    /// Address of the faulting instruction (ELR_EL1); named as on x86_64 so that shared code
    /// and tests read both.
    pub rip: Option<u64>,
    /// Faulting address (FAR_EL1) for aborts.
    pub fault_address: Option<u64>,
    /// Which vector table entry was taken (0-15), if the vCPU stopped inside a stub.
    pub entry: Option<u8>,
}

/// Names an exception class.
pub fn exception_class_name(ec: u32) -> &'static str {
    match ec {
        0x00 => "undefined instruction",
        0x01 => "WFI/WFE trap",
        0x07 => "FP/SIMD access trap",
        0x0e => "illegal execution state",
        0x15 => "SVC instruction",
        0x16 => "HVC instruction",
        0x17 => "SMC instruction",
        0x18 => "system register trap",
        0x20 | 0x21 => "instruction abort",
        0x22 => "PC alignment fault",
        0x24 | 0x25 => "data abort",
        0x26 => "SP alignment fault",
        0x2f => "SError",
        0x30..=0x35 => "debug exception",
        0x3c => "BRK instruction",
        _ => "exception",
    }
}

const ENTRY_NAMES: [&str; 4] = ["synchronous", "IRQ", "FIQ", "SError"];

impl std::fmt::Display for GuestFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (EC {:#04x}, ESR {:#x})", exception_class_name(self.vector), self.vector, self.esr)?;
        match self.rip {
            Some(pc) => write!(f, " at PC {pc:#x}")?,
            None => write!(f, " at an unknown PC")?,
        }
        if let Some(addr) = self.fault_address {
            write!(f, ", address {addr:#x}")?;
        }
        if let Some(entry) = self.entry.filter(|&e| e % 4 != 0) {
            write!(f, " ({} vector)", ENTRY_NAMES[usize::from(entry % 4)])?;
        }
        Ok(())
    }
}

/// Decodes a fault report: `esr` is what the stub wrote; ELR_EL1 and FAR_EL1 come from the
/// stopped vCPU. Nothing here trusts guest memory.
pub fn decode_fault(vcpu: &VcpuFd, _mem: &GuestMemoryMmap, esr: u32) -> GuestFault {
    let ec = esr >> 26;
    let abort = matches!(ec, 0x20 | 0x21 | 0x24 | 0x25);
    let entry = get(vcpu, regs::PC)
        .and_then(|pc| pc.checked_sub(tables::VECTORS))
        .map(|off| off / tables::VECTOR_STRIDE)
        .filter(|&i| i < 16)
        .map(|i| i as u8);
    GuestFault {
        vector: ec,
        esr,
        rip: get(vcpu, regs::ELR_EL1),
        fault_address: if abort { get(vcpu, regs::FAR_EL1) } else { None },
        entry,
    }
}

/// aarch64 guests read their counter frequency from CNTFRQ_EL0 themselves.
pub fn tsc_khz(_vcpu: &VcpuFd) -> Option<u32> {
    None
}

/// The most vCPUs a VM may have on this host.
pub fn max_vcpus(kvm: &Kvm) -> usize {
    kvm.get_nr_vcpus().max(1)
}

/// The program counter of a stopped vCPU, for error reports.
pub fn instruction_pointer(vcpu: &VcpuFd) -> Option<u64> {
    get(vcpu, regs::PC)
}

/// Where the floor guest writes: an address no device claims.
const FLOOR_MMIO: u64 = layout::MMIO_BASE + 0x0800_0000;

/// The floor guest: `movz x1, #0xd800, lsl 16; str wzr, [x1]; b .` (one MMIO write exit).
pub fn floor_code() -> Vec<u8> {
    const _: () = assert!(FLOOR_MMIO == 0xd800_0000);
    [0xd2bb_0001u32, 0xb900_003f, 0x1400_0000].iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Whether `exit` is the floor guest's exit.
pub fn is_floor_exit(exit: &VcpuExit<'_>) -> bool {
    matches!(exit, VcpuExit::MmioWrite(addr, _) if *addr == FLOOR_MMIO)
}

/// The registers of a vCPU at entry, to put back for the reuse floor.
#[derive(Debug, Clone)]
pub struct EntryRegs(Vec<(u64, u64)>);

impl EntryRegs {
    /// Reads the entry registers `setup_vcpu` sets.
    pub fn read(vcpu: &VcpuFd) -> Result<EntryRegs, ArchError> {
        let ids = [regs::SP_EL1, regs::x(0), regs::x(1), regs::PSTATE, regs::PC];
        let mut values = Vec::with_capacity(ids.len());
        for id in ids {
            let mut value = [0u8; 8];
            vcpu.get_one_reg(id, &mut value).map_err(|source| ArchError::Kvm { what: "reading a register", source })?;
            values.push((id, u64::from_le_bytes(value)));
        }
        Ok(EntryRegs(values))
    }

    /// Puts them back. The exit the vCPU stopped at is completed first (KVM_RUN with
    /// immediate_exit): on arm64 KVM finishes a pending MMIO exit at the next KVM_RUN by
    /// stepping the PC, which would otherwise skip the restored entry instruction.
    pub fn write(&self, vcpu: &mut VcpuFd) -> Result<(), ArchError> {
        vcpu.set_kvm_immediate_exit(1);
        let completed = vcpu.run().map(|_| ());
        vcpu.set_kvm_immediate_exit(0);
        match completed {
            Err(e) if e.errno() == libc::EINTR => {}
            Ok(()) => {}
            Err(source) => return Err(ArchError::Kvm { what: "completing the pending exit", source }),
        }
        self.0.iter().try_for_each(|&(id, value)| set(vcpu, id, value))
    }
}

/// The pages whose modification forbids the fast reset in reuse mode. Not worked out on
/// aarch64 yet: `None` makes every reset a full copy-on-write remap.
pub fn structural_pages(_state: &VcpuState, _read_page: &mut dyn FnMut(u64) -> Option<Vec<u8>>) -> Option<Vec<u64>> {
    None
}

/// Whether `vcpu` still uses the translation setup of `saved` (the fast reset's
/// precondition): compares the translation and vector-base registers.
pub fn same_translation(saved: &VcpuState, vcpu: &VcpuFd) -> bool {
    [regs::TTBR0_EL1, regs::TCR_EL1, regs::SCTLR_EL1, regs::MAIR_EL1, regs::VBAR_EL1].iter().all(|&id| {
        let saved = saved.regs.iter().find(|(i, _)| *i == id).map(|(_, v)| v.as_slice());
        let mut now = [0u8; 8];
        vcpu.get_one_reg(id, &mut now).is_ok() && saved == Some(now.as_slice())
    })
}

/// The image format's tripwire (see `mu2_snapshot::Versioned`): every field of `VmState` that
/// reaches the encoding, in order, with this architecture's vCPU state. Changing `VmState`,
/// `VcpuState` or a device state without updating this text and bumping
/// `mu2_snapshot::FORMAT_VERSION` is a build error.
pub const VM_STATE_SCHEMA: &str = "VmState {
        mem_size: u64,
        vcpus: Vec<VcpuState { index: u8, init: kvm_vcpu_init, regs: Vec<(u64, Vec<u8>)>, mp_state: u32 }>,
        serial: SerialConsole::State,
        vsock: MmioTransportState<VsockState>,
        port: u32, buf_alloc: u32, max_request: u32, tsc_khz: Option<u32>,
        ready_flags: u32,
        cpu_template: CpuTemplate { Host, Baseline },
        cpu_features: CpuFeatures {}
    }";
/// [`VM_STATE_SCHEMA`]'s recorded fingerprint.
pub const VM_STATE_FINGERPRINT: u64 = 0x2846_0f39_a7f9_e83f;

impl crate::error::Classify for ArchError {
    fn kind(&self) -> crate::error::FailureKind {
        use crate::error::FailureKind;
        match self {
            ArchError::Kvm { source, .. } => crate::error::kvm_kind(source),
            ArchError::Register { .. } | ArchError::Devicetree(_) | ArchError::RegisterList(_) => FailureKind::Internal,
            ArchError::CmdlineNotText(_) | ArchError::DevicetreeTooLarge { .. } => FailureKind::BadInput,
            ArchError::Memory { .. } | ArchError::Load(_) | ArchError::ImagePlacement { .. } => FailureKind::BadInput,
            ArchError::Unsupported(_) | ArchError::BadState(_) => FailureKind::BadInput,
            ArchError::TemplateUnsupported(_) | ArchError::UnknownFeature(_) => FailureKind::BadInput,
        }
    }
}
