//! Which guest pages one forked request touches, and how many exits it takes.
//!
//! `cargo run --release -p mu2-vmm --example touched -- [FUNCTION] [REQUEST]`
//! With `WARM=1` the fork is warmed up first, as pool mode does (`Vm::warm_up`); with
//! `PRECOPY=1` as well, the pages a probe request wrote are copied in advance.
//! Each page a request touches costs a shadow-paging fault on PVM hosts (~5–10 µs), so this is
//! where a forked request's time goes.

use std::time::{Duration, Instant};

use mu2_vmm::image::{self, Image};
use mu2_vmm::{invoke, Hypervisor, Vm, VmConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let function = args.next().unwrap_or_else(|| "echo".into());
    let request = args.next().unwrap_or_else(|| "hello".into());
    let hv = Hypervisor::open()?;
    {
        // A cold boot: guest memory is anonymous, so the pages mapped after readiness are the
        // ones the boot wrote or read (VMM writes included).
        let mut config = VmConfig::new(mu2_vmm::guests::find(&function).ok_or("no such guest")?);
        config.cmdline = "quiet".into();
        let start = Instant::now();
        let mut vm = Vm::boot(&hv, &config, Box::new(std::io::sink()))?;
        let built = start.elapsed();
        invoke::run_until_ready(&mut vm, None)?;
        let ready = start.elapsed();
        println!(
            "cold boot: VM built in {:.1} us, ready after {:.1} us; exits {:?}; pages mapped at readiness: {}",
            built.as_secs_f64() * 1e6,
            ready.as_secs_f64() * 1e6,
            vm.stats(),
            vm.touched_pages()?.len()
        );
    }
    let dir = std::env::temp_dir().join(format!("mu2-touched-{}", std::process::id()));
    let guest = mu2_vmm::guests::find(&function).ok_or("no such guest")?;
    let mut config = VmConfig::new(guest);
    config.cmdline = "quiet".into();
    image::create(&hv, &config, &dir, Some(Instant::now() + Duration::from_secs(30)))?;
    let image = Image::load(&hv, &dir)?;
    let mut vm = Vm::restore(&hv, &image)?;
    vm.disable_fault_around()?;
    if std::env::var_os("WARM").is_some() {
        if std::env::var_os("PRECOPY").is_some() {
            // The pages a request writes, from a probe fork.
            let mut probe = Vm::restore(&hv, &image)?;
            probe.hand_out(&image)?;
            invoke::invoke(&mut probe, image.state().port, request.as_bytes(), 1 << 20, None)?;
            let written = probe.private_pages()?;
            println!("a probe request wrote {} pages", written.len());
            vm.copy_in_advance(&written);
        }
        vm.hand_out(&image)?;
        if std::env::var_os("OTHER_THREAD").is_some() {
            vm = std::thread::scope(|s| s.spawn(move || vm.warm_up(None).map(|()| vm)).join()).expect("thread")?;
        } else {
            vm.warm_up(None)?;
        }
        println!("warmed up: pages mapped {}", vm.touched_pages()?.len());
    }
    vm.hand_out(&image)?;
    let initial = vm.touched_pages()?;
    vm.enter_without_running()?;
    let entry = vm.touched_pages()?;
    let by_entry: Vec<String> = entry.iter().filter(|p| !initial.contains(p)).map(|p| format!("{p:#x}")).collect();
    println!("pages touched by entering the VM without running it: {by_entry:?}");
    let before = entry;
    let start = Instant::now();
    let response = invoke::invoke(&mut vm, image.state().port, request.as_bytes(), 1 << 20, None)?;
    let took = start.elapsed();
    let after = vm.touched_pages()?;
    let new: Vec<u64> = after.iter().filter(|p| !before.contains(p)).copied().collect();
    println!("response {} bytes in {:.1} us; exits {:?}", response.len(), took.as_secs_f64() * 1e6, vm.stats());
    println!("pages touched by the request: {} (mapped before it ran: {})", new.len(), before.len());
    println!("private (written) KiB: {:?}", vm.private_kib());
    let mut line = String::new();
    for p in &new {
        line.push_str(&format!(" {p:#x}"));
    }
    println!("  {line}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
