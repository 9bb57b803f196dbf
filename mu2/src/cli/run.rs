//! `mu2 run`: boot a guest (or fork an image) and let it run until it stops.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use mu2_vmm::image::Image;
use mu2_vmm::{GuestError, Hypervisor, RunStop, Vm};

use super::args::{parse_duration, GuestArgs};
use crate::failure::{CliError, Failure};

#[derive(Args, Debug)]
pub struct RunArgs {
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

pub fn run(args: &RunArgs) -> Result<(), Failure> {
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
            (Vm::boot(&hv, &config, args.guest.console(true)?)?, args.vsock_uds.clone())
        }
    };
    let deadline = args.timeout.map(|t| Instant::now() + t);
    if let Some(path) = &socket {
        eprintln!("vsock socket: {}", path.display());
        remove_on_signal(path.clone())?;
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
                // wait for the deadline or an interrupt, and say so.
                eprintln!(
                    "mu2 run: the guest is waiting for requests, and `mu2 run` sends none; \
                     `mu2 invoke` sends one to a fresh VM, `--vsock-uds PATH` lets programs connect to this one \
                     (see docs/api.md); Ctrl-C stops it"
                );
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

/// On SIGINT, SIGTERM or SIGHUP, removes the bridge's socket at `path` and ends the process as
/// that signal would: the bridge removes it when dropped, but a signal ends the process without
/// running destructors. A thread, so the removal runs outside the signal handler.
fn remove_on_signal(path: PathBuf) -> Result<(), Failure> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(CliError::Signals)?;
    std::thread::Builder::new()
        .name("mu2-run-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let _ = std::fs::remove_file(&path);
                let _ = signal_hook::low_level::emulate_default_handler(signal);
            }
        })
        .map_err(CliError::Signals)?;
    Ok(())
}
