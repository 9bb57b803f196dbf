//! The daemon in its sandbox (see `crate::sandbox` for the layers and docs/RELIABILITY.md for
//! why): the settings, the supervisor that a daemon started as root runs in, and the point of
//! the start-up where the daemon confines itself.
//!
//! Started as root, `mu2 serve` forks: the parent (the supervisor) makes what needs root and
//! outlives the daemon — the private directories, the cgroup — forwards SIGINT and SIGTERM,
//! waits, and removes the socket, the directories and the cgroup however the daemon ended
//! (a daemon that runs as `nobody` in a mount namespace can do none of that itself). The child
//! opens KVM, binds its sockets, then confines itself before starting any thread: its own
//! root, the cgroup, landlock, the unprivileged user; then every thread takes its class's
//! seccomp filter as it starts.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::{ServeConfig, ServeError};
use super::files::ImagesDir;
use crate::sandbox::{self, Confinement, OnForbidden};

/// How `mu2 serve` boxes itself in.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// The user and group the daemon runs as once started, when started as root.
    pub user: (libc::uid_t, libc::gid_t),
    /// The cgroup's memory limit, bytes.
    pub memory_max: u64,
    /// The cgroup's task limit (every thread counts).
    pub pids_max: u64,
    /// The directories `PUT /images` may name guest ELFs and image directories in (read-only
    /// inside the sandbox); paths elsewhere are refused.
    pub allow_dirs: Vec<PathBuf>,
    /// What a forbidden system call does.
    pub on_forbidden: OnForbidden,
}

impl SandboxSettings {
    /// The defaults: `nobody`/`nogroup` (65534 where they do not exist), 8 GiB, 4096 tasks.
    pub fn new() -> SandboxSettings {
        let user = crate::sys::lookup_user("nobody").ok().flatten().unwrap_or((65534, 65534));
        let group = crate::sys::lookup_group("nogroup").ok().flatten().unwrap_or(user.1);
        SandboxSettings {
            user: (user.0, group),
            memory_max: 8 << 30,
            pids_max: 4096,
            allow_dirs: Vec::new(),
            on_forbidden: OnForbidden::KillProcess,
        }
    }

    /// Whether `path` lies in one of the allowed directories: absolute, without `..`, and
    /// under one of them.
    pub(super) fn allows(&self, path: &Path) -> bool {
        use std::path::Component;
        path.is_absolute()
            && path.components().all(|c| !matches!(c, Component::ParentDir))
            && self.allow_dirs.iter().any(|dir| path.starts_with(dir))
    }
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self::new()
    }
}

/// Looks up a user or group name, or takes a number: what `--uid`/`--gid` accept.
pub fn user_id(name_or_number: &str) -> Option<libc::uid_t> {
    name_or_number.parse().ok().or_else(|| crate::sys::lookup_user(name_or_number).ok().flatten().map(|(uid, _)| uid))
}

/// See [`user_id`], for groups.
pub fn group_id(name_or_number: &str) -> Option<libc::gid_t> {
    name_or_number.parse().ok().or_else(|| crate::sys::lookup_group(name_or_number).ok().flatten())
}

/// What the supervisor prepared for its child.
#[derive(Debug, Clone, Default)]
pub(super) struct Prepared {
    /// The user to become.
    user: Option<(libc::uid_t, libc::gid_t)>,
    /// The empty directory to mount the new root on.
    new_root: Option<PathBuf>,
    /// The cgroup directories to join.
    cgroups: Vec<PathBuf>,
    /// What became of the cgroup, for the sandbox line.
    cgroup_note: String,
    /// The supervisor's pid.
    supervisor: Option<libc::pid_t>,
}

/// Confines the daemon at the end of its start-up, before it starts a thread; returns the
/// sandbox line `mu2 serve` prints.
pub(super) fn enter(settings: &SandboxSettings, prepared: &Prepared, images: &ImagesDir) -> Result<String, ServeError> {
    if let Some((uid, gid)) = prepared.user {
        images.chown(uid, gid).map_err(ServeError::io("handing to the sandbox user", images.path().display()))?;
    }
    let plan = Confinement {
        user: prepared.user,
        new_root: prepared.new_root.clone(),
        read_write: vec![images.path().to_path_buf()],
        read_only: settings.allow_dirs.clone(),
        cgroups: prepared.cgroups.clone(),
        supervisor: prepared.supervisor,
    };
    let confined = sandbox::confine(&plan).map_err(|e| ServeError::Sandbox(e.into()))?;
    sandbox::install(settings.on_forbidden).map_err(ServeError::Sandbox)?;
    let action = match settings.on_forbidden {
        OnForbidden::KillProcess => "a forbidden call kills the process",
        OnForbidden::Log => "forbidden calls only logged (--seccomp-log)",
    };
    let cgroup = if prepared.cgroup_note.is_empty() { String::new() } else { format!(", {}", prepared.cgroup_note) };
    Ok(format!("seccomp on {} thread classes ({action}), {confined}{cgroup}", sandbox::ThreadClass::ALL.len()))
}

/// Whether the daemon runs under a supervisor: sandboxed and started as root.
pub(super) fn supervised(config: &ServeConfig) -> bool {
    config.sandbox.is_some() && crate::sys::effective_uid() == 0
}

/// How the supervised daemon ended, when not cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonEnd {
    /// It exited with a failure it reported itself.
    #[error("the sandboxed daemon exited with code {0}")]
    Failed(i32),
    /// A signal killed it.
    #[error("the sandboxed daemon (pid {pid}) was killed by signal {signal}{}", explain(*.signal))]
    Killed {
        /// Its pid.
        pid: i32,
        /// The signal.
        signal: i32,
    },
}

fn explain(signal: i32) -> &'static str {
    if signal == libc::SIGSYS {
        " (SIGSYS: a system call its seccomp filter does not allow)"
    } else {
        ""
    }
}

/// Runs the daemon in a child process (see the module documentation) and returns how it
/// ended; in the child, returns what `run` returned.
pub(super) fn supervise(
    mut config: ServeConfig,
    owns_api_sock: bool,
    run: impl FnOnce(ServeConfig, Prepared) -> Result<(), ServeError>,
) -> Result<(), ServeError> {
    let Some(settings) = config.sandbox.clone() else { return run(config, Prepared::default()) };
    let tmp = std::env::temp_dir();
    let made_images = match &config.images_dir {
        Some(_) => None,
        None => {
            let dir = crate::sys::make_temp_dir(&tmp, super::files::PRIVATE_DIR_PREFIX)
                .map_err(ServeError::io("creating a directory in", tmp.display()))?;
            config.images_dir = Some(dir.clone());
            Some(dir)
        }
    };
    let cleanup = Cleanup {
        api_sock: owns_api_sock.then(|| config.api_sock.clone()),
        dirs: made_images.into_iter().collect(),
        cgroups: vec![],
    };
    let mut cleanup = cleanup;
    let root = crate::sys::make_temp_dir(&tmp, "mu2-root-")
        .map_err(ServeError::io("creating a directory in", tmp.display()))?;
    cleanup.dirs.push(root.clone());
    let name = root.file_name().and_then(|n| n.to_str()).unwrap_or("mu2-root").replace("mu2-root-", "mu2-serve-");
    let (cgroups, cgroup_note) = match sandbox::cgroup_limits(&name, settings.memory_max, settings.pids_max) {
        Ok(setup) => {
            let note = format!(
                "cgroup {} (memory {} MiB, {} tasks)",
                setup.version,
                settings.memory_max >> 20,
                settings.pids_max
            );
            (setup.dirs, note)
        }
        Err(reason) => {
            log::warn!("no cgroup for the daemon: {reason}");
            (Vec::new(), format!("no cgroup ({reason})"))
        }
    };
    cleanup.cgroups = cgroups.clone();
    let supervisor = Some(std::process::id() as libc::pid_t);
    let prepared = Prepared { user: Some(settings.user), new_root: Some(root), cgroups, cgroup_note, supervisor };
    match crate::sys::fork_process().map_err(ServeError::io("forking", "the sandboxed daemon"))? {
        None => {
            // The child: the supervisor cleans up after it.
            std::mem::forget(cleanup);
            run(config, prepared)
        }
        Some(pid) => {
            let end = wait_forwarding_signals(pid);
            drop(cleanup);
            match end.map_err(ServeError::io("waiting for", "the sandboxed daemon"))? {
                crate::sys::ChildEnd::Exited(0) => Ok(()),
                crate::sys::ChildEnd::Exited(code) => Err(ServeError::Daemon(DaemonEnd::Failed(code))),
                crate::sys::ChildEnd::Killed(signal) => Err(ServeError::Daemon(DaemonEnd::Killed { pid, signal })),
            }
        }
    }
}

/// Waits for the child, passing SIGINT and SIGTERM on to it.
fn wait_forwarding_signals(pid: libc::pid_t) -> std::io::Result<crate::sys::ChildEnd> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let handle = signals.handle();
    let forwarder = std::thread::Builder::new().name("mu2-supervisor".into()).spawn(move || {
        for signal in signals.forever() {
            let _ = crate::sys::send_signal(pid, signal);
        }
    })?;
    let end = crate::sys::wait_child(pid);
    handle.close();
    let _ = forwarder.join();
    end
}

/// What the supervisor removes once the daemon is gone.
struct Cleanup {
    /// The API socket, unless a service manager made it.
    api_sock: Option<PathBuf>,
    dirs: Vec<PathBuf>,
    cgroups: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Only a socket: whatever else is there now is not the daemon's.
        if let Some(sock) = &self.api_sock {
            if std::fs::symlink_metadata(sock).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(sock);
            }
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        for cgroup in &self.cgroups {
            // The cgroup empties as the kernel finishes tearing the daemon down.
            for _ in 0..50 {
                if std::fs::remove_dir(cgroup).is_ok() || !cgroup.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
