//! What loading an image costs, and how much of it the CPU compatibility check is.
//!
//! `cargo run --release -p mu2-vmm --example image_load -- DIR [N]`
//! Loads the image in DIR N times (default 50) with a fresh `Hypervisor` each time, as a one-shot
//! `mu2 invoke --image` does, and N times on one `Hypervisor`, as the daemon and the fork engine
//! do; then times the parts: the host's CPU features (probed on a throwaway VM, once per
//! `Hypervisor`), reading and checking the state file, comparing the features, and verifying
//! the content id (which `Image::load` does not do).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use mu2_vmm::image::{self, Image, ImageInfo};
use mu2_vmm::Hypervisor;

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort_unstable();
    samples[samples.len() / 2].as_secs_f64() * 1e6
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let value = f();
    (value, start.elapsed())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: image_load DIR [N]")?);
    let n: usize = args.next().map_or(Ok(50), |s| s.parse())?;

    let mut fresh = Vec::new();
    let mut probe = Vec::new();
    for _ in 0..n {
        let hv = Hypervisor::open()?;
        fresh.push(timed(|| Image::load(&hv, &dir)).1);
        let hv = Hypervisor::open()?;
        probe.push(timed(|| hv.cpu_features().names().len()).1);
    }
    let hv = Hypervisor::open()?;
    let image = Image::load(&hv, &dir)?;
    let mut kept = Vec::new();
    let mut state = Vec::new();
    let mut compare = Vec::new();
    for _ in 0..n {
        kept.push(timed(|| Image::load(&hv, &dir)).1);
        state.push(timed(|| ImageInfo::read(&dir)).1);
        compare.push(timed(|| image.state().cpu_features.missing_on(hv.cpu_features()).len()).1);
    }
    let verify: Vec<Duration> = (0..n.min(10)).map(|_| timed(|| image::verify(&dir)).1).collect();
    println!("image {} ({} MiB), {n} runs, medians:", dir.display(), image.state().mem_size >> 20);
    println!("  Image::load, new Hypervisor each time: {:9.1} us", median(fresh));
    println!("  Image::load, one Hypervisor:           {:9.1} us", median(kept));
    println!("  host CPU features probe (once per Hypervisor): {:9.1} us", median(probe));
    println!("  state file read and checked (ImageInfo::read): {:9.1} us", median(state));
    println!("  feature comparison:                    {:9.3} us", median(compare));
    println!("  content id recomputed (image::verify): {:9.1} us", median(verify));
    Ok(())
}
