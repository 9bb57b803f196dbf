//! Where a guest comes from: a built-in guest by name, a guest ELF on disk, or a frozen image
//! directory — turned into what the VMM needs (a [`VmConfig`] to boot, or a loaded
//! [`Image`] to fork). The CLI and the daemon both go through here.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::arch::EntryMode;
use crate::error::{Classify, FailureKind};
use crate::hypervisor::Hypervisor;
use crate::image::{self, Image, ImageError};
use crate::vm::VmConfig;
use mu2_abi::ReadyInfo;

/// The largest guest ELF accepted from a file.
pub const MAX_KERNEL_BYTES: u64 = 256 << 20;

/// A guest to boot or an image to fork.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A guest built into this binary (see [`crate::guests`]).
    Builtin(String),
    /// A guest ELF file.
    Kernel(PathBuf),
    /// A frozen image directory (`mu2 snapshot`).
    Dir(PathBuf),
}

/// How to boot a guest that is not yet an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSettings {
    /// Guest memory, MiB (a multiple of 2).
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Extra kernel command-line text.
    pub cmdline: String,
    /// How the vCPU enters the guest.
    pub entry: EntryMode,
}

impl Default for GuestSettings {
    fn default() -> Self {
        GuestSettings { mem_mib: 64, vcpus: 1, cmdline: String::new(), entry: EntryMode::Native }
    }
}

/// Why a source could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// No built-in guest has this name.
    #[error("no built-in guest `{name}` (known: {known})")]
    UnknownBuiltin {
        /// The name asked for.
        name: String,
        /// The names there are.
        known: String,
    },
    /// The guest ELF could not be read.
    #[error("reading guest image {path}")]
    ReadKernel {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest ELF is not a regular file of acceptable size.
    #[error("guest image {path} is not a regular file of at most {max} bytes")]
    UnusableKernel {
        /// The file.
        path: PathBuf,
        /// The size limit.
        max: u64,
    },
    /// The memory size does not fit.
    #[error("guest memory of {mem_mib} MiB is out of range")]
    MemorySize {
        /// The size asked for.
        mem_mib: u64,
    },
    /// An image directory was given where a guest to boot is needed.
    #[error("{0} is a frozen image, not a guest to boot")]
    NotBootable(PathBuf),
    /// Making or loading the image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl Classify for SourceError {
    fn kind(&self) -> FailureKind {
        match self {
            SourceError::UnknownBuiltin { .. }
            | SourceError::UnusableKernel { .. }
            | SourceError::MemorySize { .. }
            | SourceError::NotBootable(_) => FailureKind::BadInput,
            SourceError::ReadKernel { source, .. } => match source.raw_os_error() {
                Some(libc::ENOMEM | libc::EMFILE | libc::ENFILE) => crate::error::io_kind(source),
                _ => FailureKind::BadInput,
            },
            SourceError::Image(e) => e.kind(),
        }
    }
}

impl ImageSource {
    /// The configuration that boots this guest. Fails for an image directory.
    pub fn vm_config(&self, settings: &GuestSettings) -> Result<VmConfig, SourceError> {
        let elf: Cow<'static, [u8]> = match self {
            ImageSource::Builtin(name) => crate::guests::find(name)
                .ok_or_else(|| SourceError::UnknownBuiltin {
                    name: name.clone(),
                    known: crate::guests::names().collect::<Vec<_>>().join(", "),
                })?
                .into(),
            ImageSource::Kernel(path) => read_kernel(path)?.into(),
            ImageSource::Dir(dir) => return Err(SourceError::NotBootable(dir.clone())),
        };
        let mem_size = settings
            .mem_mib
            .checked_mul(1 << 20)
            .filter(|_| settings.mem_mib > 0)
            .ok_or(SourceError::MemorySize { mem_mib: settings.mem_mib })?;
        let mut config = VmConfig::new(elf);
        config.mem_size = mem_size;
        config.vcpus = settings.vcpus;
        config.cmdline = settings.cmdline.trim().to_string();
        config.entry = settings.entry;
        Ok(config)
    }

    /// A loaded image of this source: an image directory is loaded as it is; a guest is
    /// booted, frozen into `dir` once ready and loaded from there. Returns the image and, for
    /// a guest frozen now, what it reported when it became ready.
    pub fn prepare(
        &self,
        hv: &Hypervisor,
        settings: &GuestSettings,
        dir: &Path,
        deadline: Option<Instant>,
    ) -> Result<(Image, Option<ReadyInfo>), SourceError> {
        let ready = match self {
            ImageSource::Dir(existing) => return Ok((Image::load(hv, existing)?, None)),
            _ => image::create(hv, &self.vm_config(settings)?, dir, deadline)?,
        };
        Ok((Image::load(hv, dir)?, Some(ready)))
    }
}

/// Reads a guest ELF: a regular file (not a FIFO or device, which could block or never end)
/// of at most [`MAX_KERNEL_BYTES`].
fn read_kernel(path: &Path) -> Result<Vec<u8>, SourceError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read_error = |source| SourceError::ReadKernel { path: path.to_path_buf(), source };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() || meta.len() > MAX_KERNEL_BYTES {
        return Err(SourceError::UnusableKernel { path: path.to_path_buf(), max: MAX_KERNEL_BYTES });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_KERNEL_BYTES + 1).read_to_end(&mut bytes).map_err(read_error)?;
    if bytes.len() as u64 > MAX_KERNEL_BYTES {
        return Err(SourceError::UnusableKernel { path: path.to_path_buf(), max: MAX_KERNEL_BYTES });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_builtin_is_bad_input() {
        let e = ImageSource::Builtin("no-such-guest".into()).vm_config(&GuestSettings::default()).unwrap_err();
        assert_eq!(e.kind(), FailureKind::BadInput);
        assert!(e.to_string().contains("echo"), "{e}");
    }

    #[test]
    fn builtin_resolves_with_settings() {
        let settings = GuestSettings { mem_mib: 128, vcpus: 2, cmdline: " quiet ".into(), ..Default::default() };
        let config = ImageSource::Builtin("echo".into()).vm_config(&settings).unwrap();
        assert_eq!(config.mem_size, 128 << 20);
        assert_eq!(config.vcpus, 2);
        assert_eq!(config.cmdline, "quiet");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("mu2-source-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        crate::sys::mkfifo(&fifo).unwrap();
        let e = ImageSource::Kernel(fifo).vm_config(&GuestSettings::default()).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(e, SourceError::UnusableKernel { .. }), "{e}");
    }

    #[test]
    fn a_missing_kernel_is_bad_input() {
        let e = ImageSource::Kernel("/nonexistent/guest.elf".into()).vm_config(&GuestSettings::default()).unwrap_err();
        assert_eq!(e.kind(), FailureKind::BadInput);
    }

    #[test]
    fn an_image_directory_does_not_boot() {
        let e = ImageSource::Dir("/tmp".into()).vm_config(&GuestSettings::default()).unwrap_err();
        assert!(matches!(e, SourceError::NotBootable(_)));
    }
}
