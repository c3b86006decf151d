//! Counters the engine keeps per lane, updated once per batch, and a fixed-size latency
//! histogram: quarter-octave buckets of microseconds, so quantiles are within 25%.

use std::time::Duration;

/// Values under 4 us get a bucket each; above, each power of two is split in four.
const BUCKETS: usize = 4 + 39 * 4; // up to 2^41 us: 25 days

/// Latencies of plugin calls.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: Box::new([0; BUCKETS]), total: 0 }
    }
}

/// The bucket holding `micros`.
fn bucket_of(micros: u64) -> usize {
    if micros < 4 {
        return micros as usize;
    }
    let octave = micros.ilog2();
    // The two bits below the leading one pick the quarter within the octave.
    let quarter = (micros >> (octave - 2)) & 0b11;
    (4 + (octave as usize - 2) * 4 + quarter as usize).min(BUCKETS - 1)
}

/// The largest value that falls in `bucket`, in microseconds.
fn upper_bound(bucket: usize) -> u64 {
    if bucket < 4 {
        return bucket as u64;
    }
    let shift = (bucket - 4) / 4;
    let quarter = ((bucket - 4) % 4) as u64;
    ((4 + quarter + 1) << shift) - 1
}

impl Histogram {
    pub fn record(&mut self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.counts[bucket_of(micros)] += 1;
        self.total += 1;
    }

    /// The `q` quantile (0.0..=1.0) as an upper bound, or zero if nothing was recorded.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_micros(upper_bound(bucket));
            }
        }
        Duration::from_micros(upper_bound(BUCKETS - 1))
    }
}

/// One lane's counters.
#[derive(Clone, Debug, Default)]
pub struct LaneStats {
    pub batches: u64,
    pub messages: u64,
    pub errors: u64,
    /// Calls running now.
    pub in_flight: u64,
    /// Messages waiting or running in the lane, now and at most so far.
    pub queued: u64,
    pub queued_peak: u64,
    pub latency: Histogram,
    /// Retries scheduled, and the backoff they waited in all.
    pub retries: u64,
    pub retry_wait: std::time::Duration,
    /// Messages written to the dead-letter topic and acknowledged.
    pub dead_lettered: u64,
    /// Messages whose dead-letter write awaits the broker's acknowledgement, and how long the
    /// oldest such write has waited (zero if none); filled in by `Scheduler::snapshot`.
    pub dead_letters_pending: u64,
    pub dead_letters_oldest: std::time::Duration,
    /// Sync calls that ran past their deadline (their results still count).
    pub overruns: u64,
    /// Async calls cancelled at their deadline.
    pub timeouts: u64,
    /// Times the lane's rate limit held back a call.
    pub throttled: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_is_at_most_its_buckets_upper_bound_and_above_the_previous() {
        for micros in (0..5_000u64).chain([65_535, 65_536, 1 << 20, (1 << 20) + 1, (1 << 41) - 1]) {
            let bucket = bucket_of(micros);
            assert!(micros <= upper_bound(bucket) || bucket == BUCKETS - 1, "{micros} {bucket}");
            if bucket > 0 && bucket < BUCKETS - 1 {
                assert!(micros > upper_bound(bucket - 1), "{micros:#b} in bucket {bucket}");
            }
        }
    }

    #[test]
    fn quantiles_are_close() {
        let mut h = Histogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).as_secs_f64() * 1e3;
        let p99 = h.quantile(0.99).as_secs_f64() * 1e3;
        assert!((50.0..=50.0 * 1.25).contains(&p50), "{p50}");
        assert!((99.0..=99.0 * 1.25).contains(&p99), "{p99}");
        assert_eq!(Histogram::default().quantile(0.5), Duration::ZERO);
    }
}
