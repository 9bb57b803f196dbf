//! The `mu2` command.

mod bench;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use mu2_devices::serial::ConsoleOutput;
use mu2_vmm::arch::EntryMode;
use mu2_vmm::error::{error_chain, Classify, FailureKind};
use mu2_vmm::image::Image;
use mu2_vmm::invoke;
use mu2_vmm::source::{GuestSettings, ImageSource, SourceError};
use mu2_vmm::{guests, GuestError, Hypervisor, RunStop, Vm, VmConfig};

/// The exit code of a failure of this kind: distinct per kind so that scripts can tell them
/// apart. `after_help` and README.md list them.
fn exit_code(kind: FailureKind) -> u8 {
    match kind {
        FailureKind::Internal => 1,
        FailureKind::BadInput => 2,
        FailureKind::GuestCrash => 3,
        FailureKind::Timeout => 4,
        FailureKind::KvmUnavailable => 5,
        FailureKind::GuestProtocol => 6,
        FailureKind::ResourceExhausted => 7,
    }
}

#[derive(Parser, Debug)]
#[command(name = "mu2", version, about = "Run every request in a brand-new micro-VM.")]
#[command(after_help = "Exit codes: 0 ok, 1 other failure, 2 bad input, 3 guest crashed (fault, panic), \
                        4 timeout, 5 KVM unavailable, 6 guest broke the device protocol, \
                        7 resource exhausted (memory, file descriptors).")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest and stream its console until it stops.
    Run(RunArgs),
    /// Cold-boot a VM, send one request over vsock, print the response bytes to stdout.
    Invoke(InvokeArgs),
    /// Boot a guest, wait until it is ready, freeze it into an image directory.
    Snapshot(SnapshotArgs),
    /// Measure request latency next to the raw KVM floor of this host.
    Bench(BenchArgs),
    /// List the guests built into this binary.
    Guests,
    /// Run the daemon: the control API on a Unix socket, the HTTP dispatcher on TCP.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// The control API's Unix socket (created mode 0600, removed on exit).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// Serve the HTTP dispatcher on this TCP address (e.g. 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
    /// Route a path prefix to an image: /PATH=IMAGE (repeatable).
    #[arg(long = "route", value_name = "/PATH=IMAGE", value_parser = mu2_vmm::dispatch::Routes::parse_arg)]
    routes: Vec<(String, String)>,
    /// Where images made by the daemon go (default: a temporary directory, removed on exit).
    #[arg(long, value_name = "DIR")]
    images_dir: Option<PathBuf>,
    /// How each request gets its VM.
    #[arg(long, value_name = "MODE", default_value = "pool")]
    mode: mu2_vmm::fork::Mode,
    /// VMs kept ready per image in pool mode.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pool_size: usize,
    /// Most VMs in use at once (requests in flight plus pooled VMs); beyond it requests get 429.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_vms: usize,
    /// Deadline of one request in its VM.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Largest request body, bytes (413 beyond).
    #[arg(long, value_name = "BYTES", default_value_t = 8 << 20)]
    max_body: usize,
}

#[derive(Args, Debug)]
struct GuestArgs {
    /// A guest ELF image to boot.
    #[arg(long, value_name = "ELF", conflicts_with = "function")]
    kernel: Option<PathBuf>,
    /// A built-in guest by name (see `mu2 guests`).
    #[arg(long, value_name = "NAME", default_value = "echo")]
    function: String,
    /// Guest memory in MiB (a multiple of 2).
    #[arg(long, value_name = "N", default_value_t = 64)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,
    /// Extra kernel command-line text for the guest.
    #[arg(long, value_name = "S", default_value = "")]
    cmdline: String,
    /// How the vCPU enters the guest.
    #[arg(long, value_enum, default_value_t = Entry::Native)]
    entry: Entry,
    /// Where the guest console goes: a file path, or `-` for this process's standard output.
    #[arg(long, value_name = "PATH")]
    console: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Entry {
    /// mu2's own: the VMM sets up long mode and starts the guest at CPL 3.
    Native,
    /// The Linux x86_64 64-bit boot protocol: CPL 0, boot_params in RSI.
    Linux,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Stop the guest after this long (e.g. 500ms, 10s, 2m).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Bridge the guest's vsock to Unix sockets: connect to PATH and send `CONNECT <port>`;
    /// guest connections to host port P go to PATH_P. With --image, each fork gets its own
    /// path: PATH.<pid of this mu2>, printed on stderr.
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// Run a VM forked from this frozen image instead of booting a guest.
    #[arg(long, value_name = "DIR", conflicts_with = "kernel")]
    image: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct InvokeArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// The vsock port to connect to (default: the one the guest reports).
    #[arg(long, value_name = "P")]
    port: Option<u32>,
    /// Fork this frozen image instead of cold-booting a guest.
    #[arg(long, value_name = "DIR", conflicts_with = "kernel")]
    image: Option<PathBuf>,
    /// Give up after this long, boot included (e.g. 500ms, 10s).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10s")]
    timeout: Duration,
    /// The request: a string, or @FILE for a file's bytes.
    #[arg(long, value_name = "STR|@FILE")]
    data: String,
    /// Largest response accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = invoke::DEFAULT_MAX_RESPONSE)]
    max_response: usize,
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

#[derive(Args, Debug)]
struct SnapshotArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// The image directory to write.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Give up if the guest is not ready after this long.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "30s")]
    timeout: Duration,
}

#[derive(Args, Debug)]
struct BenchArgs {
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

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("`{s}` is not a duration like 500ms or 10s"))?;
    let scale = match unit {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("unknown time unit `{unit}` (use us, ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("`{s}`: {e}"))
}

/// A command's failure: the error, and the kind of failure it is, which picks the exit code.
/// Made only from an error that classifies itself, so no command chooses a code of its own.
#[derive(Debug)]
struct Failure {
    kind: FailureKind,
    error: anyhow::Error,
}

impl<E: Classify + Send + Sync + 'static> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure { kind: error.kind(), error: error.into() }
    }
}

/// The failures of the command itself, as opposed to the library's.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// A file the user named could not be read.
    #[error("reading request file {path}")]
    ReadRequest {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A file the user named could not be created.
    #[error("creating {what} {}", path.display())]
    CreateFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file the user named could not be written.
    #[error("writing {}", path.display())]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The latency plot could not be drawn.
    #[error("drawing {}: {message}", path.display())]
    Plot { path: PathBuf, message: String },
    /// An argument is out of range.
    #[error("{0}")]
    Argument(&'static str),
    /// Standard output could not be written.
    #[error("writing the response")]
    WriteResponse(#[source] std::io::Error),
    /// A scratch directory could not be made.
    #[error("creating {}", path.display())]
    ScratchDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The guest ran to its end but reported failure.
    #[error("guest exited with code {0}")]
    GuestExited(u32),
}

impl Classify for CliError {
    fn kind(&self) -> FailureKind {
        match self {
            CliError::ReadRequest { .. }
            | CliError::CreateFile { .. }
            | CliError::WriteFile { .. }
            | CliError::Argument(_) => FailureKind::BadInput,
            CliError::Plot { .. } | CliError::WriteResponse(_) | CliError::ScratchDir { .. } => FailureKind::Internal,
            CliError::GuestExited(_) => FailureKind::GuestCrash,
        }
    }
}

impl GuestArgs {
    /// The guest to boot: `--kernel`, or else the built-in `--function`.
    fn source(&self) -> ImageSource {
        match &self.kernel {
            Some(path) => ImageSource::Kernel(path.clone()),
            None => ImageSource::Builtin(self.function.clone()),
        }
    }

    /// How to boot it; `extra_cmdline` goes before the user's `--cmdline`.
    fn settings(&self, extra_cmdline: &str) -> GuestSettings {
        GuestSettings {
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            cmdline: format!("{extra_cmdline} {}", self.cmdline),
            entry: match self.entry {
                Entry::Native => EntryMode::Native,
                Entry::Linux => EntryMode::Linux,
            },
        }
    }

    fn vm_config(&self, extra_cmdline: &str) -> Result<VmConfig, SourceError> {
        self.source().vm_config(&self.settings(extra_cmdline))
    }
}

fn console(path: &Option<PathBuf>, default_stdout: bool) -> Result<ConsoleOutput, Failure> {
    match path {
        Some(p) if p.as_os_str() == "-" => Ok(Box::new(std::io::stdout())),
        Some(p) => {
            let file = std::fs::File::create(p).map_err(|source| CliError::CreateFile {
                what: "console log",
                path: p.clone(),
                source,
            })?;
            Ok(Box::new(file))
        }
        None if default_stdout => Ok(Box::new(std::io::stdout())),
        None => Ok(Box::new(std::io::stderr())),
    }
}

fn run(args: &RunArgs) -> Result<(), Failure> {
    let hv = Hypervisor::open()?;
    let (mut vm, socket) = match &args.image {
        Some(dir) => {
            let image = Image::load(&hv, dir)?;
            let mut vm = Vm::restore(&hv, &image)?;
            vm.hand_out(&image)?;
            let socket = args.vsock_uds.as_ref().map(|p| mu2_vmm::uds::fork_path(p, u64::from(std::process::id())));
            (vm, socket)
        }
        None => {
            let config = args.guest.vm_config("")?;
            (Vm::boot(&hv, &config, console(&args.guest.console, true)?)?, args.vsock_uds.clone())
        }
    };
    let deadline = args.timeout.map(|t| Instant::now() + t);
    if let Some(path) = &socket {
        eprintln!("vsock socket: {}", path.display());
        return match mu2_vmm::uds::run(&mut vm, path, deadline)? {
            0 => Ok(()),
            code => Err(CliError::GuestExited(code).into()),
        };
    }
    loop {
        match vm.run(deadline)? {
            RunStop::Ready(info) => {
                log::info!("guest ready: listening on vsock port {}", info.port);
            }
            RunStop::Exited(0) => return Ok(()),
            RunStop::Exited(code) => return Err(CliError::GuestExited(code).into()),
            RunStop::Idle => {
                // Nothing can wake the guest but a host connection, and `run` opens none:
                // wait for the deadline or an interrupt.
                match deadline {
                    Some(d) => {
                        std::thread::sleep(d.saturating_duration_since(Instant::now()));
                        return Err(GuestError::Timeout.into());
                    }
                    None => loop {
                        std::thread::park();
                    },
                }
            }
        }
    }
}

fn request_bytes(data: &str) -> Result<Vec<u8>, Failure> {
    match data.strip_prefix('@') {
        Some(path) => {
            Ok(std::fs::read(path).map_err(|source| CliError::ReadRequest { path: path.to_string(), source })?)
        }
        None => Ok(data.as_bytes().to_vec()),
    }
}

fn write_response(response: &[u8]) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(response).and_then(|()| stdout.flush()).map_err(CliError::WriteResponse)?;
    Ok(())
}

fn invoke_image(args: &InvokeArgs, dir: &std::path::Path, request: &[u8]) -> Result<(), Failure> {
    use mu2_vmm::fork::{Engine, EngineConfig, Mode};
    let hv = std::sync::Arc::new(Hypervisor::open()?);
    let start = Instant::now();
    let image = std::sync::Arc::new(Image::load(&hv, dir)?);
    let loaded = Instant::now();
    let config = EngineConfig { mode: Mode::Fresh, max_response: args.max_response, ..EngineConfig::default() };
    let engine = Engine::new(hv, image, config);
    let served = engine.serve(request, args.timeout)?;
    write_response(&served.response)?;
    eprintln!(
        "image load {:.1} us, fork {:.1} us, request {:.1} us, vm {}",
        micros(loaded - start),
        served.fork_us,
        served.run_us,
        served.vm_id
    );
    Ok(())
}

fn snapshot_cmd(args: &SnapshotArgs) -> Result<(), Failure> {
    let config = args.guest.vm_config("quiet")?;
    let hv = Hypervisor::open()?;
    let start = Instant::now();
    mu2_vmm::image::create(&hv, &config, &args.out, Some(start + args.timeout))?;
    eprintln!("image written to {} in {:.1} ms", args.out.display(), start.elapsed().as_secs_f64() * 1e3);
    Ok(())
}

fn invoke_cmd(args: &InvokeArgs) -> Result<(), Failure> {
    let request = request_bytes(&args.data)?;
    if let Some(dir) = &args.image {
        return invoke_image(args, dir, &request);
    }
    let extra = match args.port {
        Some(p) => format!("quiet {}={p}", mu2_abi::cmdline::PORT),
        None => "quiet".to_string(),
    };
    let config = args.guest.vm_config(&extra)?;
    let hv = Hypervisor::open()?;
    let start = Instant::now();
    let deadline = Some(start + args.timeout);
    let mut vm = Vm::boot(&hv, &config, console(&args.guest.console, false)?)?;
    let ready = invoke::run_until_ready(&mut vm, deadline)?;
    let ready_at = Instant::now();
    let port = args.port.unwrap_or(ready.port);
    let response = invoke::invoke(&mut vm, port, &request, args.max_response, deadline)?;
    let answered_at = Instant::now();
    let stats = vm.stats();
    drop(vm);
    let torn_down_at = Instant::now();

    write_response(&response)?;
    eprintln!(
        "boot-to-ready {:.1} us, request-to-response {:.1} us, teardown {:.1} us, exits {} (waits {}, virtio {}, sysdev {}, pio {})",
        micros(ready_at - start),
        micros(answered_at - ready_at),
        micros(torn_down_at - answered_at),
        stats.entries,
        stats.waits,
        stats.virtio_mmio,
        stats.sysdev,
        stats.pio,
    );
    Ok(())
}

fn serve_cmd(args: &ServeArgs) -> Result<(), Failure> {
    use mu2_vmm::api::ServeConfig;
    let config = ServeConfig {
        http: args.http,
        routes: args.routes.clone(),
        images_dir: args.images_dir.clone(),
        mode: args.mode,
        pool_size: args.pool_size,
        max_vms: args.max_vms,
        timeout: args.timeout,
        max_body: args.max_body,
        ..ServeConfig::new(args.api_sock.clone())
    };
    Ok(mu2_vmm::api::run_until_signal(config)?)
}

fn bench_cmd(args: &BenchArgs) -> Result<(), Failure> {
    use crate::bench::{self, BenchConfig, Summary};
    if args.requests == 0 {
        return Err(CliError::Argument("--requests must be at least 1").into());
    }
    let request = request_bytes(&args.data)?;
    if args.mode != BenchMode::Cold {
        return fork_bench(args, &request);
    }
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
    let elapsed = started.elapsed().as_secs_f64();
    let col = |f: fn(&bench::Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let latency = Summary::of(&col(|s| s.latency_us));
    let boot = Summary::of(&col(|s| s.boot_to_ready_us));
    let req = Summary::of(&col(|s| s.request_us));
    let teardown = Summary::of(&col(|s| s.teardown_us));
    let floor = Summary::of(&col(|s| s.floor_fresh_us));
    let boot_exits = Summary::of(&col(|s| s.boot_exits as f64));
    let req_exits = Summary::of(&col(|s| s.request_exits as f64));
    // Floor cycles interleave with requests; throughput counts the requests' own time only.
    let request_time: f64 = samples.iter().map(|s| s.latency_us + s.teardown_us).sum::<f64>() / 1e6;
    let throughput = samples.len() as f64 / request_time;
    let mode = "cold";
    if args.json {
        let report = serde_json::json!({
            "mode": mode,
            "function": args.guest.kernel.as_ref().map_or(args.guest.function.clone(), |p| p.display().to_string()),
            "mem_mib": args.guest.mem_mib,
            "requests": samples.len(),
            "concurrency": 1,
            "p50_us": latency.p50, "p90_us": latency.p90, "p99_us": latency.p99, "max_us": latency.max,
            "throughput_rps": throughput,
            "boot_to_ready_p50_us": boot.p50, "boot_to_ready_p90_us": boot.p90,
            "request_p50_us": req.p50, "request_p90_us": req.p90,
            "teardown_p50_us": teardown.p50,
            "boot_exits_p50": boot_exits.p50, "request_exits_p50": req_exits.p50,
            "floor_fresh_p50_us": floor.p50, "floor_fresh_p90_us": floor.p90,
            "ratio_p50_to_floor_fresh": latency.p50 / floor.p50,
            "wall_seconds": elapsed,
        });
        println!("{report}");
    } else {
        let row = |name: &str, s: &Summary| {
            println!("  {name:<20} p50 {:>9.1}  p90 {:>9.1}  p99 {:>9.1}  max {:>9.1}  us", s.p50, s.p90, s.p99, s.max)
        };
        println!("mode {mode}, {} requests, concurrency 1, {} MiB", samples.len(), args.guest.mem_mib);
        row("latency", &latency);
        row("  boot-to-ready", &boot);
        row("  request", &req);
        row("teardown", &teardown);
        row("floor_fresh", &floor);
        println!("  exits per VM: boot p50 {:.0}, request p50 {:.0}", boot_exits.p50, req_exits.p50);
        println!("  throughput {throughput:.1} requests/s (one at a time, teardown included)");
        println!("  latency p50 / floor_fresh p50 = {:.2}", latency.p50 / floor.p50);
    }
    Ok(())
}

fn fork_bench(args: &BenchArgs, request: &[u8]) -> Result<(), Failure> {
    use crate::bench::{self, Summary};
    use mu2_vmm::fork::{Engine, EngineConfig, Mode};
    use std::sync::Arc;
    if args.concurrency == 0 || args.pool_size == 0 {
        return Err(CliError::Argument("--concurrency and --pool-size must be at least 1").into());
    }
    let hv = Arc::new(Hypervisor::open()?);
    // An image given, or a temporary one of the chosen guest (the scratch directory, removed
    // when the run ends, is left empty when an image is given).
    let source = args.image.clone().map_or_else(|| args.guest.source(), ImageSource::Dir);
    let scratch = TempDir::new()?;
    let deadline = Some(Instant::now() + Duration::from_secs(60));
    let (image, _) = source.prepare(&hv, &args.guest.settings("quiet"), &scratch.0, deadline)?;
    let image = Arc::new(image);
    let mem_size = image.state().mem_size;
    let mode = match args.mode {
        BenchMode::Fresh => Mode::Fresh,
        BenchMode::Pool => Mode::Pool,
        _ => Mode::Reuse,
    };
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
    let col = |f: fn(&bench::ForkSample) -> f64| run.samples.iter().map(f).collect::<Vec<f64>>();
    let latency = Summary::of(&col(|s| s.latency_us));
    let fork = Summary::of(&col(|s| s.fork_us));
    let run_part = Summary::of(&col(|s| s.run_us));
    let throughput = run.samples.len() as f64 / run.wall.as_secs_f64();
    let mode_name = format!("{:?}", args.mode).to_lowercase();
    if let Some(path) = &args.csv {
        let mut text = String::from("index,fork_us,run_us,latency_us\n");
        for (i, s) in run.samples.iter().enumerate() {
            text.push_str(&format!("{i},{:.1},{:.1},{:.1}\n", s.fork_us, s.run_us, s.latency_us));
        }
        std::fs::write(path, text).map_err(|source| CliError::WriteFile { path: path.clone(), source })?;
    }
    if let Some(path) = &args.plot {
        let svg = plot_cdf(&col(|s| s.latency_us), &format!("mu2 {mode_name}: request latency"))
            .map_err(|message| CliError::Plot { path: path.clone(), message })?;
        std::fs::write(path, svg).map_err(|source| CliError::WriteFile { path: path.clone(), source })?;
    }
    if args.json {
        let report = serde_json::json!({
            "mode": mode_name,
            "requests": run.samples.len(),
            "concurrency": args.concurrency,
            "mem_mib": mem_size >> 20,
            "p50_us": latency.p50, "p90_us": latency.p90, "p99_us": latency.p99, "max_us": latency.max,
            "throughput_rps": throughput,
            "private_kib_per_vm": private_kib,
            "fork_p50_us": fork.p50, "run_p50_us": run_part.p50,
            "floor_fresh_p50_us": floors.fresh.p50, "floor_reuse_p50_us": floors.reuse.p50,
            "ratio_p50_to_floor_fresh": latency.p50 / floors.fresh.p50,
            "ratio_p50_to_floor_reuse": latency.p50 / floors.reuse.p50,
            "pool_size": (mode == Mode::Pool).then_some(args.pool_size),
            "restore_ioctls_per_vcpu": image.restore_ioctls(),
        });
        println!("{report}");
    } else {
        let row = |name: &str, s: &Summary| {
            println!("  {name:<14} p50 {:>9.1}  p90 {:>9.1}  p99 {:>9.1}  max {:>9.1}  us", s.p50, s.p90, s.p99, s.max)
        };
        println!(
            "mode {mode_name}, {} requests, concurrency {}, {} MiB image",
            run.samples.len(),
            args.concurrency,
            mem_size >> 20
        );
        row("latency", &latency);
        row("  fork", &fork);
        row("  run", &run_part);
        row("floor_fresh", &floors.fresh);
        row("floor_reuse", &floors.reuse);
        println!("  throughput {throughput:.0} requests/s");
        match private_kib {
            Some(kib) => println!("  private memory per VM {kib} KiB"),
            None => println!("  private memory per VM: unknown (no /proc/self/smaps)"),
        }
        println!(
            "  latency p50 / floor_fresh p50 = {:.2}, / floor_reuse p50 = {:.2}",
            latency.p50 / floors.fresh.p50,
            latency.p50 / floors.reuse.p50
        );
    }
    Ok(())
}

/// A temporary directory removed on drop.
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

/// The latency CDF of `latencies` as an SVG document.
fn plot_cdf(latencies: &[f64], title: &str) -> Result<String, String> {
    use plotters::prelude::*;
    let mut sorted = latencies.to_vec();
    sorted.sort_by(f64::total_cmp);
    let max = sorted.last().copied().unwrap_or(1.0).max(1.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..max * 1.05, 0.0..1.0)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("latency (µs)")
            .y_desc("fraction of requests")
            .draw()
            .map_err(|e| e.to_string())?;
        let n = sorted.len().max(1) as f64;
        chart
            .draw_series(LineSeries::new(sorted.iter().enumerate().map(|(i, v)| (*v, (i + 1) as f64 / n)), &BLUE))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // A usage error is bad input; --help and --version are not errors.
            return ExitCode::from(if e.use_stderr() { exit_code(FailureKind::BadInput) } else { 0 });
        }
    };
    let result = match &cli.command {
        Command::Run(args) => run(args),
        Command::Invoke(args) => invoke_cmd(args),
        Command::Bench(args) => bench_cmd(args),
        Command::Snapshot(args) => snapshot_cmd(args),
        Command::Serve(args) => serve_cmd(args),
        Command::Guests => {
            for name in guests::names() {
                let kind = if guests::EXAMPLES.contains(&name) { "example function" } else { "test guest" };
                println!("{name:<10} {kind}");
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { kind, error }) => {
            eprintln!("mu2: {}", error_chain(&*error));
            ExitCode::from(exit_code(kind))
        }
    }
}
