//! `mu2 serve`: the daemon, until SIGINT or SIGTERM (after its drain period).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use mu2_vmm::api::{ServeConfig, DEFAULT_DRAIN_PERIOD};

use super::args::parse_duration;
use crate::failure::Failure;

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
    /// Most VMs in use at once (requests in flight plus pooled VMs); beyond it requests get 429.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_vms: usize,
    /// Deadline of one request in its VM.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Largest request body, bytes (413 beyond).
    #[arg(long, value_name = "BYTES", default_value_t = 8 << 20)]
    max_body: usize,
    /// After SIGTERM, answer 503 on /healthz for this long while still serving, so a load
    /// balancer moves traffic away; then stop (default 5s; 0: stop at once; a second signal
    /// cuts it short).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    drain_period: Option<Duration>,
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
        max_body: args.max_body,
        drain_period: args.drain_period.unwrap_or(DEFAULT_DRAIN_PERIOD),
        ..ServeConfig::new(args.api_sock.clone())
    };
    let announce = |daemon: &mu2_vmm::api::Daemon| {
        let api_sock = daemon.api_sock().unwrap_or(&args.api_sock);
        for line in startup_lines(args, api_sock, daemon.http_addr()) {
            eprintln!("{line}");
        }
    };
    Ok(mu2_vmm::api::run_until_signal(config, announce)?)
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
    lines
}
