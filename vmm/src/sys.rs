//! Small safe wrappers over the few libc calls the VMM makes outside memory mapping (`memory`)
//! and deadline signals (`kick`), so `unsafe` stays in one reviewed place.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

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
}
