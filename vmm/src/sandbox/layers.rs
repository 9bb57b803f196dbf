//! The process-wide layers of the sandbox, applied once, while the process has a single
//! thread (a mount namespace, landlock and a change of user apply to the calling thread and
//! what it starts afterwards):
//!
//! 1. a cgroup (made beforehand by the supervisor, see `cgroup_limits`): this process joins it;
//! 2. its own mount namespace whose root is a small read-only tmpfs holding only the
//!    directories the daemon uses, bind-mounted at their own paths (images read-write, the
//!    `--allow-dir`s read-only, /proc), entered with `pivot_root`; every other file of the
//!    host is out of reach, whatever the path;
//! 3. landlock (where the kernel has it): the same directories, and TCP connections only to
//!    the dispatcher's own port;
//! 4. an unprivileged user and group, with no supplementary groups (so no capability).
//!
//! /dev/kvm is not in the new root: the daemon holds the descriptor it opened before.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Classify, FailureKind};

/// What to confine the process to.
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    /// Run as this user and group from now on (needs root).
    pub user: Option<(libc::uid_t, libc::gid_t)>,
    /// An empty directory to mount the new root on: a mount namespace is made and entered
    /// (needs root).
    pub new_root: Option<PathBuf>,
    /// Directories the daemon writes (its images).
    pub read_write: Vec<PathBuf>,
    /// Directories the daemon only reads (`--allow-dir`).
    pub read_only: Vec<PathBuf>,
    /// cgroup directories to join (made and limited by the supervisor).
    pub cgroups: Vec<PathBuf>,
    /// The supervisor that forked this process: the process dies with it.
    pub supervisor: Option<libc::pid_t>,
}

/// Why the process could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The process runs more than one thread.
    #[error("the process runs {0} threads; confining it needs exactly one")]
    Threaded(usize),
    /// A step failed.
    #[error("{what}")]
    Step {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Landlock refused the rules.
    #[error("landlock")]
    Landlock(#[source] landlock::RulesetError),
}

impl Classify for ConfineError {
    fn kind(&self) -> FailureKind {
        match self {
            ConfineError::Step { source, .. } => crate::error::io_kind(source),
            _ => FailureKind::Internal,
        }
    }
}

fn step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ConfineError {
    let what = what.into();
    move |source| ConfineError::Step { what, source }
}

/// What the confinement achieved, one phrase per layer (see [`Confined`]'s `Display`).
#[derive(Debug, Clone, Default)]
pub struct Confined {
    /// The user and group the process runs as, if it changed.
    pub user: Option<(libc::uid_t, libc::gid_t)>,
    /// Whether it has its own mount namespace and root.
    pub mount_namespace: bool,
    /// The cgroups it joined.
    pub cgroups: usize,
    /// Landlock's state: `None` where the kernel has none.
    pub landlock: Option<String>,
}

impl fmt::Display for Confined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.user {
            Some((uid, gid)) => write!(f, "uid {uid} gid {gid}")?,
            None => write!(f, "same user")?,
        }
        f.write_str(if self.mount_namespace { ", own mount namespace (pivot_root)" } else { ", host mounts" })?;
        match &self.landlock {
            Some(state) => write!(f, ", landlock {state}"),
            None => f.write_str(", no landlock"),
        }
    }
}

/// Confines the calling process (see the module documentation). Everything the daemon needs
/// later must be open by now: /dev/kvm, its sockets, /proc/self/pagemap.
pub fn confine(plan: &Confinement) -> Result<Confined, ConfineError> {
    let threads = crate::sys::thread_count().map_err(step("counting threads"))?;
    if threads != 1 {
        return Err(ConfineError::Threaded(threads));
    }
    // Opened now: after the change of user the kernel would refuse it.
    crate::memory::pagemap().map_err(step("opening /proc/self/pagemap"))?;
    let mut confined = Confined::default();
    for dir in &plan.cgroups {
        std::fs::write(dir.join("cgroup.procs"), b"0\n").map_err(step(format!("joining cgroup {}", dir.display())))?;
        confined.cgroups += 1;
    }
    if let Some(root) = &plan.new_root {
        enter_new_root(root, plan)?;
        confined.mount_namespace = true;
    }
    confined.landlock = restrict_files(plan)?;
    if let Some((uid, gid)) = plan.user {
        crate::sys::become_user(uid, gid).map_err(step(format!("becoming uid {uid} gid {gid}")))?;
        confined.user = Some((uid, gid));
    }
    if let Some(supervisor) = plan.supervisor {
        crate::sys::die_with_parent(supervisor).map_err(step("tying the daemon to its supervisor"))?;
    }
    Ok(confined)
}

/// A new mount namespace whose root is a tmpfs at `root` holding the plan's directories.
fn enter_new_root(root: &Path, plan: &Confinement) -> Result<(), ConfineError> {
    use crate::sys::{mount, MountKind};
    crate::sys::unshare_mounts().map_err(step("making a mount namespace"))?;
    // Nothing mounted or unmounted from here on propagates back to the host.
    mount(MountKind::PrivateTree, Path::new("/"), Path::new("/")).map_err(step("making / private"))?;
    mount(MountKind::Tmpfs, Path::new("tmpfs"), root)
        .map_err(step(format!("mounting a tmpfs on {}", root.display())))?;
    let inside = |path: &Path| root.join(path.strip_prefix("/").unwrap_or(path));
    let mut binds: Vec<(&Path, bool)> = Vec::new();
    binds.extend(plan.read_write.iter().map(|d| (d.as_path(), true)));
    binds.extend(plan.read_only.iter().map(|d| (d.as_path(), false)));
    // Outer directories first: one inside another (the images directory in an allowed one)
    // is mounted over it, not hidden under it.
    binds.sort_by_key(|(dir, _)| dir.components().count());
    for (dir, writable) in binds {
        let target = inside(dir);
        std::fs::create_dir_all(&target).map_err(step(format!("making {}", target.display())))?;
        mount(MountKind::Bind { writable }, dir, &target).map_err(step(format!("binding {}", dir.display())))?;
    }
    let proc = inside(Path::new("/proc"));
    std::fs::create_dir_all(&proc).map_err(step("making /proc in the new root"))?;
    mount(MountKind::ProcTree, Path::new("/proc"), &proc).map_err(step("binding /proc"))?;
    crate::sys::pivot_into(root).map_err(step(format!("pivot_root into {}", root.display())))?;
    mount(MountKind::ReadOnlyRoot, Path::new("/"), Path::new("/")).map_err(step("making the new root read-only"))?;
    Ok(())
}

/// Landlock over the plan's directories, with every TCP connect and bind and every signal
/// out of the domain refused; `None` where the kernel has no landlock, else what it enforced.
fn restrict_files(plan: &Confinement) -> Result<Option<String>, ConfineError> {
    use landlock::{Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI};
    let abi = ABI::V6;
    let rules = || -> Result<landlock::RestrictionStatus, landlock::RulesetError> {
        let mut ruleset = Ruleset::default()
            .handle_access(AccessFs::from_all(abi))?
            .handle_access(AccessNet::from_all(abi))?
            .scope(Scope::from_all(abi))?
            .create()?;
        ruleset = ruleset.add_rules(landlock::path_beneath_rules(&plan.read_write, AccessFs::from_all(abi)))?;
        ruleset = ruleset.add_rules(landlock::path_beneath_rules(&plan.read_only, AccessFs::from_read(abi)))?;
        ruleset = ruleset.add_rules(landlock::path_beneath_rules(["/proc"], AccessFs::from_read(abi)))?;
        ruleset.restrict_self()
    };
    let status = rules().map_err(ConfineError::Landlock)?;
    Ok(match status.ruleset {
        RulesetStatus::NotEnforced => None,
        RulesetStatus::PartiallyEnforced => Some("partially enforced (an older ABI)".to_string()),
        RulesetStatus::FullyEnforced => Some("enforced".to_string()),
    })
}

/// How the supervisor made the daemon's cgroups: the hierarchy used and the directories.
#[derive(Debug, Clone)]
pub struct CgroupSetup {
    /// `v2` or `v1`.
    pub version: &'static str,
    /// The directories made (one on v2; one per controller on v1).
    pub dirs: Vec<PathBuf>,
}

/// Makes a cgroup called `name` with `memory_max` bytes and `pids_max` tasks, on cgroup v2
/// where its root is writable and has both controllers, else on v1's `memory` and `pids`
/// hierarchies. `Err` says why neither is usable (the caller logs it and goes on without).
pub fn cgroup_limits(name: &str, memory_max: u64, pids_max: u64) -> Result<CgroupSetup, String> {
    let root = Path::new("/sys/fs/cgroup");
    let v2 = std::fs::read_to_string(root.join("cgroup.controllers")).ok();
    let make = |dir: &Path, files: &[(&str, String)]| -> Result<(), String> {
        std::fs::create_dir(dir).map_err(|e| format!("making {}: {e}", dir.display()))?;
        for (file, value) in files {
            if let Err(e) = std::fs::write(dir.join(file), value) {
                let _ = std::fs::remove_dir(dir);
                return Err(format!("writing {}: {e}", dir.join(file).display()));
            }
        }
        Ok(())
    };
    if let Some(controllers) = v2 {
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if has("memory") && has("pids") {
            let dir = root.join(name);
            make(&dir, &[("memory.max", memory_max.to_string()), ("pids.max", pids_max.to_string())])?;
            return Ok(CgroupSetup { version: "v2", dirs: vec![dir] });
        }
    }
    let (memory, pids) = (root.join("memory"), root.join("pids"));
    if memory.join("memory.limit_in_bytes").exists() && pids.join("cgroup.procs").exists() {
        let memory_dir = memory.join(name);
        make(&memory_dir, &[("memory.limit_in_bytes", memory_max.to_string())])?;
        let pids_dir = pids.join(name);
        if let Err(e) = make(&pids_dir, &[("pids.max", pids_max.to_string())]) {
            let _ = std::fs::remove_dir(&memory_dir);
            return Err(e);
        }
        return Ok(CgroupSetup { version: "v1", dirs: vec![memory_dir, pids_dir] });
    }
    Err("no writable cgroup hierarchy with the memory and pids controllers".to_string())
}
