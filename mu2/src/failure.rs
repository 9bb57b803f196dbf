//! How a command fails: every failure is an error that knows its [`FailureKind`], and the
//! kind alone picks the exit code, so the same failure exits the same way from every command.

use std::path::PathBuf;

use mu2_vmm::error::{Classify, FailureKind};

/// The exit code of a failure of this kind. `after_help` (cli/mod.rs) and README.md list them.
pub fn exit_code(kind: FailureKind) -> u8 {
    match kind {
        FailureKind::Internal => 1,
        FailureKind::BadInput => 2,
        FailureKind::GuestCrash => 3,
        FailureKind::Timeout => 4,
        FailureKind::KvmUnavailable => 5,
        FailureKind::GuestProtocol => 6,
        FailureKind::ResourceExhausted => 7,
    }
}

/// A command's failure: the error, and the kind of failure it is. Made only from an error
/// that classifies itself, so no command picks a kind, or a code, of its own.
#[derive(Debug)]
pub struct Failure {
    pub kind: FailureKind,
    pub error: anyhow::Error,
}

impl<E: Classify + Send + Sync + 'static> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure { kind: error.kind(), error: error.into() }
    }
}

/// The failures of the command itself, as opposed to the library's.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The request file named by `--data @FILE` could not be read.
    #[error("reading request file {path}")]
    ReadRequest {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A file the user named could not be created.
    #[error("creating {what} {}", path.display())]
    CreateFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file the user named could not be written.
    #[error("writing {}", path.display())]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The latency plot could not be drawn.
    #[error("drawing {}: {message}", path.display())]
    Plot { path: PathBuf, message: String },
    /// An argument is out of range.
    #[error("{0}")]
    Argument(&'static str),
    /// Standard output could not be written.
    #[error("writing the response")]
    WriteResponse(#[source] std::io::Error),
    /// A scratch directory could not be made.
    #[error("creating {}", path.display())]
    ScratchDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The guest ran to its end but reported failure.
    #[error("guest exited with code {0}")]
    GuestExited(u32),
}

impl Classify for CliError {
    fn kind(&self) -> FailureKind {
        match self {
            CliError::ReadRequest { .. }
            | CliError::CreateFile { .. }
            | CliError::WriteFile { .. }
            | CliError::Argument(_) => FailureKind::BadInput,
            CliError::Plot { .. } | CliError::WriteResponse(_) | CliError::ScratchDir { .. } => FailureKind::Internal,
            CliError::GuestExited(_) => FailureKind::GuestCrash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_nonzero_code() {
        let mut codes: Vec<u8> = FailureKind::ALL.iter().map(|&k| exit_code(k)).collect();
        assert!(!codes.contains(&0));
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), FailureKind::ALL.len());
    }

    #[test]
    fn a_library_error_keeps_its_kind() {
        let failure = Failure::from(mu2_vmm::GuestError::Timeout);
        assert_eq!(failure.kind, FailureKind::Timeout);
        assert_eq!(exit_code(failure.kind), 4);
    }
}
