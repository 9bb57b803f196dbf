//! The VMM boxed in: a seccomp filter per thread class, and the process confined (its own
//! mount namespace with a minimal root, a cgroup, landlock, an unprivileged user).
//!
//! - `filters`: the declarative system-call list of each [`ThreadClass`], compiled by
//!   seccompiler;
//! - `layers`: the process-wide layers, applied once while the process has one thread;
//! - here: the classes, [`install`] (compile every filter, start the spawner), [`spawn`] (every
//!   thread of the daemon starts here and installs its class's filter as its first action),
//!   [`enter`] (the calling thread takes a class's filter).
//!
//! A filter is per thread and inherited by the threads it starts, stacked under theirs. So
//! that each class gets exactly its own list, no filtered thread starts another: [`spawn`]
//! hands the new thread to the spawner, a thread that does nothing else and whose filter is
//! the union of the classes' lists plus what starting a thread takes.
//!
//! A forbidden call kills the whole process (`SECCOMP_RET_KILL_PROCESS`): a thread that makes
//! one runs code the VMM does not have, and a process with one thread dead mid-way (locks
//! held, a VM half-built) or a SIGSYS handler running in a compromised process would be worse
//! than a daemon that is gone. Its supervisor reports the signal and cleans up.

pub(crate) mod filters;
mod layers;

use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use seccompiler::{BpfProgram, SeccompAction};

pub use filters::FilterError;
pub use layers::{cgroup_limits, confine, CgroupSetup, ConfineError, Confined, Confinement};

/// What the threads of the daemon do, each class with a filter of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadClass {
    /// The main thread once the daemon serves (and the signal watcher it starts): waits for
    /// the stop, wakes the acceptors, destroys every VM, removes what the daemon made.
    Main,
    /// An accept loop.
    Acceptor,
    /// A client connection: reads requests, runs each one's VM on this thread (a vCPU thread),
    /// builds images, writes responses.
    Connection,
    /// Restores VMs ahead of time for a pool.
    PoolBuilder,
    /// The reaper (destroys used VMs) and the resetter (resets them in reuse mode).
    Recycler,
    /// Starts every other thread (see the module documentation).
    Spawner,
}

impl ThreadClass {
    /// The classes the spawner starts.
    pub const SPAWNED: [ThreadClass; 5] = [
        ThreadClass::Main,
        ThreadClass::Acceptor,
        ThreadClass::Connection,
        ThreadClass::PoolBuilder,
        ThreadClass::Recycler,
    ];

    /// Every class.
    pub const ALL: [ThreadClass; 6] = [
        ThreadClass::Main,
        ThreadClass::Acceptor,
        ThreadClass::Connection,
        ThreadClass::PoolBuilder,
        ThreadClass::Recycler,
        ThreadClass::Spawner,
    ];

    /// Its name, in logs and in the test hook.
    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Main => "main",
            ThreadClass::Acceptor => "acceptor",
            ThreadClass::Connection => "connection",
            ThreadClass::PoolBuilder => "pool-builder",
            ThreadClass::Recycler => "recycler",
            ThreadClass::Spawner => "spawner",
        }
    }

    /// The system calls its filter allows, by name, sorted.
    pub fn allowed_syscalls(self) -> Vec<&'static str> {
        filters::names(self)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a forbidden system call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnForbidden {
    /// Kill the process (the default).
    KillProcess,
    /// Allow it and write it to the kernel log (`dmesg`: `audit: type=1326 … comm="mu2-conn"
    /// … syscall=N`): for finding what a new code path needs.
    Log,
}

/// Why the sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A filter could not be compiled.
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// A filter could not be installed.
    #[error("installing the seccomp filter of the {class} threads")]
    Install {
        /// The class.
        class: &'static str,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// The spawner thread could not be started.
    #[error("starting the spawner thread")]
    Spawner(#[source] std::io::Error),
    /// The process-wide layers failed.
    #[error(transparent)]
    Confine(#[from] ConfineError),
}

impl crate::error::Classify for SandboxError {
    fn kind(&self) -> crate::error::FailureKind {
        match self {
            SandboxError::Confine(e) => e.kind(),
            SandboxError::Spawner(e) => crate::error::io_kind(e),
            _ => crate::error::FailureKind::Internal,
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The compiled filters and the spawner, once [`install`]ed.
struct Installed {
    programs: Vec<BpfProgram>,
    spawner: Mutex<Sender<Job>>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Whether [`install`] ran: threads started from now on are filtered.
pub fn installed() -> bool {
    INSTALLED.get().is_some()
}

/// Compiles every class's filter and starts the spawner: from now on every thread started
/// through [`spawn`] runs under its class's filter. Once per process.
pub fn install(on_forbidden: OnForbidden) -> Result<(), SandboxError> {
    if installed() {
        return Ok(());
    }
    let action = match on_forbidden {
        OnForbidden::KillProcess => SeccompAction::KillProcess,
        OnForbidden::Log => SeccompAction::Log,
    };
    // glibc's allocator opens files on its own when a thread first needs an arena of its own
    // (the CPU count, from /sys or /proc/stat) and when it shrinks one
    // (/proc/sys/vm/overcommit_memory): a thread whose class may not open files would die of
    // it. With one arena for every thread neither happens.
    crate::sys::single_malloc_arena();
    let pid = std::process::id();
    let programs =
        ThreadClass::ALL.iter().map(|&class| filters::compile(class, action.clone(), pid)).collect::<Result<_, _>>()?;
    let no_clone3 = filters::compile_no_clone3()?;
    let (tx, rx) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), SandboxError>>(1);
    let spawner_program = {
        let programs: &Vec<BpfProgram> = &programs;
        programs[ThreadClass::Spawner.index()].clone()
    };
    std::thread::Builder::new()
        .name("mu2-spawner".into())
        .spawn(move || {
            let applied = seccompiler::apply_filter(&no_clone3)
                .and_then(|()| seccompiler::apply_filter(&spawner_program))
                .map_err(|source| SandboxError::Install { class: "spawner", source });
            let ok = applied.is_ok();
            let _ = ready_tx.send(applied);
            #[cfg(feature = "test-hooks")]
            test_hooks::forbidden_call_if_asked(ThreadClass::Spawner);
            if ok {
                for job in rx {
                    job();
                }
            }
        })
        .map_err(SandboxError::Spawner)?;
    ready_rx.recv().map_err(|_| SandboxError::Spawner(std::io::ErrorKind::BrokenPipe.into()))??;
    let _ = INSTALLED.set(Installed { programs, spawner: Mutex::new(tx) });
    Ok(())
}

/// Puts the calling thread under `class`'s filter, if the sandbox is installed. A thread that
/// cannot be filtered must not run: the process aborts.
pub fn enter(class: ThreadClass) {
    if let Some(installed) = INSTALLED.get() {
        if let Err(e) = seccompiler::apply_filter(&installed.programs[class.index()]) {
            log::error!("installing the seccomp filter of a {} thread: {e}; aborting", class.name());
            std::process::abort();
        }
    }
    #[cfg(feature = "test-hooks")]
    test_hooks::forbidden_call_if_asked(class);
}

/// Starts a thread of `class` called `name` running `f`, under the class's filter (installed
/// as its first action) once the sandbox is installed; a plain thread otherwise.
pub fn spawn<F, T>(class: ThreadClass, name: String, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let start = move || {
        std::thread::Builder::new().name(name).spawn(move || {
            enter(class);
            f()
        })
    };
    let Some(installed) = INSTALLED.get() else { return start() };
    let (reply_tx, reply_rx): (SyncSender<std::io::Result<JoinHandle<T>>>, _) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = reply_tx.send(start());
    });
    let sent = installed.spawner.lock().unwrap_or_else(|p| p.into_inner()).send(job);
    if sent.is_err() {
        return Err(std::io::Error::other("the spawner thread is gone"));
    }
    reply_rx.recv().map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// Whether every thread of this process runs under a seccomp filter (`Seccomp: 2` in each
/// `/proc/self/task/*/status`).
pub fn every_thread_filtered() -> std::io::Result<bool> {
    for task in std::fs::read_dir("/proc/self/task")? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        if !status.lines().any(|l| l.split_whitespace().eq(["Seccomp:", "2"])) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The test hook: with `MU2_TEST_FORBIDDEN_SYSCALL=<class name>` in the environment, a thread
/// of that class makes a system call no filter allows (execve) right after taking its filter.
/// Built only with the `test-hooks` feature, which only the tests enable.
#[cfg(feature = "test-hooks")]
mod test_hooks {
    use super::ThreadClass;

    /// The variable naming the class whose threads make the forbidden call.
    pub(super) const VARIABLE: &str = "MU2_TEST_FORBIDDEN_SYSCALL";

    pub(super) fn forbidden_call_if_asked(class: ThreadClass) {
        if std::env::var_os(VARIABLE).is_some_and(|v| v == class.name()) {
            crate::sys::forbidden_execve();
        }
    }
}
