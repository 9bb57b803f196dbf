//! One virtual machine: KVM objects, guest RAM, devices, and the run loop.
//!
//! A VM runs on the thread that calls [`Vm::run`]. The loop gives every exit a defined
//! outcome and returns to its caller only when the guest needs it: the guest became ready,
//! it waits with nothing to do ([`RunStop::Idle`]), it stopped, or it failed.

use std::borrow::Cow;
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use mu2_abi::{layout, sysdev, ReadyInfo, Text};
use mu2_devices::serial::{ConsoleOutput, SerialConsole, SERIAL_REGISTERS};
use mu2_devices::sysdev::SysdevRequest;
use mu2_devices::virtio::mmio::MmioTransport;
use mu2_devices::virtio::vsock::{HostEndpoint, Vsock, VsockConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::{self, EntryMode, GuestFault};
use crate::hypervisor::Hypervisor;
use crate::image::Image;
use crate::kick::{self, KickError, RunGuard};
use crate::memory::{GuestRam, MemoryError};
use mu2_devices::persist::Persist;

/// How to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The guest ELF image.
    pub image: Cow<'static, [u8]>,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Number of vCPUs. vCPU 0 runs the guest; mu2 guests are single-threaded and the others
    /// stay parked, as application processors do until a guest starts them.
    pub vcpus: u8,
    /// Extra kernel command-line text, appended after what the VMM writes.
    pub cmdline: String,
    /// How the vCPU enters the guest.
    pub entry: EntryMode,
    /// The vsock device's settings.
    pub vsock: VsockConfig,
}

impl VmConfig {
    /// Defaults for `image`: 64 MiB, one vCPU, native entry.
    pub fn new(image: impl Into<Cow<'static, [u8]>>) -> Self {
        VmConfig {
            image: image.into(),
            mem_size: 64 << 20,
            vcpus: 1,
            cmdline: String::new(),
            entry: EntryMode::Native,
            vsock: VsockConfig::default(),
        }
    }
}

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A setting is out of range.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// A KVM call failed.
    #[error("KVM could not {what}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created.
    #[error("creating guest memory")]
    Memory(#[source] MemoryError),
    /// Architecture setup failed.
    #[error("setting up the virtual machine")]
    Arch(#[source] arch::ArchError),
    /// A device could not be restored.
    #[error("restoring a device: {0}")]
    Device(String),
    /// The command line does not fit.
    #[error("building the kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
}

/// Why the guest stopped against its will, or could not go on.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A CPU exception in the guest.
    #[error("guest fault: {0}")]
    Fault(GuestFault),
    /// The guest runtime panicked.
    #[error("guest panicked: {0}")]
    Panic(String),
    /// A triple fault: the CPU shut down.
    #[error("guest triple-faulted (CPU shutdown) at RIP {rip:#x}")]
    TripleFault {
        /// Instruction pointer when it happened, or 0 if unknown.
        rip: u64,
    },
    /// The guest halted with no way to be woken (mu2 VMs have no interrupt controller).
    #[error("guest halted at RIP {rip:#x} with interrupts unavailable")]
    Halted {
        /// Instruction pointer of the `hlt`.
        rip: u64,
    },
    /// KVM could not enter the guest.
    #[error("KVM failed to enter the guest (hardware reason {reason:#x})")]
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// KVM could not emulate something the guest did.
    #[error("KVM internal error (suberror {suberror}) at RIP {rip:#x}")]
    Internal {
        /// KVM's suberror code.
        suberror: u32,
        /// Instruction pointer.
        rip: u64,
    },
    /// The guest asked for a reset or power-off through a system event.
    #[error("guest requested system event {0}")]
    SystemEvent(u32),
    /// The guest did something the VMM cannot serve.
    #[error("guest protocol error: {0}")]
    Protocol(String),
    /// The deadline passed while the guest ran.
    #[error("timed out")]
    Timeout,
    /// The guest has already stopped.
    #[error("the guest has already stopped")]
    Stopped,
    /// A KVM call failed while running.
    #[error("KVM could not {what}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The deadline timer could not be armed.
    #[error("arming the deadline")]
    Kick(#[source] KickError),
}

/// Why [`Vm::run`] returned normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStop {
    /// The guest reported readiness and will wait for work next.
    Ready(ReadyInfo),
    /// The guest waits and its devices have nothing for it.
    Idle,
    /// The guest stopped with this exit code.
    Exited(u32),
}

/// Exits seen by a VM, by kind: where its time in the VMM goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStats {
    /// Times the vCPU entered the guest (KVM_RUN calls).
    pub entries: u64,
    /// Serial console exits (port I/O on x86_64, MMIO on aarch64).
    pub pio: u64,
    /// MMIO exits to the virtio-mmio device.
    pub virtio_mmio: u64,
    /// MMIO exits to the system device other than WAIT.
    pub sysdev: u64,
    /// WAIT exits.
    pub waits: u64,
    /// Accesses to addresses no device claims.
    pub unclaimed: u64,
    /// KVM_RUN calls interrupted by a signal.
    pub interrupted: u64,
}

/// A virtual machine.
pub struct Vm {
    // Field order is drop order: vCPUs, then the VM, then the memory they used.
    vcpus: Vec<VcpuFd>,
    vm_fd: VmFd,
    ram: GuestRam,
    serial: SerialConsole,
    vsock: MmioTransport<Vsock>,
    /// The guest is parked in a WAIT read that has not been answered yet.
    parked_in_wait: bool,
    /// Restored from an image: the guest resumes from a WAIT that already returned "device
    /// work", so the devices must be polled (host data into RX) before it runs.
    poll_before_entry: bool,
    /// The next answer to the parked WAIT carries `RESTORED` (a warmed-up VM: the guest must
    /// take its HostInfo again when it is handed out).
    announce_restore: bool,
    ready: Option<ReadyInfo>,
    stopped: bool,
    stats: ExitStats,
    tsc_khz: Option<u32>,
    /// MSRs saved when this VM is frozen.
    msr_indices: Vec<u32>,
    id: u64,
}

fn next_vm_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Fills `buf` from the kernel's random source.
fn fill_entropy(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: writes at most `rest.len()` bytes into `rest`; the result is checked.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// How a reuse-mode reset put guest memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetKind {
    /// This many written pages were copied back from the image; all mappings kept.
    CopiedBack(usize),
    /// The memory file was remapped over the whole range.
    Remapped,
}

/// Why a VM could not be frozen.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// The guest never reported readiness.
    #[error("the guest is not ready")]
    NotReady,
    /// The guest is not waiting idle (it runs, or it stopped).
    #[error("the guest is not idle in a wait")]
    NotIdle,
    /// A KVM call failed.
    #[error("KVM could not {what}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Reading vCPU state failed.
    #[error("saving vCPU state")]
    Arch(#[source] arch::ArchError),
    /// Something unexpected.
    #[error("{0}")]
    Unexpected(String),
}

/// Everything about a frozen VM but its memory: plain data, stored in an image's state file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// Guest RAM size in bytes (the memory file's size).
    pub mem_size: u64,
    /// Each vCPU.
    pub vcpus: Vec<arch::VcpuState>,
    /// The serial console.
    pub serial: <SerialConsole as Persist>::State,
    /// The vsock device and its transport.
    pub vsock: <MmioTransport<Vsock> as Persist>::State,
    /// The vsock port the guest listens on.
    pub port: u32,
    /// The receive buffer the guest grants a new connection.
    pub buf_alloc: u32,
    /// The TSC frequency the guest was told.
    pub tsc_khz: Option<u32>,
}

// The image format's tripwire: describing every field that reaches the encoding, in order.
// Changing `VmState`, `VcpuState` or a device state without updating this text and bumping
// `mu2_snapshot::FORMAT_VERSION` is a build error.
impl mu2_snapshot::Versioned for VmState {
    // Each architecture describes its own vCPU state (see `arch::VM_STATE_SCHEMA`).
    const SCHEMA: &'static str = arch::VM_STATE_SCHEMA;
    const RECORDED_VERSION: u32 = 1;
    const RECORDED_FINGERPRINT: u64 = arch::VM_STATE_FINGERPRINT;
}
mu2_snapshot::assert_schema!(VmState);

impl VmState {
    /// The readiness report the frozen guest made.
    pub fn ready_info(&self) -> ReadyInfo {
        ReadyInfo {
            abi_version: mu2_abi::ABI_VERSION,
            port: self.port,
            buf_alloc: self.buf_alloc,
            ..Default::default()
        }
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("mem_size", &self.ram.size())
            .field("vcpus", &self.vcpus.len())
            .field("ready", &self.ready)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Offset of the vsock device in the MMIO window: the first virtio-mmio slot.
const VSOCK_MMIO: u64 = layout::VIRTIO_MMIO_BASE;
/// The interrupt line named on the command line. mu2 guests poll; the line is not wired.
const VSOCK_IRQ: u32 = 5;

impl Vm {
    /// Creates a VM and loads the guest: cold boot up to the first instruction.
    pub fn boot(hv: &Hypervisor, config: &VmConfig, console: ConsoleOutput) -> Result<Vm, BuildError> {
        if config.mem_size < layout::MIN_MEM || config.mem_size > layout::MAX_MEM || config.mem_size % (2 << 20) != 0 {
            return Err(BuildError::Config(format!(
                "memory must be a multiple of 2 MiB between {} MiB and {} MiB, not {} bytes",
                layout::MIN_MEM >> 20,
                layout::MAX_MEM >> 20,
                config.mem_size
            )));
        }
        let max_vcpus = hv.max_vcpus();
        if config.vcpus == 0 || usize::from(config.vcpus) > max_vcpus {
            return Err(BuildError::Config(format!(
                "vCPUs must be between 1 and {max_vcpus} on this host, not {}",
                config.vcpus
            )));
        }
        let kvm_err = |what| move |source| BuildError::Kvm { what, source };
        let vm_fd = hv.kvm().create_vm().map_err(kvm_err("create a VM"))?;
        // Validated above: the size fits in usize.
        let ram = GuestRam::anonymous(config.mem_size as usize).map_err(BuildError::Memory)?;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: config.mem_size,
            userspace_addr: ram.host_address(),
        };
        // SAFETY: the region is guest RAM, mapped for its whole size for as long as the VM
        // exists: `Vm` drops the VM fd before the memory.
        unsafe { vm_fd.set_user_memory_region(region) }.map_err(kvm_err("register guest memory"))?;

        let mem = ram.memory();
        let (entry, _image_end) = arch::load_kernel(mem, &config.image, config.mem_size).map_err(BuildError::Arch)?;

        let mut vcpus = Vec::with_capacity(config.vcpus.into());
        for index in 0..config.vcpus {
            let vcpu = vm_fd.create_vcpu(index.into()).map_err(kvm_err("create a vCPU"))?;
            vcpus.push(vcpu);
        }
        let tsc_khz = arch::tsc_khz(&vcpus[0]);
        let msr_indices = hv.msr_indices().to_vec();
        let cmdline = Self::cmdline(config, tsc_khz)?;
        arch::write_boot_data(mem, config.mem_size, cmdline.as_bytes_with_nul(), config.entry)
            .map_err(BuildError::Arch)?;
        for (index, vcpu) in vcpus.iter().enumerate() {
            let cpuid = hv.vcpu_cpuid(index as u8, config.vcpus);
            arch::setup_vcpu(vcpu, &cpuid, entry, config.entry).map_err(BuildError::Arch)?;
        }

        Ok(Vm {
            vcpus,
            vm_fd,
            ram,
            serial: SerialConsole::new(console),
            vsock: MmioTransport::new(Vsock::new(config.vsock)),
            parked_in_wait: false,
            poll_before_entry: false,
            announce_restore: false,
            ready: None,
            stopped: false,
            stats: ExitStats::default(),
            tsc_khz,
            msr_indices,
            id: next_vm_id(),
        })
    }

    fn cmdline(config: &VmConfig, tsc_khz: Option<u32>) -> Result<std::ffi::CString, BuildError> {
        let mut cmdline = Cmdline::new(layout::CMDLINE_MAX).map_err(BuildError::Cmdline)?;
        cmdline
            .add_virtio_mmio_device(layout::MMIO_DEVICE_SIZE, GuestAddress(VSOCK_MMIO), VSOCK_IRQ, None)
            .map_err(BuildError::Cmdline)?;
        cmdline.insert(mu2_abi::cmdline::SYSDEV, &format!("{:#x}", layout::SYSDEV)).map_err(BuildError::Cmdline)?;
        if let Some(khz) = tsc_khz {
            cmdline.insert(mu2_abi::cmdline::TSC_KHZ, &khz.to_string()).map_err(BuildError::Cmdline)?;
        }
        if !config.cmdline.trim().is_empty() {
            cmdline.insert_str(config.cmdline.trim()).map_err(BuildError::Cmdline)?;
        }
        cmdline.as_cstring().map_err(BuildError::Cmdline)
    }

    /// This VM's identifier, unique in the process (a reset VM gets a new one).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    /// The host side of the vsock device's connections.
    pub fn vsock(&mut self) -> &mut HostEndpoint {
        self.vsock.device_mut().host_mut()
    }

    /// What the guest reported when it became ready.
    pub fn ready_info(&self) -> Option<ReadyInfo> {
        self.ready
    }

    /// Exit counters so far.
    pub fn stats(&self) -> ExitStats {
        self.stats
    }

    /// The TSC frequency given to the guest, if KVM reported one.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.tsc_khz
    }

    /// The KVM VM object.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Freezes an idle, ready guest: completes its pending WAIT so that the guest will see
    /// `RESTORED` and device work when an image of it resumes, and returns its whole state.
    /// The VM cannot run afterwards. Guest memory is read with [`Vm::memory_bytes`].
    pub fn freeze(&mut self) -> Result<VmState, FreezeError> {
        let ready = self.ready.ok_or(FreezeError::NotReady)?;
        if !self.parked_in_wait || self.stopped {
            return Err(FreezeError::NotIdle);
        }
        self.complete_wait(mu2_abi::wait::RESTORED | 1);
        self.complete_pending_exit().map_err(|e| match e {
            GuestError::Kvm { what, source } => FreezeError::Kvm { what, source },
            other => FreezeError::Unexpected(other.to_string()),
        })?;
        self.stopped = true;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            let cpuid =
                arch::get_cpuid(vcpu).map_err(|source| FreezeError::Kvm { what: "read the CPUID table", source })?;
            vcpus.push(arch::VcpuState::save(vcpu, index as u8, &cpuid, &self.msr_indices).map_err(FreezeError::Arch)?);
        }
        Ok(VmState {
            mem_size: self.ram.size() as u64,
            vcpus,
            serial: self.serial.save(),
            vsock: self.vsock.save(),
            port: ready.port,
            buf_alloc: ready.buf_alloc,
            tsc_khz: self.tsc_khz,
        })
    }

    /// Lets KVM finish the instruction of the vCPU's last I/O or MMIO exit without running
    /// any further guest code (KVM_RUN with immediate_exit). KVM completes such an exit on the
    /// next KVM_RUN — writing the read value into its register and moving RIP past it — so
    /// state read before this is not final, and state written before this is overwritten.
    fn complete_pending_exit(&mut self) -> Result<(), GuestError> {
        self.vcpus[0].set_kvm_immediate_exit(1);
        let completed = self.vcpus[0].run().map(|_| ());
        self.vcpus[0].set_kvm_immediate_exit(0);
        match completed {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Ok(()) => Err(GuestError::Protocol("the vCPU ran instead of stopping".into())),
            Err(source) => Err(GuestError::Kvm { what: "complete the pending exit", source }),
        }
    }

    /// Guest RAM as bytes (for writing an image), while no vCPU runs.
    pub fn memory_bytes(&self) -> &[u8] {
        self.ram.as_slice()
    }

    /// Enters and leaves the guest without running it (KVM_RUN with immediate_exit), to see
    /// what the hypervisor itself touches on entry. For measurements.
    pub fn enter_without_running(&mut self) -> Result<(), GuestError> {
        self.vcpus[0].set_kvm_immediate_exit(1);
        let result = self.vcpus[0].run().map(|_| ());
        self.vcpus[0].set_kvm_immediate_exit(0);
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(source) => Err(GuestError::Kvm { what: "enter the guest", source }),
        }
    }

    /// vCPU 0, for inspection by tests and debuggers.
    pub fn vcpu_fd(&self) -> &VcpuFd {
        &self.vcpus[0]
    }

    /// Reads every vCPU's state the way freezing does (without completing a pending exit).
    pub fn vcpu_states(&self) -> Result<Vec<arch::VcpuState>, arch::ArchError> {
        self.vcpus
            .iter()
            .enumerate()
            .map(|(index, vcpu)| {
                let cpuid = arch::get_cpuid(vcpu)
                    .map_err(|source| arch::ArchError::Kvm { what: "reading the CPUID table", source })?;
                arch::VcpuState::save(vcpu, index as u8, &cpuid, &self.msr_indices)
            })
            .collect()
    }

    /// The vsock device's and its transport's state now.
    pub fn vsock_state(&self) -> <MmioTransport<Vsock> as Persist>::State {
        self.vsock.save()
    }

    /// See [`GuestRam::disable_fault_around`].
    pub fn disable_fault_around(&self) -> std::io::Result<()> {
        self.ram.disable_fault_around()
    }

    /// Guest pages mapped so far (see [`GuestRam::touched_pages`]).
    pub fn touched_pages(&self) -> std::io::Result<Vec<u64>> {
        self.ram.touched_pages()
    }

    /// See [`GuestRam::copy_in_advance`].
    pub fn copy_in_advance(&self, pages: &[u64]) {
        self.ram.copy_in_advance(pages);
    }

    /// Pages this VM holds a private copy of (see [`GuestRam::private_pages`]).
    pub fn private_pages(&self) -> std::io::Result<Vec<u64>> {
        self.ram.private_pages()
    }

    /// KiB of guest memory this VM holds privately (pages it wrote).
    pub fn private_kib(&self) -> Option<u64> {
        self.ram.private_kib()
    }

    /// Creates a VM restored from a frozen image: a new KVM VM whose memory is the image's
    /// memory file mapped copy-on-write.
    pub fn restore(hv: &Hypervisor, image: &Image) -> Result<Vm, BuildError> {
        let state = image.state();
        let kvm_err = |what| move |source| BuildError::Kvm { what, source };
        let vm_fd = hv.kvm().create_vm().map_err(kvm_err("create a VM"))?;
        let ram = GuestRam::from_file(image.memory_file(), state.mem_size as usize).map_err(BuildError::Memory)?;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: state.mem_size,
            userspace_addr: ram.host_address(),
        };
        // SAFETY: the region is guest RAM, mapped for its whole size for as long as the VM
        // exists: `Vm` drops the VM fd before the memory.
        unsafe { vm_fd.set_user_memory_region(region) }.map_err(kvm_err("register guest memory"))?;
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for (saved, restore) in state.vcpus.iter().zip(image.restore_plans()) {
            let vcpu = vm_fd.create_vcpu(saved.index.into()).map_err(kvm_err("create a vCPU"))?;
            arch::set_cpuid(&vcpu, &restore.cpuid).map_err(kvm_err("set the CPUID table"))?;
            saved.restore(&vcpu, &restore.plan).map_err(BuildError::Arch)?;
            vcpus.push(vcpu);
        }
        let vm = Vm {
            vcpus,
            vm_fd,
            ram,
            serial: SerialConsole::restore(Box::new(std::io::sink()), &state.serial)
                .map_err(|e| BuildError::Device(e.to_string()))?,
            vsock: MmioTransport::restore((), &state.vsock).map_err(|e| BuildError::Device(e.to_string()))?,
            parked_in_wait: false,
            poll_before_entry: true,
            announce_restore: false,
            ready: Some(state.ready_info()),
            stopped: false,
            stats: ExitStats::default(),
            tsc_khz: state.tsc_khz,
            msr_indices: image.msr_indices().to_vec(),
            id: next_vm_id(),
        };
        Ok(vm)
    }

    /// Lets a freshly restored VM run until its guest waits for work, before it is handed
    /// out: the guest takes its HostInfo, polls its rings and parks in WAIT, so the pages that
    /// path touches are mapped by then instead of faulting on the request path. Its next WAIT
    /// answer carries `RESTORED` again, so the guest takes the HostInfo written at hand-out.
    pub fn warm_up(&mut self, deadline: Option<Instant>) -> Result<(), GuestError> {
        if !self.poll_before_entry {
            return Err(GuestError::Protocol("only a freshly restored VM can be warmed up".into()));
        }
        match self.run(deadline)? {
            RunStop::Idle => {
                self.announce_restore = true;
                Ok(())
            }
            other => Err(GuestError::Protocol(format!("warming up: the guest stopped with {other:?}"))),
        }
    }

    /// Resets this VM to `image` for its next request (reuse mode): guest memory back to the
    /// image's, every piece of vCPU and device state put back.
    ///
    /// Memory is reset one of two ways. The full way remaps the memory file copy-on-write over
    /// the same range: every page the guest touched must then be faulted in again. The fast
    /// way copies back only the pages written since the image was mapped and keeps every
    /// mapping; it is taken only when `clean` (the request ended normally), the image is
    /// confined to CPL 3, and neither the paging and exception structures nor the registers
    /// that locate them changed — so the request cannot have changed how memory is
    /// translated (see `arch::structural_pages`).
    pub fn reset_to(&mut self, image: &Image, clean: bool) -> Result<ResetKind, BuildError> {
        let state = image.state();
        if state.mem_size != self.ram.size() as u64 || state.vcpus.len() != self.vcpus.len() {
            return Err(BuildError::Config("the image does not match this VM's layout".into()));
        }
        // The previous request left the vCPU in an exit (a WAIT read, or wherever it was
        // stopped): finish it first, or KVM would complete it over the restored registers.
        self.complete_pending_exit().map_err(|e| BuildError::Device(format!("completing the last exit: {e}")))?;
        let kind = match self.pages_to_copy_back(image, clean) {
            Some(pages) => {
                self.ram
                    .restore_pages(image.memory_file(), &pages)
                    .map_err(|e| BuildError::Device(format!("copying pages back from the image: {e}")))?;
                ResetKind::CopiedBack(pages.len())
            }
            None => {
                self.ram.remap_file(image.memory_file()).map_err(BuildError::Memory)?;
                ResetKind::Remapped
            }
        };
        for ((saved, vcpu), restore) in state.vcpus.iter().zip(&self.vcpus).zip(image.restore_plans()) {
            saved.restore(vcpu, &restore.reset).map_err(BuildError::Arch)?;
        }
        self.vsock = MmioTransport::restore((), &state.vsock).map_err(|e| BuildError::Device(e.to_string()))?;
        self.serial = SerialConsole::restore(Box::new(std::io::sink()), &state.serial)
            .map_err(|e| BuildError::Device(e.to_string()))?;
        self.parked_in_wait = false;
        self.poll_before_entry = true;
        self.announce_restore = false;
        self.ready = Some(state.ready_info());
        self.stopped = false;
        self.stats = ExitStats::default();
        self.id = next_vm_id();
        Ok(kind)
    }

    /// The pages a fast reset copies back, or `None` when only a full remap is safe.
    fn pages_to_copy_back(&self, image: &Image, clean: bool) -> Option<Vec<u64>> {
        let structural = image.structural_pages().filter(|_| clean)?;
        if !arch::same_translation(image.state().vcpus.first()?, &self.vcpus[0]) {
            return None;
        }
        let written = self.ram.private_pages().ok()?;
        if written.iter().any(|page| structural.binary_search(page).is_ok()) {
            return None;
        }
        Some(written)
    }

    /// What every VM restored from an image gets right before it serves: fresh entropy, the
    /// current time, and its generation number (see `mu2_abi::HostInfo`).
    pub fn hand_out(&mut self, image: &Image) -> Result<(), BuildError> {
        let mut info = mu2_abi::HostInfo { generation: image.next_generation(), ..Default::default() };
        fill_entropy(&mut info.entropy).map_err(|e| BuildError::Device(format!("reading host entropy: {e}")))?;
        info.unix_time_ns =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        self.ram
            .memory()
            .write_slice(&info.to_le_bytes(), GuestAddress(layout::HOST_INFO))
            .map_err(|e| BuildError::Device(format!("writing host info: {e}")))
    }

    /// Runs the guest until it needs the caller (see [`RunStop`]) or `deadline` passes.
    ///
    /// Called while the guest is parked in a WAIT, the devices are polled first: if they
    /// have nothing for the guest, this returns [`RunStop::Idle`] without entering it.
    pub fn run(&mut self, deadline: Option<Instant>) -> Result<RunStop, GuestError> {
        if self.stopped {
            return Err(GuestError::Stopped);
        }
        if self.parked_in_wait {
            self.vsock.poll(self.ram.memory());
            if !self.vsock.take_wakeup() {
                return Ok(RunStop::Idle);
            }
            let restored = if std::mem::take(&mut self.announce_restore) { mu2_abi::wait::RESTORED } else { 0 };
            self.complete_wait(1 | restored);
        } else if self.poll_before_entry {
            self.poll_before_entry = false;
            self.vsock.poll(self.ram.memory());
            // The guest's resumed WAIT already says "device work"; a second wake-up would
            // only cost it a spurious exit.
            self.vsock.take_wakeup();
        }
        kick::arm_deadline(deadline).map_err(GuestError::Kick)?;
        let result = self.run_vcpu(deadline);
        // A timer left armed would interrupt whatever this thread does next.
        let disarmed = kick::arm_deadline(None).map_err(GuestError::Kick);
        let stop = result?;
        disarmed?;
        Ok(stop)
    }

    fn run_vcpu(&mut self, deadline: Option<Instant>) -> Result<RunStop, GuestError> {
        let run_ptr: *mut kvm_bindings::kvm_run = self.vcpus[0].get_kvm_run();
        // SAFETY: the kvm_run mapping belongs to vCPU 0, which outlives this call, and this
        // thread is the only one running it.
        let _guard = unsafe { RunGuard::new(run_ptr) }.map_err(GuestError::Kick)?;
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(GuestError::Timeout);
            }
            self.stats.entries += 1;
            let outcome = match self.vcpus[0].run() {
                Ok(exit) => Self::classify(exit),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
                Err(source) => return Err(GuestError::Kvm { what: "run the vCPU", source }),
            };
            if let Some(stop) = self.handle(outcome)? {
                return Ok(stop);
            }
        }
    }

    /// Turns KVM's borrowed exit into owned data, so the handler can use `self` freely.
    fn classify(exit: VcpuExit<'_>) -> Exit {
        match exit {
            VcpuExit::IoOut(port, data) => Exit::PioWrite(port, data.to_vec()),
            VcpuExit::IoIn(port, data) => Exit::PioRead(port, data.len()),
            VcpuExit::MmioRead(addr, data) => Exit::MmioRead(addr, data.len()),
            VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite(addr, Bytes8::from(data)),
            VcpuExit::Hlt => Exit::Hlt,
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::FailEntry(reason, _) => Exit::FailEntry(reason),
            VcpuExit::InternalError => Exit::InternalError,
            VcpuExit::SystemEvent(kind, _) => Exit::SystemEvent(kind),
            VcpuExit::Intr => Exit::Interrupted,
            other => Exit::Other(format!("{other:?}")),
        }
    }

    fn handle(&mut self, exit: Exit) -> Result<Option<RunStop>, GuestError> {
        match exit {
            Exit::Interrupted => {
                self.stats.interrupted += 1;
                self.vcpus[0].set_kvm_immediate_exit(0);
                Ok(None)
            }
            Exit::PioWrite(port, data) => {
                self.stats.pio += 1;
                match Self::serial_offset(port) {
                    Some(offset) => {
                        for byte in &data {
                            self.serial.write(offset, *byte);
                        }
                    }
                    None => self.stats.unclaimed += 1,
                }
                Ok(None)
            }
            Exit::PioRead(port, len) => {
                self.stats.pio += 1;
                let value = match Self::serial_offset(port) {
                    Some(offset) => self.serial.read(offset),
                    None => {
                        self.stats.unclaimed += 1;
                        0xff
                    }
                };
                self.fill_pio_read(len, value);
                Ok(None)
            }
            Exit::MmioRead(addr, len) => self.mmio_read(addr, len),
            Exit::MmioWrite(addr, data) => self.mmio_write(addr, data.as_slice()),
            Exit::Hlt => self.fail(GuestError::Halted { rip: self.rip() }),
            Exit::Shutdown => self.fail(GuestError::TripleFault { rip: self.rip() }),
            Exit::FailEntry(reason) => self.fail(GuestError::FailEntry { reason }),
            Exit::InternalError => {
                // SAFETY: reading the `internal` member of the exit union, which KVM filled in
                // for this exit reason.
                let suberror = unsafe { self.vcpus[0].get_kvm_run().__bindgen_anon_1.internal.suberror };
                self.fail(GuestError::Internal { suberror, rip: self.rip() })
            }
            Exit::SystemEvent(kind) => self.fail(GuestError::SystemEvent(kind)),
            Exit::Other(what) => self.fail(GuestError::Protocol(format!("unexpected VM exit {what}"))),
        }
    }

    fn fail(&mut self, error: GuestError) -> Result<Option<RunStop>, GuestError> {
        self.stopped = true;
        Err(error)
    }

    fn rip(&self) -> u64 {
        arch::instruction_pointer(&self.vcpus[0]).unwrap_or(0)
    }

    fn serial_offset(port: u16) -> Option<u64> {
        let offset = u64::from(port.checked_sub(arch::SERIAL_PIO_BASE?)?);
        (offset < SERIAL_REGISTERS).then_some(offset)
    }

    /// The serial console's register at `addr`, where the console is memory-mapped (aarch64).
    fn serial_mmio_offset(addr: u64) -> Option<u64> {
        let offset = addr.checked_sub(arch::SERIAL_MMIO_BASE?)?;
        (offset < SERIAL_REGISTERS).then_some(offset)
    }

    fn fill_pio_read(&mut self, len: usize, value: u8) {
        let run = self.vcpus[0].get_kvm_run();
        // SAFETY: for a KVM_EXIT_IO exit, `io.data_offset` locates `len` bytes inside the
        // kvm_run mapping (kvm-ioctls built the same slice for the exit); nothing else
        // references them until the next KVM_RUN.
        unsafe {
            let io = run.__bindgen_anon_1.io;
            let base = (run as *mut kvm_bindings::kvm_run).cast::<u8>();
            std::ptr::write_bytes(base.add(io.data_offset as usize), value, len);
        }
    }

    fn mmio_data(&mut self) -> &mut [u8] {
        let run = self.vcpus[0].get_kvm_run();
        // SAFETY: the vCPU's last exit was KVM_EXIT_MMIO, so `mmio` is the live union member;
        // its length field was checked by KVM (at most 8).
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let len = (mmio.len as usize).min(mmio.data.len());
        &mut mmio.data[..len]
    }

    fn complete_wait(&mut self, bits: u32) {
        mu2_devices::sysdev::complete_wait(self.mmio_data(), bits);
        self.parked_in_wait = false;
    }

    fn mmio_read(&mut self, addr: u64, len: usize) -> Result<Option<RunStop>, GuestError> {
        let mut data = [0u8; 8];
        let data = &mut data[..len.min(8)];
        if let Some(offset) = Self::offset_in(addr, layout::SYSDEV) {
            match mu2_devices::sysdev::read(offset, data) {
                Ok(SysdevRequest::Wait) => {
                    self.stats.waits += 1;
                    self.vsock.poll(self.ram.memory());
                    // News for the host side (a response, a close) goes to the caller first:
                    // the guest's own wake-up (reclaiming TX buffers) can wait, and for a
                    // forked VM that is about to be destroyed it never has to happen.
                    let host_news = self.vsock.device_mut().host_mut().take_host_news();
                    if !host_news && self.vsock.take_wakeup() {
                        mu2_devices::sysdev::complete_wait(self.mmio_data(), 1);
                        return Ok(None);
                    }
                    self.parked_in_wait = true;
                    return Ok(Some(RunStop::Idle));
                }
                Ok(_) => self.stats.sysdev += 1,
                Err(e) => return self.fail(GuestError::Protocol(e.to_string())),
            }
        } else if let Some(offset) = Self::offset_in(addr, VSOCK_MMIO) {
            self.stats.virtio_mmio += 1;
            self.vsock.read(offset, data);
        } else if let Some(offset) = Self::serial_mmio_offset(addr) {
            self.stats.pio += 1;
            data.fill(0);
            data[0] = self.serial.read(offset);
        } else {
            self.stats.unclaimed += 1;
            log::debug!("guest read of unclaimed address {addr:#x}");
        }
        let value = Bytes8::from(&*data);
        let out = self.mmio_data();
        let n = out.len().min(value.len);
        out[..n].copy_from_slice(&value.as_slice()[..n]);
        Ok(None)
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Result<Option<RunStop>, GuestError> {
        if let Some(offset) = Self::offset_in(addr, layout::SYSDEV) {
            self.stats.sysdev += 1;
            let request = match mu2_devices::sysdev::write(offset, data) {
                Ok(r) => r,
                Err(e) => return self.fail(GuestError::Protocol(e.to_string())),
            };
            return self.sysdev_request(request);
        }
        if let Some(offset) = Self::offset_in(addr, VSOCK_MMIO) {
            self.stats.virtio_mmio += 1;
            self.vsock.write(self.ram.memory(), offset, data);
        } else if let Some(offset) = Self::serial_mmio_offset(addr) {
            self.stats.pio += 1;
            for byte in data {
                self.serial.write(offset, *byte);
            }
        } else {
            self.stats.unclaimed += 1;
            log::debug!("guest write to unclaimed address {addr:#x}");
        }
        Ok(None)
    }

    fn sysdev_request(&mut self, request: SysdevRequest) -> Result<Option<RunStop>, GuestError> {
        match request {
            SysdevRequest::Ready(addr) => {
                let mut raw = [0u8; ReadyInfo::SIZE];
                let info = match self.ram.memory().read_slice(&mut raw, GuestAddress(addr)) {
                    Ok(()) => ReadyInfo::from_le_bytes(raw),
                    Err(e) => return self.fail(GuestError::Protocol(format!("unreadable readiness report: {e}"))),
                };
                if info.abi_version != mu2_abi::ABI_VERSION {
                    return self.fail(GuestError::Protocol(format!(
                        "guest speaks ABI version {}, this VMM {}",
                        info.abi_version,
                        mu2_abi::ABI_VERSION
                    )));
                }
                self.ready = Some(info);
                Ok(Some(RunStop::Ready(info)))
            }
            SysdevRequest::Exit(code) => {
                self.stopped = true;
                Ok(Some(RunStop::Exited(code)))
            }
            SysdevRequest::Panic(addr) => {
                let message = self.read_text(addr).unwrap_or_else(|| "(unreadable message)".into());
                self.fail(GuestError::Panic(message))
            }
            SysdevRequest::Fault(vector) => {
                let fault = arch::decode_fault(&self.vcpus[0], self.ram.memory(), vector);
                self.fail(GuestError::Fault(fault))
            }
            SysdevRequest::Log(addr) => {
                if let Some(text) = self.read_text(addr) {
                    self.serial.write_text(text.as_bytes());
                }
                Ok(None)
            }
            SysdevRequest::Answered | SysdevRequest::Wait => Ok(None),
        }
    }

    /// Reads a guest `Text`, capped at `TEXT_MAX` bytes.
    fn read_text(&self, addr: u64) -> Option<String> {
        let mem = self.ram.memory();
        let mut raw = [0u8; Text::SIZE];
        mem.read_slice(&mut raw, GuestAddress(addr)).ok()?;
        let text = Text::from_le_bytes(raw);
        let len = text.len.min(mu2_abi::TEXT_MAX) as usize;
        let mut bytes = vec![0u8; len];
        mem.read_slice(&mut bytes, GuestAddress(text.addr)).ok()?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn offset_in(addr: u64, base: u64) -> Option<u64> {
        let offset = addr.checked_sub(base)?;
        (offset < layout::MMIO_DEVICE_SIZE).then_some(offset)
    }
}

/// Up to 8 bytes of exit data, copied out of kvm_run.
#[derive(Debug, Clone, Copy)]
struct Bytes8 {
    data: [u8; 8],
    len: usize,
}

impl Bytes8 {
    fn as_slice(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl From<&[u8]> for Bytes8 {
    fn from(src: &[u8]) -> Self {
        let len = src.len().min(8);
        let mut data = [0u8; 8];
        data[..len].copy_from_slice(&src[..len]);
        Bytes8 { data, len }
    }
}

#[derive(Debug)]
enum Exit {
    // String I/O can carry more than 8 bytes.
    PioWrite(u16, Vec<u8>),
    PioRead(u16, usize),
    MmioRead(u64, usize),
    MmioWrite(u64, Bytes8),
    Hlt,
    Shutdown,
    FailEntry(u64),
    InternalError,
    SystemEvent(u32),
    Interrupted,
    Other(String),
}

const _: () = assert!(sysdev::WAIT < layout::MMIO_DEVICE_SIZE);
