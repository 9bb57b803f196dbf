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
        FailureKind::FunctionError => 8,
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

impl Failure {
    /// The exit code of a failure a child process already reported (the sandboxed daemon,
    /// whose code came from [`exit_code`] there): passed through as it is, printed once.
    pub fn reported_code(&self) -> Option<u8> {
        match self.error.downcast_ref() {
            Some(CliError::Reported(code)) => Some(*code),
            _ => None,
        }
    }

    /// Whether this is standard output's reader having gone (EPIPE): not a failure of the
    /// command, which ends quietly with success (see `out`).
    pub fn is_reader_gone(&self) -> bool {
        matches!(self.error.downcast_ref(), Some(CliError::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe)
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
    /// The directory a file is to be written in does not exist.
    #[error("{what} {}: its directory {} does not exist", path.display(), dir.display())]
    NoParent { what: &'static str, path: PathBuf, dir: PathBuf },
    /// An argument is out of range.
    #[error("{0}")]
    Argument(&'static str),
    /// Standard output could not be written.
    #[error("writing to standard output")]
    Stdout(#[source] std::io::Error),
    /// A scratch directory could not be made.
    #[error("creating {}", path.display())]
    ScratchDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The signal handling could not be set up.
    #[error("setting up signal handling")]
    Signals(#[source] std::io::Error),
    /// The guest ran to its end but reported failure.
    #[error("guest exited with code {0}")]
    GuestExited(u32),
    /// A child process (the sandboxed daemon) failed and said why itself.
    #[error("exited with code {0}")]
    Reported(u8),
    /// The command's own I/O failed (not a file the user named).
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Refuses to write `path` in a directory that does not exist, before any work is done (a
/// typo in a directory name would otherwise be created, or found only at the end of a run).
pub fn parent_exists(what: &'static str, path: &std::path::Path) -> Result<(), CliError> {
    match path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => {
            Err(CliError::NoParent { what, path: path.to_path_buf(), dir: dir.to_path_buf() })
        }
        _ => Ok(()),
    }
}

impl Classify for CliError {
    fn kind(&self) -> FailureKind {
        match self {
            CliError::ReadRequest { .. }
            | CliError::CreateFile { .. }
            | CliError::WriteFile { .. }
            | CliError::NoParent { .. }
            | CliError::Argument(_) => FailureKind::BadInput,
            CliError::Stdout(_) | CliError::Signals(_) | CliError::ScratchDir { .. } | CliError::Io { .. } => {
                FailureKind::Internal
            }
            CliError::GuestExited(_) => FailureKind::GuestCrash,
            CliError::Reported(_) => FailureKind::Internal,
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
    fn only_a_closed_stdout_pipe_is_the_reader_gone() {
        let gone = Failure::from(CliError::Stdout(std::io::ErrorKind::BrokenPipe.into()));
        assert!(gone.is_reader_gone());
        let full = Failure::from(CliError::Stdout(std::io::ErrorKind::StorageFull.into()));
        assert!(!full.is_reader_gone());
    }

    #[test]
    fn a_library_error_keeps_its_kind() {
        let failure = Failure::from(mu2_vmm::GuestError::Timeout);
        assert_eq!(failure.kind, FailureKind::Timeout);
        assert_eq!(exit_code(failure.kind), 4);
    }
}
