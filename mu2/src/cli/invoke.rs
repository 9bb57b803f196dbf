//! `mu2 invoke`: one request in one VM, cold-booted or forked from an image; the response
//! bytes, and nothing else, on stdout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use mu2_vmm::fork::{Engine, EngineConfig, Mode};
use mu2_vmm::image::Image;
use mu2_vmm::invoke;
use mu2_vmm::{Hypervisor, Vm};

use super::args::{parse_duration, request_bytes, GuestArgs};
use crate::failure::Failure;

#[derive(Args, Debug)]
pub struct InvokeArgs {
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

pub fn invoke(args: &InvokeArgs) -> Result<(), Failure> {
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
    let mut vm = Vm::boot(&hv, &config, args.guest.console(false)?)?;
    let ready = invoke::run_until_ready(&mut vm, deadline)?;
    let ready_at = Instant::now();
    let port = args.port.unwrap_or(ready.port);
    let response = invoke::invoke(&mut vm, port, &request, args.max_response, deadline)?;
    let answered_at = Instant::now();
    let stats = vm.stats();
    drop(vm);
    let torn_down_at = Instant::now();

    crate::out::print(&response)?;
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

fn invoke_image(args: &InvokeArgs, dir: &Path, request: &[u8]) -> Result<(), Failure> {
    let hv = Arc::new(Hypervisor::open()?);
    let start = Instant::now();
    let image = Arc::new(Image::load(&hv, dir)?);
    let loaded = Instant::now();
    let config = EngineConfig { mode: Mode::Fresh, max_response: args.max_response, ..EngineConfig::default() };
    let engine = Engine::new(hv, image, config);
    let served = engine.serve(request, args.timeout)?;
    crate::out::print(&served.response)?;
    eprintln!(
        "image load {:.1} us, fork {:.1} us, request {:.1} us, vm {}",
        micros(loaded - start),
        served.fork_us,
        served.run_us,
        served.vm_id
    );
    Ok(())
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
