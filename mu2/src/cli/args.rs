//! What several commands take: the guest to boot and how, durations, request data.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use mu2_vmm::source::{GuestSettings, ImageSource, SourceError};
use mu2_vmm::EntryMode;
use mu2_vmm::VmConfig;

use crate::failure::{CliError, Failure};

#[derive(Args, Debug)]
pub struct GuestArgs {
    /// A guest ELF image to boot.
    #[arg(long, value_name = "ELF", conflicts_with = "function")]
    pub kernel: Option<PathBuf>,
    /// A built-in guest by name (see `mu2 guests`).
    #[arg(long, value_name = "NAME", default_value = "echo")]
    pub function: String,
    /// Guest memory in MiB (a multiple of 2).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u8,
    /// Extra kernel command-line text for the guest.
    #[arg(long, value_name = "S", default_value = "")]
    pub cmdline: String,
    /// How the vCPU enters the guest.
    #[arg(long, value_enum, default_value_t = Entry::Native)]
    pub entry: Entry,
    /// Where the guest console goes: a file path, or `-` for this process's standard output.
    #[arg(long, value_name = "PATH")]
    pub console: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Entry {
    /// mu2's own: the VMM sets up long mode and starts the guest at CPL 3.
    Native,
    /// The Linux x86_64 64-bit boot protocol: CPL 0, boot_params in RSI.
    Linux,
}

impl GuestArgs {
    /// The guest to boot: `--kernel`, or else the built-in `--function`.
    pub fn source(&self) -> ImageSource {
        match &self.kernel {
            Some(path) => ImageSource::Kernel(path.clone()),
            None => ImageSource::Builtin(self.function.clone()),
        }
    }

    /// How to boot it; `extra_cmdline` goes before the user's `--cmdline`.
    pub fn settings(&self, extra_cmdline: &str) -> GuestSettings {
        GuestSettings {
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            cmdline: format!("{extra_cmdline} {}", self.cmdline),
            entry: match self.entry {
                Entry::Native => EntryMode::Native,
                Entry::Linux => EntryMode::Linux,
            },
        }
    }

    pub fn vm_config(&self, extra_cmdline: &str) -> Result<VmConfig, SourceError> {
        self.source().vm_config(&self.settings(extra_cmdline))
    }

    /// Where the console goes: `--console`, or else stdout or stderr as the command prefers.
    pub fn console(&self, default_stdout: bool) -> Result<Box<dyn Write + Send>, Failure> {
        match &self.console {
            Some(p) if p.as_os_str() == "-" => Ok(Box::new(std::io::stdout())),
            Some(p) => {
                let file = std::fs::File::create(p).map_err(|source| CliError::CreateFile {
                    what: "console log",
                    path: p.clone(),
                    source,
                })?;
                Ok(Box::new(file))
            }
            None if default_stdout => Ok(Box::new(std::io::stdout())),
            None => Ok(Box::new(std::io::stderr())),
        }
    }
}

/// Parses `500ms`, `10s`, `2m`, …; a bare number is seconds (the library's syntax, shared with
/// the control API).
pub use mu2_vmm::duration::parse as parse_duration;

/// The bytes of a `--data` argument: the string itself, or with `@FILE` the file's bytes.
pub fn request_bytes(data: &str) -> Result<Vec<u8>, Failure> {
    match data.strip_prefix('@') {
        Some(path) => {
            Ok(std::fs::read(path).map_err(|source| CliError::ReadRequest { path: path.to_string(), source })?)
        }
        None => Ok(data.as_bytes().to_vec()),
    }
}
