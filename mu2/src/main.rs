//! The `mu2` command.

mod bench;

use std::borrow::Cow;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use mu2_devices::serial::ConsoleOutput;
use mu2_vmm::arch::EntryMode;
use mu2_vmm::invoke::{self, InvokeError};
use mu2_vmm::{guests, BuildError, GuestError, Hypervisor, HypervisorError, RunStop, Vm, VmConfig};

/// Exit codes, distinct per kind of failure so that scripts can tell them apart.
mod code {
    pub const FAILURE: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const GUEST_CRASH: u8 = 3;
    pub const TIMEOUT: u8 = 4;
    pub const NO_KVM: u8 = 5;
    pub const GUEST_PROTOCOL: u8 = 6;
}

#[derive(Parser, Debug)]
#[command(name = "mu2", version, about = "Run every request in a brand-new micro-VM.")]
#[command(after_help = "Exit codes: 0 ok, 1 other failure, 2 bad input, 3 guest crashed (fault, panic), \
                        4 timeout, 5 KVM unavailable, 6 guest broke the device protocol.")]
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

/// An error with the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        Failure { code, error: error.into() }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure { code: code::FAILURE, error }
    }
}

fn guest_error_code(e: &GuestError) -> u8 {
    match e {
        GuestError::Timeout => code::TIMEOUT,
        GuestError::Protocol(_) => code::GUEST_PROTOCOL,
        GuestError::Kvm { .. } | GuestError::Kick(_) | GuestError::Stopped => code::FAILURE,
        _ => code::GUEST_CRASH,
    }
}

fn invoke_error_code(e: &InvokeError) -> u8 {
    match e {
        InvokeError::Guest(g) => guest_error_code(g),
        InvokeError::ExitedBeforeReady(_) | InvokeError::ExitedDuringRequest(_) => code::GUEST_CRASH,
        _ => code::GUEST_PROTOCOL,
    }
}

fn open_hypervisor() -> Result<Hypervisor, Failure> {
    Hypervisor::open().map_err(|e| {
        let code = match e {
            HypervisorError::Missing | HypervisorError::PermissionDenied => code::NO_KVM,
            _ => code::FAILURE,
        };
        Failure::new(code, e)
    })
}

fn vm_config(args: &GuestArgs, extra_cmdline: &str) -> Result<VmConfig, Failure> {
    let image: Cow<'static, [u8]> = match &args.kernel {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("reading guest image {}", path.display()))
            .map_err(|e| Failure::new(code::BAD_INPUT, e))?
            .into(),
        None => guests::find(&args.function)
            .ok_or_else(|| {
                let known: Vec<_> = guests::names().collect();
                Failure::new(
                    code::BAD_INPUT,
                    anyhow::anyhow!("no built-in guest `{}` (known: {})", args.function, known.join(", ")),
                )
            })?
            .into(),
    };
    let mut config = VmConfig::new(image);
    config.mem_size = args
        .mem_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| Failure::new(code::BAD_INPUT, anyhow::anyhow!("--mem-mib {} is too large", args.mem_mib)))?;
    config.vcpus = args.vcpus;
    config.entry = match args.entry {
        Entry::Native => EntryMode::Native,
        Entry::Linux => EntryMode::Linux,
    };
    config.cmdline = format!("{} {}", extra_cmdline, args.cmdline).trim().to_string();
    Ok(config)
}

fn console(path: &Option<PathBuf>, default_stdout: bool) -> Result<ConsoleOutput, Failure> {
    match path {
        Some(p) if p.as_os_str() == "-" => Ok(Box::new(std::io::stdout())),
        Some(p) => {
            let file = std::fs::File::create(p)
                .with_context(|| format!("creating console log {}", p.display()))
                .map_err(|e| Failure::new(code::BAD_INPUT, e))?;
            Ok(Box::new(file))
        }
        None if default_stdout => Ok(Box::new(std::io::stdout())),
        None => Ok(Box::new(std::io::stderr())),
    }
}

fn boot(hv: &Hypervisor, config: &VmConfig, console: ConsoleOutput) -> Result<Vm, Failure> {
    Vm::boot(hv, config, console).map_err(|e| {
        let code = match e {
            BuildError::Config(_) | BuildError::Arch(mu2_vmm::arch::ArchError::Load(_)) => code::BAD_INPUT,
            BuildError::Arch(mu2_vmm::arch::ArchError::ImagePlacement { .. }) | BuildError::Cmdline(_) => {
                code::BAD_INPUT
            }
            _ => code::FAILURE,
        };
        Failure::new(code, e)
    })
}

fn run(args: &RunArgs) -> Result<(), Failure> {
    let hv = open_hypervisor()?;
    let (mut vm, socket) = match &args.image {
        Some(dir) => {
            let image = load_image(&hv, dir)?;
            let mut vm = Vm::restore(&hv, &image).map_err(|e| Failure::new(code::FAILURE, e))?;
            vm.hand_out(&image).map_err(|e| Failure::new(code::FAILURE, e))?;
            let socket = args.vsock_uds.as_ref().map(|p| mu2_vmm::uds::fork_path(p, u64::from(std::process::id())));
            (vm, socket)
        }
        None => {
            let config = vm_config(&args.guest, "")?;
            (boot(&hv, &config, console(&args.guest.console, true)?)?, args.vsock_uds.clone())
        }
    };
    let deadline = args.timeout.map(|t| Instant::now() + t);
    if let Some(path) = &socket {
        eprintln!("vsock socket: {}", path.display());
        return match mu2_vmm::uds::run(&mut vm, path, deadline) {
            Ok(0) => Ok(()),
            Ok(code) => Err(Failure::new(code::GUEST_CRASH, anyhow::anyhow!("guest exited with code {code}"))),
            Err(mu2_vmm::uds::UdsError::Guest(e)) => Err(Failure::new(guest_error_code(&e), e)),
            Err(e) => Err(Failure::new(code::FAILURE, e)),
        };
    }
    loop {
        match vm.run(deadline) {
            Ok(RunStop::Ready(info)) => {
                log::info!("guest ready: listening on vsock port {}", info.port);
            }
            Ok(RunStop::Exited(0)) => return Ok(()),
            Ok(RunStop::Exited(code)) => {
                return Err(Failure::new(code::GUEST_CRASH, anyhow::anyhow!("guest exited with code {code}")))
            }
            Ok(RunStop::Idle) => {
                // Nothing can wake the guest but a host connection, and `run` opens none:
                // wait for the deadline or an interrupt.
                match deadline {
                    Some(d) => {
                        std::thread::sleep(d.saturating_duration_since(Instant::now()));
                        return Err(Failure::new(code::TIMEOUT, GuestError::Timeout));
                    }
                    None => loop {
                        std::thread::park();
                    },
                }
            }
            Err(e) => return Err(Failure::new(guest_error_code(&e), e)),
        }
    }
}

fn request_bytes(data: &str) -> Result<Vec<u8>, Failure> {
    match data.strip_prefix('@') {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("reading request file {path}"))
            .map_err(|e| Failure::new(code::BAD_INPUT, e)),
        None => Ok(data.as_bytes().to_vec()),
    }
}

fn load_image(hv: &Hypervisor, dir: &std::path::Path) -> Result<mu2_vmm::image::Image, Failure> {
    mu2_vmm::image::Image::load(hv, dir).map_err(|e| {
        let code = match e {
            mu2_vmm::image::ImageError::Snapshot { .. } | mu2_vmm::image::ImageError::Invalid { .. } => code::BAD_INPUT,
            _ => code::FAILURE,
        };
        Failure::new(code, e)
    })
}

fn fork_error_code(e: &mu2_vmm::fork::ForkError) -> u8 {
    match e {
        mu2_vmm::fork::ForkError::Invoke(e) => invoke_error_code(e),
        _ => code::FAILURE,
    }
}

fn invoke_image(args: &InvokeArgs, dir: &std::path::Path, request: &[u8]) -> Result<(), Failure> {
    use mu2_vmm::fork::{Engine, EngineConfig, Mode};
    let hv = std::sync::Arc::new(open_hypervisor()?);
    let start = Instant::now();
    let image = std::sync::Arc::new(load_image(&hv, dir)?);
    let loaded = Instant::now();
    let config = EngineConfig { mode: Mode::Fresh, max_response: args.max_response, ..EngineConfig::default() };
    let engine = Engine::new(hv, image, config);
    let served = engine.serve(request, args.timeout).map_err(|e| Failure::new(fork_error_code(&e), e))?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&served.response).and_then(|()| stdout.flush()).context("writing the response")?;
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
    let hv = open_hypervisor()?;
    let config = vm_config(&args.guest, "quiet")?;
    let start = Instant::now();
    mu2_vmm::image::create(&hv, &config, &args.out, Some(start + args.timeout)).map_err(|e| {
        let code = match &e {
            mu2_vmm::image::ImageError::Build(BuildError::Config(_)) => code::BAD_INPUT,
            mu2_vmm::image::ImageError::Boot(InvokeError::Guest(GuestError::Timeout)) => code::TIMEOUT,
            _ => code::FAILURE,
        };
        Failure::new(code, e)
    })?;
    eprintln!("image written to {} in {:.1} ms", args.out.display(), start.elapsed().as_secs_f64() * 1e3);
    Ok(())
}

fn invoke_cmd(args: &InvokeArgs) -> Result<(), Failure> {
    let request = request_bytes(&args.data)?;
    if let Some(dir) = &args.image {
        return invoke_image(args, dir, &request);
    }
    let hv = open_hypervisor()?;
    let extra = match args.port {
        Some(p) => format!("quiet {}={p}", mu2_abi::cmdline::PORT),
        None => "quiet".to_string(),
    };
    let config = vm_config(&args.guest, &extra)?;
    let start = Instant::now();
    let deadline = Some(start + args.timeout);
    let mut vm = boot(&hv, &config, console(&args.guest.console, false)?)?;
    let wrap = |e: InvokeError| Failure::new(invoke_error_code(&e), e);
    let ready = invoke::run_until_ready(&mut vm, deadline).map_err(wrap)?;
    let ready_at = Instant::now();
    let port = args.port.unwrap_or(ready.port);
    let response = invoke::invoke(&mut vm, port, &request, args.max_response, deadline).map_err(wrap)?;
    let answered_at = Instant::now();
    let stats = vm.stats();
    drop(vm);
    let torn_down_at = Instant::now();

    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&response).and_then(|()| stdout.flush()).context("writing the response")?;
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
    use mu2_vmm::api::{ServeConfig, ServeError};
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
    mu2_vmm::api::run_until_signal(config).map_err(|e| {
        let code = match &e {
            ServeError::Config(_) => code::BAD_INPUT,
            ServeError::Hypervisor(HypervisorError::Missing | HypervisorError::PermissionDenied) => code::NO_KVM,
            _ => code::FAILURE,
        };
        Failure::new(code, e)
    })
}

fn bench_cmd(args: &BenchArgs) -> Result<(), Failure> {
    use crate::bench::{self, BenchConfig, Summary};
    if args.requests == 0 {
        return Err(Failure::new(code::BAD_INPUT, anyhow::anyhow!("--requests must be at least 1")));
    }
    let request = request_bytes(&args.data)?;
    if args.mode != BenchMode::Cold {
        return fork_bench(args, &request);
    }
    let hv = open_hypervisor()?;
    let config =
        BenchConfig { vm: vm_config(&args.guest, "quiet")?, request, requests: args.requests, timeout: args.timeout };
    let started = Instant::now();
    let show_progress = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let samples = bench::cold(&hv, &config, |done| {
        if show_progress {
            eprint!("\r{done}/{} requests", args.requests);
        }
    })
    .map_err(|e| Failure::new(code::FAILURE, e))?;
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
        return Err(Failure::new(code::BAD_INPUT, anyhow::anyhow!("--concurrency and --pool-size must be at least 1")));
    }
    let hv = Arc::new(open_hypervisor()?);
    // An image given, or a temporary one of the chosen guest.
    let temp_dir;
    let dir = match &args.image {
        Some(dir) => dir.clone(),
        None => {
            temp_dir = TempDir::new()?;
            let config = vm_config(&args.guest, "quiet")?;
            mu2_vmm::image::create(&hv, &config, &temp_dir.0, Some(Instant::now() + Duration::from_secs(60)))
                .map_err(|e| Failure::new(code::FAILURE, e))?;
            temp_dir.0.clone()
        }
    };
    let image = Arc::new(load_image(&hv, &dir)?);
    let mem_size = image.state().mem_size;
    let mode = match args.mode {
        BenchMode::Fresh => Mode::Fresh,
        BenchMode::Pool => Mode::Pool,
        _ => Mode::Reuse,
    };
    let quiet = args.json || !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let floors = bench::floors(&hv, mem_size, args.floor_samples).map_err(|e| Failure::new(code::FAILURE, e))?;
    // The expected response and private memory per VM, from one measured fork.
    let probe = Engine::new(hv.clone(), image.clone(), EngineConfig { mode: Mode::Fresh, ..EngineConfig::default() });
    let (first, private_kib) =
        probe.serve_measuring_memory(request, args.timeout).map_err(|e| Failure::new(fork_error_code(&e), e))?;
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
    )
    .map_err(|e| Failure::new(code::FAILURE, e))?;
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
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        plot_cdf(path, &col(|s| s.latency_us), &format!("mu2 {mode_name}: request latency"))
            .with_context(|| format!("drawing {}", path.display()))?;
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
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, Failure> {
        let dir = std::env::temp_dir().join(format!(
            "mu2-image-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn plot_cdf(path: &std::path::Path, latencies: &[f64], title: &str) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let mut sorted = latencies.to_vec();
    sorted.sort_by(f64::total_cmp);
    let max = sorted.last().copied().unwrap_or(1.0).max(1.0);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max * 1.05, 0.0..1.0)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("latency (µs)")
        .y_desc("fraction of requests")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let n = sorted.len().max(1) as f64;
    chart
        .draw_series(LineSeries::new(sorted.iter().enumerate().map(|(i, v)| (*v, (i + 1) as f64 / n)), &BLUE))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
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
            return ExitCode::from(if e.use_stderr() { code::BAD_INPUT } else { 0 });
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
        Err(Failure { code, error }) => {
            eprintln!("mu2: {}", format_chain(&error));
            ExitCode::from(code)
        }
    }
}

fn format_chain(error: &anyhow::Error) -> String {
    let mut out = error.to_string();
    for cause in error.chain().skip(1) {
        out.push_str(": ");
        out.push_str(&cause.to_string());
    }
    out
}
