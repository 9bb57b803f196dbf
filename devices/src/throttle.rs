//! Warnings that hostile input can repeat at will (a guest that fails every reset, a client
//! flood that exhausts descriptors) are logged once per interval, with how many were held
//! back, so the log cannot be flooded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the devices' warnings about guest misuse are logged.
pub const GUEST_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// One kind of repeated warning.
#[derive(Debug)]
pub struct Throttled {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

impl Throttled {
    /// Logs at most once per `interval`.
    pub const fn new(interval: Duration) -> Throttled {
        Throttled { interval, last: Mutex::new(None), held_back: AtomicU64::new(0) }
    }

    /// Logs `message` unless one was logged within the interval; returns whether it did.
    pub fn warn(&self, message: std::fmt::Arguments<'_>) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < self.interval) {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        *last = Some(now);
        drop(last);
        match self.held_back.swap(0, Ordering::Relaxed) {
            0 => log::warn!("{message}"),
            n => log::warn!("{message} (and {n} more like it in the last {:?})", self.interval),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_the_interval_are_held_back_and_counted() {
        let throttled = Throttled::new(Duration::from_secs(3600));
        assert!(throttled.warn(format_args!("first")));
        for _ in 0..1000 {
            assert!(!throttled.warn(format_args!("again")));
        }
        assert_eq!(throttled.held_back.load(Ordering::Relaxed), 1000);
        let short = Throttled::new(Duration::ZERO);
        assert!(short.warn(format_args!("one")) && short.warn(format_args!("two")));
    }
}
