//! Benchmarks: request latency next to the raw KVM floor measured in the same run.
//!
//! Floor cycles are interleaved with requests, so both see the same host load.

use std::time::{Duration, Instant};

use mu2_vmm::error::{Classify, FailureKind};
use mu2_vmm::floor::{self, percentile};
use mu2_vmm::fork::{Engine, ForkError, Served};
use mu2_vmm::invoke::{self, InvokeError};
use mu2_vmm::{BuildError, ExitStats, Hypervisor, Vm, VmConfig};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The guest and VM settings.
    pub vm: VmConfig,
    /// The request sent each time.
    pub request: Vec<u8>,
    /// Number of requests.
    pub requests: usize,
    /// Deadline per request.
    pub timeout: Duration,
}

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A VM could not be built.
    #[error("building a VM")]
    Build(#[from] BuildError),
    /// A floor measurement failed.
    #[error("measuring the floor")]
    Floor(#[from] mu2_vmm::floor::FloorError),
    /// A request failed.
    #[error("request {index} failed")]
    Request {
        /// Which request.
        index: usize,
        /// Why.
        #[source]
        source: InvokeError,
    },
    /// The engine could not provide a VM.
    #[error("request {index}: no VM")]
    Fork {
        /// Which request.
        index: usize,
        /// Why.
        #[source]
        source: ForkError,
    },
    /// A request failed in (or on the way to) a worker process.
    #[error("request {index} through the workers")]
    Worker {
        /// Which request.
        index: usize,
        /// Why.
        #[source]
        source: mu2_vmm::worker::WorkerError,
    },
    /// The response was not what the function returns for this request.
    #[error("request {index}: the response differs from the first one")]
    WrongResponse {
        /// Which request.
        index: usize,
    },
}

impl Classify for BenchError {
    fn kind(&self) -> FailureKind {
        match self {
            BenchError::Build(e) => e.kind(),
            BenchError::Floor(e) => e.kind(),
            BenchError::Request { source, .. } => source.kind(),
            BenchError::Fork { source, .. } => source.kind(),
            BenchError::Worker { source, .. } => source.kind(),
            // Neither a crash nor a protocol error: a function may answer differently by
            // design (`random`); the benchmark just cannot vouch for its responses.
            BenchError::WrongResponse { .. } => FailureKind::Internal,
        }
    }
}

/// One measured request, in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// From the start of VM creation to the guest's readiness.
    pub boot_to_ready_us: f64,
    /// From sending the request to the complete response.
    pub request_us: f64,
    /// Creation to complete response: the latency a caller sees.
    pub latency_us: f64,
    /// Destroying the VM (off the request path in the fork engine; measured here).
    pub teardown_us: f64,
    /// The matching floor cycle: raw VM creation to first exit.
    pub floor_fresh_us: f64,
    /// Exits during the request (boot excluded).
    pub request_exits: u64,
    /// Exits during boot.
    pub boot_exits: u64,
}

/// A summary of a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// 50th percentile.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Summary {
    /// Percentiles of `values`.
    pub fn of(values: &[f64]) -> Self {
        Summary {
            p50: percentile(values, 50.0),
            p90: percentile(values, 90.0),
            p99: percentile(values, 99.0),
            max: percentile(values, 100.0),
        }
    }
}

/// Runs `config.requests` cold requests one after another: each boots a new VM, waits until
/// the guest is ready, sends the request and destroys the VM.
pub fn cold(hv: &Hypervisor, config: &BenchConfig, mut progress: impl FnMut(usize)) -> Result<Vec<Sample>, BenchError> {
    let mut samples = Vec::with_capacity(config.requests);
    let mut first_response: Option<Vec<u8>> = None;
    let floor_image = floor::FloorImage::new(hv, config.vm.mem_size)?;
    for index in 0..config.requests {
        let floor = floor_image.fresh_cycle(hv)?;
        let start = Instant::now();
        let deadline = Some(start + config.timeout);
        let mut vm = Vm::boot(hv, &config.vm, Box::new(std::io::sink()))?;
        let wrap = |source| BenchError::Request { index, source };
        let ready = invoke::run_until_ready(&mut vm, deadline).map_err(wrap)?;
        let ready_at = Instant::now();
        let boot_stats = vm.stats();
        let response = invoke::invoke(&mut vm, ready.port, &config.request, invoke::DEFAULT_MAX_RESPONSE, deadline)
            .map_err(wrap)?;
        let done = Instant::now();
        let stats = vm.stats();
        drop(vm);
        let torn = Instant::now();
        match &first_response {
            None => first_response = Some(response),
            Some(first) if *first != response => return Err(BenchError::WrongResponse { index }),
            Some(_) => {}
        }
        samples.push(Sample {
            boot_to_ready_us: micros(ready_at - start),
            request_us: micros(done - ready_at),
            latency_us: micros(done - start),
            teardown_us: micros(torn - done),
            floor_fresh_us: micros(floor.create_to_exit),
            request_exits: exits(&stats) - exits(&boot_stats),
            boot_exits: exits(&boot_stats),
        });
        progress(index + 1);
    }
    Ok(samples)
}

fn exits(stats: &ExitStats) -> u64 {
    stats.pio + stats.virtio_mmio + stats.sysdev + stats.waits + stats.unclaimed
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// One request served by the fork engine, in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForkSample {
    /// Getting the VM (restore, pool take or reset).
    pub fork_us: f64,
    /// Running the request.
    pub run_us: f64,
    /// Both: the latency a caller sees.
    pub latency_us: f64,
}

/// The result of a fork-engine run.
#[derive(Debug, Clone)]
pub struct ForkRun {
    /// Per-request samples, in completion order.
    pub samples: Vec<ForkSample>,
    /// Wall time of the whole run.
    pub wall: Duration,
}

/// Serves `requests` requests with `concurrency` threads through `serve` (closed loop: each
/// thread sends its next request when the last one is answered); every response must equal
/// `expected` when given.
pub fn forked(
    serve: &ServeFn<'_>,
    request: &[u8],
    expected: Option<&[u8]>,
    requests: usize,
    concurrency: usize,
    timeout: Duration,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<ForkRun, BenchError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::with_capacity(requests));
    let failure: Mutex<Option<BenchError>> = Mutex::new(None);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency.max(1) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= requests || failure.lock().map_or(true, |f| f.is_some()) {
                    return;
                }
                let began = Instant::now();
                let result = match serve(request, timeout) {
                    Ok(served) if expected.is_some_and(|e| e != served.response.as_slice()) => {
                        Err(BenchError::WrongResponse { index })
                    }
                    // Latency as the caller sees it: through the worker's socket too, if any.
                    Ok(served) => Ok(ForkSample {
                        fork_us: served.fork_us,
                        run_us: served.run_us,
                        latency_us: micros(began.elapsed()),
                    }),
                    Err(e) => Err(e.at(index)),
                };
                match result {
                    Ok(sample) => {
                        if let Ok(mut s) = samples.lock() {
                            s.push(sample);
                        }
                        progress(done.fetch_add(1, Ordering::Relaxed) + 1);
                    }
                    Err(e) => {
                        if let Ok(mut f) = failure.lock() {
                            f.get_or_insert(e);
                        }
                        return;
                    }
                }
            });
        }
    });
    let wall = started.elapsed();
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    Ok(ForkRun { samples: samples.into_inner().unwrap_or_default(), wall })
}

/// One floor's figures, µs: its latency and the p50 of each step it times.
#[derive(Debug, Clone, Default)]
pub struct FloorSummary {
    /// What the floor compares with a request's latency.
    pub latency: Summary,
    /// The p50 of each step the floor took (`FloorSteps::NAMES`), the untaken ones left out.
    pub steps: Vec<(&'static str, f64)>,
}

impl FloorSummary {
    fn of(samples: &[floor::FloorSample]) -> FloorSummary {
        let latency = Summary::of(&samples.iter().map(|s| micros(s.create_to_exit)).collect::<Vec<f64>>());
        let steps = floor::FloorSteps::NAMES
            .iter()
            .enumerate()
            .filter_map(|(i, &name)| {
                let values: Vec<f64> = samples.iter().map(|s| micros(s.steps.durations()[i])).collect();
                values.iter().any(|&v| v > 0.0).then(|| (name, percentile(&values, 50.0)))
            })
            .collect();
        FloorSummary { latency, steps }
    }
}

/// The floors measured in the same run as a benchmark.
#[derive(Debug, Clone, Default)]
pub struct Floors {
    /// A minimal VM created and run to its first exit: fresh mode's floor.
    pub fresh: FloorSummary,
    /// One KVM_RUN to the next exit of a minimal VM made and run once beforehand: pool mode's.
    pub pool: FloorSummary,
    /// One KVM_RUN to the next exit of a kept minimal VM: reuse mode's.
    pub reuse: FloorSummary,
    /// Where the floor VMs' memory file lived (`memfd` or a directory).
    pub backing: String,
}

impl Floors {
    /// The floor a mode is compared with, and its name.
    pub fn of_mode(&self, mode: &str) -> (&'static str, &FloorSummary) {
        match mode {
            "pool" => ("floor_pool", &self.pool),
            "reuse" => ("floor_reuse", &self.reuse),
            _ => ("floor_fresh", &self.fresh),
        }
    }
}

/// Every floor's samples, as measured.
#[derive(Debug, Clone, Default)]
pub struct FloorSamples {
    /// Fresh floor cycles.
    pub fresh: Vec<floor::FloorSample>,
    /// Pool floor cycles.
    pub pool: Vec<floor::FloorSample>,
    /// Reuse floor cycles.
    pub reuse: Vec<floor::FloorSample>,
    /// Where the floor VMs' memory file lived.
    pub backing: String,
}

impl FloorSamples {
    pub fn summary(&self) -> Floors {
        Floors {
            fresh: FloorSummary::of(&self.fresh),
            pool: FloorSummary::of(&self.pool),
            reuse: FloorSummary::of(&self.reuse),
            backing: self.backing.clone(),
        }
    }

    /// Each floor's name and latencies, µs, for the CSV and the plot.
    pub fn series(&self) -> [(&'static str, Vec<f64>); 3] {
        let us = |v: &[floor::FloorSample]| v.iter().map(|s| micros(s.create_to_exit)).collect();
        [("floor_fresh", us(&self.fresh)), ("floor_pool", us(&self.pool)), ("floor_reuse", us(&self.reuse))]
    }
}

/// How many ready VMs the pool floor makes at a time before it times their runs.
const POOL_FLOOR_BATCH: usize = 16;

/// Measures the three floors with `samples` cycles each while a kept floor VM (the reuse
/// floor's) stays alive for the whole measurement, as an engine's VMs do (see
/// `mu2_vmm::floor`). One floor after the other, so that none runs beside another's work:
/// - fresh: each VM destroyed on a reaper thread, as an engine's are (that thread times the
///   teardowns);
/// - pool: VMs made ready in batches, then each batch's runs timed with nothing else going
///   on, as a pooled request runs while nothing is built beside it at best, then destroyed;
/// - reuse: the kept VM, `samples` times.
pub fn floors(hv: &Hypervisor, image: &floor::FloorImage, samples: usize) -> Result<FloorSamples, BenchError> {
    use std::sync::mpsc;
    let mut kept = floor::FloorVm::new(hv, image)?;
    kept.warm()?;
    let mut run = FloorSamples { backing: image.backing().to_string(), ..FloorSamples::default() };
    let (to_reap, reaped) = mpsc::channel::<floor::FloorVm>();
    let teardowns = std::thread::scope(|scope| {
        let reaper = scope.spawn(move || reaped.into_iter().map(floor::FloorVm::destroy).collect::<Vec<_>>());
        let measured = (|| -> Result<(), BenchError> {
            for _ in 0..samples {
                let (sample, vm) = image.fresh_cycle_kept(hv)?;
                run.fresh.push(sample);
                let _ = to_reap.send(vm);
            }
            Ok(())
        })();
        drop(to_reap);
        let times = reaper.join().unwrap_or_default();
        measured.map(|()| times)
    })?;
    for (sample, time) in run.fresh.iter_mut().zip(teardowns) {
        sample.teardown = time;
        sample.steps.teardown = time;
    }
    while run.pool.len() < samples {
        let batch = (samples - run.pool.len()).min(POOL_FLOOR_BATCH);
        let mut ready = (0..batch).map(|_| image.ready_vm(hv)).collect::<Result<Vec<_>, _>>()?;
        let mut timed = ready.iter_mut().map(floor::FloorVm::run_once).collect::<Result<Vec<_>, _>>()?;
        for (sample, vm) in timed.iter_mut().zip(ready) {
            sample.teardown = vm.destroy();
            sample.steps.teardown = sample.teardown;
        }
        run.pool.extend(timed);
    }
    for _ in 0..samples {
        run.reuse.push(kept.reuse_cycle()?);
    }
    Ok(run)
}

/// CPU time every thread of this process has run so far, ns (the sum of the first field of
/// `/proc/self/task/*/schedstat`, the scheduler's own exact account); `None` where it is not
/// available. Threads that ended are not counted, so measure across a span in which none does.
pub fn process_cpu_ns() -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path().join("schedstat");
        let text = std::fs::read_to_string(path).ok()?;
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// The host's memory counters (`/proc/meminfo`, KiB) that VMs move: what is available, and the
/// kernel's own allocations (slab, page tables, kernel stacks, vmalloc, per-CPU).
#[derive(Debug, Clone, Copy, Default)]
pub struct HostMemory {
    pub available: i64,
    pub slab: i64,
    pub page_tables: i64,
    pub kernel_stack: i64,
    pub vmalloc: i64,
    pub percpu: i64,
}

impl HostMemory {
    /// Reads `/proc/meminfo`; `None` where it is missing.
    pub fn read() -> Option<HostMemory> {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let field = |name: &str| -> i64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Some(HostMemory {
            available: field("MemAvailable"),
            slab: field("Slab"),
            page_tables: field("PageTables") + field("SecPageTables"),
            kernel_stack: field("KernelStack"),
            vmalloc: field("VmallocUsed"),
            percpu: field("Percpu"),
        })
    }

    /// The kernel's own allocations, KiB.
    pub fn kernel(&self) -> i64 {
        self.slab + self.page_tables + self.kernel_stack + self.vmalloc + self.percpu
    }
}

/// Private memory (KiB, `Private_Clean + Private_Dirty` of `/proc/PID/smaps_rollup`) of the
/// given processes together; `None` if any cannot be read.
pub fn private_kib_of(pids: &[u32]) -> Option<u64> {
    let mut total = 0;
    for pid in pids {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("Private_Clean:").or_else(|| line.strip_prefix("Private_Dirty:")) {
                total += rest.split_whitespace().next()?.parse::<u64>().ok()?;
            }
        }
    }
    Some(total)
}

/// How requests arrive in an open-loop run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrivals {
    /// Evenly spaced, `1 / rate` apart.
    Constant,
    /// A Poisson process: exponentially distributed gaps of mean `1 / rate`.
    Poisson,
}

impl Arrivals {
    pub fn name(self) -> &'static str {
        match self {
            Arrivals::Constant => "constant",
            Arrivals::Poisson => "poisson",
        }
    }
}

/// When each of `requests` requests is due, counted from the run's start, for `rate`
/// requests per second. Poisson gaps come from a generator seeded with `seed`, so a run can be
/// repeated exactly.
pub fn schedule(rate: f64, arrivals: Arrivals, requests: usize, seed: u64) -> Vec<Duration> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mean = 1.0 / rate;
    let mut at = 0.0f64;
    (0..requests)
        .map(|_| {
            let due = Duration::from_secs_f64(at);
            at += match arrivals {
                Arrivals::Constant => mean,
                // Inverse of the exponential CDF; `1 - u` lies in (0, 1], so the log is finite.
                Arrivals::Poisson => -(1.0 - rng.random::<f64>()).ln() * mean,
            };
            due
        })
        .collect()
}

/// One request of an open-loop run, in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenSample {
    /// From when the request was due to its complete response: what a caller arriving on
    /// schedule waits, the time it queued behind busy servers included.
    pub latency_us: f64,
    /// From when it was due to when a server began it (queueing and the generator's lateness).
    pub lag_us: f64,
    /// Getting its VM.
    pub fork_us: f64,
    /// Running it.
    pub run_us: f64,
}

/// The result of one open-loop rate.
#[derive(Debug, Clone)]
pub struct OpenRun {
    /// The offered rate, requests per second.
    pub rate: f64,
    /// Per-request samples, in completion order.
    pub samples: Vec<OpenSample>,
    /// From the first request's due time to the last response.
    pub wall: Duration,
}

/// Serves one request: the engine's `serve`, or a worker pool's.
pub type ServeFn<'a> = dyn Fn(&[u8], Duration) -> Result<Served, BenchError> + Sync + 'a;

/// Worker processes as a [`ServeFn`].
pub fn workers_server(
    workers: &mu2_vmm::worker::Workers,
) -> impl Fn(&[u8], Duration) -> Result<Served, BenchError> + Sync + '_ {
    move |request, timeout| workers.serve(request, timeout).map_err(|source| BenchError::Worker { index: 0, source })
}

/// The engine as a [`ServeFn`].
pub fn engine_server(engine: &Engine) -> impl Fn(&[u8], Duration) -> Result<Served, BenchError> + Sync + '_ {
    move |request, timeout| {
        engine.serve(request, timeout).map_err(|e| match e {
            ForkError::Invoke(source) => BenchError::Request { index: 0, source },
            e => BenchError::Fork { index: 0, source: e },
        })
    }
}

/// Offers requests on `due` (offsets from the start, see [`schedule`]) to `servers` threads,
/// each serving one request at a time: a request due while every server is busy waits, and
/// its latency counts from when it was due (no coordinated omission).
pub fn open_loop(
    serve: &ServeFn<'_>,
    request: &[u8],
    expected: Option<&[u8]>,
    rate: f64,
    due: &[Duration],
    servers: usize,
    timeout: Duration,
) -> Result<OpenRun, BenchError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::with_capacity(due.len()));
    let failure: Mutex<Option<BenchError>> = Mutex::new(None);
    // A moment ahead, so that every server is waiting when the first request is due.
    let start = Instant::now() + Duration::from_millis(5);
    std::thread::scope(|scope| {
        for _ in 0..servers.max(1) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= due.len() || failure.lock().map_or(true, |f| f.is_some()) {
                    return;
                }
                let at = start + due[index];
                wait_until(at);
                let began = Instant::now();
                let result = match serve(request, timeout) {
                    Ok(served) if expected.is_some_and(|e| e != served.response.as_slice()) => {
                        Err(BenchError::WrongResponse { index })
                    }
                    Ok(served) => Ok(OpenSample {
                        latency_us: micros(Instant::now().saturating_duration_since(at)),
                        lag_us: micros(began.saturating_duration_since(at)),
                        fork_us: served.fork_us,
                        run_us: served.run_us,
                    }),
                    Err(e) => Err(e.at(index)),
                };
                match result {
                    Ok(sample) => {
                        if let Ok(mut s) = samples.lock() {
                            s.push(sample);
                        }
                    }
                    Err(e) => {
                        if let Ok(mut f) = failure.lock() {
                            f.get_or_insert(e);
                        }
                        return;
                    }
                }
            });
        }
    });
    let wall = Instant::now().saturating_duration_since(start);
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    Ok(OpenRun { rate, samples: samples.into_inner().unwrap_or_default(), wall })
}

/// How early a server stops sleeping before a request is due: a thread's wake-up from sleep
/// comes tens of microseconds late (timer slack, scheduling), which would count against the
/// request; the rest of the wait yields the core instead.
const WAKE_EARLY: Duration = Duration::from_micros(200);

/// Waits until `at`: sleeps most of the way, then yields until it is time.
fn wait_until(at: Instant) {
    let now = Instant::now();
    if at > now + WAKE_EARLY {
        std::thread::sleep(at - now - WAKE_EARLY);
    }
    while Instant::now() < at {
        std::thread::yield_now();
    }
}

impl BenchError {
    /// The same error, naming request `index`.
    fn at(self, index: usize) -> BenchError {
        match self {
            BenchError::Request { source, .. } => BenchError::Request { index, source },
            BenchError::Fork { source, .. } => BenchError::Fork { index, source },
            BenchError::Worker { source, .. } => BenchError::Worker { index, source },
            BenchError::WrongResponse { .. } => BenchError::WrongResponse { index },
            other => other,
        }
    }
}

/// Percentiles from an HDR histogram of microsecond values (three significant digits).
#[derive(Debug, Clone, Copy, Default)]
pub struct HdrSummary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl HdrSummary {
    /// Percentiles of `values`, µs.
    pub fn of(values: impl Iterator<Item = f64>) -> HdrSummary {
        // Nanoseconds from 1 ns to an hour: any latency a run with a deadline can see.
        let Ok(mut histogram) = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3) else {
            return HdrSummary::default();
        };
        for us in values {
            histogram.saturating_record((us * 1e3).max(1.0) as u64);
        }
        if histogram.is_empty() {
            return HdrSummary::default();
        }
        let at = |q: f64| histogram.value_at_quantile(q) as f64 / 1e3;
        HdrSummary { p50: at(0.50), p90: at(0.90), p99: at(0.99), p999: at(0.999), max: histogram.max() as f64 / 1e3 }
    }
}

/// One rate of an open-loop sweep, summarised.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadPoint {
    /// Offered, requests per second.
    pub rate: f64,
    /// Served: requests over the time from the first one due to the last response.
    pub throughput: f64,
    pub requests: usize,
    /// From due to response.
    pub latency: HdrSummary,
    /// From due to a server beginning it.
    pub lag: HdrSummary,
    pub fork_p50: f64,
    pub run_p50: f64,
}

impl LoadPoint {
    pub fn of(run: &OpenRun) -> LoadPoint {
        let col = |f: fn(&OpenSample) -> f64| HdrSummary::of(run.samples.iter().map(f));
        LoadPoint {
            rate: run.rate,
            throughput: run.samples.len() as f64 / run.wall.as_secs_f64().max(1e-9),
            requests: run.samples.len(),
            latency: col(|s| s.latency_us),
            lag: col(|s| s.lag_us),
            fork_p50: col(|s| s.fork_us).p50,
            run_p50: col(|s| s.run_us).p50,
        }
    }
}

/// How far above its low-load value p99 must rise to mark the knee.
pub const KNEE_FACTOR: f64 = 2.0;

/// The knee of a latency-vs-load curve (points in increasing rate): the lowest rate whose p99
/// is more than [`KNEE_FACTOR`] times the p99 at the lowest rate; `None` if p99 stays within it.
pub fn knee(points: &[LoadPoint]) -> Option<f64> {
    let low = points.first()?.latency.p99;
    points.iter().skip(1).find(|p| p.latency.p99 > KNEE_FACTOR * low).map(|p| p.rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_arrivals_are_evenly_spaced() {
        let due = schedule(500.0, Arrivals::Constant, 4, 7);
        let us: Vec<u128> = due.iter().map(Duration::as_micros).collect();
        assert_eq!(us, [0, 2000, 4000, 6000]);
    }

    #[test]
    fn poisson_arrivals_have_the_rate_as_mean_and_repeat_with_their_seed() {
        let due = schedule(1000.0, Arrivals::Poisson, 20_000, 1);
        let span = due.last().map_or(0.0, Duration::as_secs_f64);
        // 20,000 exponential gaps of mean 1 ms: the sum is within a few percent of 20 s.
        assert!((span - 20.0).abs() < 0.6, "span {span}");
        assert!(due.windows(2).all(|w| w[0] <= w[1]), "due times never go back");
        assert_eq!(due, schedule(1000.0, Arrivals::Poisson, 20_000, 1));
        assert_ne!(due, schedule(1000.0, Arrivals::Poisson, 20_000, 2));
    }

    fn point(rate: f64, p99: f64) -> LoadPoint {
        LoadPoint { rate, latency: HdrSummary { p99, ..HdrSummary::default() }, ..LoadPoint::default() }
    }

    #[test]
    fn the_knee_is_where_p99_leaves_twice_its_low_load_value() {
        let curve = [point(100.0, 300.0), point(200.0, 590.0), point(400.0, 610.0), point(800.0, 5000.0)];
        assert_eq!(knee(&curve), Some(400.0));
        assert_eq!(knee(&curve[..2]), None);
        assert_eq!(knee(&[]), None);
    }

    #[test]
    fn hdr_percentiles_keep_three_digits() {
        let summary = HdrSummary::of((1..=1000).map(f64::from));
        assert!((summary.p50 - 500.0).abs() <= 0.5, "{summary:?}");
        assert!((summary.p99 - 990.0).abs() <= 1.0, "{summary:?}");
        assert!((summary.max - 1000.0).abs() <= 1.0, "{summary:?}");
        assert_eq!(HdrSummary::of(std::iter::empty()).p50, 0.0);
    }
}
