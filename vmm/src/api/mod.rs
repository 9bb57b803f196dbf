//! `mu2 serve`: the control API (HTTP/1.1 + JSON over a Unix socket) and the µ²services HTTP
//! dispatcher (TCP), on top of the fork engine. See docs/api.md.
//!
//! - [`model`]: requests and responses as plain values (unit-tested apart from sockets);
//! - [`http`]: HTTP/1.1 framing with `httparse`: requests, responses, one response parser;
//! - [`dispatch`]: the HTTP dispatcher's routes and its HTTP framing towards guests;
//! - [`metrics`]: Prometheus counters, histograms and gauges;
//! - [`client`]: a small blocking client for programs that embed mu2;
//! - [`activation`]: listeners passed by a service manager (`LISTEN_FDS`, systemd's protocol);
//! - `config`: [`ServeConfig`] and [`ServeError`];
//! - `registry`: the images, their engines, admission against `--max-vms`;
//! - `failure`: the HTTP status and metrics outcome of each kind of library failure;
//! - `handlers`: a request to its response, through the registry and an engine; readiness
//!   (`/healthz`);
//! - `listen`: the accept loop, a thread per connection, the lifecycle (draining, stopping);
//! - here: [`Daemon`] (start, stop, wait) and [`run_until_signal`].

pub mod activation;
pub mod client;
mod config;
pub mod dispatch;
mod failure;
mod files;
mod handlers;
pub mod http;
mod listen;
pub mod metrics;
pub mod model;
mod registry;
mod sandboxed;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use activation::Inherited;
pub use config::{ServeConfig, ServeError, DEFAULT_DRAIN_PERIOD};
pub use files::{FilesError, PRIVATE_DIR_PREFIX};
pub use sandboxed::{group_id, user_id, DaemonEnd, SandboxSettings};

use crate::hypervisor::Hypervisor;
use crate::sandbox::ThreadClass;
use dispatch::Routes;
use handlers::Handlers;
use listen::{lock, Endpoint, Lifecycle};
use metrics::Metrics;
use registry::Registry;

/// How long the shutdown waits for connections beyond the request timeout.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    handlers: Arc<Handlers>,
    lifecycle: Arc<Lifecycle>,
    stop_request: Arc<StopRequest>,
    acceptors: Vec<JoinHandle<()>>,
    /// Waits for the routes' pools to fill after the listeners are up.
    warm_up: Option<JoinHandle<()>>,
    /// Where the control API listens (bound, or passed by a service manager).
    api_path: Option<PathBuf>,
    /// The socket file to remove at exit: `None` when a service manager made it.
    owned_api_sock: Option<PathBuf>,
    http_addr: Option<SocketAddr>,
    timeout: Duration,
    drain_period: Duration,
    /// The sandbox in force, in words.
    sandbox: String,
}

/// Counts the [`Stopper::stop`] calls; [`Daemon::wait`] waits for them.
#[derive(Debug, Default)]
struct StopRequest {
    requests: Mutex<u32>,
    changed: Condvar,
}

impl StopRequest {
    /// Waits until at least `n` stops were asked for, or until `until`. Returns whether they
    /// were.
    fn wait_for(&self, n: u32, until: Option<Instant>) -> bool {
        let mut requests = lock(&self.requests);
        while *requests < n {
            let wait = match until {
                None => Duration::from_secs(3600),
                Some(until) => match until.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return false,
                },
            };
            requests = self.changed.wait_timeout(requests, wait).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }
}

/// Asks a daemon to stop; cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct Stopper(Arc<StopRequest>);

impl Stopper {
    /// Starts the shutdown: the drain period first, then the daemon's `wait` returns once
    /// the shutdown is done. A second call during the drain period cuts it short.
    pub fn stop(&self) {
        *lock(&self.0.requests) += 1;
        self.0.changed.notify_all();
    }
}

impl Daemon {
    /// Opens KVM, binds the listeners, builds the routes' built-in images, starts accepting,
    /// and waits for the routes' pools in the background (`/healthz` answers 503 until they
    /// are full).
    pub fn start(config: ServeConfig) -> Result<Daemon, ServeError> {
        Self::start_with(config, Inherited::default())
    }

    /// [`Daemon::start`], using the listeners in `inherited` (socket activation) instead of
    /// binding them.
    pub fn start_with(config: ServeConfig, inherited: Inherited) -> Result<Daemon, ServeError> {
        Self::start_confined(config, inherited, &sandboxed::Prepared::default())
    }

    /// [`Daemon::start_with`], confined at the end of its start-up as `config.sandbox` and
    /// what a supervisor `prepared` say.
    fn start_confined(
        config: ServeConfig,
        inherited: Inherited,
        prepared: &sandboxed::Prepared,
    ) -> Result<Daemon, ServeError> {
        config.validate(inherited.http.is_some())?;
        // Descriptors for every connection the caps allow, and the VMs' (each VM holds a few),
        // so that the caps and not EMFILE are what refuse work.
        let wanted = (config.max_connections as u64)
            .saturating_mul(2)
            .saturating_add((config.max_vms as u64).saturating_mul(8))
            .saturating_add(256);
        match crate::sys::raise_descriptor_limit(wanted) {
            Ok(soft) if soft < wanted => {
                log::warn!("descriptor limit {soft} is below the {wanted} the limits may need; accepts may fail first")
            }
            Ok(_) => {}
            Err(e) => log::warn!("raising the descriptor limit: {e}"),
        }
        let routes = Routes::new(config.routes.iter().cloned());
        let hv = Arc::new(Hypervisor::open().map_err(ServeError::Hypervisor)?);
        let images = files::ImagesDir::prepare(config.images_dir.as_deref()).map_err(ServeError::Files)?;
        let mut made = Made { images_dir: images.owned().then(|| images.path().to_path_buf()), api_sock: None };
        let (api_passed, http_passed) = (inherited.api.is_some(), inherited.http.is_some());
        let api = match inherited.api {
            Some(listener) => listener,
            None => {
                let listener = listen::bind_private(&config.api_sock).map_err(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => ServeError::NotASocket(config.api_sock.clone()),
                    _ => ServeError::io("binding", config.api_sock.display())(e),
                })?;
                made.api_sock = Some(config.api_sock.clone());
                listener
            }
        };
        let api_path = api.local_addr().ok().and_then(|a| a.as_pathname().map(PathBuf::from));
        let owned_api_sock = made.api_sock.clone();
        let tcp = match (inherited.http, config.http) {
            (Some(listener), wanted) => {
                let at =
                    listener.local_addr().map_err(ServeError::io("reading the address of", "the passed socket"))?;
                if wanted.is_some_and(|w| w != at) {
                    log::warn!("dispatcher on the passed socket {at}, not --http {}", wanted.unwrap_or(at));
                }
                Some(listener)
            }
            (None, Some(addr)) => Some(TcpListener::bind(addr).map_err(ServeError::io("binding", addr))?),
            (None, None) => None,
        };
        let http_addr = tcp.as_ref().and_then(|t| t.local_addr().ok());
        // Confined now, before the daemon starts a thread: everything it needs is open.
        let sandbox = match &config.sandbox {
            Some(settings) => sandboxed::enter(settings, prepared, &images)?,
            None => "none".to_string(),
        };
        let lifecycle = Arc::new(Lifecycle::default());
        let metrics = Arc::new(Metrics::new());
        let registry = Registry::new(hv, &config, images, lifecycle.clone());
        let (timeout, drain_period, max_connections) = (config.timeout, config.drain_period, config.max_connections);
        let limits = http::ReadLimits {
            max_body: config.max_body,
            read_timeout: config.read_timeout,
            bodies: Some(crate::budget::ByteBudget::new(config.max_buffered)),
        };
        let handlers = Arc::new(Handlers::new(config, routes, registry, metrics.clone(), lifecycle.clone()));
        if let Err(e) = handlers.prepare_routes() {
            handlers.registry().clear();
            return Err(e);
        }
        let endpoint = |label, handler: Arc<listen::Handler>, passed: bool| Endpoint {
            label,
            handler,
            answer_backlog_on_stop: !passed,
            limits: limits.clone(),
            max_connections,
            open: Default::default(),
            lifecycle: lifecycle.clone(),
            metrics: metrics.clone(),
            accept_failures: mu2_devices::throttle::Throttled::new(listen::ACCEPT_LOG_INTERVAL),
        };
        let mut acceptors = Vec::new();
        let h = handlers.clone();
        acceptors.push(spawn_acceptor(
            api,
            endpoint("api", Arc::new(move |r| h.api(r)), api_passed),
            "the API acceptor",
        )?);
        if let Some(tcp) = tcp {
            let h = handlers.clone();
            acceptors.push(spawn_acceptor(
                tcp,
                endpoint("http", Arc::new(move |r| h.dispatch(r)), http_passed),
                "the HTTP acceptor",
            )?);
        }
        let h = handlers.clone();
        let warm_up = crate::sandbox::spawn(ThreadClass::Main, "mu2-warm-up".into(), move || h.wait_for_pools())
            .map_err(ServeError::io("spawning", "the warm-up thread"))?;
        made.keep();
        Ok(Daemon {
            handlers,
            lifecycle,
            stop_request: Arc::default(),
            acceptors,
            warm_up: Some(warm_up),
            api_path,
            owned_api_sock,
            http_addr,
            timeout,
            drain_period,
            sandbox,
        })
    }

    /// The sandbox in force, in words (`none` without one).
    pub fn sandbox(&self) -> &str {
        &self.sandbox
    }

    /// The dispatcher's bound address (useful with port 0).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Where the control API listens: `--api-sock`, or the socket a service manager passed.
    pub fn api_sock(&self) -> Option<&Path> {
        self.api_path.as_deref()
    }

    /// A handle that stops the daemon.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.stop_request.clone())
    }

    /// Blocks until stopped, then drains and shuts down: for the drain period `/healthz`
    /// answers 503 while requests are still served; then the daemon stops accepting, lets
    /// requests in flight finish (new ones get 503), destroys every VM, removes the socket
    /// and the daemon's own images.
    pub fn wait(mut self) {
        self.stop_request.wait_for(1, None);
        if !self.drain_period.is_zero() {
            log::info!("draining for {:?}: /healthz answers 503, requests are still served", self.drain_period);
            self.lifecycle.begin_drain();
            if self.stop_request.wait_for(2, Some(Instant::now() + self.drain_period)) {
                log::info!("asked again to stop: the drain period is cut short");
            }
        }
        log::info!("shutting down");
        self.lifecycle.stop();
        // Each acceptor sees the flag within its poll interval and closes its listener.
        for acceptor in std::mem::take(&mut self.acceptors) {
            let _ = acceptor.join();
        }
        // Requests in flight end within their timeout; idle connections notice the flag
        // within a read timeout.
        let open =
            self.lifecycle.drain(Instant::now() + self.handlers.registry().longest_timeout(self.timeout) + DRAIN_GRACE);
        if open > 0 {
            log::warn!("{open} connections still open after the drain deadline");
        }
        if let Some(warm_up) = self.warm_up.take() {
            let _ = warm_up.join();
        }
        self.handlers.registry().clear();
        if let Some(sock) = &self.owned_api_sock {
            let _ = std::fs::remove_file(sock);
        }
    }
}

fn spawn_acceptor<L: listen::Listen>(
    listener: L,
    endpoint: Endpoint,
    what: &'static str,
) -> Result<JoinHandle<()>, ServeError> {
    listen::spawn_acceptor(listener, endpoint).map_err(ServeError::io("starting", what))
}

/// What `Daemon::start` made on disk: removed again if the start fails half-way (a port in
/// use, an image that cannot be built), so a failed start leaves nothing behind.
struct Made {
    images_dir: Option<PathBuf>,
    api_sock: Option<PathBuf>,
}

impl Made {
    /// The start succeeded: the daemon removes them when it stops.
    fn keep(mut self) {
        self.images_dir = None;
        self.api_sock = None;
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        if let Some(sock) = &self.api_sock {
            let _ = std::fs::remove_file(sock);
        }
        if let Some(dir) = &self.images_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM, on the listeners a service manager passed
/// (`LISTEN_FDS`) or else on its own; `started` is called once it accepts requests. A second
/// signal cuts the drain period short. Sandboxed and started as root, the daemon runs in a
/// child process under a supervisor (see `sandboxed`), and a failure of the child is
/// [`ServeError::Daemon`].
pub fn run_until_signal(config: ServeConfig, started: impl FnOnce(&Daemon)) -> Result<(), ServeError> {
    // First, before any descriptor of this process's own is opened: the passed ones are
    // numbered from 3. The supervisor takes them, and its child inherits them by the fork.
    let inherited = activation::from_env().map_err(ServeError::Activation)?;
    if sandboxed::supervised(&config) {
        let owns_api_sock = inherited.api.is_none();
        return sandboxed::supervise(config, owns_api_sock, move |config, prepared| {
            serve_until_signal(config, inherited, &prepared, started)
        });
    }
    serve_until_signal(config, inherited, &sandboxed::Prepared::default(), started)
}

fn serve_until_signal(
    config: ServeConfig,
    inherited: Inherited,
    prepared: &sandboxed::Prepared,
    started: impl FnOnce(&Daemon),
) -> Result<(), ServeError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    // Registered first, so that a signal during startup is not lost.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(ServeError::io("installing", "signal handlers"))?;
    let handle = signals.handle();
    let daemon = Daemon::start_confined(config, inherited, prepared)?;
    started(&daemon);
    // From here the main thread only waits and shuts down.
    crate::sandbox::enter(ThreadClass::Main);
    let stopper = daemon.stopper();
    let watcher = crate::sandbox::spawn(ThreadClass::Main, "mu2-signals".into(), move || {
        for _ in signals.forever() {
            stopper.stop();
        }
    })
    .map_err(ServeError::io("spawning", "the signal thread"))?;
    daemon.wait();
    handle.close();
    let _ = watcher.join();
    Ok(())
}
