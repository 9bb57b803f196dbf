//! `mu2 serve`: the daemon, until SIGINT or SIGTERM (after its drain period).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use mu2_vmm::api::{DaemonEnd, SandboxSettings, ServeConfig, ServeError, DEFAULT_DRAIN_PERIOD};
use mu2_vmm::sandbox::OnForbidden;

use super::args::parse_duration;
use crate::failure::{CliError, Failure};

/// Listeners passed by a service manager (systemd's LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES)
/// are used instead of binding --http and --api-sock: a TCP one (or one named `http`) for the
/// dispatcher, a Unix one (or one named `api`) for the control API.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The control API's Unix socket (created mode 0600, removed on exit).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// Serve the HTTP dispatcher on this TCP address (e.g. 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
    /// Route a path prefix to an image: /PATH=IMAGE (repeatable).
    #[arg(long = "route", value_name = "/PATH=IMAGE", value_parser = mu2_vmm::api::dispatch::Routes::parse_arg)]
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
    /// Most live VMs: serving, pooled, being reset or destroyed (requests beyond it: 429 when
    /// all are serving, else 503 after a brief wait).
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_vms: usize,
    /// Most guest memory of the live VMs, each counting its whole memory size (e.g. 16G;
    /// default: this machine's physical memory); a request beyond it waits briefly, then 503.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Largest guest response, for images whose PUT sets no `max_response` (502 beyond).
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "64M")]
    max_response: u64,
    /// Most bytes of guest responses buffered at once, over all requests (503 beyond).
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "1G")]
    max_response_bytes: u64,
    /// Most bytes of request bodies buffered at once, over all connections (503 beyond).
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "256M")]
    max_buffered: u64,
    /// How long a request may take to arrive, head and body, from its first byte (408 beyond).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10s")]
    read_timeout: Duration,
    /// Most connections open at once on each listener; the next is answered 503 and closed.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_connections: usize,
    /// Deadline of one request in its VM.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Largest request body, bytes, with an optional K, M or G (413 beyond).
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "8M")]
    max_body: u64,
    /// Run without the sandbox (seccomp filters, own user, mount namespace, cgroup, landlock):
    /// for debugging only.
    #[arg(long)]
    no_sandbox: bool,
    /// The user the daemon runs as once started, when started as root (name or number).
    #[arg(long, value_name = "USER", default_value = "nobody")]
    uid: String,
    /// The group the daemon runs as once started, when started as root (name or number).
    #[arg(long, value_name = "GROUP", default_value = "nogroup")]
    gid: String,
    /// The daemon's cgroup memory limit (e.g. 8G, 512M), when started as root.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "8G")]
    memory_max: u64,
    /// The daemon's cgroup task limit (every thread counts), when started as root.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pids_max: u64,
    /// A directory `PUT /images` may name guest ELFs and images in (repeatable); the sandboxed
    /// daemon reads nothing else.
    #[arg(long = "allow-dir", value_name = "DIR")]
    allow_dirs: Vec<PathBuf>,
    /// Log system calls the seccomp filters forbid to the kernel log instead of killing the
    /// daemon: for finding what a new code path needs.
    #[arg(long)]
    seccomp_log: bool,
    /// After SIGTERM, answer 503 on /healthz for this long while still serving, so a load
    /// balancer moves traffic away; then stop (default 5s; 0: stop at once; a second signal
    /// cuts it short).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    drain_period: Option<Duration>,
}

/// A size in bytes with an optional K, M or G suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (number, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let value: u64 = number.parse().map_err(|_| format!("`{s}` is not a size like 512M or 8G"))?;
    value.checked_mul(1 << shift).ok_or_else(|| format!("`{s}` is too large"))
}

/// The sandbox the flags ask for.
fn sandbox_settings(args: &ServeArgs) -> Result<Option<SandboxSettings>, Failure> {
    if args.no_sandbox {
        return Ok(None);
    }
    let uid = mu2_vmm::api::user_id(&args.uid).ok_or(CliError::Argument("--uid: no such user"))?;
    let gid = mu2_vmm::api::group_id(&args.gid).ok_or(CliError::Argument("--gid: no such group"))?;
    let mut allow_dirs = Vec::with_capacity(args.allow_dirs.len());
    for dir in &args.allow_dirs {
        let dir = std::fs::canonicalize(dir).map_err(|_| CliError::Argument("--allow-dir: no such directory"))?;
        if !dir.is_dir() {
            return Err(CliError::Argument("--allow-dir: not a directory").into());
        }
        allow_dirs.push(dir);
    }
    Ok(Some(SandboxSettings {
        user: (uid, gid),
        memory_max: args.memory_max,
        pids_max: args.pids_max,
        allow_dirs,
        on_forbidden: if args.seccomp_log { OnForbidden::Log } else { OnForbidden::KillProcess },
    }))
}

pub fn serve(args: &ServeArgs) -> Result<(), Failure> {
    let config = ServeConfig {
        http: args.http,
        routes: args.routes.clone(),
        images_dir: args.images_dir.clone(),
        mode: args.mode,
        pool_size: args.pool_size,
        max_vms: args.max_vms,
        timeout: args.timeout,
        max_body: usize::try_from(args.max_body).unwrap_or(usize::MAX),
        max_buffered: usize::try_from(args.max_buffered).unwrap_or(usize::MAX),
        max_response_bytes: usize::try_from(args.max_response_bytes).unwrap_or(usize::MAX),
        max_response: usize::try_from(args.max_response).unwrap_or(usize::MAX),
        read_timeout: args.read_timeout,
        max_connections: args.max_connections,
        sandbox: sandbox_settings(args)?,
        drain_period: args.drain_period.unwrap_or(DEFAULT_DRAIN_PERIOD),
        ..ServeConfig::new(args.api_sock.clone())
    };
    let config = ServeConfig { max_memory: args.max_memory.unwrap_or(config.max_memory), ..config };
    let announce = |daemon: &mu2_vmm::api::Daemon| {
        let api_sock = daemon.api_sock().unwrap_or(&args.api_sock);
        for line in startup_lines(args, api_sock, daemon.http_addr()) {
            eprintln!("{line}");
        }
        match args.no_sandbox {
            true => eprintln!("mu2 serve: sandbox: none (--no-sandbox)"),
            false => eprintln!("mu2 serve: sandbox: {} (pid {})", daemon.sandbox(), std::process::id()),
        }
    };
    match mu2_vmm::api::run_until_signal(config, announce) {
        // The sandboxed daemon said why itself; its exit code passes through.
        Err(ServeError::Daemon(DaemonEnd::Failed(code))) => {
            Err(CliError::Reported(u8::try_from(code).unwrap_or(u8::MAX)).into())
        }
        result => Ok(result?),
    }
}

/// What `mu2 serve` says on stderr once it accepts requests, one line each: the API socket and
/// the dispatcher's address as they are (so `--http 127.0.0.1:0` tells its port, and a passed
/// socket its own address), each route, the mode.
fn startup_lines(args: &ServeArgs, api_sock: &Path, http: Option<std::net::SocketAddr>) -> Vec<String> {
    let mut lines = vec![format!("mu2 serve: control API on unix socket {}", api_sock.display())];
    match http {
        Some(addr) => lines.push(format!("mu2 serve: HTTP dispatcher on http://{addr}")),
        None => lines.push("mu2 serve: no HTTP dispatcher (--http ADDR starts one)".to_string()),
    }
    for (prefix, image) in &args.routes {
        lines.push(format!("mu2 serve: route {prefix} -> image {image}"));
    }
    lines.push(format!(
        "mu2 serve: /healthz and /metrics on the dispatcher; drain period {:?} after SIGTERM",
        args.drain_period.unwrap_or(DEFAULT_DRAIN_PERIOD)
    ));
    let pool = match args.mode {
        mu2_vmm::fork::Mode::Pool => format!(", {} VMs pooled per image", args.pool_size),
        _ => String::new(),
    };
    lines.push(format!(
        "mu2 serve: mode {}{pool}, at most {} VMs, {:?} per request; SIGINT or SIGTERM stops it",
        format!("{:?}", args.mode).to_lowercase(),
        args.max_vms,
        args.timeout
    ));
    let memory = args.max_memory.map_or_else(|| "this machine's memory".to_string(), |m| format!("{} MiB", m >> 20));
    lines.push(format!(
        "mu2 serve: limits: guest memory {memory}, {} connections per listener, requests read within {:?}, \
         {} MiB of bodies and {} MiB of responses buffered",
        args.max_connections,
        args.read_timeout,
        args.max_buffered >> 20,
        args.max_response_bytes >> 20
    ));
    lines
}
