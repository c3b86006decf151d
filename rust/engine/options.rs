//! How one run is shaped, and the checks the engine makes of it before it starts (the
//! Python side checks the same rules first, with its own words; these guard Rust callers).

use std::time::Duration;

use crate::core::errors::Error;
use crate::core::lane::{LaneOptions, OnFailure};
use crate::core::limit::RateLimit;
use crate::kafka::poll::Shape;

/// How one run is shaped.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub lanes: Vec<LaneOptions>,
    /// How long a fetched batch may wait to fill once it holds a message.
    pub linger: Duration,
    /// End once nothing new arrived for this long after assignment (drain mode).
    pub idle_timeout: Option<Duration>,
    /// Worker threads calling plugins.
    pub workers: usize,
    /// How long a stop waits for running calls before giving up on them.
    pub shutdown_timeout: Duration,
    /// How long a revoke waits for running calls on the revoked partitions.
    pub revoke_timeout: Duration,
    /// The app's rate limit, charged per fetched batch.
    pub rate_limit: Option<RateLimit>,
    /// The bound of one dead-letter write (the producer's `message.timeout.ms`, unless the
    /// user's properties set it).
    pub dlq_timeout: Duration,
}

impl RunOptions {
    pub fn validate(&self) -> Result<(), Error> {
        if self.lanes.is_empty() {
            return Err(Error::Config("register at least one plugin".into()));
        }
        if self.workers == 0 {
            return Err(Error::Config("workers must be at least 1".into()));
        }
        for lane in &self.lanes {
            let name = &lane.name;
            if lane.batch_size == 0 || lane.concurrency == 0 {
                return Err(Error::Config(format!("plugin {name:?}: batch_size and concurrency must be at least 1")));
            }
            // Fetched batches are as large as the largest batch_size and a lane takes whole
            // batches, so a smaller bound would be overrun by a single batch.
            let fetched = self.shape().batch_size;
            if lane.max_queued < fetched {
                return Err(Error::Config(format!(
                    "plugin {name:?}: max_queued ({}) must be at least the largest batch_size ({fetched})",
                    lane.max_queued
                )));
            }
            if let Some(limit) = &lane.rate_limit {
                limit.validate(&format!("plugin {name:?}"), lane.batch_size)?;
            }
            if lane.timeout.is_some_and(|t| t.is_zero()) {
                return Err(Error::Config(format!("plugin {name:?}: timeout must be positive")));
            }
            let retry = &lane.retry;
            if retry.first_backoff > retry.max_backoff {
                return Err(Error::Config(format!("plugin {name:?}: the first backoff exceeds the maximum")));
            }
            if matches!(&retry.on_failure, OnFailure::DeadLetter(topic) if topic.trim().is_empty()) {
                return Err(Error::Config(format!("plugin {name:?}: the dead-letter topic must not be empty")));
            }
        }
        if let Some(limit) = &self.rate_limit {
            limit.validate("the app", self.shape().batch_size)?;
        }
        // librdkafka takes whole milliseconds up to i32::MAX, and must exceed the 5 ms linger.
        if self.dlq_timeout < Duration::from_millis(10) || self.dlq_timeout.as_millis() > i32::MAX as u128 {
            return Err(Error::Config(format!(
                "dlq_timeout must be between 10 ms and {} days, got {:?}",
                i32::MAX / 86_400_000,
                self.dlq_timeout
            )));
        }
        Ok(())
    }

    pub(super) fn shape(&self) -> Shape {
        Shape {
            batch_size: self.lanes.iter().map(|l| l.batch_size).max().unwrap_or(1),
            linger: self.linger,
            fetch_gathering: Duration::ZERO, // the source's fetch plan sets it
            idle_timeout: self.idle_timeout,
            revoke_timeout: self.revoke_timeout,
            rate_limit: self.rate_limit,
        }
    }
}
