//! Getting a vCPU thread out of KVM_RUN: deadlines and stop requests.
//!
//! A guest spinning at CPL 3 never exits by itself, so a deadline is enforced with a signal
//! sent to the vCPU's thread: a per-thread POSIX timer (SIGEV_THREAD_ID) fires
//! [`kick_signal`] at the deadline. The handler sets `immediate_exit` in the thread's current
//! `kvm_run`, so a signal that lands just before KVM_RUN is not lost: KVM_RUN then returns
//! EINTR at once.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::Instant;

use kvm_bindings::kvm_run;
use libc::{c_int, c_void, siginfo_t};

thread_local! {
    // The kvm_run of the vCPU this thread is running, or null.
    static CURRENT_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
    static TIMER: ThreadTimer = const { ThreadTimer::new() };
}

/// The signal that interrupts KVM_RUN.
pub fn kick_signal() -> c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // Only async-signal-safe work here: a thread-local read and a byte store.
    let run = CURRENT_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: `run` is the mmap'ed kvm_run of the vCPU this thread is executing, set by
        // `RunGuard` for exactly the span in which it stays mapped.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Errors arming a deadline.
#[derive(Debug, thiserror::Error)]
pub enum KickError {
    /// The signal handler could not be installed.
    #[error("installing the vCPU kick signal handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
    /// The per-thread timer could not be created or armed.
    #[error("arming the vCPU deadline timer")]
    Timer(#[source] std::io::Error),
}

fn install_handler() -> Result<(), KickError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let installed = INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()));
    installed.map_err(|errno| KickError::Handler(vmm_sys_util::errno::Error::new(errno)))
}

/// Marks `run` as the current thread's kvm_run while alive.
pub struct RunGuard(());

impl RunGuard {
    /// # Safety
    /// `run` must stay mapped until the guard is dropped, and be used by this thread only.
    pub unsafe fn new(run: *mut kvm_run) -> Result<Self, KickError> {
        install_handler()?;
        CURRENT_RUN.with(|c| c.set(run));
        Ok(RunGuard(()))
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        CURRENT_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

impl std::fmt::Debug for RunGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunGuard")
    }
}

struct ThreadTimer {
    id: Cell<Option<libc::timer_t>>,
}

impl ThreadTimer {
    const fn new() -> Self {
        ThreadTimer { id: Cell::new(None) }
    }

    fn get(&self) -> Result<libc::timer_t, KickError> {
        if let Some(id) = self.id.get() {
            return Ok(id);
        }
        // SAFETY: sigevent is plain data; zero is a valid starting value.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: valid pointers to a sigevent and a timer id; the result is checked.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) } != 0 {
            return Err(KickError::Timer(std::io::Error::last_os_error()));
        }
        self.id.set(Some(id));
        Ok(id)
    }

    fn set(&self, after: Option<std::time::Duration>) -> Result<(), KickError> {
        let id = match (self.id.get(), after) {
            (None, None) => return Ok(()),
            _ => self.get()?,
        };
        let after = after.map(|d| d.max(std::time::Duration::from_nanos(1)));
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: match after {
                Some(d) => libc::timespec {
                    tv_sec: d.as_secs().try_into().unwrap_or(libc::time_t::MAX),
                    tv_nsec: d.subsec_nanos().into(),
                },
                None => libc::timespec { tv_sec: 0, tv_nsec: 0 },
            },
        };
        // SAFETY: `id` is a timer this thread created; `spec` is valid. Zero disarms.
        if unsafe { libc::timer_settime(id, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(KickError::Timer(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        if let Some(id) = self.id.get() {
            // SAFETY: deleting the timer this thread created, once.
            unsafe { libc::timer_delete(id) };
        }
    }
}

/// Arms (or with `None` disarms) this thread's deadline: at `deadline` the thread gets
/// [`kick_signal`].
pub fn arm_deadline(deadline: Option<Instant>) -> Result<(), KickError> {
    install_handler()?;
    let after = deadline.map(|d| d.saturating_duration_since(Instant::now()));
    TIMER.with(|t| t.set(after))
}

impl crate::error::Classify for KickError {
    fn kind(&self) -> crate::error::FailureKind {
        crate::error::FailureKind::Internal
    }
}
