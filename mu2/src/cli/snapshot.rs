//! `mu2 snapshot`: boot a guest, wait until it is ready and idle, freeze it into an image.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use mu2_vmm::{CpuTemplate, Hypervisor};

use super::args::{parse_duration, GuestArgs};
use crate::failure::Failure;

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// The image directory to write (its parent directory must exist).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Give up if the guest is not ready after this long.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "30s")]
    timeout: Duration,
    /// Which CPU features the guest is shown, and so which hosts the image loads on.
    #[arg(long, value_enum, default_value_t = Template::Host)]
    cpu_template: Template,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Template {
    /// Everything this host's KVM supports: the image loads on hosts with the same features.
    Host,
    /// x86-64-v2 (SSE4.2, POPCNT, CMPXCHG16B; no AVX, no XSAVE): loads on any x86-64 host with it.
    Baseline,
}

pub fn snapshot(args: &SnapshotArgs) -> Result<(), Failure> {
    let mut config = args.guest.vm_config("quiet")?;
    config.cpu_template = match args.cpu_template {
        Template::Host => CpuTemplate::Host,
        Template::Baseline => CpuTemplate::Baseline,
    };
    crate::failure::parent_exists("image directory", &args.out)?;
    let hv = Hypervisor::open()?;
    let start = Instant::now();
    mu2_vmm::image::create(&hv, &config, &args.out, Some(start + args.timeout))?;
    let elapsed = start.elapsed();
    let info = super::image::written(&args.out)?;
    eprintln!(
        "image written to {} in {:.1} ms, content id {}",
        args.out.display(),
        elapsed.as_secs_f64() * 1e3,
        info.content_id
    );
    if !info.beyond_template.is_empty() {
        eprintln!(
            "mu2: warning: this host's hypervisor showed the guest CPU features the {} template leaves out, \
             and the image needs them too: {}",
            info.cpu_template,
            info.beyond_template.join(" ")
        );
    }
    Ok(())
}
