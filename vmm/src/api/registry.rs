//! The image registry: the images the daemon serves, each with its fork engine; making,
//! registering and deleting them; and admission of requests against `--max-vms`.
//!
//! Turning a built-in name, a guest ELF or an image directory into an image is
//! [`ImageSource::prepare`]'s job; what is the daemon's own is here: where the images it makes
//! go, and removing what a failed build left. Whether a guest speaks the HTTP framing is
//! recorded in its image (its readiness flags), so a registered directory needs no side file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use super::config::ServeConfig;
use super::failure;
use super::files::ImagesDir;
use super::listen::{lock, Lifecycle};
use super::model::{self, ImageSpec, ServeSettings};
use crate::budget::VmBudget;
use crate::error::Classify;
use crate::fork::{Engine, EngineConfig, Mode, ADMISSION_WAIT};
use crate::guests;
use crate::hypervisor::Hypervisor;
use crate::source::{GuestSettings, ImageSource, SourceError};

/// How long an image build may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30);
/// The kernel command line of the guests the daemon boots.
const GUEST_CMDLINE: &str = "quiet";

/// A registered image and its engine.
#[derive(Debug)]
pub(super) struct Entry {
    name: String,
    source: ImageSource,
    dir: PathBuf,
    /// The daemon made the directory: it removes it with the image.
    owned: bool,
    http: bool,
    mem_mib: u64,
    vcpus: usize,
    /// How the daemon booted its guest; `None` for an image directory registered as it is.
    guest: Option<GuestSettings>,
    /// One request's deadline in its VM.
    timeout: Duration,
    engine: Engine,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    created_unix: u64,
}

impl Entry {
    /// The image's name.
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Whether its guest speaks the HTTP framing.
    pub(super) fn http(&self) -> bool {
        self.http
    }

    /// Its fork engine.
    pub(super) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// One request's deadline in its VM.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Counts one request that reached the engine.
    pub(super) fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// What `GET /images/{name}` shows.
    pub(super) fn describe(&self) -> serde_json::Value {
        let source = match &self.source {
            ImageSource::Builtin(f) => json!({ "function": f }),
            ImageSource::Kernel(k) => json!({ "kernel": k }),
            ImageSource::Dir(p) => json!({ "path": p }),
        };
        let engine = self.engine.config();
        let entry = self.guest.as_ref().map(|g| format!("{:?}", g.entry).to_lowercase());
        json!({
            "name": self.name,
            "ready": true,
            "source": source,
            "dir": self.dir,
            "http": self.http,
            "content_id": self.engine.image().content_id().to_string(),
            "mem_mib": self.mem_mib,
            "vcpus": self.vcpus,
            "port": self.engine.image().state().port,
            "cmdline": self.guest.as_ref().map(|g| g.cmdline.as_str()),
            "entry": entry,
            "mode": format!("{:?}", engine.mode).to_lowercase(),
            "pool_size": engine.pool_size,
            "timeout": crate::duration::format(self.timeout),
            "max_response": engine.max_response,
            "max_request": self.engine.image().state().max_request,
            "pool_depth": self.engine.pool_depth(),
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "requests": self.requests.load(Ordering::Relaxed),
            "created_unix": self.created_unix,
        })
    }

    /// Drops the engine (its pool and VMs), then the directory if the daemon made it.
    fn destroy(self: Arc<Self>) {
        let (dir, owned) = (self.dir.clone(), self.owned);
        drop(self);
        if owned {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Why the registry refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub(super) enum RegistryError {
    /// No such image (and no built-in guest of that name).
    #[error("no image `{0}`")]
    NotFound(String),
    /// `PUT` of a name in use.
    #[error("image `{0}` exists; DELETE it first")]
    Exists(String),
    /// `DELETE` of an image requests are using.
    #[error("image `{name}` serves {in_flight} requests now; retry")]
    InUse {
        /// The image.
        name: String,
        /// Its requests in flight.
        in_flight: usize,
    },
    /// The daemon is shutting down.
    #[error("the daemon is shutting down")]
    Stopping,
    /// No directory could be made for the image.
    #[error("image `{name}`: making its directory")]
    Dir {
        /// The image.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A kernel or image path outside the directories the sandboxed daemon may read.
    #[error("image `{name}`: {} is outside the directories the daemon may read (--allow-dir)", path.display())]
    NotAllowed {
        /// The image.
        name: String,
        /// The path asked for.
        path: PathBuf,
    },
    /// A pool-mode `pool_size` at or above `--max-vms`.
    #[error("bad image spec: `pool_size` must be below --max-vms {max_vms} in pool and reuse mode (their pooled or kept VMs count against it), not {pool_size}")]
    PoolSize {
        /// The size asked for.
        pool_size: usize,
        /// The daemon's `--max-vms`.
        max_vms: usize,
    },
    /// The pools of the registered images and this one's would hold every VM `--max-vms`
    /// allows, leaving none for requests.
    #[error(
        "image `{name}`: the pools of the registered images hold {pooled} of --max-vms {max_vms} VMs; \
         a pool of {pool_size} more would leave none for requests (DELETE an image or lower `pool_size`)"
    )]
    PoolBudget {
        /// The image.
        name: String,
        /// VMs the other images' pools hold when full.
        pooled: usize,
        /// This image's pool size.
        pool_size: usize,
        /// The daemon's `--max-vms`.
        max_vms: usize,
    },
    /// The image's guest memory alone exceeds `--max-memory`: no VM of it could ever run.
    #[error("image `{name}`: its {mem_mib} MiB of guest memory exceed --max-memory {max_mib} MiB")]
    Oversized {
        /// The image.
        name: String,
        /// Its guest memory, MiB.
        mem_mib: u64,
        /// The daemon's `--max-memory`, MiB.
        max_mib: u64,
    },
    /// The pools of the registered images and this one's, with room for one request, would
    /// hold more guest memory than `--max-memory` allows.
    #[error(
        "image `{name}`: its pool and a request need {wanted_mib} MiB of guest memory; the registered \
         images' pools hold {pooled_mib} MiB of --max-memory {max_mib} MiB (DELETE an image or lower `pool_size`)"
    )]
    PoolMemory {
        /// The image.
        name: String,
        /// Guest memory of the other images' full pools, MiB.
        pooled_mib: u64,
        /// This image's pool and one VM more, MiB.
        wanted_mib: u64,
        /// The daemon's `--max-memory`, MiB.
        max_mib: u64,
    },
    /// A `max_response` above `--max-response-bytes`: every response that large would be
    /// refused.
    #[error("bad image spec: `max_response` {max_response} exceeds --max-response-bytes {buffered}")]
    ResponseOverBudget {
        /// The size asked for.
        max_response: usize,
        /// The daemon's `--max-response-bytes`.
        buffered: usize,
    },
    /// No room in the VM budget for the VM that boots and freezes the image.
    #[error("image `{name}`: no room to build it")]
    NoRoomToBuild {
        /// The image.
        name: String,
        /// Why.
        #[source]
        source: crate::budget::BudgetSpent,
    },
    /// The image could not be made or loaded.
    #[error("image `{name}`")]
    Build {
        /// The image.
        name: String,
        /// Why.
        #[source]
        source: SourceError,
    },
}

impl RegistryError {
    /// The status the daemon answers with.
    pub(super) fn status(&self) -> u16 {
        match self {
            RegistryError::NotFound(_) => 404,
            RegistryError::PoolSize { .. } | RegistryError::ResponseOverBudget { .. } => 400,
            RegistryError::Exists(_)
            | RegistryError::InUse { .. }
            | RegistryError::PoolBudget { .. }
            | RegistryError::PoolMemory { .. }
            | RegistryError::Oversized { .. } => 409,
            RegistryError::Stopping => 503,
            RegistryError::NotAllowed { .. } => 400,
            RegistryError::Dir { source, .. } => failure::status(crate::error::io_kind(source)),
            RegistryError::Build { source, .. } => failure::status(source.kind()),
            RegistryError::NoRoomToBuild { source, .. } => failure::status(source.kind()),
        }
    }
}

/// Why a request was not given a VM.
#[derive(Debug, thiserror::Error)]
pub(super) enum AdmissionError {
    /// `--max-vms` VMs are in use.
    #[error("--max-vms {max_vms} reached ({in_flight} requests in flight, {live} VMs live)")]
    Full {
        /// The limit.
        max_vms: usize,
        /// Requests admitted (holding a VM or waiting for one), not counting this one.
        in_flight: usize,
        /// Live VMs: serving, pooled, being reset or destroyed.
        live: usize,
    },
    /// The daemon is shutting down.
    #[error("the daemon is shutting down")]
    Stopping,
}

impl AdmissionError {
    /// The status the daemon answers with.
    pub(super) fn status(&self) -> u16 {
        match self {
            AdmissionError::Full { .. } => 429,
            AdmissionError::Stopping => 503,
        }
    }
}

/// Holds one VM's worth of `--max-vms` for a request.
#[derive(Debug)]
pub(super) struct Lease<'a> {
    registry: &'a Registry,
    entry: &'a Entry,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.entry.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.registry.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The images and what they hold against `--max-vms`.
#[derive(Debug)]
pub(super) struct Registry {
    hv: Arc<Hypervisor>,
    /// The engine settings of an image whose `PUT` sets none (the daemon's flags).
    engine_config: EngineConfig,
    /// The request deadline of such an image (`--timeout`).
    timeout: Duration,
    max_vms: usize,
    /// What every image's VMs count against.
    budget: Arc<VmBudget>,
    /// What the daemon may read, when sandboxed.
    sandbox: Option<super::SandboxSettings>,
    images_dir: ImagesDir,
    images: Mutex<BTreeMap<String, Arc<Entry>>>,
    /// Serializes image builds, so that 200 first requests to a built-in build it once.
    building: Mutex<()>,
    /// Requests holding a VM.
    in_flight: AtomicUsize,
    lifecycle: Arc<Lifecycle>,
}

impl Registry {
    /// An empty registry making its images in `images_dir`.
    pub(super) fn new(
        hv: Arc<Hypervisor>,
        config: &ServeConfig,
        images_dir: ImagesDir,
        lifecycle: Arc<Lifecycle>,
    ) -> Self {
        Registry {
            hv,
            engine_config: config.engine_config(),
            timeout: config.timeout,
            max_vms: config.max_vms,
            budget: config.budget(),
            sandbox: config.sandbox.clone(),
            images_dir,
            images: Mutex::new(BTreeMap::new()),
            building: Mutex::new(()),
            in_flight: AtomicUsize::new(0),
            lifecycle,
        }
    }

    /// What the live VMs hold of the budget.
    pub(super) fn budget(&self) -> &VmBudget {
        &self.budget
    }

    /// Requests holding a VM now.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The longest request deadline of any image (at least `default`): how long requests in
    /// flight may still take.
    pub(super) fn longest_timeout(&self, default: Duration) -> Duration {
        lock(&self.images).values().map(|e| e.timeout).fold(default, Duration::max)
    }

    /// Each image's name and VMs ready in its pool.
    pub(super) fn pool_depths(&self) -> Vec<(String, usize)> {
        lock(&self.images).values().map(|e| (e.name.clone(), e.engine.pool_depth())).collect()
    }

    /// The registered image `name`, if any.
    pub(super) fn get(&self, name: &str) -> Option<Arc<Entry>> {
        lock(&self.images).get(name).cloned()
    }

    /// What every registered image shows, and the built-in guests not built yet.
    pub(super) fn list(&self) -> (Vec<serde_json::Value>, Vec<&'static str>) {
        let images = lock(&self.images);
        let listed = images.values().map(|e| e.describe()).collect();
        let available = guests::EXAMPLES.iter().copied().filter(|n| !images.contains_key(*n)).collect();
        (listed, available)
    }

    /// The image `name` for a request; a built-in guest not yet built is built now.
    pub(super) fn entry(&self, name: &str) -> Result<Arc<Entry>, RegistryError> {
        if let Some(e) = self.get(name) {
            return Ok(e);
        }
        if guests::find(name).is_none() || !model::valid_name(name) {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        let _building = lock(&self.building);
        if let Some(e) = self.get(name) {
            return Ok(e);
        }
        if self.lifecycle.stopping() {
            return Err(RegistryError::Stopping);
        }
        let spec = ImageSpec::Function { function: name.to_string(), guest: GuestSettings::default() };
        let entry = self.build(name, &spec, &ServeSettings::default())?;
        lock(&self.images).insert(name.to_string(), entry.clone());
        Ok(entry)
    }

    /// `PUT /images/{name}`: makes the image from `spec`, served as `serve` says, and registers
    /// it.
    pub(super) fn create(
        &self,
        name: &str,
        spec: &ImageSpec,
        serve: &ServeSettings,
    ) -> Result<Arc<Entry>, RegistryError> {
        let _building = lock(&self.building);
        if lock(&self.images).contains_key(name) {
            return Err(RegistryError::Exists(name.to_string()));
        }
        if self.lifecycle.stopping() {
            return Err(RegistryError::Stopping);
        }
        let entry = self.build(name, spec, serve)?;
        lock(&self.images).insert(name.to_string(), entry.clone());
        Ok(entry)
    }

    /// The engine settings and request deadline of image `name` served as `serve` says, the
    /// daemon's flags filling in what it leaves out. A pool must leave room under `--max-vms`
    /// for requests, with the pools of the images already registered. The caller holds
    /// `building`.
    fn serving(&self, name: &str, serve: &ServeSettings) -> Result<(EngineConfig, Duration), RegistryError> {
        let mut engine = self.engine_config;
        engine.mode = serve.mode.unwrap_or(engine.mode);
        engine.pool_size = serve.pool_size.unwrap_or(engine.pool_size);
        engine.max_response = serve.max_response.unwrap_or(engine.max_response);
        let buffered = self.budget.responses().limit();
        if engine.max_response > buffered {
            return Err(RegistryError::ResponseOverBudget { max_response: engine.max_response, buffered });
        }
        if holds_vms(&engine) {
            let (pool_size, max_vms) = (engine.pool_size, self.max_vms);
            if pool_size >= max_vms {
                return Err(RegistryError::PoolSize { pool_size, max_vms });
            }
            let pooled: usize =
                lock(&self.images).values().map(|e| e.engine.config()).filter(holds_vms).map(|c| c.pool_size).sum();
            if pooled + pool_size >= max_vms {
                return Err(RegistryError::PoolBudget { name: name.to_string(), pooled, pool_size, max_vms });
            }
        }
        Ok((engine, serve.timeout.unwrap_or(self.timeout)))
    }

    /// Whether a pool of `config` for VMs of `mem_size` bytes fits `--max-memory` beside the
    /// full pools of the images registered, with one VM of it left for requests. The caller
    /// holds `building`.
    fn pool_memory_fits(&self, name: &str, config: &EngineConfig, mem_size: u64) -> Result<(), RegistryError> {
        let max_memory = self.budget.limits().max_memory;
        if mem_size > max_memory {
            return Err(RegistryError::Oversized {
                name: name.to_string(),
                mem_mib: mem_size >> 20,
                max_mib: max_memory >> 20,
            });
        }
        if !holds_vms(config) {
            return Ok(());
        }
        let pooled: u64 = lock(&self.images)
            .values()
            .filter(|e| holds_vms(&e.engine.config()))
            .map(|e| (e.engine.config().pool_size as u64).saturating_mul(e.engine.image().state().mem_size))
            .sum();
        let wanted = (config.pool_size as u64 + 1).saturating_mul(mem_size);
        if pooled.saturating_add(wanted) > max_memory {
            return Err(RegistryError::PoolMemory {
                name: name.to_string(),
                pooled_mib: pooled >> 20,
                wanted_mib: wanted >> 20,
                max_mib: max_memory >> 20,
            });
        }
        Ok(())
    }

    /// `DELETE /images/{name}`: refused while requests use it.
    pub(super) fn delete(&self, name: &str) -> Result<(), RegistryError> {
        let removed = {
            let mut images = lock(&self.images);
            match images.get(name) {
                None => return Err(RegistryError::NotFound(name.to_string())),
                Some(e) if e.in_flight.load(Ordering::Relaxed) > 0 => {
                    return Err(RegistryError::InUse {
                        name: name.to_string(),
                        in_flight: e.in_flight.load(Ordering::Relaxed),
                    })
                }
                Some(_) => images.remove(name),
            }
        };
        // The engine (its pool and VMs) goes here, outside the lock.
        if let Some(entry) = removed {
            entry.destroy();
        }
        Ok(())
    }

    /// Counts a request until the lease is dropped, or refuses it: each request holds a VM,
    /// so no more than `--max-vms` are in flight. (The VMs themselves, pooled ones and those
    /// being reset or destroyed too, count against the engines' shared budget.)
    pub(super) fn admit<'a>(&'a self, entry: &'a Entry) -> Result<Lease<'a>, AdmissionError> {
        if self.lifecycle.stopping() {
            return Err(AdmissionError::Stopping);
        }
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        entry.in_flight.fetch_add(1, Ordering::Relaxed);
        let lease = Lease { registry: self, entry };
        if before + 1 > self.max_vms {
            let live = self.budget.usage().vms;
            return Err(AdmissionError::Full { max_vms: self.max_vms, in_flight: before, live });
        }
        Ok(lease)
    }

    /// Drops every image (pools drained, VMs destroyed) and the directories the daemon made.
    pub(super) fn clear(&self) {
        let images = std::mem::take(&mut *lock(&self.images));
        for entry in images.into_values() {
            entry.destroy();
        }
        self.images_dir.remove_if_owned();
    }

    /// Makes (or, for an image directory, loads) the image `name` and starts its engine. The
    /// caller holds `building`.
    fn build(&self, name: &str, spec: &ImageSpec, serve: &ServeSettings) -> Result<Arc<Entry>, RegistryError> {
        let build_error = |source| RegistryError::Build { name: name.to_string(), source };
        let (engine_config, timeout) = self.serving(name, serve)?;
        let (source, guest) = match spec {
            ImageSpec::Function { function, guest } => (ImageSource::Builtin(function.clone()), Some(guest)),
            ImageSpec::Kernel { kernel, guest } => (ImageSource::Kernel(kernel.clone()), Some(guest)),
            ImageSpec::Path { path, .. } => (ImageSource::Dir(path.clone()), None),
        };
        if let (Some(sandbox), ImageSource::Kernel(path) | ImageSource::Dir(path)) = (&self.sandbox, &source) {
            if !sandbox.allows(path) {
                return Err(RegistryError::NotAllowed { name: name.to_string(), path: path.clone() });
            }
        }
        let (dir, owned) = match &source {
            ImageSource::Dir(path) => (path.clone(), false),
            ImageSource::Builtin(_) | ImageSource::Kernel(_) => {
                let dir = self
                    .images_dir
                    .make_image_dir(name)
                    .map_err(|source| RegistryError::Dir { name: name.to_string(), source })?;
                (dir, true)
            }
        };
        // The daemon's own command line goes first; the caller's may add to it.
        let settings = guest.map_or_else(GuestSettings::default, |g| GuestSettings {
            cmdline: format!("{GUEST_CMDLINE} {}", g.cmdline),
            ..g.clone()
        });
        let max_memory = self.budget.limits().max_memory;
        if (settings.mem_mib << 20) > max_memory {
            if owned {
                let _ = std::fs::remove_dir_all(&dir);
            }
            return Err(RegistryError::Oversized {
                name: name.to_string(),
                mem_mib: settings.mem_mib,
                max_mib: max_memory >> 20,
            });
        }
        // The VM that boots and freezes the image is a live VM like any other.
        let build_vm = match self.budget.take_within(settings.mem_mib << 20, ADMISSION_WAIT) {
            Ok(permit) => permit,
            Err(e) => {
                if owned {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                return Err(RegistryError::NoRoomToBuild { name: name.to_string(), source: e });
            }
        };
        let prepared = source.prepare(&self.hv, &settings, &dir, Some(Instant::now() + BUILD_TIMEOUT));
        drop(build_vm);
        let (image, _) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                if owned {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                return Err(build_error(e));
            }
        };
        // The image records what its guest announced; a registration's own `http` wins.
        let http = match spec {
            ImageSpec::Path { http: Some(http), .. } => *http,
            _ => image.info().http(),
        };
        let (mem_mib, vcpus) = (image.state().mem_size >> 20, image.state().vcpus.len());
        if let Err(e) = self.pool_memory_fits(name, &engine_config, image.state().mem_size) {
            if owned {
                let _ = std::fs::remove_dir_all(&dir);
            }
            return Err(e);
        }
        let engine = Engine::with_budget(self.hv.clone(), Arc::new(image), engine_config, self.budget.clone());
        Ok(Arc::new(Entry {
            name: name.to_string(),
            source,
            dir,
            owned,
            http,
            mem_mib,
            vcpus,
            guest: guest.cloned(),
            timeout,
            engine,
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            created_unix: unix_now(),
        }))
    }
}

/// Whether an engine of `config` keeps VMs between requests (a pool's ready ones, reuse mode's
/// kept ones), which a `PUT` must find room for.
fn holds_vms(config: &EngineConfig) -> bool {
    matches!(config.mode, Mode::Pool | Mode::Reuse)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
