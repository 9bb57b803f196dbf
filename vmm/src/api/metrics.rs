//! The daemon's counters, histograms and gauges, rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds of the latency histograms' buckets, seconds.
const BUCKETS: &[f64] =
    &[0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// How a request ended, as counted in `mu2_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
    fn label(self) -> &'static str {
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

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// Forks over the last few seconds, one bucket per second.
#[derive(Debug)]
struct Rate {
    start: Instant,
    buckets: [u64; Rate::WINDOW],
    last_second: u64,
}

impl Rate {
    const WINDOW: usize = 10;

    fn advance(&mut self, now: Instant) {
        let second = now.duration_since(self.start).as_secs();
        let gap = second.saturating_sub(self.last_second).min(Self::WINDOW as u64);
        for s in 0..gap {
            self.buckets[((self.last_second + 1 + s) % Self::WINDOW as u64) as usize] = 0;
        }
        self.last_second = self.last_second.max(second);
    }

    fn add(&mut self, now: Instant) {
        self.advance(now);
        self.buckets[(self.last_second % Self::WINDOW as u64) as usize] += 1;
    }

    /// Forks per second over the last complete seconds of the window.
    fn per_second(&mut self, now: Instant) -> f64 {
        self.advance(now);
        let current = (self.last_second % Self::WINDOW as u64) as usize;
        let complete = (Self::WINDOW - 1).min(self.last_second as usize);
        if complete == 0 {
            return self.buckets[current] as f64;
        }
        let total: u64 = self.buckets.iter().enumerate().filter(|(i, _)| *i != current).map(|(_, c)| c).sum();
        total as f64 / complete as f64
    }
}

#[derive(Debug)]
struct Inner {
    requests: BTreeMap<(String, Outcome), u64>,
    latency: BTreeMap<String, Histogram>,
    fork: BTreeMap<String, Histogram>,
    run: BTreeMap<String, Histogram>,
    responses: BTreeMap<(&'static str, u16), u64>,
    forks: u64,
    rate: Rate,
}

/// Gauges read when the metrics are rendered.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Requests holding a VM now.
    pub in_flight: usize,
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
}

/// The daemon's metrics.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
    started: Instant,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Self {
        let now = Instant::now();
        Metrics {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                latency: BTreeMap::new(),
                fork: BTreeMap::new(),
                run: BTreeMap::new(),
                responses: BTreeMap::new(),
                forks: 0,
                rate: Rate { start: now, buckets: [0; Rate::WINDOW], last_second: 0 },
            }),
            started: now,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic elsewhere while holding the lock leaves plain counters: still usable.
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut inner)
    }

    /// Counts a request to `image` that ended with `outcome` after `total`; `fork_run` are the
    /// engine's parts when a VM ran.
    pub fn request(&self, image: &str, outcome: Outcome, total: Duration, fork_run: Option<(f64, f64)>) {
        let now = Instant::now();
        self.with(|m| {
            *m.requests.entry((image.to_string(), outcome)).or_default() += 1;
            m.latency.entry(image.to_string()).or_default().observe(total.as_secs_f64());
            if let Some((fork_us, run_us)) = fork_run {
                m.fork.entry(image.to_string()).or_default().observe(fork_us / 1e6);
                m.run.entry(image.to_string()).or_default().observe(run_us / 1e6);
            }
            if !matches!(outcome, Outcome::Rejected) {
                m.forks += 1;
                m.rate.add(now);
            }
        })
    }

    /// Counts an HTTP response on `listener` (`api` or `http`).
    pub fn response(&self, listener: &'static str, status: u16) {
        self.with(|m| *m.responses.entry((listener, status)).or_default() += 1)
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gauges: &Gauges) -> String {
        let now = Instant::now();
        let mut out = String::with_capacity(4096);
        self.with(|m| {
            out.push_str("# HELP mu2_requests_total Requests served by a VM, by image and outcome.\n");
            out.push_str("# TYPE mu2_requests_total counter\n");
            for ((image, outcome), n) in &m.requests {
                let _ = writeln!(out, "mu2_requests_total{{image=\"{}\",outcome=\"{}\"}} {n}", esc(image), outcome.label());
            }
            for (name, help, map) in [
                ("mu2_request_duration_seconds", "Time from admission to response, by image.", &m.latency),
                ("mu2_fork_duration_seconds", "Getting a VM ready for a request, by image.", &m.fork),
                ("mu2_run_duration_seconds", "Running a request in its VM, by image.", &m.run),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
                for (image, h) in map {
                    h.render(&mut out, name, &format!("image=\"{}\"", esc(image)));
                }
            }
            out.push_str("# HELP mu2_http_responses_total HTTP responses by listener and status.\n");
            out.push_str("# TYPE mu2_http_responses_total counter\n");
            for ((listener, status), n) in &m.responses {
                let _ = writeln!(out, "mu2_http_responses_total{{listener=\"{listener}\",status=\"{status}\"}} {n}");
            }
            let _ = writeln!(out, "# HELP mu2_forks_total VMs handed a request.\n# TYPE mu2_forks_total counter");
            let _ = writeln!(out, "mu2_forks_total {}", m.forks);
            let _ = writeln!(
                out,
                "# HELP mu2_forks_per_second VMs handed a request per second, over the last 10 s.\n# TYPE mu2_forks_per_second gauge"
            );
            let _ = writeln!(out, "mu2_forks_per_second {:.3}", m.rate.per_second(now));
        });
        let gauge = |out: &mut String, name: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        };
        gauge(&mut out, "mu2_requests_in_flight", "Requests holding a VM now.", gauges.in_flight.to_string());
        let pooled: usize = gauges.pool_depth.iter().map(|(_, d)| d).sum();
        gauge(
            &mut out,
            "mu2_vms_in_use",
            "VMs counted against --max-vms: requests in flight plus VMs waiting in pools.",
            (gauges.in_flight + pooled).to_string(),
        );
        let _ = writeln!(out, "# HELP mu2_pool_depth VMs ready in an image's pool.\n# TYPE mu2_pool_depth gauge");
        for (image, depth) in &gauges.pool_depth {
            let _ = writeln!(out, "mu2_pool_depth{{image=\"{}\"}} {depth}", esc(image));
        }
        if let Some(n) = gauges.kvm_vms {
            gauge(&mut out, "mu2_live_vms", "KVM VMs this process holds (kernel's count).", n.to_string());
        }
        if let Some(n) = gauges.threads {
            gauge(&mut out, "mu2_threads", "Threads of the daemon.", n.to_string());
        }
        gauge(&mut out, "mu2_images", "Images registered.", gauges.images.to_string());
        gauge(&mut out, "mu2_connections", "Open client connections.", gauges.connections.to_string());
        gauge(
            &mut out,
            "mu2_uptime_seconds",
            "Seconds since the daemon started.",
            format!("{:.3}", self.started.elapsed().as_secs_f64()),
        );
        out
    }
}

/// Escapes a label value.
fn esc(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
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

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::new();
        m.request("echo", Outcome::Ok, Duration::from_micros(300), Some((50.0, 200.0)));
        m.request("echo", Outcome::Timeout, Duration::from_secs(1), None);
        m.response("api", 200);
        let text = m.render(&Gauges { in_flight: 2, pool_depth: vec![("echo".into(), 3)], ..Gauges::default() });
        assert!(text.contains("mu2_requests_total{image=\"echo\",outcome=\"ok\"} 1"), "{text}");
        assert!(text.contains("mu2_requests_total{image=\"echo\",outcome=\"timeout\"} 1"));
        assert!(text.contains("mu2_request_duration_seconds_bucket{image=\"echo\",le=\"0.0005\"} 1"));
        assert!(text.contains("mu2_request_duration_seconds_count{image=\"echo\"} 2"));
        assert!(text.contains("mu2_http_responses_total{listener=\"api\",status=\"200\"} 1"));
        assert!(text.contains("mu2_vms_in_use 5"));
        assert!(text.contains("mu2_forks_total 2"));
    }

    #[test]
    fn rate_forgets_old_seconds() {
        let start = Instant::now();
        let mut r = Rate { start, buckets: [0; Rate::WINDOW], last_second: 0 };
        for _ in 0..10 {
            r.add(start);
        }
        assert_eq!(r.per_second(start), 10.0);
        assert_eq!(r.per_second(start + Duration::from_secs(30)), 0.0);
    }
}
