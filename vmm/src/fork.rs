//! The fork engine: every request gets a VM restored from a frozen image.
//!
//! Three modes on one engine:
//! - `fresh`: the VM is created on the request path (and the pages a request writes, found by
//!   a probe fork, are copied into it before it runs, by one madvise per run of pages);
//! - `pool`: VMs are restored ahead of time by background threads, each serves exactly one
//!   request and is destroyed; the pool refills itself;
//! - `reuse`: VMs are kept and reset to the image between requests (see `Vm::reset_to`); the
//!   reset runs on one of two resetter threads after the response is out, so no caller waits
//!   for it.
//!
//! Destroying a VM blocks for milliseconds on some hosts, so it happens on a reaper thread,
//! off the request path, in every mode.
//!
//! Every VM an engine makes holds a [`Permit`] of the engine's [`VmBudget`] (shared with other
//! engines, as the daemon's images share `--max-vms` and `--max-memory`) from before it is
//! made until the reaper has destroyed it. A request that needs a new VM waits briefly for
//! one to fit; a pool builder only takes what leaves a VM for requests, and while requests
//! wait, pools give VMs back.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::budget::{BudgetSpent, ByteCharge, Permit, Reclaim, VmBudget};
use crate::error::error_chain;
use crate::hypervisor::Hypervisor;
use crate::image::Image;
use crate::invoke::{self, InvokeError, RequestTooLarge};
use crate::restore::{ResetKind, RestoreError};
use crate::sandbox::{self, ThreadClass};
use crate::vm::Vm;
use mu2_devices::throttle::{Throttled, GUEST_WARNING_INTERVAL};

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
    /// VMs kept ready in pool mode; the most VMs reuse mode keeps.
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
    Restore(#[source] RestoreError),
    /// The pool's builders stopped.
    #[error("the VM pool is shut down")]
    PoolClosed,
    /// The budget of VMs and memory has no room for a VM.
    #[error("no VM for the request")]
    Budget(#[source] BudgetSpent),
    /// The request failed in the VM.
    #[error(transparent)]
    Invoke(#[from] InvokeError),
}

/// A request's result: the response and what it took. Failures are [`ForkError`]s, whose
/// [`Classify::kind`](crate::error::Classify::kind) says whether the guest crashed, broke the
/// protocol, ran out of time, or the VMM failed.
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
    /// The response's share of the budget's response bytes: pass it on with the bytes, and
    /// drop it once they are sent.
    pub response_charge: Option<Arc<ByteCharge>>,
}

/// How long a request waits for its VM to fit the budget (VMs of finished requests are
/// still being destroyed, or a pool gives one back) before it is refused.
pub const ADMISSION_WAIT: Duration = Duration::from_millis(100);
/// How long a pool-mode request waits for a pooled VM before it restores one itself.
const POOL_WAIT: Duration = Duration::from_secs(1);
/// How long a pool builder that found no room waits for the budget to change before it
/// looks again.
const BUDGET_RECHECK: Duration = Duration::from_millis(50);

/// A VM and its share of the budget, given back after the VM is destroyed (fields drop in
/// order).
#[derive(Debug)]
struct Leased {
    vm: Vm,
    _permit: Permit,
}

impl std::ops::Deref for Leased {
    type Target = Vm;
    fn deref(&self) -> &Vm {
        &self.vm
    }
}

impl std::ops::DerefMut for Leased {
    fn deref_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }
}

/// Destroys VMs on a background thread.
#[derive(Debug)]
struct Reaper {
    tx: Option<Sender<Leased>>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    fn start() -> Reaper {
        let (tx, rx) = mpsc::channel::<Leased>();
        let thread = sandbox::spawn(ThreadClass::Recycler, "mu2-reaper".into(), move || {
            crate::sys::background_thread();
            for vm in rx {
                drop(vm);
            }
        })
        .ok();
        Reaper { tx: Some(tx), thread }
    }

    fn reap(&self, vm: Leased) {
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

/// Prepares a pooled VM off the request path, so that its request faults in few pages: the
/// pages a request writes are copied in advance (`written`), then the guest runs until it
/// waits for work, mapping the pages that path reads (see `Vm::warm_up`). A VM whose warm-up
/// fails is replaced by a cold restore, which serves all the same.
fn warmed(hv: &Hypervisor, mut vm: Vm, image: &Image, written: &[u64]) -> Result<Vm, RestoreError> {
    vm.copy_in_advance(written);
    if vm.hand_out(image).is_ok() && vm.warm_up(Some(Instant::now() + WARM_UP_DEADLINE)).is_ok() {
        return Ok(vm);
    }
    drop(vm);
    Vm::restore(hv, image)
}

/// How long a pooled VM's warm-up may take.
const WARM_UP_DEADLINE: Duration = Duration::from_millis(500);

/// The pooled VMs ready for a request: a queue the builders fill and requests take from,
/// guarded by a mutex that is never held while waiting (a request waits on `added`).
#[derive(Debug, Default)]
struct Ready {
    vms: Mutex<VecDeque<Result<Leased, RestoreError>>>,
    added: Condvar,
    /// VMs queued or being built for the queue: a builder claims a slot before it builds, so
    /// the pool never holds more than its size, however many builders there are.
    slots: AtomicUsize,
}

impl Ready {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Result<Leased, RestoreError>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims a slot for a VM about to be built, if fewer than `size` are claimed.
    fn claim(&self, size: usize) -> bool {
        self.slots.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < size).then_some(n + 1)).is_ok()
    }

    /// Takes the oldest queued VM, giving its slot back.
    fn pop(&self, vms: &mut VecDeque<Result<Leased, RestoreError>>) -> Option<Result<Leased, RestoreError>> {
        let vm = vms.pop_front()?;
        self.slots.fetch_sub(1, Ordering::AcqRel);
        Some(vm)
    }
}

/// VMs restored ahead of time.
#[derive(Debug)]
struct Pool {
    ready: Arc<Ready>,
    stop: Arc<AtomicBool>,
    builders: Vec<JoinHandle<()>>,
    depth: Arc<AtomicUsize>,
}

impl Pool {
    fn start(
        hv: &Arc<Hypervisor>,
        image: &Arc<Image>,
        budget: &Arc<VmBudget>,
        size: usize,
        builders: usize,
        written: Arc<Vec<u64>>,
    ) -> Pool {
        let ready = Arc::new(Ready::default());
        let memory = image.state().mem_size;
        let stop = Arc::new(AtomicBool::new(false));
        let depth = Arc::new(AtomicUsize::new(0));
        let filling = Arc::new(AtomicBool::new(true));
        let low_water = size / 2;
        let builders = (0..builders.max(1))
            .filter_map(|i| {
                let (hv, image, ready, stop, depth) =
                    (hv.clone(), image.clone(), ready.clone(), stop.clone(), depth.clone());
                let written = written.clone();
                let filling = filling.clone();
                let budget = budget.clone();
                sandbox::spawn(ThreadClass::PoolBuilder, format!("mu2-pool-{i}"), move || {
                    crate::sys::background_thread();
                    while !stop.load(Ordering::Relaxed) {
                        // Refill in bursts: once the pool is full, wait until it is down to
                        // half. Building a VM competes with the VM serving a request (for
                        // the cores, and for the process's mmap lock, which VM creation
                        // takes and the serving VM's page faults need), so most requests
                        // then run with nothing being built beside them.
                        if !filling.load(Ordering::Relaxed) {
                            if depth.load(Ordering::Relaxed) > low_water {
                                std::thread::sleep(Duration::from_millis(1));
                                continue;
                            }
                            filling.store(true, Ordering::Relaxed);
                        }
                        // Every slot taken (the last VMs still being built): wait for one to
                        // free, still filling.
                        if !ready.claim(size) {
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                        // One VM is left for requests of the budget's other engines, and
                        // nothing is built while a request waits for room (`try_take`).
                        let Ok(permit) = budget.try_take(memory, 1) else {
                            ready.slots.fetch_sub(1, Ordering::AcqRel);
                            budget.wait_for_change(BUDGET_RECHECK);
                            continue;
                        };
                        let vm = Vm::restore(&hv, &image)
                            .and_then(|vm| warmed(&hv, vm, &image, &written))
                            .map(|vm| Leased { vm, _permit: permit });
                        let failed = vm.is_err();
                        // Counted before it is queued, so that a request taking it at once
                        // never counts the pool below zero.
                        let depth_now = depth.fetch_add(1, Ordering::Relaxed).saturating_add(1);
                        ready.lock().push_back(vm);
                        ready.added.notify_one();
                        if depth_now >= size {
                            filling.store(false, Ordering::Relaxed);
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
        Pool { ready, stop, builders, depth }
    }

    /// The next pooled VM, waiting up to `wait` for a builder to finish one (the lock is
    /// released while waiting); `None` if none came.
    fn take(&self, wait: Duration) -> Option<Result<Leased, ForkError>> {
        let until = Instant::now() + wait;
        let mut vms = self.ready.lock();
        loop {
            if let Some(vm) = self.ready.pop(&mut vms) {
                self.depth.fetch_sub(1, Ordering::Relaxed);
                return Some(vm.map_err(ForkError::Restore));
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || self.builders.iter().all(JoinHandle::is_finished) {
                return None;
            }
            vms = self.ready.added.wait_timeout(vms, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// Gives pooled VMs back to requests of other engines waiting for room in the budget, down to
/// one.
#[derive(Debug)]
struct PoolReclaim {
    ready: Arc<Ready>,
    depth: Arc<AtomicUsize>,
    reaper: Sender<Leased>,
}

impl Reclaim for PoolReclaim {
    fn give_back_one(&self) -> bool {
        let Ok(mut vms) = self.ready.vms.try_lock() else { return false };
        if vms.len() <= 1 {
            return false;
        }
        let Some(vm) = self.ready.pop(&mut vms) else { return false };
        self.depth.fetch_sub(1, Ordering::Relaxed);
        drop(vms);
        match vm {
            // Destroyed on the reaper, whose drop of the permit wakes the waiter.
            Ok(vm) => self.reaper.send(vm).is_ok(),
            Err(_) => false,
        }
    }
}

/// Gives reuse mode's idle VMs back to requests of other engines waiting for room, down to
/// one.
#[derive(Debug)]
struct KeptReclaim {
    kept: Arc<Kept>,
    reaper: Sender<Leased>,
}

impl Reclaim for KeptReclaim {
    fn give_back_one(&self) -> bool {
        let Ok(mut ready) = self.kept.ready.try_lock() else { return false };
        if self.kept.alive.load(Ordering::Relaxed) <= 1 {
            return false;
        }
        let Some(vm) = ready.pop() else { return false };
        drop(ready);
        self.kept.forget_one();
        self.reaper.send(vm).is_ok()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Builders finish the VM they are making; then every pooled VM is destroyed here.
        for builder in self.builders.drain(..) {
            let _ = builder.join();
        }
        self.ready.lock().clear();
    }
}

/// Reuse mode's VMs: reset ones ready for a request, and how many exist.
#[derive(Debug, Default)]
struct Kept {
    ready: Mutex<Vec<Leased>>,
    returned: Condvar,
    alive: AtomicUsize,
}

impl Kept {
    fn put_back(&self, vm: Leased) {
        match self.ready.lock() {
            Ok(mut ready) => ready.push(vm),
            Err(poisoned) => poisoned.into_inner().push(vm),
        }
        self.returned.notify_one();
    }

    fn forget_one(&self) {
        self.alive.fetch_sub(1, Ordering::Relaxed);
        self.returned.notify_one();
    }
}

/// Resets used VMs in the background (reuse mode).
#[derive(Debug)]
struct Resetter {
    tx: Option<Sender<(Leased, bool)>>,
    threads: Vec<JoinHandle<()>>,
}

/// Threads resetting used VMs per engine: a reset costs about twice a reused request here, so
/// one thread cannot keep up with one serving thread.
const RESETTERS: usize = 2;

impl Resetter {
    fn start(image: Arc<Image>, kept: Arc<Kept>, reaper: Sender<Leased>, counts: Arc<[AtomicUsize; 2]>) -> Resetter {
        let (tx, rx) = mpsc::channel::<(Leased, bool)>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..RESETTERS)
            .filter_map(|i| {
                let (image, kept, reaper, counts, rx) =
                    (image.clone(), kept.clone(), reaper.clone(), counts.clone(), rx.clone());
                sandbox::spawn(ThreadClass::Recycler, format!("mu2-resetter-{i}"), move || {
                    crate::sys::background_thread();
                    loop {
                        // The lock is held only to take the next VM, not while resetting it.
                        let next = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok((mut vm, clean)) = next else { return };
                        match vm.reset_to(&image, clean) {
                            Ok(kind) => {
                                let slot = usize::from(kind == ResetKind::Remapped);
                                counts[slot].fetch_add(1, Ordering::Relaxed);
                                kept.put_back(vm);
                            }
                            Err(e) => {
                                // A guest can make every reset fail: logged once per interval.
                                static WARNINGS: Throttled = Throttled::new(GUEST_WARNING_INTERVAL);
                                WARNINGS.warn(format_args!(
                                    "resetting VM {} failed, destroying it: {}",
                                    vm.id(),
                                    error_chain(&e)
                                ));
                                kept.forget_one();
                                let _ = reaper.send(vm);
                            }
                        }
                    }
                })
                .ok()
            })
            .collect::<Vec<_>>();
        // Without a thread to take them, used VMs would wait in the channel for ever.
        let tx = (!threads.is_empty()).then_some(tx);
        Resetter { tx, threads }
    }
}

impl Drop for Resetter {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The pages a request writes in a VM of `image`, from one probe fork serving an empty
/// request; empty if the probe fails (a guest that crashes or hangs on it).
fn probe_written_pages(hv: &Hypervisor, image: &Image, budget: &Arc<VmBudget>) -> Vec<u64> {
    let probe = || -> Option<Vec<u64>> {
        // A VM like any other: without room for it, the pool does without the probe.
        let _permit = budget.try_take(image.state().mem_size, 0).ok()?;
        let mut vm = Vm::restore(hv, image).ok()?;
        vm.hand_out(image).ok()?;
        let deadline = Some(Instant::now() + WARM_UP_DEADLINE);
        invoke::invoke(&mut vm, image.state().port, b"", 1 << 20, deadline).ok()?;
        vm.written_pages().ok()
    };
    probe().unwrap_or_default()
}

/// The fork engine for one image: every [`Engine::serve`] runs its request in a VM of its own,
/// restored from the image, and destroys or resets that VM afterwards.
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use mu2_vmm::fork::{Engine, EngineConfig, Mode};
/// use mu2_vmm::image::Image;
/// use mu2_vmm::Hypervisor;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let hv = Arc::new(Hypervisor::open()?);
/// let image = Arc::new(Image::load(&hv, std::path::Path::new("/tmp/echo.img"))?);
/// let engine = Engine::new(hv, image, EngineConfig { mode: Mode::Pool, ..EngineConfig::default() });
/// let served = engine.serve(b"hello", Duration::from_secs(1))?;
/// assert_eq!(served.response, b"hello");
/// println!("VM {} forked in {:.0} us, answered in {:.0} us", served.vm_id, served.fork_us, served.run_us);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Engine {
    hv: Arc<Hypervisor>,
    image: Arc<Image>,
    config: EngineConfig,
    pool: Option<Pool>,
    // Declared before the reaper and the kept VMs: dropping it joins its thread first.
    resetter: Option<Resetter>,
    kept: Arc<Kept>,
    /// What this engine gives back to the budget's waiting requests (held by the budget
    /// weakly); declared before the reaper, whose sender it holds.
    _reclaim: Option<Arc<dyn Reclaim>>,
    reaper: Reaper,
    budget: Arc<VmBudget>,
    /// Reuse-mode resets: [pages copied back, memory remapped].
    resets: Arc<[AtomicUsize; 2]>,
    /// The pages a request writes (fresh and pool modes; from a probe fork).
    written: Arc<Vec<u64>>,
}

impl Engine {
    /// Starts an engine with a budget of its own that never refuses; in pool mode the
    /// builders start filling the pool at once.
    pub fn new(hv: Arc<Hypervisor>, image: Arc<Image>, config: EngineConfig) -> Engine {
        Engine::with_budget(hv, image, config, VmBudget::unlimited())
    }

    /// Starts an engine whose VMs count against `budget`, which other engines may share.
    pub fn with_budget(hv: Arc<Hypervisor>, image: Arc<Image>, config: EngineConfig, budget: Arc<VmBudget>) -> Engine {
        let written = match config.mode {
            Mode::Pool | Mode::Fresh => Arc::new(probe_written_pages(&hv, &image, &budget)),
            Mode::Reuse => Arc::new(Vec::new()),
        };
        let pool = (config.mode == Mode::Pool)
            .then(|| Pool::start(&hv, &image, &budget, config.pool_size, config.pool_builders, written.clone()));
        let reaper = Reaper::start();
        let kept = Arc::new(Kept::default());
        let resets = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let resetter = match (config.mode, &reaper.tx) {
            (Mode::Reuse, Some(tx)) => Some(Resetter::start(image.clone(), kept.clone(), tx.clone(), resets.clone())),
            _ => None,
        };
        let reclaim: Option<Arc<dyn Reclaim>> = match (&pool, config.mode, &reaper.tx) {
            (Some(pool), _, Some(tx)) => {
                Some(Arc::new(PoolReclaim { ready: pool.ready.clone(), depth: pool.depth.clone(), reaper: tx.clone() }))
            }
            (None, Mode::Reuse, Some(tx)) => Some(Arc::new(KeptReclaim { kept: kept.clone(), reaper: tx.clone() })),
            _ => None,
        };
        if let Some(reclaim) = &reclaim {
            budget.register(Arc::downgrade(reclaim));
        }
        Engine { hv, image, config, pool, resetter, kept, _reclaim: reclaim, reaper, budget, resets, written }
    }

    /// The image.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    /// The settings it was started with.
    pub fn config(&self) -> EngineConfig {
        self.config
    }

    /// Reuse-mode resets so far: (pages copied back, memory remapped).
    pub fn reset_counts(&self) -> (usize, usize) {
        (self.resets[0].load(Ordering::Relaxed), self.resets[1].load(Ordering::Relaxed))
    }

    /// Waits until no reset is in progress (reuse mode): every kept VM is back and ready.
    /// Returns false if `timeout` passed first.
    pub fn wait_for_resets(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        loop {
            let ready = self.kept.ready.lock().map(|r| r.len()).unwrap_or(0);
            if ready >= self.kept.alive.load(Ordering::Relaxed) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
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

    /// A VM for a request: in pool mode a ready one, or the builders' next within
    /// [`POOL_WAIT`], else one restored now as in fresh mode.
    fn vm_for_request(&self) -> Result<Leased, ForkError> {
        match self.config.mode {
            Mode::Fresh => self.restored(),
            // The builders are usually a VM away; only a pool they cannot refill (no room in
            // the budget, builders gone) sends the request to restore its own.
            Mode::Pool => match self.pool.as_ref().ok_or(ForkError::PoolClosed)?.take(POOL_WAIT) {
                Some(vm) => vm,
                None => self.restored(),
            },
            Mode::Reuse => self.kept_vm(),
        }
    }

    /// A VM restored now, once the budget has room for it.
    fn restored(&self) -> Result<Leased, ForkError> {
        let permit = self.budget.take_within(self.image.state().mem_size, ADMISSION_WAIT).map_err(ForkError::Budget)?;
        let mut vm = Vm::restore(&self.hv, &self.image).map_err(ForkError::Restore)?;
        // One madvise per run of the pages the request will write: cheaper than taking each
        // copy-on-write fault from inside the guest's run.
        vm.copy_in_advance(&self.written);
        Ok(Leased { vm, _permit: permit })
    }

    /// Reuse mode: a reset VM, a new one while fewer than `pool_size` exist, or else the next
    /// one the resetter hands back.
    fn kept_vm(&self) -> Result<Leased, ForkError> {
        let limit = self.config.pool_size.max(1);
        let mut ready = self.kept.ready.lock().map_err(|_| ForkError::PoolClosed)?;
        loop {
            if let Some(vm) = ready.pop() {
                return Ok(vm);
            }
            if self.kept.alive.load(Ordering::Relaxed) < limit {
                self.kept.alive.fetch_add(1, Ordering::Relaxed);
                drop(ready);
                return self.restored().inspect_err(|_| self.kept.forget_one());
            }
            ready = self.kept.returned.wait(ready).map_err(|_| ForkError::PoolClosed)?;
        }
    }

    /// Refuses, before any VM is made for it, a request larger than the image's guest can
    /// hold.
    pub fn check_request(&self, request: &[u8]) -> Result<(), RequestTooLarge> {
        let state = self.image.state();
        RequestTooLarge::check(request.len(), state.max_request, state.mem_size)
    }

    /// Serves one request on its own VM.
    pub fn serve(&self, request: &[u8], timeout: Duration) -> Result<Served, ForkError> {
        self.check_request(request).map_err(|e| ForkError::Invoke(e.into()))?;
        let start = Instant::now();
        let mut vm = self.vm_for_request()?;
        if let Err(e) = vm.hand_out(&self.image) {
            if self.config.mode == Mode::Reuse {
                self.kept.forget_one();
            }
            self.reaper.reap(vm);
            return Err(ForkError::Restore(e));
        }
        let forked = Instant::now();
        let port = self.image.state().port;
        let responses = Some(self.budget.responses());
        let result =
            invoke::invoke_counted(&mut vm, port, request, self.config.max_response, responses, Some(forked + timeout));
        let done = Instant::now();
        let vm_id = vm.id();
        match &self.resetter {
            // A failed request's VM is reset too: the reset falls back to a full remap.
            Some(Resetter { tx: Some(tx), .. }) => {
                if let Err(mpsc::SendError((vm, _))) = tx.send((vm, result.is_ok())) {
                    self.kept.forget_one();
                    self.reaper.reap(vm);
                }
            }
            _ => self.reaper.reap(vm),
        }
        let (response, held) = result?;
        let held = held.map(Arc::new);
        Ok(Served {
            response,
            fork_us: micros(forked - start),
            run_us: micros(done - forked),
            vm_id,
            response_charge: held,
        })
    }

    /// Serves one request and reports how much guest memory its VM wrote (KiB), for
    /// benchmarks; the VM is then destroyed.
    pub fn serve_measuring_memory(
        &self,
        request: &[u8],
        timeout: Duration,
    ) -> Result<(Served, Option<u64>), ForkError> {
        self.check_request(request).map_err(|e| ForkError::Invoke(e.into()))?;
        let start = Instant::now();
        let mut vm = self.restored()?;
        vm.hand_out(&self.image).map_err(ForkError::Restore)?;
        let forked = Instant::now();
        let port = self.image.state().port;
        let result = invoke::invoke(&mut vm, port, request, self.config.max_response, Some(forked + timeout));
        let done = Instant::now();
        let private = vm.private_kib();
        let vm_id = vm.id();
        self.reaper.reap(vm);
        let response = result?;
        let served = Served {
            response,
            fork_us: micros(forked - start),
            run_us: micros(done - forked),
            vm_id,
            response_charge: None,
        };
        Ok((served, private))
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
impl crate::error::Classify for ForkError {
    fn kind(&self) -> crate::error::FailureKind {
        match self {
            ForkError::Restore(e) => e.kind(),
            ForkError::PoolClosed => crate::error::FailureKind::Internal,
            ForkError::Budget(e) => e.kind(),
            ForkError::Invoke(e) => e.kind(),
        }
    }
}
