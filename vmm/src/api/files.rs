//! The daemon's files: the directory its images go in, and the small files it keeps there.
//!
//! The rules: a directory the daemon makes has a name nobody can guess (mkdtemp) and mode
//! 0700; a directory it is given must be its own and writable by nobody else; every image
//! directory in it is made anew (mkdirat, which fails on anything already there, a planted
//! symbolic link included), and every file the daemon opens there is opened relative to a
//! directory descriptor without following symbolic links, mode 0600. A link planted where the
//! daemon expects a name is an error, never a way to make it write elsewhere.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sys::Dir;

/// The prefix of the images directory the daemon makes in the temporary directory.
pub const PRIVATE_DIR_PREFIX: &str = "mu2-serve-";
/// How many names an image directory is tried under before giving up.
const NAME_ATTEMPTS: u64 = 64;

/// Why the images directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A directory could not be made, opened or inspected.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The given directory is not one the daemon may trust.
    #[error("images directory {path}: {reason}")]
    Untrusted {
        /// The directory.
        path: PathBuf,
        /// Why not.
        reason: &'static str,
    },
}

impl crate::error::Classify for FilesError {
    fn kind(&self) -> crate::error::FailureKind {
        match self {
            FilesError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::EACCES | libc::EEXIST) => {
                    crate::error::FailureKind::BadInput
                }
                _ => crate::error::io_kind(source),
            },
            FilesError::Untrusted { .. } => crate::error::FailureKind::BadInput,
        }
    }
}

/// The directory the daemon's images go in, held open.
#[derive(Debug)]
pub(super) struct ImagesDir {
    path: PathBuf,
    dir: Dir,
    /// The daemon made it: it removes it at shutdown.
    owned: bool,
    next: AtomicU64,
}

impl ImagesDir {
    /// `given`, made if missing (mode 0700), or else a new private directory in the
    /// temporary directory.
    pub(super) fn prepare(given: Option<&Path>) -> Result<ImagesDir, FilesError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| FilesError::Io { what, path, source }
        };
        let (path, owned) = match given {
            None => {
                let tmp = std::env::temp_dir();
                (
                    crate::sys::make_temp_dir(&tmp, PRIVATE_DIR_PREFIX).map_err(io("creating a directory in", &tmp))?,
                    true,
                )
            }
            Some(path) => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
                }
                match std::fs::DirBuilder::new().mode(0o700).create(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io("creating", path)(e)),
                }
                (path.to_path_buf(), false)
            }
        };
        let dir = Dir::open(&path).map_err(io("opening", &path))?;
        let meta = dir.metadata().map_err(io("inspecting", &path))?;
        let untrusted = |reason| FilesError::Untrusted { path: path.clone(), reason };
        if meta.uid() != crate::sys::effective_uid() {
            return Err(untrusted("it belongs to another user"));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(untrusted("other users may write in it (make it mode 0700)"));
        }
        Ok(ImagesDir { path, dir, owned, next: AtomicU64::new(1) })
    }

    /// Its path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the daemon made it (and removes it at shutdown).
    pub(super) fn owned(&self) -> bool {
        self.owned
    }

    /// Hands the directory to the user the sandbox runs the daemon as.
    pub(super) fn chown(&self, uid: libc::uid_t, gid: libc::gid_t) -> std::io::Result<()> {
        self.dir.chown(uid, gid)
    }

    /// Makes a new, empty directory for the image `name` (`name.N`, mode 0700) and returns its
    /// path. Nothing that exists already is used, whatever it is.
    pub(super) fn make_image_dir(&self, name: &str) -> std::io::Result<PathBuf> {
        let mut last = std::io::Error::from(std::io::ErrorKind::AlreadyExists);
        for _ in 0..NAME_ATTEMPTS {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let entry = format!("{name}.{n}");
            match self.dir.make_dir(&entry, 0o700) {
                Ok(()) => return Ok(self.path.join(entry)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Removes it if the daemon made it.
    pub(super) fn remove_if_owned(&self) {
        if self.owned {
            // std's remove_dir_all does not follow symbolic links.
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_made_directory_is_private_and_unguessable() {
        let a = ImagesDir::prepare(None).unwrap();
        let b = ImagesDir::prepare(None).unwrap();
        assert_ne!(a.path(), b.path());
        for d in [&a, &b] {
            let name = d.path().file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with(PRIVATE_DIR_PREFIX) && name.len() == PRIVATE_DIR_PREFIX.len() + 6, "{name}");
            assert_eq!(std::fs::metadata(d.path()).unwrap().permissions().mode() & 0o777, 0o700);
            let image = d.make_image_dir("echo").unwrap();
            assert_eq!(std::fs::metadata(&image).unwrap().permissions().mode() & 0o777, 0o700);
            d.remove_if_owned();
            assert!(!d.path().exists());
        }
    }

    #[test]
    fn a_planted_link_is_skipped_not_followed() {
        let root = crate::sys::make_temp_dir(&std::env::temp_dir(), "mu2-files-test-").unwrap();
        let victim = root.join("victim");
        std::fs::create_dir(&victim).unwrap();
        let images = root.join("images");
        let d = ImagesDir::prepare(Some(&images)).unwrap();
        std::os::unix::fs::symlink(&victim, images.join("echo.1")).unwrap();
        let made = d.make_image_dir("echo").unwrap();
        assert_eq!(made, images.join("echo.2"));
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_directory_others_may_write_in_is_refused() {
        let root = crate::sys::make_temp_dir(&std::env::temp_dir(), "mu2-files-test-").unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ImagesDir::prepare(Some(&root)).unwrap_err();
        assert!(matches!(e, FilesError::Untrusted { .. }), "{e}");
        let link = root.with_extension("link");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        assert!(ImagesDir::prepare(Some(&link)).is_err(), "a symbolic link is not an images directory");
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }
}
