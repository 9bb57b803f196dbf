//! The handlers: a control-API request ([`ApiRequest`]) to its [`ApiResponse`], and a
//! dispatcher request to the guest's answer. Both run a request in a VM the same way
//! ([`Handlers::run`]: admission, [`Engine::serve`](crate::fork::Engine::serve), metrics) and
//! answer a failure the same way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::config::{ServeConfig, ServeError};
use super::dispatch::{self, DispatchError, Routes};
use super::failure;
use super::http::{Held, Request, Response};
use super::listen::Lifecycle;
use super::metrics::{self, Gauges, Metrics, Outcome};
use super::model::{self, ApiRequest, ApiResponse, ModelError};
use super::registry::{AdmissionError, Entry, Registry, RegistryError};
use crate::error::{error_chain, Classify};
use crate::fork::{Engine, ForkError, Mode, Served};
use crate::guests;
use crate::invoke::RequestTooLarge;

/// How long the warm-up waits for the routes' pools to fill before it moves on (a pool that
/// fills later still makes the daemon ready: readiness is looked at on every `/healthz`).
const POOL_FILL_WAIT: Duration = Duration::from_secs(60);

/// A pool-mode engine's pool that is not full yet: (VMs ready, pool size).
fn pool_short(engine: &Engine) -> Option<(usize, usize)> {
    let (depth, size) = (engine.pool_depth(), engine.config().pool_size);
    (engine.mode() == Mode::Pool && depth < size).then_some((depth, size))
}

/// Whether the daemon should get traffic, as `/healthz` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Readiness {
    /// Every route's image is loaded and its pool was filled: 200.
    Ready,
    /// Still warming up, waiting for what is listed: 503.
    Starting(Vec<String>),
    /// SIGTERM received, the drain period runs: 503 while requests are still served.
    Draining,
    /// Shutting down: 503.
    Stopping,
}

impl Readiness {
    fn label(&self) -> &'static str {
        match self {
            Readiness::Ready => "ready",
            Readiness::Starting(_) => "starting",
            Readiness::Draining => "draining",
            Readiness::Stopping => "stopping",
        }
    }
}

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// Not a control-API request.
    #[error(transparent)]
    Request(#[from] ModelError),
    /// The registry refused or could not make the image.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// No VM for it under `--max-vms`.
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    /// No dispatcher route matches the path.
    #[error("no route for {0}")]
    NoRoute(String),
    /// The request is larger than the image's guest can hold.
    #[error("image `{image}`")]
    TooLarge {
        /// The image.
        image: String,
        /// The limit, and how to raise it.
        #[source]
        source: RequestTooLarge,
    },
    /// The engine could not serve it.
    #[error("image `{image}`")]
    Serve {
        /// The image.
        image: String,
        /// Why.
        #[source]
        source: ForkError,
    },
    /// The guest's answer is not an HTTP response.
    #[error("image `{image}`")]
    Answer {
        /// The image.
        image: String,
        /// Why.
        #[source]
        source: DispatchError,
    },
}

impl Failure {
    fn status(&self) -> u16 {
        match self {
            Failure::Request(e) => e.status(),
            Failure::Registry(e) => e.status(),
            Failure::Admission(e) => e.status(),
            Failure::NoRoute(_) => 404,
            Failure::TooLarge { .. } => 413,
            Failure::Serve { source, .. } => failure::status(source.kind()),
            Failure::Answer { source, .. } => failure::status(source.kind()),
        }
    }

    /// How `mu2_requests_total` counts a request that ran into this.
    fn outcome(&self) -> Outcome {
        match self {
            Failure::Serve { source, .. } => failure::outcome(source.kind()),
            Failure::Answer { source, .. } => failure::outcome(source.kind()),
            Failure::Registry(RegistryError::Build { source, .. }) => failure::outcome(source.kind()),
            Failure::Request(_)
            | Failure::Registry(_)
            | Failure::Admission(_)
            | Failure::NoRoute(_)
            | Failure::TooLarge { .. } => Outcome::Rejected,
        }
    }

    fn response(&self) -> ApiResponse {
        let response = ApiResponse::error(self.status(), error_chain(self));
        match self {
            Failure::Request(e) => match e.allowed_methods() {
                Some(allowed) => response.with_header("allow", allowed),
                None => response,
            },
            _ => response,
        }
    }
}

/// What the engine reports of a request's VM, sent back as `x-mu2-*` headers.
#[derive(Debug, Clone)]
struct Timing {
    vm_id: u64,
    fork_us: f64,
    run_us: f64,
    /// The response's share of `--max-response-bytes`, held until the reply is written.
    held: Held,
}

impl Timing {
    /// The timing headers of a request that began at `start`.
    fn headers(&self, start: Instant) -> [(&'static str, String); 4] {
        [
            ("x-mu2-vm-id", self.vm_id.to_string()),
            ("x-mu2-fork-us", format!("{:.1}", self.fork_us)),
            ("x-mu2-run-us", format!("{:.1}", self.run_us)),
            ("x-mu2-total-us", format!("{:.1}", start.elapsed().as_secs_f64() * 1e6)),
        ]
    }
}

/// What the handlers share: the settings, the routes, the images, the metrics.
#[derive(Debug)]
pub(super) struct Handlers {
    config: ServeConfig,
    routes: Routes,
    registry: Registry,
    metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
    /// Set once every route's image was loaded with a full pool; stays set, so that a pool
    /// drained by load does not turn the daemon unready.
    warmed: AtomicBool,
}

impl Handlers {
    /// Handlers over `registry`.
    pub(super) fn new(
        config: ServeConfig,
        routes: Routes,
        registry: Registry,
        metrics: Arc<Metrics>,
        lifecycle: Arc<Lifecycle>,
    ) -> Self {
        Handlers { config, routes, registry, metrics, lifecycle, warmed: AtomicBool::new(false) }
    }

    /// The images.
    pub(super) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Builds the built-in images behind routes before the daemon listens (their pools start
    /// filling; [`Handlers::wait_for_pools`] waits for them). A route that cannot be served
    /// stops the start.
    pub(super) fn prepare_routes(&self) -> Result<(), ServeError> {
        for (prefix, image) in self.routes.iter() {
            let (prefix, image) = (prefix.to_string(), image.to_string());
            match self.registry.entry(&image) {
                Ok(_) => {}
                Err(RegistryError::Build { source, .. }) => {
                    return Err(ServeError::Route { prefix, image, source: Box::new(source) })
                }
                Err(e) => return Err(ServeError::RouteRefused { prefix, image, source: Box::new(e) }),
            }
        }
        Ok(())
    }

    /// Waits until the routes' pools are full (pool mode), so that the first requests find
    /// them ready; `/healthz` answers 503 until then. Runs on the warm-up thread, after the
    /// listeners are up; ends early if the daemon stops.
    pub(super) fn wait_for_pools(&self) {
        let until = Instant::now() + POOL_FILL_WAIT;
        for (_, image) in self.routes.iter() {
            // Not the engine's own wait: a shutdown must not wait for a pool to fill. The
            // entry is looked up again each time, so that an image deleted meanwhile is
            // dropped (its VMs with it) rather than kept alive by this wait.
            while Instant::now() < until && !self.lifecycle.stopping() {
                match self.registry.get(image) {
                    Some(entry) if pool_short(entry.engine()).is_some() => {}
                    _ => break,
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        match self.readiness() {
            Readiness::Ready => log::info!("ready: every route's image is loaded and its pool full"),
            Readiness::Starting(waiting) => log::warn!("not ready: waiting for {}", waiting.join(", ")),
            Readiness::Draining | Readiness::Stopping => {}
        }
    }

    /// Whether the daemon should get traffic now.
    pub(super) fn readiness(&self) -> Readiness {
        if self.lifecycle.stopping() {
            return Readiness::Stopping;
        }
        if self.lifecycle.draining() {
            return Readiness::Draining;
        }
        if self.warmed.load(Ordering::SeqCst) {
            return Readiness::Ready;
        }
        let mut waiting = Vec::new();
        for (_, image) in self.routes.iter() {
            match self.registry.get(image) {
                None => waiting.push(format!("image `{image}`")),
                Some(entry) => {
                    if let Some((depth, size)) = pool_short(entry.engine()) {
                        waiting.push(format!("image `{image}`: {depth} of {size} VMs pooled"));
                    }
                }
            }
        }
        if !waiting.is_empty() {
            return Readiness::Starting(waiting);
        }
        self.warmed.store(true, Ordering::SeqCst);
        Readiness::Ready
    }

    /// `GET /healthz`: 200 when ready, else 503; a small JSON body says why.
    fn healthz(&self) -> ApiResponse {
        let readiness = self.readiness();
        let status = if readiness == Readiness::Ready { 200 } else { 503 };
        match readiness {
            Readiness::Starting(waiting) => {
                ApiResponse::json(status, &json!({ "status": "starting", "waiting_for": waiting }))
            }
            other => ApiResponse::json(status, &json!({ "status": other.label() })),
        }
    }

    fn metrics_response(&self) -> ApiResponse {
        ApiResponse::bytes(200, metrics::CONTENT_TYPE, self.metrics.render(&self.gauges()).into_bytes())
    }

    /// Answers a request on the control API's socket.
    pub(super) fn api(&self, request: Request) -> Response {
        match model::parse(&request.method, &request.target, request.body) {
            Ok(request) => self.handle(request),
            Err(e) => Failure::from(e).response(),
        }
        .into()
    }

    /// Answers a control-API request.
    pub(super) fn handle(&self, request: ApiRequest) -> ApiResponse {
        self.try_handle(request).unwrap_or_else(|f| f.response())
    }

    fn try_handle(&self, request: ApiRequest) -> Result<ApiResponse, Failure> {
        match request {
            ApiRequest::Health => Ok(ApiResponse::json(200, &self.health())),
            ApiRequest::Metrics => Ok(self.metrics_response()),
            ApiRequest::ListImages => {
                let (images, available) = self.registry.list();
                Ok(ApiResponse::json(200, &json!({ "images": images, "builtin_available": available })))
            }
            ApiRequest::GetImage { name } => match self.registry.get(&name) {
                Some(e) => Ok(ApiResponse::json(200, &e.describe())),
                None if guests::find(&name).is_some() => Ok(ApiResponse::json(
                    200,
                    &json!({ "name": name, "ready": false, "source": { "function": name },
                             "note": "built-in: built on first use" }),
                )),
                None => Err(RegistryError::NotFound(name).into()),
            },
            ApiRequest::DeleteImage { name } => {
                self.registry.delete(&name)?;
                Ok(ApiResponse::json(200, &json!({ "deleted": name })))
            }
            ApiRequest::PutImage { name, spec, serve } => {
                let entry = self.registry.create(&name, &spec, &serve)?;
                Ok(ApiResponse::json(201, &entry.describe()))
            }
            ApiRequest::Invoke { name, body } => {
                let start = Instant::now();
                let entry = self.registry.entry(&name)?;
                let (response, timing) = self.run(&entry, &body, Ok)?;
                let mut reply = ApiResponse::bytes(200, "application/octet-stream", response);
                for (name, value) in timing.headers(start) {
                    reply = reply.with_header(name, value);
                }
                Ok(reply.holding(timing.held))
            }
        }
    }

    /// Answers a request on the dispatcher's port: `/healthz` and `/metrics` itself, any other
    /// path by the route's image in a new VM.
    pub(super) fn dispatch(&self, request: Request) -> Response {
        if let Some(path) = dispatch::daemon_path(&request.target) {
            return self.daemon_path(path, &request.method).into();
        }
        self.try_dispatch(request).unwrap_or_else(|f| f.response().into())
    }

    fn daemon_path(&self, path: &'static str, method: &str) -> ApiResponse {
        if method != "GET" && method != "HEAD" {
            return ApiResponse::error(405, format!("{path} takes GET or HEAD")).with_header("allow", "GET, HEAD");
        }
        if path == dispatch::HEALTHZ_PATH {
            self.healthz()
        } else {
            self.metrics_response()
        }
    }

    fn try_dispatch(&self, request: Request) -> Result<Response, Failure> {
        let start = Instant::now();
        let Some((prefix, image)) = self.routes.find(&request.target) else {
            let path = request.target.split('?').next().unwrap_or_default();
            return Err(Failure::NoRoute(path.to_string()));
        };
        let entry = self.registry.entry(image)?;
        let (mut response, timing) = if entry.http() {
            let input =
                dispatch::encode_request(&request.method, &request.target, &request.headers, prefix, &request.body);
            self.run(&entry, &input, |answer| {
                dispatch::decode_response(answer, entry.engine().config().max_response)
                    .map_err(|source| Failure::Answer { image: image.to_string(), source })
            })?
        } else {
            self.run(&entry, &request.body, |answer| {
                let headers = vec![("content-type".to_string(), b"application/octet-stream".to_vec())];
                Ok(Response { status: 200, headers, body: answer, held: Held::default() })
            })?
        };
        response.headers.extend(timing.headers(start).into_iter().map(|(n, v)| (n.to_string(), v.into_bytes())));
        response.held = timing.held;
        Ok(response)
    }

    /// Runs `input` in a new VM of `entry` under `--max-vms`; `answer` turns the guest's
    /// response into the reply. The request is counted with the outcome of both.
    fn run<T>(
        &self,
        entry: &Entry,
        input: &[u8],
        answer: impl FnOnce(Vec<u8>) -> Result<T, Failure>,
    ) -> Result<(T, Timing), Failure> {
        let start = Instant::now();
        // Refused before a VM is made for it: the guest could not hold it.
        let admitted = match entry.engine().check_request(input) {
            Ok(()) => self.registry.admit(entry).map_err(Failure::from),
            Err(source) => Err(Failure::TooLarge { image: entry.name().to_string(), source }),
        };
        let lease = match admitted {
            Ok(lease) => lease,
            Err(failure) => {
                self.metrics.request(entry.name(), failure.outcome(), start.elapsed(), None);
                return Err(failure);
            }
        };
        let served = entry.engine().serve(input, entry.timeout());
        drop(lease);
        entry.count_request();
        let (result, fork_run) = match served {
            Ok(Served { response, fork_us, run_us, vm_id, response_charge }) => {
                let timing = Timing { vm_id, fork_us, run_us, held: Held::new(response_charge) };
                (answer(response).map(|reply| (reply, timing)), Some((fork_us, run_us)))
            }
            Err(source) => (Err(Failure::Serve { image: entry.name().to_string(), source }), None),
        };
        let outcome = result.as_ref().map_or_else(Failure::outcome, |_| Outcome::Ok);
        self.metrics.request(entry.name(), outcome, start.elapsed(), fork_run);
        result
    }

    fn gauges(&self) -> Gauges {
        let pool_depth = self.registry.pool_depths();
        let usage = self.registry.budget().usage();
        Gauges {
            in_flight: self.registry.in_flight(),
            vms_in_use: usage.vms,
            memory_in_use: usage.memory,
            images: pool_depth.len(),
            pool_depth,
            kvm_vms: metrics::live_kvm_vms(),
            threads: metrics::threads(),
            connections: self.lifecycle.connections(),
            ready: self.readiness() == Readiness::Ready,
        }
    }

    fn health(&self) -> serde_json::Value {
        let g = self.gauges();
        json!({
            "status": match self.readiness() {
                Readiness::Stopping => "stopping",
                Readiness::Draining => "draining",
                Readiness::Ready | Readiness::Starting(_) => "ok",
            },
            "ready": g.ready,
            "mode": format!("{:?}", self.config.mode).to_lowercase(),
            "images": g.images,
            "in_flight": g.in_flight,
            "live_vms": g.kvm_vms,
            "threads": g.threads,
            "connections": g.connections,
            "max_vms": self.config.max_vms,
            "vms_in_use": g.vms_in_use,
            "guest_memory_bytes": g.memory_in_use,
            "max_memory": self.config.max_memory,
        })
    }
}
