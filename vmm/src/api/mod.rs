//! `mu2 serve`: the control API (HTTP/1.1 + JSON over a Unix socket) and the µ²services HTTP
//! dispatcher (TCP), on top of the fork engine. See docs/api.md.
//!
//! - [`model`]: requests and responses as plain values (unit-tested apart from sockets);
//! - [`http`]: HTTP/1.1 framing with `httparse`: requests, responses, one response parser;
//! - [`dispatch`]: the HTTP dispatcher's routes and its HTTP framing towards guests;
//! - [`metrics`]: Prometheus counters, histograms and gauges;
//! - [`client`]: a small blocking client for programs that embed mu2;
//! - `config`: [`ServeConfig`] and [`ServeError`];
//! - `registry`: the images, their engines, admission against `--max-vms`;
//! - `failure`: the HTTP status and metrics outcome of each kind of library failure;
//! - `handlers`: a request to its response, through the registry and an engine;
//! - `listen`: the accept loop, a thread per connection, the stop flag;
//! - here: [`Daemon`] (start, stop, wait) and [`run_until_signal`].

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
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use config::{ServeConfig, ServeError};
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
    /// Descriptors of the listeners, to stop their accept loops with shutdown(2).
    wakers: Vec<std::os::fd::OwnedFd>,
    api_sock: PathBuf,
    http_addr: Option<SocketAddr>,
    timeout: Duration,
    sandbox: String,
}

/// Set once by a [`Stopper`]; [`Daemon::wait`] waits for it.
#[derive(Debug, Default)]
struct StopRequest {
    requested: Mutex<bool>,
    changed: Condvar,
}

/// Asks a daemon to stop; cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct Stopper(Arc<StopRequest>);

impl Stopper {
    /// Starts the shutdown: the daemon's `wait` returns once it is done.
    pub fn stop(&self) {
        *lock(&self.0.requested) = true;
        self.0.changed.notify_all();
    }
}

impl Daemon {
    /// Opens KVM, binds the listeners, builds the routes' built-in images, and starts
    /// accepting.
    pub fn start(config: ServeConfig) -> Result<Daemon, ServeError> {
        Self::start_prepared(config, &sandboxed::Prepared::default())
    }

    /// [`Daemon::start`], confined at the end of its start-up as `config.sandbox` and what a
    /// supervisor `prepared` say.
    fn start_prepared(config: ServeConfig, prepared: &sandboxed::Prepared) -> Result<Daemon, ServeError> {
        config.validate()?;
        let routes = Routes::new(config.routes.iter().cloned());
        let hv = Arc::new(Hypervisor::open().map_err(ServeError::Hypervisor)?);
        let images = files::ImagesDir::prepare(config.images_dir.as_deref()).map_err(ServeError::Files)?;
        let mut made = Made { images_dir: images.owned().then(|| images.path().to_path_buf()), api_sock: None };
        let api = listen::bind_private(&config.api_sock).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => ServeError::NotASocket(config.api_sock.clone()),
            _ => ServeError::io("binding", config.api_sock.display())(e),
        })?;
        made.api_sock = Some(config.api_sock.clone());
        let tcp = match config.http {
            Some(addr) => Some(TcpListener::bind(addr).map_err(ServeError::io("binding", addr))?),
            None => None,
        };
        let http_addr = tcp.as_ref().and_then(|t| t.local_addr().ok());
        let mut wakers = vec![api.try_clone().map_err(ServeError::io("duplicating", "the API socket"))?.into()];
        if let Some(tcp) = &tcp {
            wakers.push(tcp.try_clone().map_err(ServeError::io("duplicating", "the HTTP socket"))?.into());
        }
        // Confined now, before the daemon starts a thread: everything it needs is open.
        let sandbox = match &config.sandbox {
            Some(settings) => sandboxed::enter(settings, prepared, &images)?,
            None => "none".to_string(),
        };
        let lifecycle = Arc::new(Lifecycle::default());
        let metrics = Arc::new(Metrics::new());
        let registry = Registry::new(hv, &config, images, lifecycle.clone());
        let (api_sock, timeout, max_body) = (config.api_sock.clone(), config.timeout, config.max_body);
        let handlers = Arc::new(Handlers::new(config, routes, registry, metrics.clone(), lifecycle.clone()));
        if let Err(e) = handlers.prepare_routes() {
            handlers.registry().clear();
            return Err(e);
        }
        let endpoint = |label, handler: Arc<listen::Handler>| Endpoint {
            label,
            handler,
            max_body,
            lifecycle: lifecycle.clone(),
            metrics: metrics.clone(),
        };
        let mut acceptors = Vec::new();
        let h = handlers.clone();
        acceptors.push(
            listen::spawn_acceptor(api, endpoint("api", Arc::new(move |r| h.api(r))))
                .map_err(ServeError::io("spawning", "the API acceptor"))?,
        );
        if let Some(tcp) = tcp {
            let h = handlers.clone();
            acceptors.push(
                listen::spawn_acceptor(tcp, endpoint("http", Arc::new(move |r| h.dispatch(r))))
                    .map_err(ServeError::io("spawning", "the HTTP acceptor"))?,
            );
        }
        made.keep();
        Ok(Daemon {
            handlers,
            lifecycle,
            stop_request: Arc::default(),
            acceptors,
            wakers,
            api_sock,
            http_addr,
            timeout,
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

    /// A handle that stops the daemon.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.stop_request.clone())
    }

    /// Blocks until stopped, then shuts down: stops accepting, lets requests in flight finish
    /// (new ones get 503), destroys every VM, removes the socket and the daemon's own images.
    pub fn wait(self) {
        {
            let mut requested = lock(&self.stop_request.requested);
            while !*requested {
                requested = self.stop_request.changed.wait(requested).unwrap_or_else(|p| p.into_inner());
            }
        }
        log::info!("shutting down");
        self.lifecycle.stop();
        // Wake the acceptors, blocked in accept: shut down, their sockets accept no more.
        for waker in &self.wakers {
            use std::os::fd::AsFd;
            if let Err(e) = crate::sys::shutdown_listener(waker.as_fd()) {
                log::warn!("stopping an accept loop: {e}");
            }
        }
        for acceptor in self.acceptors {
            let _ = acceptor.join();
        }
        // Requests in flight end within their timeout; idle connections notice the flag
        // within a read timeout.
        let open =
            self.lifecycle.drain(Instant::now() + self.handlers.registry().longest_timeout(self.timeout) + DRAIN_GRACE);
        if open > 0 {
            log::warn!("{open} connections still open after the drain deadline");
        }
        self.handlers.registry().clear();
        let _ = std::fs::remove_file(&self.api_sock);
    }
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

/// Runs the daemon until SIGINT or SIGTERM; `started` is called once it accepts requests.
/// Sandboxed and started as root, the daemon runs in a child process under a supervisor (see
/// `sandboxed`), and a failure of the child is [`ServeError::Daemon`].
pub fn run_until_signal(config: ServeConfig, started: impl FnOnce(&Daemon)) -> Result<(), ServeError> {
    if sandboxed::supervised(&config) {
        return sandboxed::supervise(config, |config, prepared| serve_until_signal(config, &prepared, started));
    }
    serve_until_signal(config, &sandboxed::Prepared::default(), started)
}

fn serve_until_signal(
    config: ServeConfig,
    prepared: &sandboxed::Prepared,
    started: impl FnOnce(&Daemon),
) -> Result<(), ServeError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    // Registered first, so that a signal during startup is not lost.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(ServeError::io("installing", "signal handlers"))?;
    let handle = signals.handle();
    let daemon = Daemon::start_prepared(config, prepared)?;
    started(&daemon);
    // From here the main thread only waits and shuts down.
    crate::sandbox::enter(ThreadClass::Main);
    let stopper = daemon.stopper();
    let watcher = crate::sandbox::spawn(ThreadClass::Main, "mu2-signals".into(), move || {
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
