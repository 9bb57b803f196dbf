//! `mu2 snapshot`: boot a guest, wait until it is ready and idle, freeze it into an image.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use mu2_vmm::Hypervisor;

use super::args::{parse_duration, GuestArgs};
use crate::failure::Failure;

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// The image directory to write.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Give up if the guest is not ready after this long.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "30s")]
    timeout: Duration,
}

pub fn snapshot(args: &SnapshotArgs) -> Result<(), Failure> {
    let config = args.guest.vm_config("quiet")?;
    let hv = Hypervisor::open()?;
    let start = Instant::now();
    mu2_vmm::image::create(&hv, &config, &args.out, Some(start + args.timeout))?;
    eprintln!("image written to {} in {:.1} ms", args.out.display(), start.elapsed().as_secs_f64() * 1e3);
    Ok(())
}
