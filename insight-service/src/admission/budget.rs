//! The memory budget: bytes reserved by admitted calls, released (by a drop guard) when the
//! call ends however it ends, with a release-rate estimate for RetryInfo.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Shortest and longest retry delay suggested to refused callers.
const MIN_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(10);

/// A byte budget shared by all heavy calls.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    in_use: AtomicU64,
    /// Exponentially weighted release rate, bytes per second, and when it was last updated.
    release: Mutex<(f64, Instant)>,
}

/// Why a reservation was refused, and when trying again is likely to work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Bytes asked for.
    pub wanted: u64,
    /// Bytes free at the time.
    pub available: u64,
    /// Suggested delay before retrying, from how fast budget has been released lately.
    pub retry_after: Duration,
    /// The whole budget: asked for more, the call can never fit, however long it waits.
    pub limit: u64,
}

impl From<Refused> for super::AdmissionError {
    fn from(refused: Refused) -> Self {
        refused.beside(0)
    }
}

impl Refused {
    /// The refusal of a call that already holds `held` bytes of the budget while it asks for
    /// more: it can never be admitted when both together exceed the whole budget, since a
    /// retry needs them at once ([`super::AdmissionError::OverBudget`], no RetryInfo); else it
    /// may fit later ([`super::AdmissionError::MemoryBudget`]).
    pub fn beside(self, held: u64) -> super::AdmissionError {
        let total = held.saturating_add(self.wanted);
        if total > self.limit {
            super::AdmissionError::OverBudget {
                wanted: total,
                limit: self.limit,
            }
        } else {
            super::AdmissionError::MemoryBudget {
                wanted: self.wanted,
                available: self.available,
                retry_after: self.retry_after,
            }
        }
    }
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            in_use: AtomicU64::new(0),
            release: Mutex::new((0.0, Instant::now())),
        })
    }

    /// The budget in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Acquire)
    }

    /// Reserves `bytes` if they fit, without waiting. A request larger than the whole budget
    /// can never fit and is refused with the longest delay (as an [`super::AdmissionError`]:
    /// `OverBudget`, which tells the caller not to retry).
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, Refused> {
        let mut current = self.in_use.load(Ordering::Acquire);
        loop {
            let next = current.saturating_add(bytes);
            if next > self.limit {
                return Err(Refused {
                    wanted: bytes,
                    available: self.limit.saturating_sub(current),
                    retry_after: self.retry_after(next - self.limit, bytes > self.limit),
                    limit: self.limit,
                });
            }
            match self.in_use.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(Reservation {
                        budget: self.clone(),
                        bytes,
                    });
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Time until `deficit` bytes are likely released, at the recent release rate.
    fn retry_after(&self, deficit: u64, never_fits: bool) -> Duration {
        if never_fits {
            return MAX_RETRY;
        }
        let (rate, _) = *self.release.lock().unwrap_or_else(PoisonError::into_inner);
        if rate <= 1.0 {
            return Duration::from_secs(1);
        }
        Duration::from_secs_f64(deficit as f64 / rate).clamp(MIN_RETRY, MAX_RETRY)
    }

    fn release(&self, bytes: u64) {
        self.in_use.fetch_sub(bytes, Ordering::AcqRel);
        self.record_release(bytes, Instant::now());
    }

    /// Folds `bytes` released at `now` into the release rate (apart from [`Self::release`] so
    /// tests can drive the rate with a clock of their own).
    fn record_release(&self, bytes: u64, now: Instant) {
        let mut release = self.release.lock().unwrap_or_else(PoisonError::into_inner);
        let (rate, last) = *release;
        let dt = now.duration_since(last).as_secs_f64().max(1e-3);
        // EWMA with a ~2 s horizon: recent releases matter, one burst does not dominate.
        let alpha = (dt / 2.0).min(1.0);
        *release = ((1.0 - alpha) * rate + alpha * (bytes as f64 / dt), now);
    }
}

/// Bytes held by one admitted call; returned to the budget on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_until_full_and_releases_on_drop() {
        let budget = MemoryBudget::new(100);
        let a = budget.try_reserve(60).unwrap();
        let refused = budget.try_reserve(50).unwrap_err();
        assert_eq!(refused.available, 40);
        assert_eq!(refused.wanted, 50);
        assert!(refused.retry_after >= MIN_RETRY && refused.retry_after <= MAX_RETRY);
        let b = budget.try_reserve(40).unwrap();
        assert_eq!(budget.in_use(), 100);
        drop(a);
        assert_eq!(budget.in_use(), 40);
        drop(b);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn a_request_larger_than_the_budget_gets_the_longest_delay() {
        let budget = MemoryBudget::new(100);
        assert_eq!(budget.try_reserve(101).unwrap_err().retry_after, MAX_RETRY);
    }

    #[test]
    fn only_a_request_that_fits_an_empty_budget_is_told_to_wait() {
        use super::super::AdmissionError;
        let budget = MemoryBudget::new(100);
        let _held = budget.try_reserve(60).unwrap();
        // Refused now, but it fits once the 60 bytes are released.
        let later = AdmissionError::from(budget.try_reserve(100).unwrap_err());
        assert!(
            matches!(
                later,
                AdmissionError::MemoryBudget {
                    wanted: 100,
                    available: 40,
                    ..
                }
            ),
            "{later:?}"
        );
        // Never.
        let never = AdmissionError::from(budget.try_reserve(101).unwrap_err());
        assert_eq!(
            never,
            AdmissionError::OverBudget {
                wanted: 101,
                limit: 100
            }
        );
    }

    #[test]
    fn the_retry_delay_is_the_deficit_at_the_recent_release_rate() {
        let budget = MemoryBudget::new(100 << 20);
        let _held = budget.try_reserve(90 << 20).unwrap();
        // Nothing released yet: no rate to go by, a fixed guess.
        let before = budget.try_reserve(20 << 20).unwrap_err();
        assert_eq!(before.retry_after, Duration::from_secs(1));
        // 1 MiB released every 100 ms for 20 s (ten horizons of the average): a steady 10 MiB/s.
        let start = Instant::now();
        for tick in 1..=200 {
            budget.record_release(1 << 20, start + Duration::from_millis(100 * tick));
        }
        let (rate, _) = *budget.release.lock().unwrap();
        assert!(
            (rate / f64::from(10u32 << 20) - 1.0).abs() < 0.01,
            "rate {rate} bytes/s"
        );
        // 10 MiB free: asking 15 MiB is 5 MiB short (~0.5 s), 40 MiB is 30 MiB short (~3 s).
        let near = budget.try_reserve(15 << 20).unwrap_err().retry_after;
        let far = budget.try_reserve(40 << 20).unwrap_err().retry_after;
        let close = |got: Duration, want: f64| (got.as_secs_f64() / want - 1.0).abs() < 0.02;
        assert!(close(near, 0.5), "{near:?}");
        assert!(close(far, 3.0), "{far:?}");
        // The suggestion stays within its bounds whatever the deficit.
        assert_eq!(
            budget.try_reserve(10 << 20 | 1).unwrap_err().retry_after,
            MIN_RETRY
        );
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_limit() {
        let budget = MemoryBudget::new(1_000);
        std::thread::scope(|s| {
            for _ in 0..8 {
                let budget = budget.clone();
                s.spawn(move || {
                    for _ in 0..10_000 {
                        if let Ok(r) = budget.try_reserve(300) {
                            assert!(budget.in_use() <= 1_000);
                            drop(r);
                        }
                    }
                });
            }
        });
        assert_eq!(budget.in_use(), 0);
    }
}
