//! One virtual machine: KVM objects, guest RAM, the device bus, and the run loop.
//!
//! - `mod.rs`: the machine — building one ([`Vm::boot`]), its phase, its parts;
//! - `bus.rs`: guest address ranges mapped to devices;
//! - `exits.rs`: the run loop — what each exit means, and access to `kvm_run`;
//! - `state.rs`: freezing a ready guest into a [`VmState`];
//! - `error.rs`: why a VM could not be built or could not go on.
//!
//! Restoring a VM from an image, resetting it and handing it out are workflows above images,
//! in `crate::restore`. A VM runs on the thread that calls [`Vm::run`].

mod bus;
mod error;
mod exits;
mod state;

use std::borrow::Cow;

use kvm_ioctls::{VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use mu2_abi::{layout, ReadyInfo};
use mu2_devices::serial::{ConsoleOutput, SerialConsole, SERIAL_REGISTERS};
use mu2_devices::virtio::mmio::MmioTransport;
use mu2_devices::virtio::vsock::{HostEndpoint, Vsock, VsockConfig};
use vm_memory::GuestAddress;
#[cfg(feature = "inspect")]
use vm_memory::GuestMemoryMmap;

pub use self::bus::BusError;
use self::bus::{Bus, DeviceHandle, ExitCounter, IoSpace, Sysdev};
pub use self::error::{BuildError, GuestError, ProtocolError};
pub use self::state::{FreezeError, VmState};
use crate::arch::{self, EntryMode};
use crate::cpu::CpuTemplate;
use crate::hypervisor::Hypervisor;
use crate::memory::GuestRam;

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
    /// Which CPU features the guest is shown (and an image of it needs).
    pub cpu_template: CpuTemplate,
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
            cpu_template: CpuTemplate::Host,
        }
    }
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

/// Where the VM is in its life, as far as the run loop cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The guest runs, or sits in an exit that has been answered.
    Running,
    /// Restored from an image: the guest resumes from a WAIT that already returned "device
    /// work", so the devices are polled (host data into RX) before it first runs.
    Restored,
    /// Parked in a WAIT read that has not been answered. With `announce_restore`, the answer
    /// carries `RESTORED` (a warmed-up VM takes its HostInfo again when handed out).
    Parked {
        /// Answer the WAIT with `RESTORED`.
        announce_restore: bool,
    },
    /// Exited, failed or frozen: it cannot run again (a reset makes it `Restored`).
    Stopped,
}

/// The devices the VM itself calls into, on its bus.
#[derive(Debug, Clone, Copy)]
struct Devices {
    serial: DeviceHandle<SerialConsole>,
    vsock: DeviceHandle<MmioTransport<Vsock>>,
}

/// The vsock device's place: the first virtio-mmio slot.
const VSOCK_MMIO: u64 = layout::VIRTIO_MMIO_BASE;
/// The interrupt line named on the command line. mu2 guests poll; the line is not wired.
const VSOCK_IRQ: u32 = 5;
/// The serial console's place, which each architecture chooses.
const SERIAL_AT: (IoSpace, u64) = match (arch::SERIAL_PIO_BASE, arch::SERIAL_MMIO_BASE) {
    (Some(port), _) => (IoSpace::Pio, port as u64),
    (None, Some(addr)) => (IoSpace::Mmio, addr),
    (None, None) => panic!("each architecture places the serial console"),
};

/// Places every device of a mu2 VM on a new bus: the one list of what sits where.
fn attach_devices(serial: SerialConsole, vsock: MmioTransport<Vsock>) -> Result<(Bus, Devices), BuildError> {
    let mut bus = Bus::default();
    bus.register(IoSpace::Mmio, layout::SYSDEV, layout::MMIO_DEVICE_SIZE, ExitCounter::Sysdev, Sysdev)
        .map_err(BuildError::Bus)?;
    let vsock = bus
        .register(IoSpace::Mmio, VSOCK_MMIO, layout::MMIO_DEVICE_SIZE, ExitCounter::VirtioMmio, vsock)
        .map_err(BuildError::Bus)?;
    let serial = bus
        .register(SERIAL_AT.0, SERIAL_AT.1, SERIAL_REGISTERS, ExitCounter::Console, serial)
        .map_err(BuildError::Bus)?;
    Ok((bus, Devices { serial, vsock }))
}

/// A virtual machine.
pub struct Vm {
    // Field order is drop order: vCPUs, then the VM, then the memory they used.
    vcpus: Vec<VcpuFd>,
    // Held open for the VM's lifetime; only inspection reads it.
    #[cfg_attr(not(feature = "inspect"), allow(dead_code))]
    vm_fd: VmFd,
    ram: GuestRam,
    bus: Bus,
    devices: Devices,
    phase: Phase,
    ready: Option<ReadyInfo>,
    stats: ExitStats,
    tsc_khz: Option<u32>,
    /// MSRs saved when this VM is frozen.
    msr_indices: Vec<u32>,
    /// The CPU template its vCPUs were given.
    cpu_template: CpuTemplate,
    id: u64,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.id)
            .field("mem_size", &self.ram.size())
            .field("vcpus", &self.vcpus.len())
            .field("phase", &self.phase)
            .field("ready", &self.ready)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// A guest's text as it may be shown: control characters (which could drive a terminal, or
/// fake a log line) replaced.
pub(crate) fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '\u{fffd}' } else { c }).collect()
}

fn next_vm_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What a VM restored from an image is made of (see `crate::restore`).
pub(crate) struct RestoredParts {
    pub(crate) vcpus: Vec<VcpuFd>,
    pub(crate) vm_fd: VmFd,
    pub(crate) ram: GuestRam,
    pub(crate) serial: SerialConsole,
    pub(crate) vsock: MmioTransport<Vsock>,
    pub(crate) ready: ReadyInfo,
    pub(crate) tsc_khz: Option<u32>,
    pub(crate) msr_indices: Vec<u32>,
    pub(crate) cpu_template: CpuTemplate,
}

impl Vm {
    /// Creates a VM and loads the guest: cold boot up to the first instruction.
    pub fn boot(hv: &Hypervisor, config: &VmConfig, console: ConsoleOutput) -> Result<Vm, BuildError> {
        if config.mem_size < layout::MIN_MEM || config.mem_size > layout::MAX_MEM || config.mem_size % (2 << 20) != 0 {
            return Err(BuildError::MemorySize { bytes: config.mem_size });
        }
        let max_vcpus = hv.max_vcpus();
        if config.vcpus == 0 || usize::from(config.vcpus) > max_vcpus {
            return Err(BuildError::VcpuCount { asked: config.vcpus, max: max_vcpus });
        }
        if let Some((name, value, max)) = config.vsock.out_of_range() {
            return Err(BuildError::VsockLimit { name, value, max });
        }
        let kvm_err = |what| move |source| BuildError::Kvm { what, source };
        // Validated above: the size fits in usize. Mapped before the VM exists, so that on an
        // early return below the VM's locals (declared later) are dropped before it.
        let ram = GuestRam::anonymous(config.mem_size as usize).map_err(BuildError::Memory)?;
        let vm_fd = hv.kvm().create_vm().map_err(kvm_err("create a VM"))?;
        // SAFETY: every KVM fd of this VM (`vm_fd`, and the vCPUs made below) is declared after
        // `ram`, so an early return drops them first; on success they move into the `Vm`,
        // whose field order drops the vCPUs and the VM before the memory.
        unsafe { ram.register(&vm_fd) }.map_err(kvm_err("register guest memory"))?;

        let mem = ram.memory();
        let (entry, _image_end) = arch::load_kernel(mem, &config.image, config.mem_size).map_err(BuildError::Arch)?;

        let mut vcpus = Vec::with_capacity(config.vcpus.into());
        for index in 0..config.vcpus {
            vcpus.push(vm_fd.create_vcpu(index.into()).map_err(kvm_err("create a vCPU"))?);
        }
        let tsc_khz = arch::tsc_khz(&vcpus[0]);
        let cmdline = Self::cmdline(config, tsc_khz)?;
        arch::write_boot_data(mem, config.mem_size, cmdline.as_bytes_with_nul(), config.entry)
            .map_err(BuildError::Arch)?;
        for (index, vcpu) in vcpus.iter().enumerate() {
            let mut cpuid = hv.vcpu_cpuid(index as u8, config.vcpus);
            arch::apply_template(&mut cpuid, config.cpu_template).map_err(BuildError::Arch)?;
            arch::setup_vcpu(vcpu, &cpuid, entry, config.entry).map_err(BuildError::Arch)?;
        }
        let (bus, devices) = attach_devices(SerialConsole::new(console), MmioTransport::new(Vsock::new(config.vsock)))?;
        Ok(Vm {
            vcpus,
            vm_fd,
            ram,
            bus,
            devices,
            phase: Phase::Running,
            ready: None,
            stats: ExitStats::default(),
            tsc_khz,
            msr_indices: hv.msr_indices().to_vec(),
            cpu_template: config.cpu_template,
            id: next_vm_id(),
        })
    }

    /// A VM of parts restored from an image; it resumes from the image's WAIT.
    pub(crate) fn from_restored(parts: RestoredParts) -> Result<Vm, BuildError> {
        let (bus, devices) = attach_devices(parts.serial, parts.vsock)?;
        Ok(Vm {
            vcpus: parts.vcpus,
            vm_fd: parts.vm_fd,
            ram: parts.ram,
            bus,
            devices,
            phase: Phase::Restored,
            ready: Some(parts.ready),
            stats: ExitStats::default(),
            tsc_khz: parts.tsc_khz,
            msr_indices: parts.msr_indices,
            cpu_template: parts.cpu_template,
            id: next_vm_id(),
        })
    }

    /// Puts this VM back to where a restored one starts, with devices rebuilt from an image
    /// (reuse mode). vCPU state and memory are the caller's to put back first.
    pub(crate) fn rearm(
        &mut self,
        serial: SerialConsole,
        vsock: MmioTransport<Vsock>,
        ready: ReadyInfo,
    ) -> Result<(), BuildError> {
        let (bus, devices) = attach_devices(serial, vsock)?;
        self.bus = bus;
        self.devices = devices;
        self.phase = Phase::Restored;
        self.ready = Some(ready);
        self.stats = ExitStats::default();
        self.id = next_vm_id();
        Ok(())
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

    /// What the guest reported when it became ready.
    pub fn ready_info(&self) -> Option<ReadyInfo> {
        self.ready
    }

    /// Guest RAM size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.ram.size() as u64
    }

    /// Exit counters so far.
    pub fn stats(&self) -> ExitStats {
        self.stats
    }

    /// The host side of the vsock device: connections to and from the guest.
    pub fn vsock(&mut self) -> &mut HostEndpoint {
        self.vsock_transport().device_mut().host_mut()
    }

    fn vsock_transport(&mut self) -> &mut MmioTransport<Vsock> {
        self.bus.get_mut(self.devices.vsock)
    }

    fn serial(&mut self) -> &mut SerialConsole {
        self.bus.get_mut(self.devices.serial)
    }

    /// Guest RAM.
    pub(crate) fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest RAM, to replace its contents (reuse mode).
    pub(crate) fn ram_mut(&mut self) -> &mut GuestRam {
        &mut self.ram
    }

    /// The vCPUs.
    pub(crate) fn vcpus(&self) -> &[VcpuFd] {
        &self.vcpus
    }

    /// Whether the VM was restored and has not run since.
    pub(crate) fn is_freshly_restored(&self) -> bool {
        self.phase == Phase::Restored
    }

    /// Makes the answer to the WAIT the guest is parked in carry `RESTORED`.
    pub(crate) fn announce_restore_on_wake(&mut self) -> bool {
        match &mut self.phase {
            Phase::Parked { announce_restore } => {
                *announce_restore = true;
                true
            }
            _ => false,
        }
    }
}

/// Inspection for tests, debuggers and research tools: what the guest and KVM hold.
#[cfg(feature = "inspect")]
impl Vm {
    /// The vsock transport's record of driver misuse since the last call (a refused status
    /// write, a bad register access, …).
    pub fn vsock_transport_errors(&mut self) -> Vec<mu2_devices::virtio::mmio::MmioError> {
        self.vsock_transport().take_errors()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    /// Guest RAM as bytes, while no vCPU runs.
    pub fn memory_bytes(&self) -> &[u8] {
        self.ram.as_slice()
    }

    /// vCPU 0.
    pub fn vcpu_fd(&self) -> &VcpuFd {
        &self.vcpus[0]
    }

    /// The KVM VM object.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// The TSC frequency given to the guest, if KVM reported one.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.tsc_khz
    }

    /// Turns off the kernel's fault-around for guest memory (MADV_RANDOM), so that
    /// [`Vm::touched_pages`] counts exactly the pages the guest touched rather than the 64 KiB
    /// blocks around them. For measurements.
    pub fn disable_fault_around(&self) -> std::io::Result<()> {
        self.ram.disable_fault_around()
    }

    /// Guest-physical addresses of the pages mapped into this process so far: for a VM
    /// restored just before a request, the pages the guest touched. Reads /proc/self/pagemap.
    pub fn touched_pages(&self) -> std::io::Result<Vec<u64>> {
        self.ram.touched_pages()
    }

    /// Guest-physical addresses of the pages this VM holds a private copy of: the pages written
    /// since the image was mapped (by the guest or by the VMM).
    pub fn private_pages(&self) -> std::io::Result<Vec<u64>> {
        self.ram.private_pages()
    }

    /// Enters and leaves the guest without running it (KVM_RUN with immediate_exit), to see
    /// what the hypervisor itself touches on entry.
    pub fn enter_without_running(&mut self) -> Result<(), GuestError> {
        self.enter_and_leave().map(|_| ())
    }
}
