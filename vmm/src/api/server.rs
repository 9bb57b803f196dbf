//! The `mu2 serve` daemon: the control API on a Unix socket, the HTTP dispatcher on TCP, one
//! fork engine per image, and a clean shutdown.
//!
//! Threads: one accept thread per listener and one thread per client connection (blocking
//! I/O; a request runs its VM on its connection's thread, so a response leaves as soon as the
//! guest's last byte arrives). Engines add their pool builders and reaper.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use super::http::{self, Request};
use super::metrics::{self, Gauges, Metrics, Outcome};
use super::model::{self, ApiRequest, ApiResponse, ImageSpec};
use super::dispatch::{self, Routes};
use crate::fork::{error_chain, Engine, EngineConfig, ForkError, Mode, Served};
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::image::{Image, ImageError};
use crate::vm::VmConfig;
use crate::{guests, invoke};

/// The file in an image directory made by the daemon that records what the image's guest
/// announced (`{"http": true}`), since the frozen state keeps no readiness flags.
pub const SIDECAR: &str = "mu2-api.json";
/// How long an image build may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30);
/// Read timeout of client sockets: how often an idle connection looks at the stop flag.
const POLL: Duration = Duration::from_millis(200);

/// Daemon settings (`mu2 serve` flags).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The control API's Unix socket.
    pub api_sock: PathBuf,
    /// The dispatcher's TCP address, if any.
    pub http: Option<SocketAddr>,
    /// `(path prefix, image)` routes of the dispatcher.
    pub routes: Vec<(String, String)>,
    /// Where images made by the daemon go (default: a temporary directory it removes).
    pub images_dir: Option<PathBuf>,
    /// How requests get their VM.
    pub mode: Mode,
    /// VMs kept ready per image in pool mode.
    pub pool_size: usize,
    /// Most VMs in use at once: requests in flight plus VMs waiting in pools.
    pub max_vms: usize,
    /// Deadline of one request's run in its VM.
    pub timeout: Duration,
    /// Largest request body.
    pub max_body: usize,
    /// Largest response from a guest.
    pub max_response: usize,
}

impl ServeConfig {
    /// Defaults for a socket path.
    pub fn new(api_sock: PathBuf) -> Self {
        ServeConfig {
            api_sock,
            http: None,
            routes: Vec::new(),
            images_dir: None,
            mode: Mode::Pool,
            pool_size: 8,
            max_vms: 256,
            timeout: Duration::from_secs(10),
            max_body: 8 << 20,
            max_response: invoke::DEFAULT_MAX_RESPONSE,
        }
    }
}

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
    /// /dev/kvm could not be opened.
    #[error("opening KVM")]
    Hypervisor(#[source] HypervisorError),
    /// A socket or directory could not be set up.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl ServeError {
    fn io(what: &'static str, path: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ServeError {
        let path = path.to_string();
        move |source| ServeError::Io { what, path, source }
    }
}

/// Where a registered image came from.
#[derive(Debug, Clone)]
enum Source {
    Function(String),
    Kernel(PathBuf),
    Path(PathBuf),
}

/// A registered image and its engine.
#[derive(Debug)]
struct Entry {
    name: String,
    source: Source,
    dir: PathBuf,
    /// The daemon made the directory: it removes it with the image.
    owned: bool,
    http: bool,
    mem_mib: u64,
    engine: Engine,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    created_unix: u64,
}

impl Entry {
    fn describe(&self) -> serde_json::Value {
        let source = match &self.source {
            Source::Function(f) => json!({ "function": f }),
            Source::Kernel(k) => json!({ "kernel": k }),
            Source::Path(p) => json!({ "path": p }),
        };
        json!({
            "name": self.name,
            "ready": true,
            "source": source,
            "dir": self.dir,
            "http": self.http,
            "mem_mib": self.mem_mib,
            "mode": format!("{:?}", self.engine.mode()).to_lowercase(),
            "pool_depth": self.engine.pool_depth(),
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "requests": self.requests.load(Ordering::Relaxed),
            "created_unix": self.created_unix,
        })
    }
}

/// A refusal or failure with its status.
#[derive(Debug)]
struct Failure {
    status: u16,
    message: String,
}

impl Failure {
    fn new(status: u16, message: impl std::fmt::Display) -> Self {
        Failure { status, message: message.to_string() }
    }

    fn response(&self) -> ApiResponse {
        ApiResponse::error(self.status, &self.message)
    }
}

/// One response on the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl From<Reply> for http::Response {
    fn from(r: Reply) -> Self {
        http::Response { status: r.status, headers: r.headers, body: r.body }
    }
}

impl From<ApiResponse> for Reply {
    fn from(r: ApiResponse) -> Self {
        let mut headers = vec![("content-type".to_string(), r.content_type.into_bytes())];
        headers.extend(r.headers.into_iter().map(|(n, v)| (n, v.into_bytes())));
        Reply { status: r.status, headers, body: r.body }
    }
}

#[derive(Debug)]
struct State {
    hv: Arc<Hypervisor>,
    config: ServeConfig,
    routes: Routes,
    images_dir: PathBuf,
    owns_images_dir: bool,
    images: Mutex<BTreeMap<String, Arc<Entry>>>,
    /// Serializes image builds, so that 200 first requests to a built-in build it once.
    building: Mutex<()>,
    metrics: Metrics,
    in_flight: AtomicUsize,
    stopping: AtomicBool,
    stop_requested: (Mutex<bool>, Condvar),
    connections: (Mutex<usize>, Condvar),
    next_dir: AtomicU64,
}

/// Holds one VM's worth of `--max-vms` for a request.
struct Lease<'a> {
    state: &'a State,
    entry: &'a Entry,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.entry.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decrements the connection count when a connection thread ends.
struct ConnGuard(Arc<State>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let (count, cv) = &self.0.connections;
        *lock(count) -= 1;
        cv.notify_all();
    }
}

/// Locks, ignoring poisoning: the guarded data are counters and maps that stay consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Boots `config`'s guest, freezes it once it is ready and idle, writes the image to `dir`.
/// Returns whether the guest announced the HTTP framing.
fn freeze_guest(hv: &Hypervisor, config: &VmConfig, dir: &Path) -> Result<bool, ImageError> {
    let ready = crate::image::create(hv, config, dir, Some(Instant::now() + BUILD_TIMEOUT))?;
    Ok(ready.flags & mu2_abi::ready_flags::HTTP != 0)
}

fn image_failure(e: &ImageError) -> Failure {
    let status = match e {
        ImageError::Build(crate::vm::BuildError::Config(_) | crate::vm::BuildError::Arch(_))
        | ImageError::Boot(_)
        | ImageError::NotIdle(_)
        | ImageError::Snapshot { .. }
        | ImageError::Invalid { .. } => 400,
        _ => 500,
    };
    Failure::new(status, error_chain(e))
}

impl State {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            mode: self.config.mode,
            pool_size: self.config.pool_size,
            pool_builders: 2,
            max_response: self.config.max_response,
        }
    }

    fn gauges(&self) -> Gauges {
        let images = lock(&self.images);
        Gauges {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            pool_depth: images.values().map(|e| (e.name.clone(), e.engine.pool_depth())).collect(),
            kvm_vms: metrics::live_kvm_vms(),
            threads: metrics::threads(),
            images: images.len(),
            connections: *lock(&self.connections.0),
        }
    }

    fn pooled(&self) -> usize {
        lock(&self.images).values().map(|e| e.engine.pool_depth()).sum()
    }

    /// Makes the image `name` from `spec` and registers it. The caller holds `building`.
    fn create(&self, name: &str, spec: &ImageSpec) -> Result<Arc<Entry>, Failure> {
        let (source, dir, owned, http, mem_mib) = match spec {
            ImageSpec::Path { path, http } => {
                let sidecar = std::fs::read(path.join(SIDECAR))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["http"].as_bool());
                (Source::Path(path.clone()), path.clone(), false, http.or(sidecar).unwrap_or(false), 0)
            }
            ImageSpec::Function { mem_mib, .. } | ImageSpec::Kernel { mem_mib, .. }
                if *mem_mib == 0 || mem_mib.checked_mul(1 << 20).is_none() =>
            {
                return Err(Failure::new(400, format!("mem_mib {mem_mib} is out of range")));
            }
            ImageSpec::Function { .. } | ImageSpec::Kernel { .. } => {
                let (source, elf): (Source, std::borrow::Cow<'static, [u8]>) = match spec {
                    ImageSpec::Function { function, .. } => {
                        let bytes = guests::find(function).ok_or_else(|| {
                            let known: Vec<_> = guests::names().collect();
                            Failure::new(
                                400,
                                format!("no built-in function `{function}` (known: {})", known.join(", ")),
                            )
                        })?;
                        (Source::Function(function.clone()), bytes.into())
                    }
                    ImageSpec::Kernel { kernel, .. } => {
                        let bytes = std::fs::read(kernel)
                            .map_err(|e| Failure::new(400, format!("reading {}: {e}", kernel.display())))?;
                        (Source::Kernel(kernel.clone()), bytes.into())
                    }
                    ImageSpec::Path { .. } => return Err(Failure::new(500, "unreachable image source")),
                };
                let mem_mib = function_or_kernel(spec);
                let mut config = VmConfig::new(elf);
                config.mem_size = mem_mib << 20;
                config.cmdline = "quiet".into();
                let n = self.next_dir.fetch_add(1, Ordering::Relaxed);
                let dir = self.images_dir.join(format!("{name}.{n}"));
                let http = match freeze_guest(&self.hv, &config, &dir) {
                    Ok(http) => http,
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return Err(image_failure(&e));
                    }
                };
                let _ = std::fs::write(dir.join(SIDECAR), json!({ "http": http }).to_string());
                (source, dir, true, http, mem_mib)
            }
        };
        let image = match Image::load(&self.hv, &dir) {
            Ok(image) => Arc::new(image),
            Err(e) => {
                if owned {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                return Err(image_failure(&e));
            }
        };
        let mem_mib = if mem_mib == 0 { image.state().mem_size >> 20 } else { mem_mib };
        let engine = Engine::new(self.hv.clone(), image, self.engine_config());
        Ok(Arc::new(Entry {
            name: name.to_string(),
            source,
            dir,
            owned,
            http,
            mem_mib,
            engine,
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            created_unix: unix_now(),
        }))
    }

    /// The image `name`; a built-in guest not yet built is built now.
    fn entry(&self, name: &str) -> Result<Arc<Entry>, Failure> {
        if let Some(e) = lock(&self.images).get(name) {
            return Ok(e.clone());
        }
        if guests::find(name).is_none() || !model::valid_name(name) {
            return Err(Failure::new(404, format!("no image `{name}`")));
        }
        let _building = lock(&self.building);
        if let Some(e) = lock(&self.images).get(name) {
            return Ok(e.clone());
        }
        if self.stopping() {
            return Err(Failure::new(503, "the daemon is shutting down"));
        }
        let spec = ImageSpec::Function { function: name.to_string(), mem_mib: model::DEFAULT_MEM_MIB };
        let entry = self.create(name, &spec)?;
        lock(&self.images).insert(name.to_string(), entry.clone());
        Ok(entry)
    }

    fn admit<'a>(&'a self, entry: &'a Entry) -> Result<Lease<'a>, Failure> {
        if self.stopping() {
            return Err(Failure::new(503, "the daemon is shutting down"));
        }
        let pooled = self.pooled();
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        entry.in_flight.fetch_add(1, Ordering::Relaxed);
        let lease = Lease { state: self, entry };
        if before + 1 + pooled > self.config.max_vms {
            return Err(Failure::new(
                429,
                format!(
                    "--max-vms {} reached ({before} requests in flight, {pooled} VMs in pools)",
                    self.config.max_vms
                ),
            ));
        }
        Ok(lease)
    }

    /// Runs `input` in a new VM of `entry`, counting it.
    fn run(&self, entry: &Entry, input: &[u8]) -> Result<Served, Failure> {
        let start = Instant::now();
        let lease = match self.admit(entry) {
            Ok(lease) => lease,
            Err(f) => {
                self.metrics.request(&entry.name, Outcome::Rejected, start.elapsed(), None);
                return Err(f);
            }
        };
        let result = entry.engine.serve(input, self.config.timeout);
        drop(lease);
        entry.requests.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(served) => {
                self.metrics.request(&entry.name, Outcome::Ok, start.elapsed(), Some((served.fork_us, served.run_us)));
                Ok(served)
            }
            Err(e) => {
                let (outcome, status) = match &e {
                    ForkError::Invoke(i) if i.is_timeout() => (Outcome::Timeout, 504),
                    ForkError::Invoke(_) => (Outcome::GuestError, 502),
                    ForkError::PoolClosed => (Outcome::Error, 503),
                    ForkError::Restore(_) => (Outcome::Error, 500),
                };
                self.metrics.request(&entry.name, outcome, start.elapsed(), None);
                Err(Failure::new(status, format!("image `{}`: {}", entry.name, error_chain(&e))))
            }
        }
    }

    fn handle_api(&self, req: &Request) -> Reply {
        let api = match model::parse(&req.method, &req.target, req.body.clone()) {
            Ok(api) => api,
            Err(e) => return ApiResponse::error(e.status(), &e).into(),
        };
        self.api(api).unwrap_or_else(|f| f.response()).into()
    }

    fn api(&self, request: ApiRequest) -> Result<ApiResponse, Failure> {
        match request {
            ApiRequest::Health => {
                let g = self.gauges();
                Ok(ApiResponse::json(
                    200,
                    &json!({
                        "status": if self.stopping() { "stopping" } else { "ok" },
                        "mode": format!("{:?}", self.config.mode).to_lowercase(),
                        "images": g.images,
                        "in_flight": g.in_flight,
                        "live_vms": g.kvm_vms,
                        "threads": g.threads,
                        "connections": g.connections,
                        "max_vms": self.config.max_vms,
                    }),
                ))
            }
            ApiRequest::Metrics => Ok(ApiResponse::bytes(
                200,
                "text/plain; version=0.0.4",
                self.metrics.render(&self.gauges()).into_bytes(),
            )),
            ApiRequest::ListImages => {
                let images = lock(&self.images);
                let list: Vec<_> = images.values().map(|e| e.describe()).collect();
                let available: Vec<_> = guests::EXAMPLES
                    .iter()
                    .chain(["hello-http"].iter())
                    .filter(|n| !images.contains_key(**n))
                    .collect();
                Ok(ApiResponse::json(200, &json!({ "images": list, "builtin_available": available })))
            }
            ApiRequest::GetImage { name } => match lock(&self.images).get(&name) {
                Some(e) => Ok(ApiResponse::json(200, &e.describe())),
                None if guests::find(&name).is_some() => Ok(ApiResponse::json(
                    200,
                    &json!({ "name": name, "ready": false, "source": { "function": name },
                             "note": "built-in: built on first use" }),
                )),
                None => Err(Failure::new(404, format!("no image `{name}`"))),
            },
            ApiRequest::DeleteImage { name } => {
                let removed = {
                    let mut images = lock(&self.images);
                    match images.get(&name) {
                        None => return Err(Failure::new(404, format!("no image `{name}`"))),
                        Some(e) if e.in_flight.load(Ordering::Relaxed) > 0 => {
                            return Err(Failure::new(
                                409,
                                format!(
                                    "image `{name}` serves {} requests now; retry",
                                    e.in_flight.load(Ordering::Relaxed)
                                ),
                            ))
                        }
                        Some(_) => images.remove(&name),
                    }
                };
                // The engine (its pool and VMs) goes here, outside the lock.
                if let Some(entry) = removed {
                    let (dir, owned) = (entry.dir.clone(), entry.owned);
                    drop(entry);
                    if owned {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
                Ok(ApiResponse::json(200, &json!({ "deleted": name })))
            }
            ApiRequest::PutImage { name, spec } => {
                let _building = lock(&self.building);
                if lock(&self.images).contains_key(&name) {
                    return Err(Failure::new(409, format!("image `{name}` exists; DELETE it first")));
                }
                if self.stopping() {
                    return Err(Failure::new(503, "the daemon is shutting down"));
                }
                let entry = self.create(&name, &spec)?;
                let body = entry.describe();
                lock(&self.images).insert(name, entry);
                Ok(ApiResponse::json(201, &body))
            }
            ApiRequest::Invoke { name, body } => {
                let start = Instant::now();
                let entry = self.entry(&name)?;
                let served = self.run(&entry, &body)?;
                Ok(timed(ApiResponse::bytes(200, "application/octet-stream", served.response.clone()), &served, start))
            }
        }
    }

    fn handle_dispatch(&self, req: &Request) -> Reply {
        let start = Instant::now();
        let Some((prefix, image)) = self.routes.find(&req.target) else {
            return ApiResponse::error(404, format!("no route for {}", req.target.split('?').next().unwrap_or("")))
                .into();
        };
        let result = self.entry(image).and_then(|entry| {
            let input = if entry.http {
                dispatch::encode_request(&req.method, &req.target, &req.headers, prefix, &req.body)
            } else {
                req.body.clone()
            };
            self.run(&entry, &input).map(|served| (entry.http, served))
        });
        let (http, served) = match result {
            Ok(ok) => ok,
            Err(f) => return f.response().into(),
        };
        let timing = timed(ApiResponse::bytes(200, "", Vec::new()), &served, start).headers;
        let mut reply = if http {
            match dispatch::decode_response(&served.response, self.config.max_response) {
                Ok(r) => Reply { status: r.status, headers: r.headers, body: r.body },
                Err(e) => return ApiResponse::error(502, format!("image `{image}`: {e}")).into(),
            }
        } else {
            Reply {
                status: 200,
                headers: vec![("content-type".into(), b"application/octet-stream".to_vec())],
                body: served.response,
            }
        };
        reply.headers.extend(timing.into_iter().map(|(n, v)| (n, v.into_bytes())));
        reply
    }
}

fn function_or_kernel(spec: &ImageSpec) -> u64 {
    match spec {
        ImageSpec::Function { mem_mib, .. } | ImageSpec::Kernel { mem_mib, .. } => *mem_mib,
        ImageSpec::Path { .. } => 0,
    }
}

/// Adds the timing and VM headers.
fn timed(r: ApiResponse, served: &Served, start: Instant) -> ApiResponse {
    r.with_header("x-mu2-vm-id", served.vm_id)
        .with_header("x-mu2-fork-us", format!("{:.1}", served.fork_us))
        .with_header("x-mu2-run-us", format!("{:.1}", served.run_us))
        .with_header("x-mu2-total-us", format!("{:.1}", start.elapsed().as_secs_f64() * 1e6))
}

/// Which listener a connection came from.
#[derive(Debug, Clone, Copy)]
enum Listener {
    Api,
    Http,
}

fn serve_connection<S: Read + Write>(state: &State, mut stream: S, listener: Listener) {
    let mut buf = Vec::new();
    let label = match listener {
        Listener::Api => "api",
        Listener::Http => "http",
    };
    loop {
        let req = match http::read_request(&mut stream, &mut buf, state.config.max_body, &|| state.stopping()) {
            Ok(req) => req,
            Err(e) => {
                if let Some(status) = e.status() {
                    let r: Reply = ApiResponse::error(status, crate::error::error_chain(&e)).into();
                    let _ = http::write_response(&mut stream, &r.into(), false, false);
                    state.metrics.response(label, status);
                }
                return;
            }
        };
        let stopping = state.stopping();
        let reply = if stopping {
            ApiResponse::error(503, "the daemon is shutting down").into()
        } else {
            match listener {
                Listener::Api => state.handle_api(&req),
                Listener::Http => state.handle_dispatch(&req),
            }
        };
        let keep_alive = req.keep_alive && !state.stopping();
        let head_only = req.method == "HEAD";
        state.metrics.response(label, reply.status);
        if http::write_response(&mut stream, &reply.into(), keep_alive, head_only).is_err() || !keep_alive {
            return;
        }
    }
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    state: Arc<State>,
    acceptors: Vec<JoinHandle<()>>,
    http_addr: Option<SocketAddr>,
}

/// Asks a daemon to stop; cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct Stopper(Arc<State>);

impl Stopper {
    /// Starts the shutdown: the daemon's `wait` returns once it is done.
    pub fn stop(&self) {
        let (flag, cv) = &self.0.stop_requested;
        *lock(flag) = true;
        cv.notify_all();
    }
}

/// Binds the Unix socket with mode 0600 from the start: the umask covers the bind, so the
/// socket never exists with wider permissions.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        // A socket left by a daemon that died can go; one that answers cannot.
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another daemon listens there"));
        }
        std::fs::remove_file(path)?;
    }
    // SAFETY: umask only changes this process's file-creation mask; it is restored right
    // after the bind. The daemon has no other thread creating files at this point.
    let old = unsafe { libc::umask(0o177) };
    let result = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = result?;
    // Belt and braces: a umask cannot widen, but say the mode explicitly.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn spawn_connection<S: Read + Write + Send + 'static>(state: &Arc<State>, stream: S, listener: Listener) {
    *lock(&state.connections.0) += 1;
    let guard = ConnGuard(state.clone());
    let spawned = std::thread::Builder::new().name("mu2-conn".into()).spawn(move || {
        let state = guard.0.clone();
        serve_connection(&state, stream, listener);
        drop(guard);
    });
    if let Err(e) = spawned {
        log::warn!("no thread for a new connection: {e}");
    }
}

impl Daemon {
    /// Opens KVM, binds the listeners, builds the routes' built-in images, and starts
    /// accepting.
    pub fn start(config: ServeConfig) -> Result<Daemon, ServeError> {
        if config.pool_size == 0 || config.max_vms == 0 {
            return Err(ServeError::Config("--pool-size and --max-vms must be at least 1".into()));
        }
        if config.mode == Mode::Pool && config.pool_size >= config.max_vms {
            return Err(ServeError::Config(format!(
                "--pool-size {} leaves no room under --max-vms {}: pooled VMs count against it",
                config.pool_size, config.max_vms
            )));
        }
        let routes = Routes::new(config.routes.iter().cloned());
        for (_, image) in routes.iter() {
            if !model::valid_name(image) {
                return Err(ServeError::Config(format!("route to invalid image name `{image}`")));
            }
        }
        let hv = Arc::new(Hypervisor::open().map_err(ServeError::Hypervisor)?);
        let (images_dir, owns_images_dir) = match &config.images_dir {
            Some(dir) => (dir.clone(), false),
            None => (std::env::temp_dir().join(format!("mu2-serve-{}", std::process::id())), true),
        };
        std::fs::create_dir_all(&images_dir).map_err(ServeError::io("creating", images_dir.display()))?;
        let api = bind_private(&config.api_sock).map_err(ServeError::io("binding", config.api_sock.display()))?;
        let tcp = match config.http {
            Some(addr) => Some(TcpListener::bind(addr).map_err(ServeError::io("binding", addr))?),
            None => None,
        };
        let http_addr = tcp.as_ref().and_then(|t| t.local_addr().ok());
        let state = Arc::new(State {
            hv,
            routes,
            images_dir,
            owns_images_dir,
            images: Mutex::new(BTreeMap::new()),
            building: Mutex::new(()),
            metrics: Metrics::new(),
            in_flight: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            stop_requested: (Mutex::new(false), Condvar::new()),
            connections: (Mutex::new(0), Condvar::new()),
            next_dir: AtomicU64::new(1),
            config,
        });
        // Built-in images behind routes are built before accepting, so the first requests
        // find them (and their pools) ready. A failure leaves the route to fail per request.
        let routed: Vec<String> = state.routes.iter().map(|(_, i)| i.to_string()).collect();
        for image in routed {
            if let Err(f) = state.entry(&image) {
                log::warn!("route image `{image}`: {}", f.message);
            }
        }
        let mut acceptors = Vec::new();
        let s = state.clone();
        acceptors.push(
            std::thread::Builder::new()
                .name("mu2-api-accept".into())
                .spawn(move || {
                    for stream in api.incoming() {
                        if s.stopping() {
                            break;
                        }
                        match stream {
                            Ok(stream) => {
                                let _ = stream.set_read_timeout(Some(POLL));
                                spawn_connection(&s, stream, Listener::Api);
                            }
                            Err(e) => log::warn!("accepting on the API socket: {e}"),
                        }
                    }
                })
                .map_err(ServeError::io("spawning", "the API acceptor"))?,
        );
        if let Some(tcp) = tcp {
            let s = state.clone();
            acceptors.push(
                std::thread::Builder::new()
                    .name("mu2-http-accept".into())
                    .spawn(move || {
                        for stream in tcp.incoming() {
                            if s.stopping() {
                                break;
                            }
                            match stream {
                                Ok(stream) => {
                                    // Responses leave in one write; do not hold them back.
                                    let _ = stream.set_nodelay(true);
                                    let _ = stream.set_read_timeout(Some(POLL));
                                    spawn_connection(&s, stream, Listener::Http);
                                }
                                Err(e) => log::warn!("accepting on the HTTP listener: {e}"),
                            }
                        }
                    })
                    .map_err(ServeError::io("spawning", "the HTTP acceptor"))?,
            );
        }
        Ok(Daemon { state, acceptors, http_addr })
    }

    /// The dispatcher's bound address (useful with port 0).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// A handle that stops the daemon.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.state.clone())
    }

    /// Blocks until stopped, then shuts down: stops accepting, lets requests in flight finish
    /// (new ones get 503), destroys every VM, removes the socket and the daemon's own images.
    pub fn wait(self) {
        let state = self.state;
        {
            let (flag, cv) = &state.stop_requested;
            let mut stop = lock(flag);
            while !*stop {
                stop = cv.wait(stop).unwrap_or_else(|p| p.into_inner());
            }
        }
        log::info!("shutting down");
        state.stopping.store(true, Ordering::SeqCst);
        // Wake the acceptors, blocked in accept, with one connection each.
        let _ = UnixStream::connect(&state.config.api_sock);
        if let Some(addr) = self.http_addr {
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        }
        for a in self.acceptors {
            let _ = a.join();
        }
        // Requests in flight end within their timeout; idle connections notice the flag
        // within a read timeout.
        let until = Instant::now() + state.config.timeout + Duration::from_secs(5);
        {
            let (count, cv) = &state.connections;
            let mut n = lock(count);
            while *n > 0 && Instant::now() < until {
                n = cv.wait_timeout(n, Duration::from_millis(100)).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
            }
            if *n > 0 {
                log::warn!("{} connections still open after the drain deadline", *n);
            }
        }
        let images: Vec<Arc<Entry>> = std::mem::take(&mut *lock(&state.images)).into_values().collect();
        for entry in images {
            let (dir, owned) = (entry.dir.clone(), entry.owned);
            drop(entry);
            if owned {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        let _ = std::fs::remove_file(&state.config.api_sock);
        if state.owns_images_dir {
            let _ = std::fs::remove_dir_all(&state.images_dir);
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run_until_signal(config: ServeConfig) -> Result<(), ServeError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    // Registered first, so that a signal during startup is not lost.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(ServeError::io("installing", "signal handlers"))?;
    let handle = signals.handle();
    let daemon = Daemon::start(config)?;
    let stopper = daemon.stopper();
    let watcher = std::thread::Builder::new()
        .name("mu2-signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                stopper.stop();
            }
        })
        .map_err(ServeError::io("spawning", "the signal thread"))?;
    daemon.wait();
    handle.close();
    let _ = watcher.join();
    Ok(())
}

impl crate::error::Classify for ServeError {
    fn kind(&self) -> crate::error::FailureKind {
        match self {
            ServeError::Config(_) => crate::error::FailureKind::BadInput,
            ServeError::Hypervisor(e) => e.kind(),
            ServeError::Io { source, .. } => crate::error::io_kind(source),
        }
    }
}
