//! The fork engine: every request gets a VM restored from a frozen image.
//!
//! Three modes on one engine:
//! - `fresh`: the VM is created on the request path;
//! - `pool`: VMs are restored ahead of time by background threads, each serves exactly one
//!   request and is destroyed; the pool refills itself;
//! - `reuse`: a VM is kept and reset to the image between requests (memory remapped
//!   copy-on-write in place, every piece of vCPU and device state put back).
//!
//! Destroying a VM blocks for milliseconds on some hosts, so it happens on a reaper thread,
//! off the request path, in every mode.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::hypervisor::Hypervisor;
use crate::image::Image;
use crate::invoke::{self, InvokeError};
use crate::vm::{BuildError, ResetKind, Vm};

/// How a request gets its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Restore a VM on the request path.
    Fresh,
    /// Take a VM restored ahead of time.
    Pool,
    /// Reset a kept VM to the image.
    Reuse,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fresh" => Ok(Mode::Fresh),
            "pool" => Ok(Mode::Pool),
            "reuse" => Ok(Mode::Reuse),
            _ => Err(format!("unknown mode `{s}` (fresh, pool or reuse)")),
        }
    }
}

/// Engine settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// The mode.
    pub mode: Mode,
    /// VMs kept ready in pool mode.
    pub pool_size: usize,
    /// Threads restoring VMs for the pool.
    pub pool_builders: usize,
    /// Largest response accepted.
    pub max_response: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { mode: Mode::Fresh, pool_size: 8, pool_builders: 1, max_response: invoke::DEFAULT_MAX_RESPONSE }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// No VM could be made for it.
    #[error("restoring a VM from the image")]
    Restore(#[source] BuildError),
    /// The pool's builders stopped.
    #[error("the VM pool is shut down")]
    PoolClosed,
    /// The request failed in the VM.
    #[error(transparent)]
    Invoke(#[from] InvokeError),
}

/// What one request took.
#[derive(Debug, Clone)]
pub struct Served {
    /// The response bytes.
    pub response: Vec<u8>,
    /// Getting a VM ready for the request (restore, pool take, or reset), µs.
    pub fork_us: f64,
    /// Running the request in it, µs.
    pub run_us: f64,
    /// The VM's identifier (unique in this process).
    pub vm_id: u64,
}

/// Destroys VMs on a background thread.
#[derive(Debug)]
struct Reaper {
    tx: Option<Sender<Vm>>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    fn start() -> Reaper {
        let (tx, rx) = mpsc::channel::<Vm>();
        let thread = std::thread::Builder::new()
            .name("mu2-reaper".into())
            .spawn(move || {
                for vm in rx {
                    drop(vm);
                }
            })
            .ok();
        Reaper { tx: Some(tx), thread }
    }

    fn reap(&self, vm: Vm) {
        match (&self.tx, &self.thread) {
            (Some(tx), Some(_)) => {
                if let Err(mpsc::SendError(vm)) = tx.send(vm) {
                    drop(vm);
                }
            }
            _ => drop(vm),
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// VMs restored ahead of time.
#[derive(Debug)]
struct Pool {
    ready: Mutex<Receiver<Result<Vm, BuildError>>>,
    stop: Arc<AtomicBool>,
    builders: Vec<JoinHandle<()>>,
    depth: Arc<AtomicUsize>,
}

impl Pool {
    fn start(hv: &Arc<Hypervisor>, image: &Arc<Image>, size: usize, builders: usize) -> Pool {
        // The channel holds `size` VMs; each builder also holds one while it waits to hand
        // it over, so the channel is that much smaller.
        let capacity = size.saturating_sub(builders).max(1);
        let (tx, rx): (SyncSender<Result<Vm, BuildError>>, _) = mpsc::sync_channel(capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let depth = Arc::new(AtomicUsize::new(0));
        let builders = (0..builders.max(1))
            .filter_map(|i| {
                let (hv, image, tx, stop, depth) = (hv.clone(), image.clone(), tx.clone(), stop.clone(), depth.clone());
                std::thread::Builder::new()
                    .name(format!("mu2-pool-{i}"))
                    .spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            let vm = Vm::restore(&hv, &image);
                            let failed = vm.is_err();
                            depth.fetch_add(1, Ordering::Relaxed);
                            if tx.send(vm).is_err() {
                                depth.fetch_sub(1, Ordering::Relaxed);
                                break;
                            }
                            if failed {
                                // Do not spin on a persistent failure; the taker sees it.
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    })
                    .ok()
            })
            .collect();
        Pool { ready: Mutex::new(rx), stop, builders, depth }
    }

    fn take(&self) -> Result<Vm, ForkError> {
        let rx = self.ready.lock().map_err(|_| ForkError::PoolClosed)?;
        let vm = rx.recv().map_err(|_| ForkError::PoolClosed)?;
        self.depth.fetch_sub(1, Ordering::Relaxed);
        vm.map_err(ForkError::Restore)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Drain so that blocked builders can finish; the VMs are destroyed here.
        if let Ok(rx) = self.ready.lock() {
            while let Ok(vm) = rx.try_recv() {
                drop(vm);
            }
            for builder in self.builders.drain(..) {
                while !builder.is_finished() {
                    while let Ok(vm) = rx.try_recv() {
                        drop(vm);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                let _ = builder.join();
            }
        }
    }
}

/// The fork engine for one image.
#[derive(Debug)]
pub struct Engine {
    hv: Arc<Hypervisor>,
    image: Arc<Image>,
    config: EngineConfig,
    pool: Option<Pool>,
    kept: Mutex<Vec<Vm>>,
    reaper: Reaper,
    fast_resets: AtomicUsize,
    full_resets: AtomicUsize,
}

impl Engine {
    /// Starts an engine; in pool mode the builders start filling the pool at once.
    pub fn new(hv: Arc<Hypervisor>, image: Arc<Image>, config: EngineConfig) -> Engine {
        let pool =
            (config.mode == Mode::Pool).then(|| Pool::start(&hv, &image, config.pool_size, config.pool_builders));
        Engine {
            hv,
            image,
            config,
            pool,
            kept: Mutex::new(Vec::new()),
            reaper: Reaper::start(),
            fast_resets: AtomicUsize::new(0),
            full_resets: AtomicUsize::new(0),
        }
    }

    /// The image.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    /// Reuse-mode resets so far: (pages copied back, memory remapped).
    pub fn reset_counts(&self) -> (usize, usize) {
        (self.fast_resets.load(Ordering::Relaxed), self.full_resets.load(Ordering::Relaxed))
    }

    /// VMs ready in the pool now (pool mode).
    pub fn pool_depth(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.depth.load(Ordering::Relaxed))
    }

    /// Waits until the pool holds at least `n` VMs or `timeout` passes; returns the depth.
    pub fn wait_for_pool(&self, n: usize, timeout: Duration) -> usize {
        let until = Instant::now() + timeout;
        while self.pool_depth() < n && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.pool_depth()
    }

    fn vm_for_request(&self) -> Result<Vm, ForkError> {
        match self.config.mode {
            Mode::Fresh => Vm::restore(&self.hv, &self.image).map_err(ForkError::Restore),
            Mode::Pool => self.pool.as_ref().ok_or(ForkError::PoolClosed)?.take(),
            Mode::Reuse => {
                let kept = self.kept.lock().ok().and_then(|mut k| k.pop());
                match kept {
                    Some(vm) => Ok(vm),
                    None => Vm::restore(&self.hv, &self.image).map_err(ForkError::Restore),
                }
            }
        }
    }

    /// Serves one request on its own VM.
    pub fn serve(&self, request: &[u8], timeout: Duration) -> Result<Served, ForkError> {
        let start = Instant::now();
        let mut vm = self.vm_for_request()?;
        if let Err(e) = vm.hand_out(&self.image) {
            self.reaper.reap(vm);
            return Err(ForkError::Restore(e));
        }
        let forked = Instant::now();
        let port = self.image.state().port;
        let result = invoke::invoke(&mut vm, port, request, self.config.max_response, Some(forked + timeout));
        let done = Instant::now();
        let vm_id = vm.id();
        match (&result, self.config.mode) {
            (Ok(_), Mode::Reuse) => self.recycle(vm),
            _ => self.reaper.reap(vm),
        }
        let response = result?;
        Ok(Served { response, fork_us: micros(forked - start), run_us: micros(done - forked), vm_id })
    }

    /// Reuse mode: reset the VM to the image and keep it; a VM that cannot be reset is
    /// destroyed instead (the next request restores a new one).
    fn recycle(&self, mut vm: Vm) {
        match vm.reset_to(&self.image, true) {
            Ok(kind) => {
                let counter = match kind {
                    ResetKind::CopiedBack(_) => &self.fast_resets,
                    ResetKind::Remapped => &self.full_resets,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                match self.kept.lock() {
                    Ok(mut kept) => kept.push(vm),
                    Err(_) => self.reaper.reap(vm),
                }
            }
            Err(e) => {
                log::warn!("resetting VM {} failed, destroying it: {}", vm.id(), error_chain(&e));
                self.reaper.reap(vm);
            }
        }
    }

    /// Serves one request and reports how much guest memory its VM wrote (KiB), for
    /// benchmarks; the VM is then destroyed.
    pub fn serve_measuring_memory(
        &self,
        request: &[u8],
        timeout: Duration,
    ) -> Result<(Served, Option<u64>), ForkError> {
        let start = Instant::now();
        let mut vm = Vm::restore(&self.hv, &self.image).map_err(ForkError::Restore)?;
        vm.hand_out(&self.image).map_err(ForkError::Restore)?;
        let forked = Instant::now();
        let port = self.image.state().port;
        let result = invoke::invoke(&mut vm, port, request, self.config.max_response, Some(forked + timeout));
        let done = Instant::now();
        let private = vm.private_kib();
        let vm_id = vm.id();
        self.reaper.reap(vm);
        let response = result?;
        Ok((Served { response, fork_us: micros(forked - start), run_us: micros(done - forked), vm_id }, private))
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
