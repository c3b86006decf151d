//! Rate limits in messages per second, as GCRA (the `governor` crate): charged once per batch
//! with `check_n`, never per message. A refused charge says when it would pass, and the
//! caller puts that instant on the timer wheel instead of sleeping or polling.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::core::errors::{Error, Result};

/// A rate and the most messages let through at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl RateLimit {
    /// Checks the limit against the largest charge it will see (one batch).
    pub fn validate(&self, what: &str, largest_charge: usize) -> Result<()> {
        if !(self.per_second.is_finite() && self.per_second > 0.0) {
            return Err(Error::Config(format!(
                "{what}: rate_limit must be a positive number, got {}",
                self.per_second
            )));
        }
        if (self.burst as usize) < largest_charge {
            return Err(Error::Config(format!(
                "{what}: the rate limit's burst ({}) must be at least the batch size ({largest_charge}), \
                 since a batch is charged at once",
                self.burst
            )));
        }
        Ok(())
    }
}

/// One GCRA limiter on the std monotonic clock (no background thread).
pub struct Limiter {
    gcra: RateLimiter<NotKeyed, InMemoryState, MonotonicClock, NoOpMiddleware<Instant>>,
    clock: MonotonicClock,
    burst: NonZeroU32,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("burst", &self.burst).finish_non_exhaustive()
    }
}

impl Limiter {
    pub fn new(limit: RateLimit) -> Result<Self> {
        let invalid = || Error::Config(format!("invalid rate limit {limit:?}"));
        let burst = NonZeroU32::new(limit.burst).ok_or_else(invalid)?;
        let period = Duration::try_from_secs_f64(1.0 / limit.per_second).map_err(|_| invalid())?;
        let quota = Quota::with_period(period).ok_or_else(invalid)?.allow_burst(burst);
        let clock = MonotonicClock;
        Ok(Limiter { gcra: RateLimiter::direct_with_clock(quota, clock.clone()), clock, burst })
    }

    /// Charges `n` messages. `Err` says when a charge of that size would pass; nothing is
    /// charged then. A charge larger than the burst is charged as the burst (validation keeps
    /// charges within it).
    pub fn charge(&self, n: usize) -> std::result::Result<(), Instant> {
        let Some(n) = NonZeroU32::new(n.min(self.burst.get() as usize) as u32) else {
            return Ok(());
        };
        match self.gcra.check_n(n) {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(not_until)) => Err(self.clock.now() + not_until.wait_time_from(self.clock.now())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_a_burst_through_then_says_when_the_next_batch_passes() {
        let limiter = Limiter::new(RateLimit { per_second: 1000.0, burst: 100 }).expect("valid");
        assert_eq!(limiter.charge(100), Ok(()));
        let until = limiter.charge(100).expect_err("over budget");
        let wait = until.saturating_duration_since(Instant::now());
        // 100 messages at 1000/s: about 100 ms.
        assert!(wait > Duration::from_millis(80) && wait <= Duration::from_millis(101), "{wait:?}");
        assert_eq!(limiter.charge(0), Ok(()));
    }

    #[test]
    fn a_burst_smaller_than_a_batch_is_a_config_error() {
        let limit = RateLimit { per_second: 10.0, burst: 5 };
        assert!(limit.validate("plugin \"p\"", 10).is_err());
        assert!(limit.validate("plugin \"p\"", 5).is_ok());
        assert!(RateLimit { per_second: 0.0, burst: 5 }.validate("app", 1).is_err());
    }
}
