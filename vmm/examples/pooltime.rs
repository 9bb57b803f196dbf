//! Times requests on a pool-mode engine: fork (take + hand-out) and run, per request.
use std::sync::Arc;
use std::time::{Duration, Instant};

use mu2_vmm::fork::{Engine, EngineConfig, Mode};
use mu2_vmm::image::{self, Image};
use mu2_vmm::{Hypervisor, VmConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hv = Hypervisor::open()?;
    let dir = std::env::temp_dir().join(format!("mu2-pooltime-{}", std::process::id()));
    let mut config = VmConfig::new(mu2_vmm::guests::find("echo").ok_or("echo")?);
    config.cmdline = "quiet".into();
    image::create(&hv, &config, &dir, Some(Instant::now() + Duration::from_secs(30)))?;
    let image = Arc::new(Image::load(&hv, &dir)?);
    let engine =
        Engine::new(Arc::new(hv), image, EngineConfig { mode: Mode::Pool, pool_size: 16, ..Default::default() });
    engine.wait_for_pool(16, Duration::from_secs(30));
    for _ in 0..12 {
        let s = engine.serve(b"hello", Duration::from_secs(5))?;
        println!("fork {:7.1} us  run {:7.1} us  depth {}", s.fork_us, s.run_us, engine.pool_depth());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(engine);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
