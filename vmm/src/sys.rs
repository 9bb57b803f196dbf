//! Small safe wrappers over the few libc calls the VMM makes outside memory mapping (`memory`)
//! and deadline signals (`kick`), so `unsafe` stays in one reviewed place.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// Fills `buf` from the kernel's random source (getrandom, blocking until it is seeded).
pub(crate) fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, which is valid for
        // writes of that length; the result is checked.
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

/// A new anonymous in-memory file (memfd), closed on exec.
pub(crate) fn memfd(name: &CStr) -> std::io::Result<File> {
    memfd_with(name, libc::MFD_CLOEXEC)
}

/// A new memfd that can be sealed (see [`seal_contents`]), closed on exec.
pub(crate) fn sealable_memfd(name: &CStr) -> std::io::Result<File> {
    memfd_with(name, libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
}

fn memfd_with(name: &CStr, flags: libc::c_uint) -> std::io::Result<File> {
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor just created for this call and owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Seals a memfd made by [`sealable_memfd`] so that its size and contents never change again
/// (F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE, and F_SEAL_SEAL so the seals stay). Private
/// (copy-on-write) mappings of it stay writable; shared writable ones are refused.
pub(crate) fn seal_contents(file: &File) -> std::io::Result<()> {
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS takes an integer argument and touches no memory; the result is checked.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The seals on a file (F_GET_SEALS); for tests of [`seal_contents`].
#[cfg(test)]
pub(crate) fn seals(file: &File) -> std::io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS takes no argument and touches no memory; the result is checked.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(seals)
}

/// The next data extent of `file` at or after `offset`: `(start, end)`, or `None` past the last
/// one (SEEK_DATA, then SEEK_HOLE). A file system without hole support reports the whole file
/// as data.
pub(crate) fn next_data_extent(file: &File, offset: u64) -> std::io::Result<Option<(u64, u64)>> {
    let seek = |offset: u64, whence| -> std::io::Result<Option<u64>> {
        let offset = libc::off_t::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        // SAFETY: lseek only moves the file offset of a descriptor `file` owns; the result is
        // checked. Callers read with pread, so the moved offset disturbs nothing.
        let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        match at {
            -1 if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => Ok(None),
            -1 => Err(std::io::Error::last_os_error()),
            at => Ok(Some(at as u64)),
        }
    };
    let Some(start) = seek(offset, libc::SEEK_DATA)? else { return Ok(None) };
    let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(start);
    Ok(Some((start, end)))
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput.into())
}

/// A name inside a [`Dir`]: one path component, neither `.` nor `..`.
fn c_name(name: &str) -> std::io::Result<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput.into())
}

/// Makes a new directory `prefix` + six random characters in `parent`, mode 0700 (mkdtemp):
/// its name cannot be guessed, so nobody can have made it, or anything in it, beforehand.
pub(crate) fn make_temp_dir(parent: &Path, prefix: &str) -> std::io::Result<PathBuf> {
    let mut template = c_path(&parent.join(format!("{prefix}XXXXXX")))?.into_bytes_with_nul();
    // SAFETY: `template` is a writable NUL-terminated buffer ending in XXXXXX that outlives the
    // call; mkdtemp replaces the Xs in place. The result is checked.
    let made = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
    if made.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    template.pop();
    Ok(PathBuf::from(std::ffi::OsString::from_vec(template)))
}

/// A directory held open: what is made in it is made relative to its descriptor (mkdirat),
/// and it is opened without following a symbolic link, so a link planted where a name is
/// expected is an error, never a way to make the daemon write elsewhere.
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// Opens the directory `path`, refusing a symbolic link in its last component.
    pub(crate) fn open(path: &Path) -> std::io::Result<Dir> {
        let path = c_path(path)?;
        // SAFETY: `path` is NUL-terminated and outlives the call; the result is checked.
        let fd = unsafe {
            libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        };
        Self::owned(fd).map(|fd| Dir { fd })
    }

    fn owned(fd: libc::c_int) -> std::io::Result<OwnedFd> {
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel for this call and is owned by nothing else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Makes the directory `name` in this one, mode `mode`; fails if anything has that name.
    pub(crate) fn make_dir(&self, name: &str, mode: libc::mode_t) -> std::io::Result<()> {
        let name = c_name(name)?;
        // SAFETY: as in `openat`.
        if unsafe { libc::mkdirat(self.fd.as_raw_fd(), name.as_ptr(), mode) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Changes the owner of this directory (fchown).
    pub(crate) fn chown(&self, uid: libc::uid_t, gid: libc::gid_t) -> std::io::Result<()> {
        // SAFETY: fchown on a descriptor this value owns; the result is checked.
        if unsafe { libc::fchown(self.fd.as_raw_fd(), uid, gid) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The directory's metadata (fstat).
    pub(crate) fn metadata(&self) -> std::io::Result<std::fs::Metadata> {
        let file = File::from(self.fd.try_clone()?);
        file.metadata()
    }
}

/// Runs `f` with the process's file-creation mask set to `mask`, then puts the old mask back.
/// The mask is process-wide: call it only while no other thread creates files.
pub(crate) fn with_umask<T>(mask: libc::mode_t, f: impl FnOnce() -> T) -> T {
    // SAFETY: umask only changes this process's file-creation mask and cannot fail.
    let old = unsafe { libc::umask(mask) };
    let result = f();
    // SAFETY: as above; restores the mask read before.
    unsafe { libc::umask(old) };
    result
}

/// This process's effective user id.
pub(crate) fn effective_uid() -> libc::uid_t {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Threads of this process (`Threads:` in /proc/self/status).
pub(crate) fn thread_count() -> std::io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| std::io::ErrorKind::InvalidData.into())
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Gives up root for good: no supplementary groups, then `gid` and `uid` as real, effective
/// and saved ids (which also clears every capability), and checks that root cannot be had
/// back. Call it while the process has one thread.
pub(crate) fn become_user(uid: libc::uid_t, gid: libc::gid_t) -> std::io::Result<()> {
    // SAFETY: setgroups with a count of 0 reads no memory; the result is checked.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: plain integer arguments; the results are checked.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: as above.
    check(unsafe { libc::setresuid(uid, uid, uid) })?;
    // SAFETY: as above; a call that must fail now.
    if uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err(std::io::Error::other("root could be regained after dropping it"));
    }
    Ok(())
}

/// Has the kernel kill this process when `parent`, the process that forked it, ends; fails if
/// it has ended already. (A change of user clears the setting: call it after [`become_user`].)
pub(crate) fn die_with_parent(parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory; result checked.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) })?;
    // SAFETY: getppid has no preconditions and cannot fail.
    if unsafe { libc::getppid() } != parent {
        return Err(std::io::Error::other("the supervisor has ended"));
    }
    Ok(())
}

/// Gives this process its own mount namespace (unshare CLONE_NEWNS).
pub(crate) fn unshare_mounts() -> std::io::Result<()> {
    // SAFETY: unshare takes a flag word and touches no memory; the result is checked.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) })
}

/// The mounts the sandbox makes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum MountKind {
    /// Every mount under the target becomes private (no propagation to or from the host).
    PrivateTree,
    /// A small tmpfs (the new root), mode 0755.
    Tmpfs,
    /// A bind mount of a directory, without devices, set-uid programs or execution, and
    /// read-only unless `writable`.
    Bind {
        /// Whether it stays writable.
        writable: bool,
    },
    /// A recursive bind mount of /proc.
    ProcTree,
    /// The root, remounted read-only.
    ReadOnlyRoot,
}

/// Mounts `source` on `target` the way `kind` says.
pub(crate) fn mount(kind: MountKind, source: &Path, target: &Path) -> std::io::Result<()> {
    let (source, target) = (c_path(source)?, c_path(target)?);
    let hardened = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let call = |source: *const libc::c_char, fstype: &CStr, flags: libc::c_ulong, data: &CStr| {
        // SAFETY: every pointer is a NUL-terminated string (or null, where mount(2) allows it)
        // that outlives the call; the result is checked.
        check(unsafe { libc::mount(source, target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) })
    };
    let none = std::ptr::null();
    match kind {
        MountKind::PrivateTree => call(none, c"", libc::MS_REC | libc::MS_PRIVATE, c""),
        MountKind::Tmpfs => call(source.as_ptr(), c"tmpfs", hardened, c"mode=0755,size=1m,nr_inodes=256"),
        MountKind::Bind { writable } => {
            call(source.as_ptr(), c"", libc::MS_BIND, c"")?;
            let read_only = if writable { 0 } else { libc::MS_RDONLY };
            call(none, c"", libc::MS_REMOUNT | libc::MS_BIND | hardened | read_only, c"")
        }
        MountKind::ProcTree => call(source.as_ptr(), c"", libc::MS_BIND | libc::MS_REC, c""),
        MountKind::ReadOnlyRoot => call(none, c"", libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | hardened, c""),
    }
}

/// Makes `root` this process's root directory (pivot_root, the old root stacked under the new
/// one and then detached) and moves into it.
pub(crate) fn pivot_into(root: &Path) -> std::io::Result<()> {
    std::env::set_current_dir(root)?;
    // SAFETY: "." is a NUL-terminated string; pivot_root with the same directory twice puts
    // the old root on top of the new one, which the detach below removes. Results checked.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) } as libc::c_int)?;
    // SAFETY: as above.
    check(unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) })?;
    std::env::set_current_dir("/")
}

/// The user `name`'s id and primary group, if it exists (getpwnam_r).
pub(crate) fn lookup_user(name: &str) -> std::io::Result<Option<(libc::uid_t, libc::gid_t)>> {
    let name = CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: passwd is plain data; zero is a valid starting value.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: `buf` for its length; getpwnam_r writes the
    // entry's strings into `buf` and `found` points at `entry` or is null. Result checked.
    let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut entry, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok((!found.is_null()).then_some((entry.pw_uid, entry.pw_gid)))
}

/// The group `name`'s id, if it exists (getgrnam_r).
pub(crate) fn lookup_group(name: &str) -> std::io::Result<Option<libc::gid_t>> {
    let name = CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: group is plain data; zero is a valid starting value.
    let mut entry: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in `lookup_user`.
    let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut entry, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok((!found.is_null()).then_some(entry.gr_gid))
}

/// Forks this process (which must have a single thread): `Ok(None)` in the child,
/// `Ok(Some(pid))` in the parent.
pub(crate) fn fork_process() -> std::io::Result<Option<libc::pid_t>> {
    // SAFETY: the caller guarantees a single thread, so the child's memory (locks included)
    // is in a consistent state; the result is checked.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Some(pid)),
    }
}

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChildEnd {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Killed(i32),
}

/// Waits for the child `pid` to end.
pub(crate) fn wait_child(pid: libc::pid_t) -> std::io::Result<ChildEnd> {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid place for waitpid to write; the result is checked.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == -1 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if libc::WIFEXITED(status) {
            return Ok(ChildEnd::Exited(libc::WEXITSTATUS(status)));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(ChildEnd::Killed(libc::WTERMSIG(status)));
        }
    }
}

/// Sends `signal` to the process `pid`.
pub(crate) fn send_signal(pid: libc::pid_t, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: kill takes plain integers; the result is checked.
    check(unsafe { libc::kill(pid, signal) })
}

/// Makes a system call that no seccomp filter of the daemon allows (execve of /bin/true), for
/// the test that each thread class dies of one. Without a filter it replaces the process.
#[cfg(feature = "test-hooks")]
pub(crate) fn forbidden_execve() {
    let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: the path, argv and envp are NUL-terminated and null-terminated arrays that
    // outlive the call; if it returns, it failed, which the test then sees.
    unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
}

/// Waits until `fd` is readable (for a listening socket: a connection is waiting) or `timeout`
/// passes. Returns whether it is readable.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> std::io::Result<bool> {
    let mut pollfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // ppoll, not poll: the one call every architecture has (the seccomp filters allow it).
    let wait = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: `pollfd` is one valid, initialised element that outlives the call, matching the
    // count of 1; `wait` is a valid timespec and the signal mask pointer may be null; `fd` is
    // borrowed, so it stays open during the call. The result is checked.
    let n = unsafe { libc::ppoll(&mut pollfd, 1, &wait, std::ptr::null()) };
    match n {
        n if n < 0 => {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            Err(e)
        }
        0 => Ok(false),
        // POLLERR/POLLHUP count as readable: the accept that follows reports the error.
        _ => Ok(true),
    }
}

/// Raises this process's soft limit of open descriptors towards `wanted`, as far as its hard
/// limit allows; returns the soft limit in force.
pub(crate) fn raise_descriptor_limit(wanted: u64) -> std::io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into `limit`, which is valid for writes; checked.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    let target = wanted.min(limit.rlim_max);
    if target > limit.rlim_cur {
        limit.rlim_cur = target;
        // SAFETY: setrlimit reads the rlimit it is given; raising the soft limit up to the
        // hard one needs no privilege. Checked.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) })?;
    }
    Ok(limit.rlim_cur)
}

/// Has every thread allocate from glibc's main arena (`M_ARENA_MAX` 1), which grows and
/// shrinks with brk and never opens a file to decide how; elsewhere a no-op.
pub(crate) fn single_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt changes an allocator parameter; with one thread (the caller's) no
    // allocation is in progress elsewhere. A refusal (0) only leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// This machine's physical memory, bytes.
pub(crate) fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf takes a name and touches no memory.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    u64::try_from(pages).ok()?.checked_mul(u64::try_from(page).ok()?)
}

/// Clears `O_NONBLOCK` on `fd` (with fcntl).
pub(crate) fn set_blocking(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: F_GETFL and F_SETFL read and set the flags of a descriptor the caller keeps open
    // (it is borrowed); they touch no memory. The results are checked.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What an inherited descriptor is, as far as a socket-activated daemon cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketInfo {
    /// `AF_INET`, `AF_INET6`, `AF_UNIX`, …
    pub family: libc::c_int,
    /// A `SOCK_STREAM` socket.
    pub stream: bool,
    /// `listen` was called on it.
    pub listening: bool,
}

/// Looks at the descriptor number `fd` without taking it: `Ok(None)` if it is open but not a
/// socket, an error if it is not open.
pub(crate) fn socket_info(fd: RawFd) -> std::io::Result<Option<SocketInfo>> {
    // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one `stat` into `st`, which is valid for writes; any descriptor
    // number is acceptable (a closed one fails with EBADF). The result is checked.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Ok(None);
    }
    let int_option = |name| -> std::io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are valid for writes and `len` says the size of `value`;
        // the kernel writes at most that many bytes. The result is checked.
        let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, name, (&raw mut value).cast(), &mut len) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(value)
    };
    Ok(Some(SocketInfo {
        family: int_option(libc::SO_DOMAIN)?,
        stream: int_option(libc::SO_TYPE)? == libc::SOCK_STREAM,
        listening: int_option(libc::SO_ACCEPTCONN)? != 0,
    }))
}

/// The inherited descriptors already claimed, so that none is wrapped twice.
static CLAIMED: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Takes ownership of a descriptor this process inherited at exec (socket activation passes
/// listeners from fd 3 on), marking it close-on-exec. Only descriptors from 3 on are taken,
/// each at most once; the caller must claim them before the process opens any descriptor of
/// its own, as systemd's `sd_listen_fds` contract requires.
pub(crate) fn claim_inherited_fd(fd: RawFd) -> std::io::Result<OwnedFd> {
    let mut claimed = CLAIMED.lock().unwrap_or_else(|p| p.into_inner());
    if fd < 3 || claimed.contains(&fd) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not an inherited one that is still unclaimed"),
        ));
    }
    // SAFETY: F_SETFD with FD_CLOEXEC only changes the descriptor's flags; a closed
    // descriptor fails with EBADF, which is checked.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    claimed.push(fd);
    // SAFETY: `fd` is open (F_SETFD succeeded). It was inherited at exec rather than opened by
    // this process, which the caller guarantees by claiming before opening descriptors of its
    // own, so no other object owns it; `CLAIMED` ensures this is its only `OwnedFd`.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes a FIFO at `path`, mode 0600 (for tests of what refuses one).
#[cfg(test)]
pub(crate) fn mkfifo(path: &std::path::Path) -> std::io::Result<()> {
    let path = c_path(path)?;
    // SAFETY: `path` is NUL-terminated and outlives the call; the result is checked.
    if unsafe { libc::mkfifo(path.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An unnamed file (O_TMPFILE) in `dir`, read-write, gone when closed: scratch data on the same
/// file system as the directory's other files.
pub(crate) fn unnamed_file_in(dir: &std::path::Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(libc::O_TMPFILE).open(dir)
}

/// Marks the calling thread as background work (SCHED_BATCH): the scheduler then never lets
/// its wake-up preempt a running thread, so a builder, resetter or reaper woken by a request's
/// end waits for a free core instead of taking the one whose caller is about to answer.
pub(crate) fn background_thread() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler with pid 0 changes only the calling thread's policy; `param`
    // is a valid sched_param that outlives the call. A failure leaves the policy as it was.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc != 0 {
        log::debug!("SCHED_BATCH for a background thread: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_fill_the_buffer() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        fill_random(&mut a).unwrap();
        fill_random(&mut b).unwrap();
        assert_ne!(a, b);
        fill_random(&mut []).unwrap();
    }

    #[test]
    fn a_sealed_memfd_keeps_its_size_and_contents() {
        use std::os::unix::fs::FileExt;
        let file = sealable_memfd(c"mu2-test").unwrap();
        file.set_len(8192).unwrap();
        file.write_all_at(b"frozen", 4096).unwrap();
        seal_contents(&file).unwrap();
        assert_ne!(seals(&file).unwrap() & libc::F_SEAL_WRITE, 0);
        assert!(file.set_len(4096).is_err(), "shrinking is refused");
        assert!(file.set_len(16384).is_err(), "growing is refused");
        assert!(file.write_all_at(b"thawed", 4096).is_err(), "writing is refused");
        let mut back = [0u8; 6];
        file.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(&back, b"frozen");
    }

    #[test]
    fn extents_skip_holes() {
        use std::os::unix::fs::FileExt;
        let file = memfd(c"mu2-test").unwrap();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[1; 4096], 64 << 10).unwrap();
        let (start, end) = next_data_extent(&file, 0).unwrap().expect("one extent");
        assert!(start <= 64 << 10 && end >= 68 << 10 && end - start < 1 << 20, "{start}..{end}");
        assert_eq!(next_data_extent(&file, end).unwrap(), None, "nothing but a hole after it");
    }

    #[test]
    fn a_dir_refuses_symbolic_links_and_makes_private_directories() {
        use std::os::unix::fs::PermissionsExt;
        let parent = make_temp_dir(&std::env::temp_dir(), "mu2-sys-test-").unwrap();
        assert_eq!(std::fs::metadata(&parent).unwrap().permissions().mode() & 0o777, 0o700);
        let dir = Dir::open(&parent).unwrap();
        std::os::unix::fs::symlink("/etc", parent.join("link")).unwrap();
        assert!(Dir::open(&parent.join("link")).is_err(), "a link is not opened as a directory");
        assert!(dir.make_dir("link", 0o700).is_err(), "a name in use is not made again");
        assert!(dir.make_dir("..", 0o700).is_err() && dir.make_dir("a/b", 0o700).is_err());
        dir.make_dir("sub", 0o700).unwrap();
        assert_eq!(std::fs::metadata(parent.join("sub")).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn a_memfd_is_a_sizable_file() {
        let file = memfd(c"mu2-test").unwrap();
        file.set_len(8192).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 8192);
    }

    #[test]
    fn socket_info_tells_listeners_from_other_descriptors() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let info = socket_info(tcp.as_raw_fd()).unwrap().expect("a socket");
        assert_eq!(info, SocketInfo { family: libc::AF_INET, stream: true, listening: true });
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let info = socket_info(udp.as_raw_fd()).unwrap().expect("a socket");
        assert!(!info.stream && !info.listening);
        let file = memfd(c"mu2-test").unwrap();
        assert_eq!(socket_info(file.as_raw_fd()).unwrap(), None);
        assert!(socket_info(-1).is_err());
    }

    #[test]
    fn a_listener_is_readable_once_a_client_connects() {
        use std::os::fd::AsFd;
        use std::os::unix::net::{UnixListener, UnixStream};
        // A Unix socket: the aarch64 test VM has no network, not even loopback.
        let dir = std::env::temp_dir().join(format!("mu2-sys-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("listener");
        let listener = UnixListener::bind(&path).unwrap();
        assert!(!wait_readable(listener.as_fd(), Duration::from_millis(10)).unwrap());
        let _client = UnixStream::connect(&path).unwrap();
        let readable = wait_readable(listener.as_fd(), Duration::from_secs(5)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(readable);
    }

    #[test]
    fn only_inherited_descriptors_are_claimed() {
        assert!(claim_inherited_fd(0).is_err(), "stdin is not a passed listener");
        assert!(claim_inherited_fd(2).is_err());
    }
}
