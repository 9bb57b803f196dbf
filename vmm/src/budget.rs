//! The VM budget: every live KVM VM of the engines that share one — pooled, serving, being
//! reset, waiting for the reaper — holds a [`Permit`] from it until the VM is destroyed, so one
//! limit of VMs and one of guest memory bound them all. The memory a VM counts is its guest's
//! whole memory size: what it may come to own by writing, whatever it shares copy-on-write now.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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

/// One limit of VMs and guest memory, shared by engines.
#[derive(Debug)]
pub struct VmBudget {
    limits: Limits,
    used: Mutex<Usage>,
    freed: Condvar,
    /// When a caller last waited for, or was refused, a permit (ms since `epoch`, plus one;
    /// zero: never). Pools give VMs back while this is recent.
    pressed_at: AtomicU64,
    epoch: Instant,
    responses: Arc<ByteBudget>,
}

impl VmBudget {
    /// A budget of `limits`.
    pub fn new(limits: Limits) -> Arc<VmBudget> {
        Arc::new(VmBudget {
            limits,
            used: Mutex::new(Usage::default()),
            freed: Condvar::new(),
            pressed_at: AtomicU64::new(0),
            epoch: Instant::now(),
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

    /// Whether a VM of `memory` bytes fits beside `used` with `spare` more VMs still free.
    fn fits(&self, used: &Usage, memory: u64, spare: usize) -> bool {
        let vms_left = self.limits.max_vms.saturating_sub(used.vms);
        let memory_left = self.limits.max_memory.saturating_sub(used.memory);
        vms_left > spare && memory_left >= memory
    }

    fn spent(&self, used: Usage, memory: u64) -> BudgetSpent {
        BudgetSpent { limits: self.limits, used, memory }
    }

    fn grant(self: &Arc<Self>, used: &mut Usage, memory: u64) -> Permit {
        used.vms += 1;
        used.memory += memory;
        Permit { budget: self.clone(), memory }
    }

    /// A permit for a VM of `memory` bytes if one fits now with `spare` VMs left free beside
    /// it (a pool builder leaves room for requests). Does not count as pressure.
    pub fn try_take(self: &Arc<Self>, memory: u64, spare: usize) -> Result<Permit, BudgetSpent> {
        let mut used = self.lock();
        if !self.fits(&used, memory, spare) {
            return Err(self.spent(*used, memory));
        }
        Ok(self.grant(&mut used, memory))
    }

    /// A permit for a VM of `memory` bytes, waiting up to `wait` for VMs to be destroyed
    /// (a request): while it waits, pools sharing the budget give VMs back.
    pub fn take_within(self: &Arc<Self>, memory: u64, wait: Duration) -> Result<Permit, BudgetSpent> {
        let until = Instant::now() + wait;
        let mut used = self.lock();
        loop {
            if self.fits(&used, memory, 0) {
                return Ok(self.grant(&mut used, memory));
            }
            self.note_pressure();
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || memory > self.limits.max_memory {
                return Err(self.spent(*used, memory));
            }
            used =
                self.freed.wait_timeout(used, left.min(Duration::from_millis(5))).map(|(g, _)| g).unwrap_or_else(|p| {
                    let (g, _) = p.into_inner();
                    g
                });
        }
    }

    fn note_pressure(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        self.pressed_at.store(now, Ordering::Relaxed);
    }

    /// Whether a request waited for, or was refused, a permit within `window`.
    pub fn under_pressure(&self, window: Duration) -> bool {
        match self.pressed_at.load(Ordering::Relaxed) {
            0 => false,
            at => {
                let since = Duration::from_millis(at - 1);
                self.epoch.elapsed().saturating_sub(since) < window
            }
        }
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

    /// Bytes taken now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if they fit now.
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Result<ByteCharge, BytesSpent> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let after = used.checked_add(bytes).filter(|&after| after <= self.limit);
            let Some(after) = after else { return Err(BytesSpent { limit: self.limit, used, wanted: bytes }) };
            match self.used.compare_exchange_weak(used, after, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(ByteCharge { budget: self.clone(), bytes }),
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
        let b = bytes.charge(40).expect("fits exactly");
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
    }

    #[test]
    fn a_waiting_request_gets_the_vm_another_frees_and_marks_pressure() {
        let budget = VmBudget::new(Limits { max_vms: 1, max_memory: u64::MAX, max_response_bytes: 0 });
        assert!(!budget.under_pressure(Duration::from_secs(1)));
        let held = budget.try_take(0, 0).expect("the only VM");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(held);
        });
        let got = budget.take_within(0, Duration::from_secs(5));
        assert!(got.is_ok(), "{got:?}");
        assert!(budget.under_pressure(Duration::from_secs(1)));
        release.join().expect("release thread");
    }

    #[test]
    fn a_vm_larger_than_the_whole_budget_is_refused_at_once() {
        let budget = VmBudget::new(Limits { max_vms: 4, max_memory: 10 * MIB, max_response_bytes: 0 });
        let start = Instant::now();
        let refused = budget.take_within(11 * MIB, Duration::from_secs(10)).expect_err("too large");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(refused.to_string().contains("this VM needs 11 MiB"), "{refused}");
    }
}
