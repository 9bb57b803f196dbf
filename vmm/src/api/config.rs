//! The daemon's settings (`mu2 serve` flags) and why it could not start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::activation::ActivationError;
use super::dispatch::{Routes, DAEMON_PATHS};
use super::model;
use crate::error::{Classify, FailureKind};
use crate::fork::{EngineConfig, Mode};
use crate::hypervisor::HypervisorError;
use crate::invoke;

/// The drain period unless told otherwise: long enough for a load balancer checking every
/// second or two to see two failed checks.
pub const DEFAULT_DRAIN_PERIOD: Duration = Duration::from_secs(5);

/// The default of `--max-buffered`: 256 MiB of request bodies buffered at once.
pub const DEFAULT_MAX_BUFFERED: usize = 256 << 20;
/// The default of `--max-connections`, per listener.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// The default of `--max-response-bytes`: 1 GiB of responses buffered at once.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1 << 30;

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
    /// Most live KVM VMs: serving, pooled, being reset or destroyed.
    pub max_vms: usize,
    /// Most guest memory of the live VMs, bytes (each counts its whole memory size).
    pub max_memory: u64,
    /// Most response bytes buffered at once, of all requests.
    pub max_response_bytes: usize,
    /// Deadline of one request's run in its VM.
    pub timeout: Duration,
    /// Largest request body.
    pub max_body: usize,
    /// Request bodies buffered at once across connections, bytes.
    pub max_buffered: usize,
    /// How long a request may take to arrive, from its first byte.
    pub read_timeout: Duration,
    /// Most connections open at once, per listener.
    pub max_connections: usize,
    /// Largest response from a guest.
    pub max_response: usize,
    /// The sandbox, if any (`mu2 serve` has one unless `--no-sandbox`).
    pub sandbox: Option<super::SandboxSettings>,
    /// How long the daemon reports not-ready on `/healthz`, still serving, between SIGTERM
    /// and the shutdown (zero: none).
    pub drain_period: Duration,
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
            max_memory: crate::sys::physical_memory().unwrap_or(8 << 30),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            timeout: Duration::from_secs(10),
            max_body: 8 << 20,
            max_buffered: DEFAULT_MAX_BUFFERED,
            read_timeout: super::http::DEFAULT_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_response: invoke::DEFAULT_MAX_RESPONSE,
            sandbox: None,
            drain_period: DEFAULT_DRAIN_PERIOD,
        }
    }

    /// Refuses settings the daemon cannot run with; `passed_http` says a service manager
    /// passed the dispatcher's listener (socket activation), which stands in for `--http`.
    pub(super) fn validate(&self, passed_http: bool) -> Result<(), ServeError> {
        if self.pool_size == 0 || self.max_vms == 0 {
            return Err(ServeError::Config("--pool-size and --max-vms must be at least 1".into()));
        }
        if self.max_connections == 0 || self.read_timeout.is_zero() {
            return Err(ServeError::Config("--max-connections and --read-timeout must be above zero".into()));
        }
        if self.max_response_bytes < self.max_response {
            return Err(ServeError::Config(format!(
                "--max-response-bytes {} is below the largest response {}: no response of that size could be buffered",
                self.max_response_bytes, self.max_response
            )));
        }
        if self.max_buffered < self.max_body {
            return Err(ServeError::Config(format!(
                "--max-buffered {} is below --max-body {}: no request of the largest size could be read",
                self.max_buffered, self.max_body
            )));
        }
        if matches!(self.mode, Mode::Pool | Mode::Reuse) && self.pool_size >= self.max_vms {
            return Err(ServeError::Config(format!(
                "--pool-size {} leaves no room under --max-vms {}: pooled and kept VMs count against it",
                self.pool_size, self.max_vms
            )));
        }
        if let Some((_, image)) = self.routes.iter().find(|(_, image)| !model::valid_name(image)) {
            return Err(ServeError::Config(format!("route to invalid image name `{image}`")));
        }
        if let Some((prefix, _)) = Routes::new(self.routes.iter().cloned()).shadowed() {
            return Err(ServeError::Config(format!(
                "route {prefix}: the daemon answers {} itself on the dispatcher's port",
                DAEMON_PATHS.join(" and ")
            )));
        }
        // Routes are fixed at start, and only the built-in guests are images by then.
        if let Some((prefix, image)) = self.routes.iter().find(|(_, image)| crate::guests::find(image).is_none()) {
            return Err(ServeError::Config(format!(
                "--route {prefix}={image}: no built-in guest `{image}` (a route names one of `mu2 guests`)"
            )));
        }
        if self.http.is_none() && !passed_http {
            if let Some((prefix, image)) = self.routes.first() {
                return Err(ServeError::Config(format!(
                    "--route {prefix}={image} without --http: routes belong to the HTTP dispatcher, which --http ADDR starts"
                )));
            }
        }
        Ok(())
    }

    /// The budget every image's VMs share.
    pub(super) fn budget(&self) -> std::sync::Arc<crate::budget::VmBudget> {
        crate::budget::VmBudget::new(crate::budget::Limits {
            max_vms: self.max_vms,
            max_memory: self.max_memory,
            max_response_bytes: self.max_response_bytes,
        })
    }

    /// The engine settings every image gets.
    pub(super) fn engine_config(&self) -> EngineConfig {
        EngineConfig { mode: self.mode, pool_size: self.pool_size, pool_builders: 2, max_response: self.max_response }
    }
}

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
    /// The listeners passed by a service manager are unusable.
    #[error("socket activation")]
    Activation(#[source] ActivationError),
    /// /dev/kvm could not be opened.
    #[error("opening KVM")]
    Hypervisor(#[source] HypervisorError),
    /// The image a route names could not be made.
    #[error("--route {prefix}={image}")]
    Route {
        /// The route's path prefix.
        prefix: String,
        /// The image it names.
        image: String,
        /// Why the image could not be made (boxed: the error is large, and rare).
        #[source]
        source: Box<crate::source::SourceError>,
    },
    /// A route names an image the daemon cannot serve (no such built-in guest, or the daemon
    /// refused it).
    #[error("--route {prefix}={image}")]
    RouteRefused {
        /// The route's path prefix.
        prefix: String,
        /// The image it names.
        image: String,
        /// Why (the registry's refusal; its type is the daemon's own).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Something other than a stale socket is at the `--api-sock` path.
    #[error("--api-sock {0}: something other than a socket is there; refusing to replace it")]
    NotASocket(PathBuf),
    /// The images directory is unusable.
    #[error(transparent)]
    Files(super::files::FilesError),
    /// The sandbox could not be set up.
    #[error("sandbox")]
    Sandbox(#[source] crate::sandbox::SandboxError),
    /// The sandboxed daemon, a child process, did not end cleanly.
    #[error(transparent)]
    Daemon(super::DaemonEnd),
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
    /// A mapper from an I/O error to [`ServeError::Io`] doing `what` on `path`.
    pub(super) fn io(what: &'static str, path: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ServeError {
        let path = path.to_string();
        move |source| ServeError::Io { what, path, source }
    }
}

impl Classify for ServeError {
    fn kind(&self) -> FailureKind {
        match self {
            ServeError::Config(_) | ServeError::Activation(_) => FailureKind::BadInput,
            ServeError::Hypervisor(e) => e.kind(),
            ServeError::Route { source, .. } => source.kind(),
            ServeError::RouteRefused { .. } => FailureKind::BadInput,
            ServeError::NotASocket(_) => FailureKind::BadInput,
            ServeError::Files(e) => e.kind(),
            ServeError::Sandbox(e) => e.kind(),
            ServeError::Daemon(_) => FailureKind::Internal,
            ServeError::Io { source, .. } => crate::error::io_kind(source),
        }
    }
}
