//! What kind of failure an error is, and how to print one with its causes.
//!
//! Every error type of this library answers [`Classify::kind`] with one [`FailureKind`]. The
//! `mu2` binary maps kinds to exit codes in one place and the daemon maps them to HTTP
//! statuses in one place, so the same failure gives the same code and status everywhere.
//!
//! This module depends on no other module of the crate: each error type implements
//! [`Classify`] next to its definition.

use std::fmt;

/// The kinds of failure a caller can act on differently.
///
/// ```
/// use mu2_vmm::error::{error_chain, Classify, FailureKind};
/// use mu2_vmm::source::{GuestSettings, ImageSource};
///
/// let unknown = ImageSource::Builtin("no-such-guest".into());
/// let error = unknown.vm_config(&GuestSettings::default()).unwrap_err();
/// assert_eq!(error.kind(), FailureKind::BadInput);
/// assert!(error_chain(&error).starts_with("no built-in guest `no-such-guest`"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The caller's input is unusable: a setting out of range, an unreadable or invalid guest
    /// ELF or image, an unknown built-in guest.
    BadInput,
    /// The guest crashed: a CPU exception, a panic, a triple fault, an exit before answering.
    GuestCrash,
    /// The guest broke the device protocol or the request framing.
    GuestProtocol,
    /// The function ran and returned an error (its message travels with it): neither a crash
    /// nor a success.
    FunctionError,
    /// The deadline passed.
    Timeout,
    /// KVM is missing or may not be opened.
    KvmUnavailable,
    /// A limit was reached (VM budget, memory): the same request may succeed later.
    ResourceExhausted,
    /// Anything else: a failed KVM call, an I/O error of the VMM's own.
    Internal,
}

impl FailureKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FailureKind; 8] = [
        FailureKind::BadInput,
        FailureKind::GuestCrash,
        FailureKind::GuestProtocol,
        FailureKind::FunctionError,
        FailureKind::Timeout,
        FailureKind::KvmUnavailable,
        FailureKind::ResourceExhausted,
        FailureKind::Internal,
    ];

    /// A short snake-case name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::BadInput => "bad_input",
            FailureKind::GuestCrash => "guest_crash",
            FailureKind::GuestProtocol => "guest_protocol",
            FailureKind::FunctionError => "function_error",
            FailureKind::Timeout => "timeout",
            FailureKind::KvmUnavailable => "kvm_unavailable",
            FailureKind::ResourceExhausted => "resource_exhausted",
            FailureKind::Internal => "internal",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error that knows which [`FailureKind`] it is.
pub trait Classify: std::error::Error {
    /// The kind of this failure.
    fn kind(&self) -> FailureKind;
}

/// Classifies an I/O error of the VMM's own: out of memory or descriptors is a resource
/// limit, anything else is internal.
pub(crate) fn io_kind(e: &std::io::Error) -> FailureKind {
    match e.raw_os_error() {
        Some(libc::ENOMEM | libc::EMFILE | libc::ENFILE | libc::ENOSPC | libc::EAGAIN) => {
            FailureKind::ResourceExhausted
        }
        _ => FailureKind::Internal,
    }
}

/// Classifies a failed KVM call the same way as [`io_kind`].
pub(crate) fn kvm_kind(e: &kvm_ioctls::Error) -> FailureKind {
    match e.errno() {
        libc::ENOMEM | libc::EMFILE | libc::ENFILE | libc::ENOSPC | libc::EAGAIN => FailureKind::ResourceExhausted,
        _ => FailureKind::Internal,
    }
}

/// An error and its causes on one line, `outer: cause: root cause`. A cause whose text the
/// message before it already ends with is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn chain_lists_every_cause_once() {
        let e = Outer(Middle(std::io::Error::other("root")));
        assert_eq!(error_chain(&e), "outer: middle: root");
    }

    #[test]
    fn chain_skips_a_cause_already_printed() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapper: root")]
        struct Repeats(#[source] std::io::Error);
        assert_eq!(error_chain(&Repeats(std::io::Error::other("root"))), "wrapper: root");
    }

    #[test]
    fn kinds_have_distinct_names() {
        let mut names: Vec<_> = FailureKind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FailureKind::ALL.len());
    }

    #[test]
    fn out_of_memory_is_a_resource_limit() {
        assert_eq!(io_kind(&std::io::Error::from_raw_os_error(libc::ENOMEM)), FailureKind::ResourceExhausted);
        assert_eq!(io_kind(&std::io::Error::from_raw_os_error(libc::EIO)), FailureKind::Internal);
    }
}
