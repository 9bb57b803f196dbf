//! What the seccomp filters (`sandbox::filters`) need to know of aarch64: its audit
//! architecture. It has only the `*at` path calls, which the common lists allow.

/// The architecture the filters check for.
pub const SECCOMP_ARCH: seccompiler::TargetArch = seccompiler::TargetArch::aarch64;

/// None here: aarch64 has no path calls beside their `*at` forms.
pub const SECCOMP_PATH_SYSCALLS: &[(&str, libc::c_long)] = &[];
