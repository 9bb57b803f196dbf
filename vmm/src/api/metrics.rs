//! The daemon's counters, histograms and gauges, kept and rendered by `prometheus-client` in
//! the Prometheus text format (0.0.4).
//!
//! Counters and histograms live for the daemon's lifetime in one registry. Gauges describe
//! the daemon at the moment of a scrape (pool depths of the images that exist now, open
//! connections, threads), so each render builds them afresh from a [`Gauges`] snapshot in a
//! registry of their own: an image deleted since the last scrape leaves no stale series.
//!
//! Names follow Prometheus' conventions: `mu2_` prefix, base units in the name (`_seconds`),
//! `_total` on counters (the crate adds it), histograms for latencies, and no rates computed
//! in-process (`rate(mu2_forks_total[1m])` gives forks per second).

use std::time::{Duration, SystemTime};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The `content-type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds of the latency histograms' buckets, seconds: 100 µs (a reuse-mode request) to
/// 10 s (the default `--timeout`).
const BUCKETS: &[f64] =
    &[0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// How a request ended, as counted in `mu2_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Answered by the guest.
    Ok,
    /// The guest ran out of time (504).
    Timeout,
    /// The guest crashed or broke the protocol (502).
    GuestError,
    /// The function returned an error (500).
    FunctionError,
    /// Refused by `--max-vms` (429) or because the daemon stops (503).
    Rejected,
    /// Any other failure: no VM could be made, a resource limit, a bad image.
    Error,
}

impl Outcome {
    /// The `outcome` label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Timeout => "timeout",
            Outcome::GuestError => "guest_error",
            Outcome::FunctionError => "function_error",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.label(), encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    image: String,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ImageLabels {
    image: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResponseLabels {
    listener: &'static str,
    status: u16,
}

/// A histogram family whose members all get [`BUCKETS`].
type Latency = Family<ImageLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS.iter().copied())
}

/// Gauges read when the metrics are rendered.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Requests holding a VM now.
    pub in_flight: usize,
    /// Live VMs counted against `--max-vms`: serving, pooled, being reset or destroyed.
    pub vms_in_use: usize,
    /// Their guest memory, bytes, counted against `--max-memory`.
    pub memory_in_use: u64,
    /// VMs ready in each image's pool.
    pub pool_depth: Vec<(String, usize)>,
    /// KVM VMs this process holds (from /proc/self/fd), if known.
    pub kvm_vms: Option<usize>,
    /// Threads of this process, if known.
    pub threads: Option<usize>,
    /// Images registered.
    pub images: usize,
    /// Open client connections.
    pub connections: usize,
    /// Whether `/healthz` answers 200 now.
    pub ready: bool,
}

/// The daemon's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Latency,
    fork: Latency,
    run: Latency,
    responses: Family<ResponseLabels, Counter>,
    forks: Counter,
    started_unix: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Latency::new_with_constructor(latency_histogram);
        let fork = Latency::new_with_constructor(latency_histogram);
        let run = Latency::new_with_constructor(latency_histogram);
        let responses = Family::<ResponseLabels, Counter>::default();
        let forks = Counter::default();
        let mut registry = Registry::default();
        registry.register("mu2_requests", "Requests that reached an image, by image and outcome", requests.clone());
        registry.register_with_unit(
            "mu2_request_duration",
            "Time from admission to the guest's answer, by image",
            Unit::Seconds,
            latency.clone(),
        );
        registry.register_with_unit(
            "mu2_fork_duration",
            "Getting a VM ready for a request, by image",
            Unit::Seconds,
            fork.clone(),
        );
        registry.register_with_unit(
            "mu2_run_duration",
            "Running a request in its VM, by image",
            Unit::Seconds,
            run.clone(),
        );
        registry.register("mu2_http_responses", "HTTP responses by listener and status", responses.clone());
        registry.register("mu2_forks", "VMs handed a request", forks.clone());
        let started_unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        Metrics { registry, requests, latency, fork, run, responses, forks, started_unix }
    }

    /// Counts a request to `image` that ended with `outcome` after `total`; `fork_run` are the
    /// engine's parts (µs) when a VM ran.
    pub fn request(&self, image: &str, outcome: Outcome, total: Duration, fork_run: Option<(f64, f64)>) {
        let image = ImageLabels { image: image.to_string() };
        self.requests.get_or_create(&RequestLabels { image: image.image.clone(), outcome }).inc();
        self.latency.get_or_create(&image).observe(total.as_secs_f64());
        if let Some((fork_us, run_us)) = fork_run {
            self.fork.get_or_create(&image).observe(fork_us / 1e6);
            self.run.get_or_create(&image).observe(run_us / 1e6);
        }
        if outcome != Outcome::Rejected {
            self.forks.inc();
        }
    }

    /// Counts an HTTP response on `listener` (`api` or `http`).
    pub fn response(&self, listener: &'static str, status: u16) {
        self.responses.get_or_create(&ResponseLabels { listener, status }).inc();
    }

    /// The Prometheus text exposition: the counters and histograms, then `gauges`.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(8192);
        let mut now = Registry::default();
        register_gauges(&mut now, gauges, self.started_unix);
        // Writing into a String cannot fail; an error here would be the crate's own bug.
        for registry in [&self.registry, &now] {
            if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
                log::warn!("encoding metrics: {e}");
            }
        }
        out
    }
}

/// Adds to `registry` the gauges of one scrape.
fn register_gauges(registry: &mut Registry, g: &Gauges, started_unix: f64) {
    let int = |value: usize| {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        gauge
    };
    registry.register("mu2_requests_in_flight", "Requests holding a VM now", int(g.in_flight));
    registry.register(
        "mu2_vms_in_use",
        "Live VMs counted against --max-vms: serving, pooled, being reset or destroyed",
        int(g.vms_in_use),
    );
    let memory = Gauge::<i64>::default();
    memory.set(i64::try_from(g.memory_in_use).unwrap_or(i64::MAX));
    registry.register("mu2_guest_memory_bytes", "Guest memory of the live VMs, counted against --max-memory", memory);
    let pool_depth = Family::<ImageLabels, Gauge>::default();
    for (image, depth) in &g.pool_depth {
        pool_depth.get_or_create(&ImageLabels { image: image.clone() }).set(i64::try_from(*depth).unwrap_or(i64::MAX));
    }
    registry.register("mu2_pool_depth", "VMs ready in an image's pool", pool_depth);
    if let Some(n) = g.kvm_vms {
        registry.register("mu2_live_vms", "KVM VMs this process holds (the kernel's count)", int(n));
    }
    if let Some(n) = g.threads {
        registry.register("mu2_threads", "Threads of the daemon", int(n));
    }
    registry.register("mu2_images", "Images registered", int(g.images));
    registry.register("mu2_connections", "Open client connections", int(g.connections));
    registry.register("mu2_ready", "1 while /healthz answers 200, else 0", int(usize::from(g.ready)));
    let started = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    started.set(started_unix);
    registry.register_with_unit(
        "mu2_start_time",
        "When the daemon started, seconds since the Unix epoch",
        Unit::Seconds,
        started,
    );
}

/// KVM VMs open in this process: file descriptors that are KVM VM inodes.
pub fn live_kvm_vms() -> Option<usize> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(
        dir.filter_map(Result::ok)
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:kvm-vm"))
            .count(),
    )
}

/// Threads of this process.
pub fn threads() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/task").ok()?.count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::client::metric_value;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::new();
        m.request("echo", Outcome::Ok, Duration::from_micros(300), Some((50.0, 200.0)));
        m.request("echo", Outcome::Timeout, Duration::from_secs(1), None);
        m.request("echo", Outcome::Rejected, Duration::from_micros(5), None);
        m.response("api", 200);
        let gauges = Gauges {
            in_flight: 2,
            vms_in_use: 5,
            memory_in_use: 5 << 26,
            pool_depth: vec![("echo".into(), 3)],
            ready: true,
            ..Gauges::default()
        };
        let text = m.render(&gauges);
        assert!(text.contains("mu2_requests_total{image=\"echo\",outcome=\"ok\"} 1\n"), "{text}");
        assert!(!text.contains("outcome=\"guest_error\""), "only outcomes that happened: {text}");
        assert_eq!(metric_value(&text, "mu2_requests_total", "outcome=\"timeout\""), 1.0);
        assert!(text.contains("# TYPE mu2_request_duration_seconds histogram\n"), "{text}");
        assert_eq!(metric_value(&text, "mu2_request_duration_seconds_bucket", "le=\"0.0005\""), 2.0, "{text}");
        assert_eq!(metric_value(&text, "mu2_request_duration_seconds_bucket", "le=\"+Inf\""), 3.0);
        assert_eq!(metric_value(&text, "mu2_request_duration_seconds_count", "image=\"echo\""), 3.0);
        assert_eq!(metric_value(&text, "mu2_fork_duration_seconds_sum", "image=\"echo\""), 50e-6);
        assert!(text.contains("mu2_http_responses_total{listener=\"api\",status=\"200\"} 1\n"), "{text}");
        assert_eq!(metric_value(&text, "mu2_vms_in_use", ""), 5.0);
        assert_eq!(metric_value(&text, "mu2_guest_memory_bytes", ""), f64::from(5u32 << 26));
        assert_eq!(metric_value(&text, "mu2_pool_depth", "image=\"echo\""), 3.0);
        assert_eq!(metric_value(&text, "mu2_forks_total", ""), 2.0, "a rejected request forks nothing");
        assert_eq!(metric_value(&text, "mu2_ready", ""), 1.0);
        assert!(metric_value(&text, "mu2_start_time_seconds", "") > 1.6e9);
    }

    #[test]
    fn gauges_of_a_scrape_leave_nothing_for_the_next() {
        let m = Metrics::new();
        let first = m.render(&Gauges { pool_depth: vec![("gone".into(), 4)], ..Gauges::default() });
        assert!(first.contains("image=\"gone\""), "{first}");
        let second = m.render(&Gauges::default());
        assert!(!second.contains("image=\"gone\""), "{second}");
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.request("a\"b\\c\nd", Outcome::Ok, Duration::ZERO, None);
        let text = m.render(&Gauges::default());
        assert!(text.contains(r#"image="a\"b\\c\nd""#), "{text}");
    }
}
