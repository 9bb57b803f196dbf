//! Small safe wrappers over the few libc calls the VMM makes outside memory mapping (`memory`)
//! and deadline signals (`kick`), so `unsafe` stays in one reviewed place.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
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
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor just created for this call and owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
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

/// Waits until `fd` is readable (for a listening socket: a connection is waiting) or `timeout`
/// passes. Returns whether it is readable.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> std::io::Result<bool> {
    let mut pollfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pollfd` is one valid, initialised element that outlives the call, matching the
    // count of 1; `fd` is borrowed, so it stays open during the call. The result is checked.
    let n = unsafe { libc::poll(&mut pollfd, 1, millis) };
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
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
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
