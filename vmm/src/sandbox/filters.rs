//! The seccomp filters, one per thread class, as declarative lists: the system calls each class
//! makes, measured by running the test suite and the daemon with `--seccomp-log` and reading
//! the kernel log (see docs/RELIABILITY.md). Anything not listed kills the process.
//!
//! The arguments of the dangerous calls are filtered where seccomp can see them (registers,
//! not memory): `ioctl` only with KVM's request type (0xAE) or the one non-KVM request a
//! class needs; `mmap`/`mprotect` never with `PROT_EXEC`; `clone` only for threads; `tgkill` only within this process. Names
//! that exist on one architecture only (x86_64's `unlink`, `rename`, …) come from `arch`.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

use super::ThreadClass;
use crate::arch;

/// What a listed system call may be called with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Args {
    /// Anything.
    Any,
    /// `mmap`/`mprotect`: memory that is never executable.
    NoExec,
    /// `ioctl` on KVM's descriptors (request type 0xAE), and one other request.
    KvmAnd(u64),
    /// `clone` of a thread (CLONE_THREAD set), never of a process.
    ThreadOnly,
    /// `tgkill` to a thread of this process.
    OwnProcess,
    /// `prctl` to name a thread, or to set no_new_privs before a filter.
    NameOrNoNewPrivs,
    /// `sched_setscheduler` of the calling thread (pid 0) to `SCHED_BATCH`, nothing else.
    OwnBatchPolicy,
}

/// One allowed system call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Syscall {
    /// `SYS_` and its name.
    id: &'static str,
    /// Its number on this architecture.
    pub(crate) nr: libc::c_long,
    /// What it may be called with.
    pub(crate) args: Args,
}

/// `allow!(SYS_name)` or `allow!(SYS_name, Args)`: one entry of a list.
macro_rules! allow {
    ($nr:ident) => {
        Syscall { id: stringify!($nr), nr: libc::$nr, args: Args::Any }
    };
    ($nr:ident, $($args:tt)+) => {
        Syscall { id: stringify!($nr), nr: libc::$nr, args: Args::$($args)+ }
    };
}

impl Syscall {
    /// An entry: `SYS_name`, its number here, its arguments.
    pub(crate) const fn new(id: &'static str, nr: libc::c_long, args: Args) -> Syscall {
        Syscall { id, nr, args }
    }

    /// Its name, as in `man 2`.
    pub(crate) fn name(&self) -> &'static str {
        self.id.trim_start_matches("SYS_")
    }
}

/// KVM's ioctl request type, bits 8..16 of every KVM request number.
const KVM_IOCTL_TYPE: u64 = 0xAE;
/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)` (see `memory.rs`).
pub(crate) const PAGEMAP_SCAN: u64 = (3 << 30) | (96 << 16) | ((b'f' as u64) << 8) | 16;

/// What every thread does: memory, locks, time, signals, its own end, errors on stderr.
const BASE: &[Syscall] = &[
    allow!(SYS_brk),
    allow!(SYS_clock_gettime),
    allow!(SYS_clock_nanosleep),
    allow!(SYS_close),
    allow!(SYS_exit),
    allow!(SYS_fcntl),
    allow!(SYS_futex),
    allow!(SYS_getpid),
    allow!(SYS_getrandom),
    allow!(SYS_gettid),
    allow!(SYS_madvise),
    allow!(SYS_mmap, NoExec),
    allow!(SYS_mprotect, NoExec),
    allow!(SYS_munmap),
    allow!(SYS_nanosleep),
    // A sleep or wait a signal interrupted resumes through it (SIGTERM lands on any thread).
    allow!(SYS_restart_syscall),
    allow!(SYS_rt_sigprocmask),
    allow!(SYS_rt_sigreturn),
    allow!(SYS_sched_yield),
    // The SIGINT/SIGTERM handler (signal-hook) wakes the watcher with send(2), on whichever
    // thread the signal lands.
    allow!(SYS_sendto),
    allow!(SYS_sigaltstack),
    allow!(SYS_tgkill, OwnProcess),
    allow!(SYS_write),
];

/// Running vCPUs: KVM ioctls, the guest's memory, the deadline timer and its signal.
const VCPU: &[Syscall] = &[
    allow!(SYS_ioctl, KvmAnd(PAGEMAP_SCAN)),
    allow!(SYS_mremap),
    allow!(SYS_pread64),
    allow!(SYS_rt_sigaction),
    allow!(SYS_timer_create),
    allow!(SYS_timer_delete),
    allow!(SYS_timer_settime),
];

/// Threads off the serving path (builders, resetters, reaper): their own scheduling policy,
/// `SCHED_BATCH`, once at their start.
const BACKGROUND: &[Syscall] = &[allow!(SYS_sched_setscheduler, OwnBatchPolicy)];

/// Files of images: made, read, removed; /proc for the daemon's own gauges.
const FILES: &[Syscall] = &[
    allow!(SYS_fstat),
    allow!(SYS_fsync),
    allow!(SYS_ftruncate),
    allow!(SYS_getdents64),
    allow!(SYS_lseek),
    allow!(SYS_memfd_create),
    allow!(SYS_mkdirat),
    allow!(SYS_newfstatat),
    allow!(SYS_openat),
    allow!(SYS_pwrite64),
    allow!(SYS_read),
    allow!(SYS_readlinkat),
    allow!(SYS_renameat2),
    allow!(SYS_statx),
    allow!(SYS_unlinkat),
];

/// The daemon's main thread once it serves: waits for the stop request, joins the accept
/// loops, drops every engine (VMs, threads), removes what it
/// made; and the signal watcher it starts.
const MAIN: &[Syscall] = &[
    allow!(SYS_exit_group),
    allow!(SYS_fstat),
    allow!(SYS_getdents64),
    allow!(SYS_newfstatat),
    allow!(SYS_openat),
    allow!(SYS_ppoll),
    allow!(SYS_read),
    allow!(SYS_recvfrom),
    allow!(SYS_statx),
    allow!(SYS_timer_delete),
    allow!(SYS_unlinkat),
];

/// An accept loop: waits for connections (polling, so that it sees the stop flag), takes
/// them, sets their options, hands them to a new thread.
const ACCEPTOR: &[Syscall] = &[allow!(SYS_accept4), allow!(SYS_ppoll), allow!(SYS_setsockopt)];

/// A client connection: reads requests and writes responses, and runs its request's VM (and
/// builds images) on this thread.
const CONNECTION: &[Syscall] = &[allow!(SYS_recvfrom), allow!(SYS_shutdown), allow!(SYS_writev)];

/// What a thread needs to start another (only the spawner does): the new thread runs under
/// this filter until it installs its own.
const SPAWN: &[Syscall] = &[
    allow!(SYS_clone, ThreadOnly),
    allow!(SYS_clone3),
    allow!(SYS_prctl, NameOrNoNewPrivs),
    allow!(SYS_rseq),
    allow!(SYS_sched_getaffinity),
    allow!(SYS_seccomp),
    allow!(SYS_set_robust_list),
];

/// This architecture's extra path calls (see `arch::SECCOMP_PATH_SYSCALLS`).
static PATH: std::sync::LazyLock<Vec<Syscall>> = std::sync::LazyLock::new(|| {
    arch::SECCOMP_PATH_SYSCALLS.iter().map(|&(id, nr)| Syscall::new(id, nr, Args::Any)).collect()
});

/// The lists a class's filter is made of.
pub(crate) fn lists(class: ThreadClass) -> Vec<&'static [Syscall]> {
    let path: &'static [Syscall] = &PATH;
    match class {
        ThreadClass::Main => vec![BASE, MAIN, path],
        ThreadClass::Acceptor => vec![BASE, ACCEPTOR],
        ThreadClass::Connection => vec![BASE, VCPU, FILES, CONNECTION, path],
        ThreadClass::PoolBuilder => vec![BASE, VCPU, BACKGROUND],
        ThreadClass::Recycler => vec![BASE, VCPU, BACKGROUND],
        // Every thread starts under the spawner's filter and adds its own, so the spawner's
        // allows what any class does, and starting threads.
        ThreadClass::Spawner => {
            let mut all: Vec<&'static [Syscall]> = ThreadClass::SPAWNED.iter().flat_map(|&c| lists(c)).collect();
            all.push(SPAWN);
            all
        }
    }
}

/// The system calls a class allows, each once (an argument-filtered one once per filter).
pub(crate) fn allowed(class: ThreadClass) -> BTreeMap<libc::c_long, Vec<Args>> {
    let mut map: BTreeMap<libc::c_long, Vec<Args>> = BTreeMap::new();
    for syscall in lists(class).into_iter().flatten() {
        let args = map.entry(syscall.nr).or_default();
        if !args.contains(&syscall.args) {
            args.push(syscall.args);
        }
    }
    // A call allowed with any arguments by one list is allowed with any.
    for args in map.values_mut() {
        if args.contains(&Args::Any) {
            *args = vec![Args::Any];
        }
    }
    map
}

/// The names a class allows, sorted (for the documentation and tests).
pub(crate) fn names(class: ThreadClass) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = lists(class).into_iter().flatten().map(Syscall::name).collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Why a filter could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// seccompiler refused the rules.
    #[error("compiling the seccomp filter of the {class} threads")]
    Compile {
        /// The class.
        class: &'static str,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
}

fn cond(index: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // seccompiler only refuses an argument index above 5.
    SeccompCondition::new(index, len, op, value).unwrap_or_else(|_| unreachable!("argument index {index} is valid"))
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    // seccompiler only refuses an empty condition list.
    SeccompRule::new(conditions).unwrap_or_else(|_| unreachable!("conditions are never empty"))
}

/// The rules that let `args` through (empty: any arguments).
fn rules(args: Args, pid: u32) -> Vec<SeccompRule> {
    use SeccompCmpArgLen::{Dword, Qword};
    use SeccompCmpOp::{Eq, MaskedEq};
    let kvm = || rule(vec![cond(1, Dword, MaskedEq(0xff00), KVM_IOCTL_TYPE << 8)]);
    let request = |r: u64| rule(vec![cond(1, Dword, Eq, r)]);
    match args {
        Args::Any => Vec::new(),
        Args::NoExec => vec![rule(vec![cond(2, Dword, MaskedEq(libc::PROT_EXEC as u64), 0)])],
        Args::KvmAnd(r) => vec![kvm(), request(r)],
        Args::ThreadOnly => {
            let thread = libc::CLONE_THREAD as u64;
            vec![rule(vec![cond(0, Qword, MaskedEq(thread), thread)])]
        }
        Args::OwnProcess => vec![rule(vec![cond(0, Dword, Eq, u64::from(pid))])],
        Args::OwnBatchPolicy => {
            vec![rule(vec![cond(0, Dword, Eq, 0), cond(1, Dword, Eq, libc::SCHED_BATCH as u64)])]
        }
        Args::NameOrNoNewPrivs => [libc::PR_SET_NAME, libc::PR_SET_NO_NEW_PRIVS]
            .iter()
            .map(|&o| rule(vec![cond(0, Dword, Eq, o as u64)]))
            .collect(),
    }
}

/// The BPF program of a class: the listed calls allowed, anything else `on_forbidden`.
pub(crate) fn compile(class: ThreadClass, on_forbidden: SeccompAction, pid: u32) -> Result<BpfProgram, FilterError> {
    let compile_error = |source| FilterError::Compile { class: class.name(), source };
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, args) in allowed(class) {
        let rules = args.into_iter().flat_map(|a| rules(a, pid)).collect();
        map.insert(nr, rules);
    }
    let filter =
        SeccompFilter::new(map, on_forbidden, SeccompAction::Allow, arch::SECCOMP_ARCH).map_err(compile_error)?;
    BpfProgram::try_from(filter).map_err(compile_error)
}

/// A filter for the spawner alone, under its own: `clone3` fails with ENOSYS, so that the C
/// library falls back to `clone`, whose flags (in a register, unlike clone3's) the spawner's
/// filter checks.
pub(crate) fn compile_no_clone3() -> Result<BpfProgram, FilterError> {
    let compile_error = |source| FilterError::Compile { class: "spawner", source };
    let map = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let filter =
        SeccompFilter::new(map, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch::SECCOMP_ARCH)
            .map_err(compile_error)?;
    BpfProgram::try_from(filter).map_err(compile_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_compiles() {
        for class in ThreadClass::ALL {
            let program = compile(class, SeccompAction::KillProcess, 1).unwrap();
            assert!(!program.is_empty(), "{}", class.name());
        }
        assert!(!compile_no_clone3().unwrap().is_empty());
    }

    #[test]
    fn no_class_may_start_programs_trace_remount_open_sockets_or_change_ids() {
        let forbidden = [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_process_vm_writev,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_setuid,
            libc::SYS_setgid,
            libc::SYS_setresuid,
            libc::SYS_setresgid,
            libc::SYS_setgroups,
            libc::SYS_bpf,
            libc::SYS_init_module,
            libc::SYS_kexec_load,
        ];
        for class in ThreadClass::ALL {
            let allowed = allowed(class);
            for nr in forbidden {
                assert!(!allowed.contains_key(&nr), "{} allows syscall {nr}", class.name());
            }
        }
    }

    #[test]
    fn only_the_spawner_starts_threads_and_it_allows_what_each_class_does() {
        let spawner = allowed(ThreadClass::Spawner);
        for class in ThreadClass::SPAWNED {
            let own = allowed(class);
            assert!(!own.contains_key(&libc::SYS_clone) && !own.contains_key(&libc::SYS_clone3), "{}", class.name());
            for nr in own.keys() {
                assert!(spawner.contains_key(nr), "the spawner forbids syscall {nr} of {}", class.name());
            }
        }
        assert_eq!(spawner[&libc::SYS_clone], vec![Args::ThreadOnly]);
    }

    #[test]
    fn kvm_ioctls_only_where_vcpus_run() {
        let ioctl = |class| allowed(class).get(&libc::SYS_ioctl).cloned();
        assert_eq!(ioctl(ThreadClass::Acceptor), None);
        assert_eq!(ioctl(ThreadClass::Main), None);
        assert_eq!(ioctl(ThreadClass::Connection), Some(vec![Args::KvmAnd(PAGEMAP_SCAN)]));
        assert_eq!(allowed(ThreadClass::Connection)[&libc::SYS_mmap], vec![Args::NoExec]);
    }
}
