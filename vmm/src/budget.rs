//! The VM budget: every live KVM VM of the engines that share one — pooled, serving, being
//! reset, waiting for the reaper — holds a [`Permit`] from it until the VM is destroyed, so one
//! limit of VMs and one of guest memory bound them all. The memory a VM counts is its guest's
//! whole memory size: what it may come to own by writing, whatever it shares copy-on-write now.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::error::{Classify, FailureKind};

/// The limits of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Live VMs.
    pub max_vms: usize,
    /// Guest memory of the live VMs, bytes.
    pub max_memory: u64,
    /// Response bytes buffered at once, of all the VMs' requests.
    pub max_response_bytes: usize,
}

/// What a budget's permits hold now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Live VMs.
    pub vms: usize,
    /// Their guest memory, bytes.
    pub memory: u64,
}

/// A VM the budget cannot hold.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the VM budget is spent: {} of {} VMs and {} of {} MiB of guest memory are live; this VM needs {} MiB",
    used.vms, limits.max_vms, used.memory >> 20, limits.max_memory >> 20, memory >> 20
)]
pub struct BudgetSpent {
    /// The budget's limits.
    pub limits: Limits,
    /// What was in use.
    pub used: Usage,
    /// The memory the VM needed.
    pub memory: u64,
}

impl Classify for BudgetSpent {
    fn kind(&self) -> FailureKind {
        FailureKind::ResourceExhausted
    }
}

/// What holds VMs it could give back to a budget on request: a pool's ready VMs, reuse
/// mode's idle ones.
pub trait Reclaim: Send + Sync + std::fmt::Debug {
    /// Gives one VM back (destroyed, its permit dropped, soon); false if it has none to spare.
    fn give_back_one(&self) -> bool;
}

/// One limit of VMs and guest memory, shared by engines.
pub struct VmBudget {
    limits: Limits,
    used: Mutex<Usage>,
    freed: Condvar,
    /// Requests waiting for room now: pool builders build nothing while there are any.
    waiting: AtomicUsize,
    /// Who may give VMs back to a waiting request.
    reclaimers: Mutex<Vec<Weak<dyn Reclaim>>>,
    responses: Arc<ByteBudget>,
}

impl std::fmt::Debug for VmBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBudget").field("limits", &self.limits).field("used", &self.usage()).finish_non_exhaustive()
    }
}

impl VmBudget {
    /// A budget of `limits`.
    pub fn new(limits: Limits) -> Arc<VmBudget> {
        Arc::new(VmBudget {
            limits,
            used: Mutex::new(Usage::default()),
            freed: Condvar::new(),
            waiting: AtomicUsize::new(0),
            reclaimers: Mutex::new(Vec::new()),
            responses: ByteBudget::new(limits.max_response_bytes),
        })
    }

    /// A budget that never refuses (an engine of its own, a benchmark).
    pub fn unlimited() -> Arc<VmBudget> {
        VmBudget::new(Limits { max_vms: usize::MAX, max_memory: u64::MAX, max_response_bytes: usize::MAX })
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The response bytes of the VMs' requests, buffered at once.
    pub fn responses(&self) -> &Arc<ByteBudget> {
        &self.responses
    }

    /// What the permits hold now.
    pub fn usage(&self) -> Usage {
        *self.lock()
    }

    fn lock(&self) -> MutexGuard<'_, Usage> {
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a VM of `memory` bytes fits beside `used` with room for `spare` more VMs of
    /// its size still free.
    fn fits(&self, used: &Usage, memory: u64, spare: usize) -> bool {
        let vms_left = self.limits.max_vms.saturating_sub(used.vms);
        let memory_left = self.limits.max_memory.saturating_sub(used.memory);
        vms_left > spare && memory_left >= memory.saturating_mul(spare as u64 + 1)
    }

    fn spent(&self, used: Usage, memory: u64) -> BudgetSpent {
        BudgetSpent { limits: self.limits, used, memory }
    }

    fn grant(self: &Arc<Self>, used: &mut Usage, memory: u64) -> Permit {
        used.vms += 1;
        used.memory += memory;
        Permit { budget: self.clone(), memory }
    }

    /// A permit for a VM of `memory` bytes if one fits now with room for `spare` more VMs of
    /// its size beside it (a pool builder leaves room for requests), and no request is
    /// waiting for room.
    pub fn try_take(self: &Arc<Self>, memory: u64, spare: usize) -> Result<Permit, BudgetSpent> {
        let mut used = self.lock();
        if self.waiting.load(Ordering::SeqCst) > 0 || !self.fits(&used, memory, spare) {
            return Err(self.spent(*used, memory));
        }
        Ok(self.grant(&mut used, memory))
    }

    /// Waits up to `wait` for the budget to change (a permit given back, a request done
    /// waiting): what a pool builder does instead of polling.
    pub fn wait_for_change(&self, wait: Duration) {
        let used = self.lock();
        let _ = self.freed.wait_timeout(used, wait);
    }

    /// Has `reclaimer` give VMs back to requests that wait for room (held weakly: an engine
    /// that is gone is skipped).
    pub fn register(&self, reclaimer: Weak<dyn Reclaim>) {
        let mut reclaimers = self.reclaimers.lock().unwrap_or_else(|p| p.into_inner());
        reclaimers.retain(|r| r.strong_count() > 0);
        reclaimers.push(reclaimer);
    }

    /// Asks the registered engines, in turn, for one VM back; whether one gave.
    fn reclaim_one(&self) -> bool {
        let reclaimers: Vec<_> = self.reclaimers.lock().unwrap_or_else(|p| p.into_inner()).clone();
        reclaimers.iter().filter_map(Weak::upgrade).any(|r| r.give_back_one())
    }

    /// A permit for a VM of `memory` bytes, waiting up to `wait` for VMs to be destroyed
    /// (a request): while it waits, the engines sharing the budget give idle VMs back and
    /// build no new ones. A VM larger than the whole budget is refused at once.
    pub fn take_within(self: &Arc<Self>, memory: u64, wait: Duration) -> Result<Permit, BudgetSpent> {
        let until = Instant::now() + wait;
        let mut used = self.lock();
        if memory > self.limits.max_memory || self.limits.max_vms == 0 {
            return Err(self.spent(*used, memory));
        }
        if self.fits(&used, memory, 0) {
            return Ok(self.grant(&mut used, memory));
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let result = loop {
            drop(used);
            // Idle VMs of other engines go first; what they give back arrives through the
            // reapers, which wake this wait.
            let reclaimed = self.reclaim_one();
            used = self.lock();
            if self.fits(&used, memory, 0) {
                break Ok(self.grant(&mut used, memory));
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(self.spent(*used, memory));
            }
            let nap = if reclaimed { Duration::from_millis(2) } else { Duration::from_millis(10) };
            used = self.freed.wait_timeout(used, left.min(nap)).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        };
        drop(used);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.freed.notify_all();
        result
    }

    /// Requests waiting for room now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// One live VM's share of a budget, given back when dropped (after the VM it belongs to).
#[derive(Debug)]
pub struct Permit {
    budget: Arc<VmBudget>,
    memory: u64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut used = self.budget.lock();
        used.vms = used.vms.saturating_sub(1);
        used.memory = used.memory.saturating_sub(self.memory);
        drop(used);
        self.budget.freed.notify_all();
    }
}

/// A bound on bytes buffered at once across callers (request bodies, responses): each caller
/// holds a [`ByteCharge`] for its bytes until it has sent them on.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
}

/// Bytes a [`ByteBudget`] cannot hold now.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{wanted} bytes do not fit: {used} of {limit} bytes buffered at once are taken")]
pub struct BytesSpent {
    /// The budget's limit.
    pub limit: usize,
    /// What was taken.
    pub used: usize,
    /// What was asked for.
    pub wanted: usize,
}

impl Classify for BytesSpent {
    fn kind(&self) -> FailureKind {
        FailureKind::ResourceExhausted
    }
}

impl ByteBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget { limit, used: AtomicUsize::new(0) })
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes taken now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if they fit now.
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Result<ByteCharge, BytesSpent> {
        self.take(bytes)?;
        Ok(ByteCharge { budget: self.clone(), bytes })
    }

    fn take(&self, bytes: usize) -> Result<(), BytesSpent> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let after = used.checked_add(bytes).filter(|&after| after <= self.limit);
            let Some(after) = after else { return Err(BytesSpent { limit: self.limit, used, wanted: bytes }) };
            match self.used.compare_exchange_weak(used, after, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }
}

/// Bytes held of a [`ByteBudget`], given back when dropped.
#[derive(Debug)]
pub struct ByteCharge {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl ByteCharge {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds `total` bytes in all, taking what is missing if it fits now (a buffer charged as
    /// it fills, so that a length announced but not sent holds nothing).
    pub fn grow_to(&mut self, total: usize) -> Result<(), BytesSpent> {
        if let Some(more) = total.checked_sub(self.bytes).filter(|&more| more > 0) {
            self.budget.take(more)?;
            self.bytes = total;
        }
        Ok(())
    }
}

impl Drop for ByteCharge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn byte_charges_fit_the_limit_and_are_given_back() {
        let bytes = ByteBudget::new(100);
        let a = bytes.charge(60).expect("fits");
        let spent = bytes.charge(41).expect_err("over the limit");
        assert_eq!((spent.used, spent.wanted), (60, 41));
        assert!(bytes.charge(usize::MAX).is_err(), "no overflow");
        let mut b = bytes.charge(0).expect("nothing yet");
        b.grow_to(30).expect("grows");
        b.grow_to(20).expect("never shrinks");
        assert!(b.grow_to(41).is_err(), "60 + 41 > 100");
        b.grow_to(40).expect("fits exactly");
        assert_eq!(b.bytes(), 40);
        drop(a);
        assert_eq!(bytes.used(), 40);
        drop(b);
        assert_eq!(bytes.used(), 0);
    }

    #[test]
    fn permits_count_vms_and_memory_until_dropped() {
        let budget = VmBudget::new(Limits { max_vms: 2, max_memory: 100 * MIB, max_response_bytes: 0 });
        let a = budget.try_take(40 * MIB, 0).expect("first");
        let b = budget.try_take(40 * MIB, 0).expect("second");
        assert_eq!(budget.usage(), Usage { vms: 2, memory: 80 * MIB });
        let refused = budget.try_take(MIB, 0).expect_err("a third VM");
        assert_eq!(refused.used.vms, 2);
        drop(a);
        assert_eq!(budget.usage(), Usage { vms: 1, memory: 40 * MIB });
        // Memory, not VMs, is what refuses this one.
        assert!(budget.try_take(61 * MIB, 0).is_err());
        let c = budget.try_take(60 * MIB, 0).expect("fits exactly");
        drop((b, c));
        assert_eq!(budget.usage(), Usage::default());
    }

    #[test]
    fn spare_vms_are_left_for_requests() {
        let budget = VmBudget::new(Limits { max_vms: 3, max_memory: u64::MAX, max_response_bytes: 0 });
        let _a = budget.try_take(0, 1).expect("two left after it");
        let _b = budget.try_take(0, 1).expect("one left after it");
        assert!(budget.try_take(0, 1).is_err(), "the last VM is kept for a request");
        assert!(budget.take_within(0, Duration::ZERO).is_ok(), "a request takes it");
        // Memory is kept the same way: room for one more VM of the size asked for.
        let memory = VmBudget::new(Limits { max_vms: 100, max_memory: 3 * MIB, max_response_bytes: 0 });
        let _c = memory.try_take(MIB, 1).expect("two MiB left after it");
        assert!(memory.try_take(2 * MIB, 1).is_err(), "it would leave no 2 MiB for a request");
    }

    #[test]
    fn a_waiting_request_gets_the_vm_another_frees_and_builders_hold_off_meanwhile() {
        let budget = VmBudget::new(Limits { max_vms: 1, max_memory: u64::MAX, max_response_bytes: 0 });
        let held = budget.try_take(0, 0).expect("the only VM");
        let waiter = {
            let budget = budget.clone();
            std::thread::spawn(move || budget.take_within(0, Duration::from_secs(30)).map(drop))
        };
        while budget.waiting() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(held);
        // Freed while a request waits: a builder's try_take does not take it from the request.
        let builder = budget.try_take(0, 0);
        assert!(waiter.join().expect("waiter").is_ok());
        assert!(builder.is_err() || budget.usage().vms <= 1);
        assert_eq!(budget.waiting(), 0);
    }

    #[derive(Debug)]
    struct Spares(Mutex<Vec<Permit>>);

    impl Reclaim for Spares {
        fn give_back_one(&self) -> bool {
            self.0.lock().expect("spares").pop().is_some()
        }
    }

    #[test]
    fn a_waiting_request_is_given_an_idle_vm_of_a_registered_engine() {
        let budget = VmBudget::new(Limits { max_vms: 2, max_memory: u64::MAX, max_response_bytes: 0 });
        let spares = Arc::new(Spares(Mutex::new(vec![
            budget.try_take(0, 0).expect("first"),
            budget.try_take(0, 0).expect("second"),
        ])));
        let weak: Weak<dyn Reclaim> = Arc::downgrade(&spares) as Weak<dyn Reclaim>;
        budget.register(weak);
        let got = budget.take_within(0, Duration::from_secs(30)).expect("an idle VM given back");
        assert_eq!(spares.0.lock().expect("spares").len(), 1, "one given back, not both");
        drop(got);
        drop(spares);
        assert_eq!(budget.usage().vms, 0, "the dropped engine's last permit went with it");
    }

    #[test]
    fn a_vm_larger_than_the_whole_budget_is_refused_at_once() {
        let budget = VmBudget::new(Limits { max_vms: 4, max_memory: 10 * MIB, max_response_bytes: 0 });
        let refused = budget.take_within(11 * MIB, Duration::from_secs(3600)).expect_err("too large");
        assert!(refused.to_string().contains("this VM needs 11 MiB"), "{refused}");
        assert_eq!(budget.waiting(), 0, "it never waited, so no builder held off for it");
    }
}
