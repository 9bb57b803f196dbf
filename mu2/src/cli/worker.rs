//! `mu2 __worker` (hidden): one worker process of `mu2 bench --workers`. It loads the image,
//! starts its own engine (VMs, builders, resetter, reaper in this process's address space),
//! waits until its VMs are ready, and serves what the supervisor sends on the socket it got as
//! its standard input (`mu2_vmm::worker::serve_requests`) until the supervisor closes it.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use mu2_vmm::fork::{Engine, EngineConfig, Mode};
use mu2_vmm::image::Image;
use mu2_vmm::Hypervisor;

use crate::failure::{CliError, Failure};

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The image directory to fork.
    #[arg(long, value_name = "DIR")]
    image: PathBuf,
    /// fresh, pool or reuse.
    #[arg(long)]
    mode: Mode,
    /// VMs this worker keeps ready (pool) or at most (reuse).
    #[arg(long, value_name = "N", default_value_t = 16)]
    pool_size: usize,
    /// Threads restoring VMs for the pool.
    #[arg(long, value_name = "N", default_value_t = 1)]
    builders: usize,
    /// Requests served at once.
    #[arg(long, value_name = "N", default_value_t = 1)]
    capacity: usize,
}

pub fn worker(args: &WorkerArgs) -> Result<(), Failure> {
    let hv = Arc::new(Hypervisor::open()?);
    let image = Arc::new(Image::load(&hv, &args.image)?);
    // A request cannot be larger than the guest's memory; the engine checks the guest's own
    // announced limit.
    let max_request = usize::try_from(image.state().mem_size).unwrap_or(usize::MAX);
    let config = EngineConfig {
        mode: args.mode,
        pool_size: args.pool_size.max(1),
        pool_builders: args.builders.max(1),
        ..EngineConfig::default()
    };
    let engine = Engine::new(hv, image, config);
    if args.mode == Mode::Pool {
        engine.wait_for_pool(config.pool_size, Duration::from_secs(600));
    }
    let io = |source| CliError::Io { what: "the worker's socket (standard input)", source };
    let socket = std::io::stdin().as_fd().try_clone_to_owned().map_err(io)?;
    mu2_vmm::worker::serve_requests(UnixStream::from(socket), &engine, args.capacity, max_request).map_err(io)?;
    Ok(())
}
