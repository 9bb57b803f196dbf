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
use crate::report::{self, ColdReport, ForkReport, ForkSetup};

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
    /// Also write every sample to this CSV file.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Also draw the latency CDF to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
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
    let report = ColdReport::new(function, args.guest.mem_mib, &samples, started.elapsed().as_secs_f64());
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.text());
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
    let floors = bench::floors(&hv, mem_size, args.floor_samples)?;
    // The expected response and private memory per VM, from one measured fork.
    let probe = Engine::new(hv.clone(), image.clone(), EngineConfig { mode: Mode::Fresh, ..EngineConfig::default() });
    let (first, private_kib) = probe.serve_measuring_memory(request, args.timeout)?;
    drop(probe);
    let engine = Engine::new(
        hv.clone(),
        image.clone(),
        EngineConfig { mode, pool_size: args.pool_size, pool_builders: 2, ..EngineConfig::default() },
    );
    if mode == Mode::Pool {
        let depth = engine.wait_for_pool(args.pool_size, Duration::from_secs(600));
        if !quiet {
            eprintln!("pool filled: {depth} VMs");
        }
    }
    let total = args.requests;
    let progress = |done: usize| {
        if !quiet && (done % 100 == 0 || done == total) {
            eprint!("\r{done}/{total} requests");
        }
    };
    let run = bench::forked(
        &engine,
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
    let mode_name = format!("{:?}", args.mode).to_lowercase();
    if let Some(path) = &args.csv {
        std::fs::write(path, report::fork_samples_csv(&run.samples))
            .map_err(|source| CliError::WriteFile { path: path.clone(), source })?;
    }
    if let Some(path) = &args.plot {
        let latencies: Vec<f64> = run.samples.iter().map(|s| s.latency_us).collect();
        let svg = plot::latency_cdf_svg(&latencies, &format!("mu2 {mode_name}: request latency"))
            .map_err(|message| CliError::Plot { path: path.clone(), message })?;
        std::fs::write(path, svg).map_err(|source| CliError::WriteFile { path: path.clone(), source })?;
    }
    let setup = ForkSetup {
        mode: mode_name,
        concurrency: args.concurrency,
        mem_mib: mem_size >> 20,
        private_kib,
        floors,
        pool_size: (mode == Mode::Pool).then_some(args.pool_size),
        restore_ioctls_per_vcpu: image.restore_ioctls(),
    };
    let report = ForkReport::new(setup, &run);
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.text());
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
