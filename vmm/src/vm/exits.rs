//! The run loop: entering the guest, turning each exit into what it means, and the few
//! places that read or write `kvm_run` directly.

use std::time::Instant;

use kvm_ioctls::VcpuExit;
use mu2_abi::{ReadyInfo, Text};
use mu2_devices::sysdev::SysdevRequest;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::bus::{Bus, BusAction, ExitCounter, IoSpace};
use super::{ExitStats, GuestError, Phase, ProtocolError, RunStop, Vm};
use crate::arch;
use crate::kick::{self, RunGuard};

/// What an exit asks of the VM once KVM's borrow of `kvm_run` has ended.
#[derive(Debug)]
enum Next {
    /// Enter the guest again.
    Continue,
    /// KVM_RUN returned early (a signal, or `immediate_exit`).
    Interrupted,
    /// The system device decoded a request.
    Sysdev(SysdevRequest),
    /// The guest is done with an exit in a way that ends it.
    Fail(Failure),
}

/// Exits that end the guest, resolved with the vCPU's state after the exit.
#[derive(Debug)]
enum Failure {
    Halted,
    Shutdown,
    FailEntry(u64),
    InternalError,
    SystemEvent(u32),
    Protocol(ProtocolError),
}

/// Sends a device access to the bus and counts it.
fn count(stats: &mut ExitStats, routed: Option<(ExitCounter, BusAction)>) -> Next {
    let Some((counter, action)) = routed else {
        stats.unclaimed += 1;
        return Next::Continue;
    };
    match (counter, &action) {
        (_, BusAction::Sysdev(SysdevRequest::Wait)) => stats.waits += 1,
        (ExitCounter::Console, _) => stats.pio += 1,
        (ExitCounter::VirtioMmio, _) => stats.virtio_mmio += 1,
        (ExitCounter::Sysdev, _) => stats.sysdev += 1,
    }
    match action {
        BusAction::Done => Next::Continue,
        BusAction::Sysdev(request) => Next::Sysdev(request),
        BusAction::SysdevMisuse(e) => Next::Fail(Failure::Protocol(ProtocolError::Sysdev(e))),
    }
}

/// What KVM's exit means, answered by the device it addresses where it is an access.
fn route(exit: VcpuExit<'_>, bus: &mut Bus, mem: &GuestMemoryMmap, stats: &mut ExitStats) -> Next {
    match exit {
        VcpuExit::IoOut(port, data) => count(stats, bus.write(mem, IoSpace::Pio, port.into(), data)),
        VcpuExit::IoIn(port, data) => count(stats, bus.read(mem, IoSpace::Pio, port.into(), data)),
        VcpuExit::MmioWrite(addr, data) => count(stats, bus.write(mem, IoSpace::Mmio, addr, data)),
        VcpuExit::MmioRead(addr, data) => count(stats, bus.read(mem, IoSpace::Mmio, addr, data)),
        VcpuExit::Intr => Next::Interrupted,
        VcpuExit::Hlt => Next::Fail(Failure::Halted),
        VcpuExit::Shutdown => Next::Fail(Failure::Shutdown),
        VcpuExit::FailEntry(reason, _) => Next::Fail(Failure::FailEntry(reason)),
        VcpuExit::InternalError => Next::Fail(Failure::InternalError),
        VcpuExit::SystemEvent(kind, _) => Next::Fail(Failure::SystemEvent(kind)),
        other => Next::Fail(Failure::Protocol(ProtocolError::UnexpectedExit { exit: format!("{other:?}") })),
    }
}

impl Vm {
    /// Runs the guest until it needs the caller (see [`RunStop`]) or `deadline` passes.
    ///
    /// Called while the guest is parked in a WAIT, the devices are polled first: if they
    /// have nothing for the guest, this returns [`RunStop::Idle`] without entering it.
    pub fn run(&mut self, deadline: Option<Instant>) -> Result<RunStop, GuestError> {
        match self.phase {
            Phase::Stopped => return Err(GuestError::Stopped),
            Phase::Parked { announce_restore } => {
                let mem = self.ram.memory();
                let vsock = self.bus.get_mut(self.devices.vsock);
                vsock.poll(mem);
                if !vsock.take_wakeup() {
                    return Ok(RunStop::Idle);
                }
                let restored = if announce_restore { mu2_abi::wait::RESTORED } else { 0 };
                self.complete_wait(1 | restored);
            }
            Phase::Restored => {
                let mem = self.ram.memory();
                let vsock = self.bus.get_mut(self.devices.vsock);
                vsock.poll(mem);
                // The guest's resumed WAIT already says "device work"; a second wake-up would
                // only cost it a spurious exit.
                vsock.take_wakeup();
                self.phase = Phase::Running;
            }
            Phase::Running => {}
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
            // The exit borrows kvm_run through vCPU 0; the bus, memory and counters are
            // other fields, so the device answers straight into KVM's buffer.
            let next = match self.vcpus[0].run() {
                Ok(exit) => route(exit, &mut self.bus, self.ram.memory(), &mut self.stats),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Interrupted,
                Err(source) => return Err(GuestError::Kvm { what: "run the vCPU", source }),
            };
            let stop = match next {
                Next::Continue => None,
                Next::Interrupted => {
                    self.stats.interrupted += 1;
                    self.vcpus[0].set_kvm_immediate_exit(0);
                    None
                }
                Next::Sysdev(request) => self.sysdev_request(request)?,
                Next::Fail(failure) => return Err(self.fail(failure)),
            };
            if let Some(stop) = stop {
                return Ok(stop);
            }
        }
    }

    /// Stops the VM for good and names why.
    fn fail(&mut self, failure: Failure) -> GuestError {
        self.phase = Phase::Stopped;
        let rip = arch::instruction_pointer(&self.vcpus[0]).unwrap_or(0);
        match failure {
            Failure::Halted => GuestError::Halted { rip },
            Failure::Shutdown => GuestError::TripleFault { rip },
            Failure::FailEntry(reason) => GuestError::FailEntry { reason },
            Failure::InternalError => GuestError::Internal { suberror: self.internal_suberror(), rip },
            Failure::SystemEvent(kind) => GuestError::SystemEvent(kind),
            Failure::Protocol(e) => GuestError::Protocol(e),
        }
    }

    fn sysdev_request(&mut self, request: SysdevRequest) -> Result<Option<RunStop>, GuestError> {
        match request {
            SysdevRequest::Wait => Ok(self.wait()),
            SysdevRequest::Ready(addr) => {
                let mut raw = [0u8; ReadyInfo::SIZE];
                if let Err(e) = self.ram.memory().read_slice(&mut raw, GuestAddress(addr)) {
                    return Err(self.fail(Failure::Protocol(ProtocolError::UnreadableReady(e))));
                }
                let info = ReadyInfo::from_le_bytes(raw);
                if info.abi_version != mu2_abi::ABI_VERSION {
                    let mismatch = ProtocolError::AbiVersion { guest: info.abi_version, vmm: mu2_abi::ABI_VERSION };
                    return Err(self.fail(Failure::Protocol(mismatch)));
                }
                let mem_size = self.ram.size() as u64;
                if u64::from(info.max_request) > mem_size {
                    let claim = ProtocolError::MaxRequest { max_request: info.max_request, mem_size };
                    return Err(self.fail(Failure::Protocol(claim)));
                }
                self.ready = Some(info);
                Ok(Some(RunStop::Ready(info)))
            }
            SysdevRequest::Exit(code) => {
                self.phase = Phase::Stopped;
                Ok(Some(RunStop::Exited(code)))
            }
            SysdevRequest::Panic(addr) => {
                let message =
                    self.read_text(addr).map_or_else(|| "(unreadable message)".into(), |t| super::printable(&t));
                self.phase = Phase::Stopped;
                Err(GuestError::Panic(message))
            }
            SysdevRequest::Fault(vector) => {
                let fault = arch::decode_fault(&self.vcpus[0], self.ram.memory(), vector);
                self.phase = Phase::Stopped;
                Err(GuestError::Fault(fault))
            }
            SysdevRequest::Log(addr) => {
                if let Some(text) = self.read_text(addr) {
                    self.serial().write_text(text.as_bytes());
                }
                Ok(None)
            }
            SysdevRequest::Answered => Ok(None),
        }
    }

    /// A WAIT read: answered at once if a device has work for the guest, else the vCPU stays
    /// parked in it and the caller hears `Idle`.
    fn wait(&mut self) -> Option<RunStop> {
        let mem = self.ram.memory();
        let vsock = self.bus.get_mut(self.devices.vsock);
        vsock.poll(mem);
        // News for the host side (a response, a close) goes to the caller first: the guest's
        // own wake-up (reclaiming TX buffers) can wait, and for a forked VM that is about to
        // be destroyed it never has to happen.
        let host_news = vsock.device_mut().host_mut().take_host_news();
        if !host_news && vsock.take_wakeup() {
            mu2_devices::sysdev::complete_wait(self.mmio_data(), 1);
            return None;
        }
        self.phase = Phase::Parked { announce_restore: false };
        Some(RunStop::Idle)
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

    /// Answers the WAIT read the guest is parked in.
    pub(super) fn complete_wait(&mut self, bits: u32) {
        mu2_devices::sysdev::complete_wait(self.mmio_data(), bits);
        self.phase = Phase::Running;
    }

    /// KVM_RUN with `immediate_exit`: KVM finishes the instruction of the last I/O or MMIO
    /// exit (writing a read's value into its register, moving RIP past it) without running
    /// any further guest code. Returns whether KVM ran guest code anyway.
    pub(super) fn enter_and_leave(&mut self) -> Result<bool, GuestError> {
        self.vcpus[0].set_kvm_immediate_exit(1);
        let result = self.vcpus[0].run().map(|_| ());
        self.vcpus[0].set_kvm_immediate_exit(0);
        match result {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == libc::EINTR => Ok(false),
            Err(source) => Err(GuestError::Kvm { what: "complete the pending exit", source }),
        }
    }

    /// Lets KVM finish the vCPU's last exit (see [`Vm::enter_and_leave`]), so that state read
    /// afterwards is final and state written afterwards is not overwritten by it.
    pub(crate) fn complete_pending_exit(&mut self) -> Result<(), GuestError> {
        match self.enter_and_leave()? {
            false => Ok(()),
            true => Err(GuestError::Protocol(ProtocolError::RanInsteadOfStopping)),
        }
    }

    /// The data of the vCPU's last MMIO exit, to answer a read after KVM's exit borrow ended.
    fn mmio_data(&mut self) -> &mut [u8] {
        let run = self.vcpus[0].get_kvm_run();
        // SAFETY: only called while the vCPU's last exit is KVM_EXIT_MMIO (a WAIT read), so
        // `mmio` is the live union member; KVM caps its `len` at 8, and it is clamped to the
        // array anyway.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let len = (mmio.len as usize).min(mmio.data.len());
        &mut mmio.data[..len]
    }

    fn internal_suberror(&mut self) -> u32 {
        // SAFETY: only called for a KVM_EXIT_INTERNAL_ERROR exit, for which KVM filled in the
        // `internal` member of the exit union.
        unsafe { self.vcpus[0].get_kvm_run().__bindgen_anon_1.internal.suberror }
    }
}
