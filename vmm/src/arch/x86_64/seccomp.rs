//! What the seccomp filters (`sandbox::filters`) need to know of x86_64: its audit
//! architecture, and the path calls the C library makes here that newer architectures only
//! have as `*at` calls (`unlink` for `unlinkat`, …).

/// The architecture the filters check for.
pub const SECCOMP_ARCH: seccompiler::TargetArch = seccompiler::TargetArch::x86_64;

/// Path calls x86_64 keeps beside their `*at` forms; the C library uses them for `unlink(3)`,
/// `rename(3)`, `mkdir(3)`, `rmdir(3)`, `readlink(3)` and `poll(2)`; allowed with any arguments where a class does path calls.
pub const SECCOMP_PATH_SYSCALLS: &[(&str, libc::c_long)] = &[
    ("SYS_mkdir", libc::SYS_mkdir),
    ("SYS_poll", libc::SYS_poll),
    ("SYS_readlink", libc::SYS_readlink),
    ("SYS_rename", libc::SYS_rename),
    ("SYS_rmdir", libc::SYS_rmdir),
    ("SYS_unlink", libc::SYS_unlink),
];
