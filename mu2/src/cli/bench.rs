//! `mu2 bench`: measure request latency next to the raw KVM floor, and report it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use mu2_vmm::fork::{Engine, EngineConfig, Mode};
use mu2_vmm::source::ImageSource;
use mu2_vmm::Hypervisor;

use super::args::{parse_duration, request_bytes, GuestArgs};
use crate::bench::{self, BenchConfig};
use crate::failure::{CliError, Failure};
use crate::plot;
use crate::report::{self, ColdReport, CsvRow, ForkReport, ForkSetup};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// How each request gets its VM.
    #[arg(long, value_enum, default_value_t = BenchMode::Pool)]
    mode: BenchMode,
    /// A frozen image to fork (default: a temporary image of --function/--kernel).
    #[arg(long, value_name = "DIR")]
    image: Option<PathBuf>,
    /// Requests in flight at once.
    #[arg(long, value_name = "C", default_value_t = 1)]
    concurrency: usize,
    /// VMs kept ready in pool mode.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pool_size: usize,
    /// Cycles measured for each KVM floor.
    #[arg(long, value_name = "N", default_value_t = 200)]
    floor_samples: usize,
    /// Also write every sample, the floors' too, to this CSV file (`mu2 plot` reads it back).
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Also draw the latency CDF with the floors to this file: SVG, or PNG if it ends in .png.
    #[arg(long, value_name = "FILE.svg|FILE.png")]
    plot: Option<PathBuf>,
    /// Number of requests.
    #[arg(long, value_name = "N", default_value_t = 30)]
    requests: usize,
    /// The request: a string, or @FILE for a file's bytes.
    #[arg(long, value_name = "STR|@FILE", default_value = "hello")]
    data: String,
    /// Deadline per request.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Open loop: offer requests at this rate (requests/s) whatever the responses, latency
    /// counted from when each was due; several comma-separated rates sweep the
    /// latency-vs-load curve and find its knee. --requests is then per rate, and --concurrency
    /// the requests served at once (more queue).
    #[arg(long, value_name = "R[,R...]", value_delimiter = ',')]
    rate: Vec<f64>,
    /// How open-loop requests arrive.
    #[arg(long, value_enum, default_value_t = ArrivalsArg::Poisson)]
    arrivals: ArrivalsArg,
    /// Seed of the Poisson arrivals.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Serve from N worker processes, each with its own VMs in its own address space (pool and
    /// reuse VMs split among them, at most 64 per worker) [default: one per core]; 0 runs the
    /// engine in this process.
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ArrivalsArg {
    /// Evenly spaced.
    Constant,
    /// A Poisson process (exponential gaps).
    Poisson,
}

impl From<ArrivalsArg> for bench::Arrivals {
    fn from(a: ArrivalsArg) -> Self {
        match a {
            ArrivalsArg::Constant => bench::Arrivals::Constant,
            ArrivalsArg::Poisson => bench::Arrivals::Poisson,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BenchMode {
    /// Every request cold-boots a new VM and waits for the guest to become ready.
    Cold,
    /// Every request restores a new VM from the image on the request path.
    Fresh,
    /// VMs restored ahead of time by background threads; one request each.
    Pool,
    /// Each worker keeps a VM and resets it to the image between requests.
    Reuse,
}

pub fn bench(args: &BenchArgs) -> Result<(), Failure> {
    if args.requests == 0 {
        return Err(CliError::Argument("--requests must be at least 1").into());
    }
    if args.floor_samples == 0 {
        return Err(CliError::Argument("--floor-samples must be at least 1: the ratios divide by the floor").into());
    }
    // Where the results go is checked before the run, not after it.
    if let Some(path) = &args.plot {
        plot::check_target(path)?;
    }
    if let Some(path) = &args.csv {
        crate::failure::parent_exists("CSV file", path)?;
    }
    if !args.rate.is_empty() {
        if args.mode == BenchMode::Cold {
            return Err(CliError::Argument("--rate needs a fork mode: fresh, pool or reuse").into());
        }
        if args.rate.iter().any(|r| !r.is_finite() || *r <= 0.0 || *r > 1e6) {
            return Err(CliError::Argument("--rate takes rates above 0 and up to 1000000 requests/s").into());
        }
        if args.rate.len() > 1 && args.csv.is_some() {
            return Err(CliError::Argument("--csv keeps one run's samples: give one --rate, or use --json").into());
        }
    }
    let request = request_bytes(&args.data)?;
    match args.mode {
        BenchMode::Cold => cold(args, request),
        BenchMode::Fresh => forked(args, Mode::Fresh, &request),
        BenchMode::Pool => forked(args, Mode::Pool, &request),
        BenchMode::Reuse => forked(args, Mode::Reuse, &request),
    }
}

fn cold(args: &BenchArgs, request: Vec<u8>) -> Result<(), Failure> {
    let config =
        BenchConfig { vm: args.guest.vm_config("quiet")?, request, requests: args.requests, timeout: args.timeout };
    let hv = Hypervisor::open()?;
    let started = Instant::now();
    let show_progress = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let samples = bench::cold(&hv, &config, |done| {
        if show_progress {
            eprint!("\r{done}/{} requests", args.requests);
        }
    })?;
    if show_progress {
        eprintln!();
    }
    let function = args.guest.kernel.as_ref().map_or(args.guest.function.clone(), |p| p.display().to_string());
    let mut rows: Vec<CsvRow> = samples
        .iter()
        .map(|s| CsvRow {
            boot_us: Some(s.boot_to_ready_us),
            run_us: Some(s.request_us),
            teardown_us: Some(s.teardown_us),
            ..CsvRow::request(s.latency_us)
        })
        .collect();
    rows.extend(samples.iter().map(|s| CsvRow::floor("floor_fresh", s.floor_fresh_us)));
    keep_samples(args, &run_params(args, "cold", args.guest.mem_mib), &rows)?;
    let report = ColdReport::new(function, args.guest.mem_mib, &samples, started.elapsed().as_secs_f64());
    if args.json {
        crate::out::print(format!("{}\n", report.json()))?;
    } else {
        crate::out::print(report.text())?;
    }
    Ok(())
}

fn forked(args: &BenchArgs, mode: Mode, request: &[u8]) -> Result<(), Failure> {
    if args.concurrency == 0 || args.pool_size == 0 {
        return Err(CliError::Argument("--concurrency and --pool-size must be at least 1").into());
    }
    let hv = Arc::new(Hypervisor::open()?);
    // An image given, or a temporary one of the chosen guest (made in the scratch directory,
    // which is removed when the run ends).
    let source = args.image.clone().map_or_else(|| args.guest.source(), ImageSource::Dir);
    let scratch = TempDir::new()?;
    let deadline = Some(Instant::now() + Duration::from_secs(60));
    let (image, _) = source.prepare(&hv, &args.guest.settings("quiet"), &scratch.0, deadline)?;
    let image = Arc::new(image);
    let mem_size = image.state().mem_size;
    let quiet = args.json || !std::io::IsTerminal::is_terminal(&std::io::stderr());
    // The expected response and private memory per VM, from one measured fork.
    let probe = Engine::new(hv.clone(), image.clone(), EngineConfig { mode: Mode::Fresh, ..EngineConfig::default() });
    let (first, private_kib) = probe.serve_measuring_memory(request, args.timeout)?;
    drop(probe);
    // Where the VMs live: an engine in this process, or worker processes with one each. The
    // host's memory before and after they are made gives what each VM costs.
    let before = bench::HostMemory::read();
    let private_before = bench::private_kib_of(&[std::process::id()]);
    let target = Target::start(args, mode, &hv, &image, quiet)?;
    let density = (mode == Mode::Pool).then(|| density(&target, args.pool_size, before, private_before)).flatten();
    // The floors under the engine's own conditions: its VMs alive (a full pool in pool mode),
    // the image's memory size, file system and CPUID table.
    let floor_image = mu2_vmm::floor::FloorImage::like(&hv, &image)?;
    let floor_samples = bench::floors(&hv, &floor_image, args.floor_samples)?;
    drop(floor_image);
    let floors = floor_samples.summary();
    let setup = ForkSetup {
        mode: format!("{:?}", args.mode).to_lowercase(),
        concurrency: args.concurrency,
        mem_mib: mem_size >> 20,
        private_kib,
        floors,
        pool_size: (mode == Mode::Pool).then_some(args.pool_size),
        restore_ioctls_per_vcpu: image.restore_ioctls(),
        workers: target.workers(),
        pool_fill_rate: target.fill_rate(),
        workers_ready_ms: target.workers_ready_ms(),
        density,
    };
    let serve = target.server();
    let settle = || target.settle();
    if !args.rate.is_empty() {
        return open_loop(args, setup, &*serve, &settle, request, &first.response, &floor_samples, quiet);
    }
    let total = args.requests;
    let progress = |done: usize| {
        if !quiet && (done % 100 == 0 || done == total) {
            eprint!("\r{done}/{total} requests");
        }
    };
    let run = bench::forked(
        &*serve,
        request,
        Some(&first.response),
        args.requests,
        args.concurrency,
        args.timeout,
        &progress,
    )?;
    if !quiet {
        eprintln!();
    }
    let mut rows: Vec<CsvRow> = run
        .samples
        .iter()
        .map(|s| CsvRow { fork_us: Some(s.fork_us), run_us: Some(s.run_us), ..CsvRow::request(s.latency_us) })
        .collect();
    for (name, samples) in floor_samples.series() {
        rows.extend(samples.iter().map(|&v| CsvRow::floor(name, v)));
    }
    keep_samples(args, &run_params(args, &setup.mode, mem_size >> 20), &rows)?;
    let report = ForkReport::new(setup, &run);
    if args.json {
        crate::out::print(format!("{}\n", report.json()))?;
    } else {
        crate::out::print(report.text())?;
    }
    Ok(())
}

/// The most VMs one worker process holds: beyond it, every copy-on-write fault's MMU-notifier
/// walk and every KVM_CREATE_VM's lock of the whole address space grow with the VMs that share
/// it (see docs/PERFORMANCE.md). `--workers` is raised so that no worker holds more.
pub const MAX_VMS_PER_WORKER: usize = 64;

/// What a full pool of `vms` VMs costs the host, per VM: from `/proc/meminfo` before the
/// engine or workers started and now, and the private memory of the processes holding them.
fn density(
    target: &Target,
    vms: usize,
    before: Option<bench::HostMemory>,
    private_before: Option<u64>,
) -> Option<report::Density> {
    let (before, after) = (before?, bench::HostMemory::read()?);
    let private = match target {
        Target::InProcess(..) => bench::private_kib_of(&[std::process::id()])?.saturating_sub(private_before?),
        Target::Workers(workers, _) => bench::private_kib_of(&workers.pids())?,
    };
    let per_vm = |kib: i64| kib as f64 / vms.max(1) as f64;
    Some(report::Density {
        vms,
        available_kib_per_vm: per_vm(before.available - after.available),
        kernel_kib_per_vm: per_vm(after.kernel() - before.kernel()),
        user_private_kib_per_vm: per_vm(private as i64),
    })
}

/// What serves the benchmark's requests.
enum Target {
    /// An engine in this process, and in pool mode how fast its builders filled the pool
    /// (VMs/s).
    InProcess(Engine, Option<(f64, Option<f64>)>),
    /// Worker processes, each with its own engine, and how long they took to start and fill
    /// their pools.
    Workers(mu2_vmm::worker::Workers, Duration),
}

impl Target {
    fn start(
        args: &BenchArgs,
        mode: Mode,
        hv: &Arc<Hypervisor>,
        image: &Arc<mu2_vmm::image::Image>,
        quiet: bool,
    ) -> Result<Target, Failure> {
        // One worker per core unless told otherwise.
        let requested =
            args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
        if requested == 0 {
            let config = EngineConfig { mode, pool_size: args.pool_size, pool_builders: 2, ..EngineConfig::default() };
            let engine = Engine::new(hv.clone(), image.clone(), config);
            let mut fill_rate = None;
            if mode == Mode::Pool {
                let (filling, cpu) = (Instant::now(), bench::process_cpu_ns());
                let depth = engine.wait_for_pool(args.pool_size, Duration::from_secs(600));
                // What the builders make per second when nothing else runs: the pool's
                // capacity to keep up; and the CPU each VM took to build, which a loaded
                // machine does not change as much.
                let cpu_per_vm = cpu.zip(bench::process_cpu_ns()).map(|(a, b)| (b - a) as f64 / 1e3 / depth as f64);
                fill_rate = Some((depth as f64 / filling.elapsed().as_secs_f64(), cpu_per_vm));
                if !quiet {
                    eprintln!("pool filled: {depth} VMs in {:.1} ms", filling.elapsed().as_secs_f64() * 1e3);
                }
            }
            return Ok(Target::InProcess(engine, fill_rate));
        }
        let sharded = if mode == Mode::Fresh { 0 } else { args.pool_size.div_ceil(MAX_VMS_PER_WORKER) };
        let workers = requested.max(sharded);
        if workers > requested && !quiet {
            eprintln!("{workers} workers, so that none holds more than {MAX_VMS_PER_WORKER} VMs");
        }
        let per_worker = args.pool_size.div_ceil(workers).to_string();
        let capacity = args.concurrency.div_ceil(workers);
        let exe = std::env::current_exe().map_err(|source| CliError::Io { what: "finding this program", source })?;
        let dir = image.dir().to_path_buf();
        let mode_name = format!("{:?}", args.mode).to_lowercase();
        let spawn = move |_index: usize| {
            let mut command = std::process::Command::new(&exe);
            command.arg("__worker").arg("--image").arg(&dir).args(["--mode", &mode_name]);
            command.args(["--pool-size", &per_worker, "--builders", "1", "--capacity", &capacity.to_string()]);
            command
        };
        let config = mu2_vmm::worker::WorkerConfig {
            workers,
            capacity,
            max_request: usize::try_from(image.state().mem_size).unwrap_or(usize::MAX),
            max_response: mu2_vmm::invoke::DEFAULT_MAX_RESPONSE,
            start_timeout: Duration::from_secs(600),
            reply_grace: Duration::from_secs(5),
        };
        let starting = Instant::now();
        let workers = mu2_vmm::worker::Workers::start(config, Box::new(spawn))?;
        let ready = starting.elapsed();
        if !quiet {
            eprintln!(
                "{} worker processes ready in {:.0} ms: {:?}",
                workers.len(),
                ready.as_secs_f64() * 1e3,
                workers.pids()
            );
        }
        Ok(Target::Workers(workers, ready))
    }

    /// How fast the pool filled at the start (VMs/s), for an engine in this process.
    fn fill_rate(&self) -> Option<(f64, Option<f64>)> {
        match self {
            Target::InProcess(_, rate) => *rate,
            Target::Workers(..) => None,
        }
    }

    /// How long the worker processes took to start and fill their pools, ms.
    fn workers_ready_ms(&self) -> Option<f64> {
        match self {
            Target::InProcess(..) => None,
            Target::Workers(_, ready) => Some(ready.as_secs_f64() * 1e3),
        }
    }

    /// Worker processes, 0 when the engine runs in this process.
    fn workers(&self) -> usize {
        match self {
            Target::InProcess(..) => 0,
            Target::Workers(w, _) => w.len(),
        }
    }

    fn server(&self) -> Box<bench::ServeFn<'_>> {
        match self {
            Target::InProcess(engine, _) => Box::new(bench::engine_server(engine)),
            Target::Workers(workers, _) => Box::new(bench::workers_server(workers)),
        }
    }

    /// Waits until the VMs are ready again: a full pool, every kept VM reset.
    fn settle(&self) {
        match self {
            Target::InProcess(engine, _) => mu2_vmm::worker::Handler::settle(engine, Duration::from_secs(600)),
            Target::Workers(workers, _) => {
                if let Err(e) = workers.settle(Duration::from_secs(600)) {
                    log::warn!("settling the workers: {}", mu2_vmm::error::error_chain(&e));
                }
            }
        }
    }
}

/// The open-loop runs: one per `--rate`, in increasing rate, each from a settled engine.
#[allow(clippy::too_many_arguments)]
fn open_loop(
    args: &BenchArgs,
    setup: ForkSetup,
    serve: &bench::ServeFn<'_>,
    settle: &dyn Fn(),
    request: &[u8],
    expected: &[u8],
    floor_samples: &bench::FloorSamples,
    quiet: bool,
) -> Result<(), Failure> {
    let mut rates = args.rate.clone();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    let arrivals = bench::Arrivals::from(args.arrivals);
    let mut points = Vec::with_capacity(rates.len());
    let mut last_run = None;
    for &rate in &rates {
        settle();
        let due = bench::schedule(rate, arrivals, args.requests, args.seed);
        let run = bench::open_loop(serve, request, Some(expected), rate, &due, args.concurrency, args.timeout)?;
        let point = bench::LoadPoint::of(&run);
        if !quiet {
            eprintln!(
                "rate {rate:.0}/s: served {:.0}/s, p50 {:.1} us, p99 {:.1} us",
                point.throughput, point.latency.p50, point.latency.p99
            );
        }
        points.push(point);
        last_run = Some(run);
    }
    let report = report::OpenReport { setup, arrivals, seed: args.seed, requests_per_rate: args.requests, points };
    if let (Some(path), Some(run)) = (&args.csv, &last_run) {
        let mut params = run_params(args, &report.setup.mode, report.setup.mem_mib);
        params.push(("rate".into(), format!("{}", run.rate)));
        params.push(("arrivals".into(), arrivals.name().into()));
        let mut rows: Vec<CsvRow> = run
            .samples
            .iter()
            .map(|s| CsvRow { fork_us: Some(s.fork_us), run_us: Some(s.run_us), ..CsvRow::request(s.latency_us) })
            .collect();
        for (name, samples) in floor_samples.series() {
            rows.extend(samples.iter().map(|&v| CsvRow::floor(name, v)));
        }
        std::fs::write(path, report::samples_csv(&params, &rows))
            .map_err(|source| CliError::WriteFile { path: path.clone(), source })?;
    }
    if let Some(path) = &args.plot {
        let curve =
            plot::LoadCurve::of_report(&report.json()).ok_or(CliError::Argument("no open-loop points to plot"))?;
        plot::draw_load(&[curve], &format!("mu2 bench: latency vs load, {} mode", report.setup.mode), path)?;
    }
    if args.json {
        crate::out::print(format!("{}\n", report.json()))?;
    } else {
        crate::out::print(report.text())?;
    }
    Ok(())
}

/// The run's parameters, as the CSV's first line and the plot's subtitle show them.
fn run_params(args: &BenchArgs, mode: &str, mem_mib: u64) -> Vec<(String, String)> {
    let function = match (&args.image, &args.guest.kernel) {
        (Some(dir), _) => format!("image:{}", dir.display()),
        (None, Some(elf)) => elf.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        (None, None) => args.guest.function.clone(),
    };
    let mut params = vec![
        ("mode", mode.to_string()),
        ("function", function.replace(char::is_whitespace, "_")),
        ("requests", args.requests.to_string()),
        ("concurrency", if mode == "cold" { 1 } else { args.concurrency }.to_string()),
        ("mem_mib", mem_mib.to_string()),
    ];
    if mode == "pool" {
        params.push(("pool_size", args.pool_size.to_string()));
    }
    let floors = if mode == "cold" { "per_request".to_string() } else { args.floor_samples.to_string() };
    params.push(("floor_samples", floors));
    params.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Writes the samples to `--csv` and draws them to `--plot`, where asked.
fn keep_samples(args: &BenchArgs, params: &[(String, String)], rows: &[CsvRow]) -> Result<(), Failure> {
    if let Some(path) = &args.csv {
        std::fs::write(path, report::samples_csv(params, rows))
            .map_err(|source| CliError::WriteFile { path: path.clone(), source })?;
    }
    if let Some(path) = &args.plot {
        let mode = params.iter().find(|(k, _)| k == "mode").map_or("", |(_, v)| v.as_str());
        let mut run = plot::Run { label: "requests".to_string(), params: params.to_vec(), ..plot::Run::default() };
        for row in rows {
            match row.series {
                "request" => run.latencies.push(row.latency_us),
                floor => match run.floors.iter_mut().find(|(f, _)| f == floor) {
                    Some((_, samples)) => samples.push(row.latency_us),
                    None => run.floors.push((floor.to_string(), vec![row.latency_us])),
                },
            }
        }
        plot::draw(&[run], &format!("mu2 bench: request latency, {mode} mode"), path)?;
    }
    Ok(())
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, Failure> {
        let dir = std::env::temp_dir().join(format!(
            "mu2-image-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        std::fs::create_dir_all(&dir).map_err(|source| CliError::ScratchDir { path: dir.clone(), source })?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
