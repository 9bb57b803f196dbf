//! x86_64: boot tables, CPUID, vCPU registers, guest loading and fault decoding.
//!
//! Exports the same names as `arch::aarch64` so that the VM builder stays free of
//! architecture conditionals.

mod confine;
mod cpuid;
mod features;
mod seccomp;
mod state;
mod tables;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{elf::Elf, KernelLoader};
use mu2_abi::layout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use confine::structural_pages;
pub use cpuid::{supported_cpuid, vcpu_cpuid};
#[cfg(feature = "inspect")]
pub use features::remove_features;
pub use features::{apply_template, check_recorded, CpuFeatures};
/// The vCPU configuration set before anything else (aarch64: its KVM_ARM_VCPU_INIT).
pub use kvm_bindings::CpuId;
pub use seccomp::{SECCOMP_ARCH, SECCOMP_PATH_SYSCALLS};
pub use state::{saved_msr_indices, RestorePlan, VcpuState};

/// Errors of the x86_64 setup code.
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
    Load(#[source] linux_loader::loader::Error),
    /// More MSRs than one KVM call carries.
    #[error("{0} MSRs are more than KVM accepts in one call")]
    TooManyMsrs(usize),
    /// KVM refused to set an MSR.
    #[error("KVM refused to set MSR {0:#x}")]
    MsrRefused(u32),
    /// A saved state is inconsistent.
    #[error("invalid saved vCPU state: {0}")]
    BadState(String),
    /// A saved CPUID table does not fit KVM's.
    #[error("invalid saved CPUID table")]
    CpuidTable(#[source] vmm_sys_util::fam::Error),
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
    /// mu2's own entry: long mode set up by the VMM, the guest starts at CPL 3.
    #[default]
    Native,
    /// The Linux x86_64 64-bit boot protocol: CPL 0, `boot_params` in RSI.
    Linux,
}

/// The serial console's location: COM1's I/O ports.
pub const SERIAL_PIO_BASE: Option<u16> = Some(0x3f8);
/// The serial console is not memory-mapped on x86_64.
pub const SERIAL_MMIO_BASE: Option<u64> = None;

/// The CPU features a CPUID table lists.
pub fn table_features(cpuid: &CpuId) -> CpuFeatures {
    CpuFeatures::of(cpuid.as_slice())
}

/// The CPU features a vCPU's guest sees: its CPUID table as KVM reports it back, which is not
/// always the table it was given (PVM adds the hardware's own features).
pub fn vcpu_features(vcpu: &VcpuFd) -> Result<CpuFeatures, kvm_ioctls::Error> {
    Ok(CpuFeatures::of(get_cpuid(vcpu)?.as_slice()))
}

/// The CPU features a saved vCPU's guest saw: those of its CPUID table.
pub fn guest_features(vcpu: &VcpuState) -> CpuFeatures {
    CpuFeatures::of(&vcpu.cpuid)
}

/// Gives a new vCPU its CPUID table; first thing after creating it.
pub fn set_cpuid(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), kvm_ioctls::Error> {
    vcpu.set_cpuid2(cpuid)
}

/// The CPUID table a vCPU was given.
pub fn get_cpuid(vcpu: &VcpuFd) -> Result<CpuId, kvm_ioctls::Error> {
    vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
}

/// Loads a guest ELF into guest memory; returns (entry point, end of the image).
pub fn load_kernel(mem: &GuestMemoryMmap, image: &[u8], mem_size: u64) -> Result<(u64, u64), ArchError> {
    let mut reader = std::io::Cursor::new(image);
    let loaded = Elf::load(mem, None, &mut reader, Some(GuestAddress(layout::IMAGE_BASE))).map_err(ArchError::Load)?;
    let start = loaded.kernel_load.0;
    let end = loaded.kernel_end;
    if start < layout::IMAGE_BASE || end > mem_size {
        return Err(ArchError::ImagePlacement { min: layout::IMAGE_BASE, max: mem_size, start, end });
    }
    // The entry point is in the ELF header; linux-loader reports it as `kernel_load`.
    Ok((start, end))
}

/// Writes everything the guest finds in memory at entry: boot tables and `boot_params`.
pub fn write_boot_data(mem: &GuestMemoryMmap, mem_size: u64, cmdline: &[u8], mode: EntryMode) -> Result<(), ArchError> {
    tables::write(mem, mem_size, mode)?;
    let mut params = boot_params::default();
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    params.ext_cmd_line_ptr = 0;
    // Low RAM, then RAM from 1 MiB up; the boot tables live in the low block.
    let ram = [(0u64, 0x9_fc00u64), (0x10_0000, mem_size - 0x10_0000)];
    for (i, (addr, size)) in ram.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = 1;
    }
    params.e820_entries = ram.len() as u8;
    mem.write_obj(params, GuestAddress(layout::BOOT_PARAMS))
        .map_err(|source| ArchError::Memory { what: "boot parameters", source })?;
    mem.write_slice(cmdline, GuestAddress(layout::CMDLINE))
        .map_err(|source| ArchError::Memory { what: "command line", source })?;
    Ok(())
}

/// Sets a fresh vCPU's registers so that it enters the guest at `entry`.
pub fn setup_vcpu(vcpu: &VcpuFd, cpuid: &CpuId, entry: u64, mode: EntryMode) -> Result<(), ArchError> {
    vcpu.set_cpuid2(cpuid).map_err(|source| ArchError::Kvm { what: "the CPUID table", source })?;
    setup_registers(vcpu, cpuid, entry, mode)
}

/// The part of [`setup_vcpu`] after the CPUID table: the registers that enter the guest at
/// `entry` (the floor times the two apart).
pub fn setup_registers(vcpu: &VcpuFd, _cpuid: &CpuId, entry: u64, mode: EntryMode) -> Result<(), ArchError> {
    let kvm = |what| move |source| ArchError::Kvm { what, source };
    let mut sregs = vcpu.get_sregs().map_err(kvm("reading special registers"))?;
    let (cs, ds) = match mode {
        EntryMode::Native => (segment(tables::USER_CS, 3, true), segment(tables::USER_DS, 3, false)),
        EntryMode::Linux => (segment(tables::BOOT_CS, 0, true), segment(tables::BOOT_DS, 0, false)),
    };
    sregs.cs = cs;
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.gdt.base = tables::GDT;
    sregs.gdt.limit = tables::gdt_limit(mode);
    match mode {
        EntryMode::Native => {
            sregs.idt.base = tables::IDT;
            sregs.idt.limit = tables::IDT_VECTORS * 16 - 1;
            sregs.tr = kvm_segment {
                base: tables::TSS,
                limit: tables::TSS_SIZE - 1,
                selector: tables::TSS_SELECTOR,
                type_: 0xb, // 64-bit TSS, busy
                present: 1,
                ..Default::default()
            };
        }
        EntryMode::Linux => {
            sregs.idt.base = 0;
            sregs.idt.limit = 0;
        }
    }
    sregs.cr3 = tables::PML4;
    sregs.cr4 = tables::CR4;
    sregs.cr0 = tables::CR0;
    sregs.efer = tables::EFER;
    vcpu.set_sregs(&sregs).map_err(kvm("setting special registers"))?;

    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm("setting the FPU state"))?;

    let regs = kvm_regs {
        rip: entry,
        rsp: layout::STACK_TOP,
        rsi: layout::BOOT_PARAMS,
        // Bit 1 is reserved-one. IOPL 3 grants CPL-3 port I/O on hardware KVM; PVM keeps
        // IOPL 0 for guest user mode and consults the TSS I/O bitmap instead (see tables).
        rflags: match mode {
            EntryMode::Native => 0x2 | (3 << 12),
            EntryMode::Linux => 0x2,
        },
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("setting general registers"))?;
    Ok(())
}

fn segment(selector: u16, dpl: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// What the guest's exception stub reported, decoded from the frame the CPU pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFault {
    /// Exception vector.
    pub vector: u32,
    /// Instruction pointer of the faulting instruction (when the frame was readable).
    pub rip: Option<u64>,
    /// Error code, for vectors that push one.
    pub error_code: Option<u64>,
    /// Faulting address (CR2) for page faults.
    pub fault_address: Option<u64>,
}

impl std::fmt::Display for GuestFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (vector {})", mu2_abi::exception_name(self.vector), self.vector)?;
        match self.rip {
            Some(rip) => write!(f, " at RIP {rip:#x}")?,
            None => write!(f, " at an unknown RIP")?,
        }
        if let Some(code) = self.error_code {
            write!(f, ", error code {code:#x}")?;
        }
        if let Some(addr) = self.fault_address {
            write!(f, ", address {addr:#x}")?;
        }
        Ok(())
    }
}

/// Decodes a fault report: the vCPU stopped in the ring-0 stub with RSP at the exception
/// frame. Everything read here is guest-controlled, so every read is checked.
pub fn decode_fault(vcpu: &VcpuFd, mem: &GuestMemoryMmap, vector: u32) -> GuestFault {
    let mut fault = GuestFault { vector, rip: None, error_code: None, fault_address: None };
    let Ok(regs) = vcpu.get_regs() else { return fault };
    let mut frame = regs.rsp;
    if vector < 32 && mu2_abi::exception_has_error_code(vector) {
        fault.error_code = mem.read_obj::<u64>(GuestAddress(frame)).ok();
        frame = frame.wrapping_add(8);
    }
    fault.rip = mem.read_obj::<u64>(GuestAddress(frame)).ok();
    if vector == 14 {
        fault.fault_address = vcpu.get_sregs().ok().map(|s| s.cr2);
    }
    fault
}

/// Reads the TSC frequency KVM gives the vCPU, in kHz.
pub fn tsc_khz(vcpu: &VcpuFd) -> Option<u32> {
    vcpu.get_tsc_khz().ok().filter(|&khz| khz > 0)
}

/// The most vCPUs a VM may have on this host.
pub fn max_vcpus(kvm: &Kvm) -> usize {
    kvm.get_nr_vcpus().max(1)
}

/// Describes the instruction pointer of a stopped vCPU, for error reports.
pub fn instruction_pointer(vcpu: &VcpuFd) -> Option<u64> {
    vcpu.get_regs().ok().map(|r| r.rip)
}

/// The I/O port the floor guest writes to; any exit would do.
const FLOOR_PORT: u8 = 0x80;

/// The floor guest: `out FLOOR_PORT, al` (one port I/O exit).
pub fn floor_code() -> Vec<u8> {
    vec![0xe6, FLOOR_PORT]
}

/// Whether `exit` is the floor guest's exit.
pub fn is_floor_exit(exit: &VcpuExit<'_>) -> bool {
    matches!(exit, VcpuExit::IoOut(port, _) if *port == u16::from(FLOOR_PORT))
}

/// The registers of a vCPU at entry, to put back for the reuse floor.
#[derive(Debug, Clone)]
pub struct EntryRegs {
    sregs: kvm_sregs,
    regs: kvm_regs,
}

impl EntryRegs {
    /// Reads the entry registers `setup_vcpu` sets.
    pub fn read(vcpu: &VcpuFd) -> Result<EntryRegs, ArchError> {
        let kvm = |what| move |source| ArchError::Kvm { what, source };
        Ok(EntryRegs {
            sregs: vcpu.get_sregs().map_err(kvm("reading special registers"))?,
            regs: vcpu.get_regs().map_err(kvm("reading registers"))?,
        })
    }

    /// Puts them back.
    pub fn write(&self, vcpu: &mut VcpuFd) -> Result<(), ArchError> {
        let kvm = |what| move |source| ArchError::Kvm { what, source };
        vcpu.set_sregs(&self.sregs).map_err(kvm("setting special registers"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("setting registers"))
    }
}

/// Whether `vcpu` still uses the paging and descriptor-table setup of `saved` (the fast
/// reset's precondition, with `structural_pages`).
pub fn same_translation(saved: &VcpuState, vcpu: &VcpuFd) -> bool {
    let saved = &saved.sregs;
    let Ok(now) = vcpu.get_sregs() else { return false };
    now.cr3 == saved.cr3
        && now.cr0 == saved.cr0
        && now.cr4 == saved.cr4
        && now.efer == saved.efer
        && (now.gdt.base, now.gdt.limit, now.idt.base, now.idt.limit)
            == (saved.gdt.base, saved.gdt.limit, saved.idt.base, saved.idt.limit)
        && now.tr.base == saved.tr.base
}

/// The image format's tripwire (see `mu2_snapshot::Versioned`): every field of `VmState` that
/// reaches the encoding, in order, with this architecture's vCPU state. Changing `VmState`,
/// `VcpuState` or a device state without updating this text and bumping
/// `mu2_snapshot::FORMAT_VERSION` is a build error.
pub const VM_STATE_SCHEMA: &str = "VmState {
        mem_size: u64,
        vcpus: Vec<VcpuState { index: u8, cpuid: Vec<kvm_cpuid_entry2>, regs: kvm_regs, sregs: kvm_sregs,
            xsave: Vec<u32>, xcrs: kvm_xcrs, msrs: Vec<(u32, u64)>, events: kvm_vcpu_events,
            debugregs: kvm_debugregs, mp_state: kvm_mp_state }>,
        serial: SerialConsole::State,
        vsock: MmioTransportState<VsockState>,
        port: u32, buf_alloc: u32, max_request: u32, tsc_khz: Option<u32>,
        ready_flags: u32,
        cpu_template: CpuTemplate { Host, Baseline },
        cpu_features: CpuFeatures { leaf1_ecx: u32, leaf1_edx: u32, leaf7_ebx: u32, leaf7_ecx: u32, leaf7_edx: u32,
            ext1_ecx: u32, ext1_edx: u32, xsave_ops: u32, xsave_components: u64 }
    }";
/// [`VM_STATE_SCHEMA`]'s recorded fingerprint.
pub const VM_STATE_FINGERPRINT: u64 = 0x8922_4db2_9997_a152;

impl crate::error::Classify for ArchError {
    fn kind(&self) -> crate::error::FailureKind {
        use crate::error::FailureKind;
        match self {
            ArchError::Kvm { source, .. } => crate::error::kvm_kind(source),
            ArchError::Memory { .. } | ArchError::Load(_) | ArchError::ImagePlacement { .. } => FailureKind::BadInput,
            ArchError::BadState(_) | ArchError::CpuidTable(_) | ArchError::UnknownFeature(_) => FailureKind::BadInput,
            ArchError::TooManyMsrs(_) | ArchError::MsrRefused(_) => FailureKind::Internal,
        }
    }
}
