//! A plugin's lane: its own bounded queue of work, per partition in offset order, with at
//! most one call per partition in flight and at most `concurrency` calls in all. A failed
//! call's chunk waits for its retry at the head of its partition's queue, so the partition's
//! later work waits behind it and order holds. A lane is plain data; the scheduler owns
//! every lane, and the timer wheel that lifts their backoffs and rate limits.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::batch::{Batch, Partition};
use crate::core::limit::{Limiter, RateLimit};
use crate::core::offsets::Epoch;
use crate::core::stats::LaneStats;
use crate::core::timer::TimerKey;

/// What happens to a batch once a plugin has failed it `retries + 1` times.
#[derive(Clone, Debug, PartialEq)]
pub enum OnFailure {
    /// Write its messages to this topic; they count as done once the write is acknowledged.
    DeadLetter(String),
    /// Never give up (backoff stays at its maximum).
    RetryForever,
    /// End the run with the error.
    Stop,
}

/// How a plugin's failed calls are retried.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    pub retries: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    pub on_failure: OnFailure,
}

impl RetryPolicy {
    /// No retries: a failure ends the run.
    #[cfg(test)]
    pub fn stop() -> Self {
        RetryPolicy {
            retries: 0,
            first_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            on_failure: OnFailure::Stop,
        }
    }

    /// Whether a call that failed on attempt `attempt` (1 for the first) is tried again.
    pub fn retries_after(&self, attempt: u32) -> bool {
        self.on_failure == OnFailure::RetryForever || attempt <= self.retries
    }

    /// The wait before attempt `attempt + 1`: exponential from `first_backoff`, capped at
    /// `max_backoff`, with "equal jitter" (half fixed, half random) so retries of many
    /// partitions spread out instead of arriving together.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doubled = self.first_backoff.saturating_mul(1u32 << attempt.saturating_sub(1).min(31));
        let capped = doubled.min(self.max_backoff);
        capped / 2 + capped.mul_f64(fastrand::f64() / 2.0)
    }
}

/// How one plugin is fed.
#[derive(Clone, Debug)]
pub struct LaneOptions {
    pub name: String,
    /// The most messages in one call.
    pub batch_size: usize,
    /// Calls in flight at once, on different partitions.
    pub concurrency: usize,
    /// Messages waiting or running in the lane before it refuses more.
    pub max_queued: usize,
    /// Payload bytes of the batches waiting or running in the lane before it refuses more.
    pub max_queued_bytes: usize,
    /// Each call's deadline, from its start.
    pub timeout: Option<Duration>,
    /// Messages per second handed to the plugin, charged per call.
    pub rate_limit: Option<RateLimit>,
    pub retry: RetryPolicy,
}

impl LaneOptions {
    /// Options with no deadline, no rate limit and no retries.
    #[cfg(test)]
    pub fn new(name: &str, batch_size: usize, concurrency: usize, max_queued: usize) -> Self {
        LaneOptions {
            name: name.into(),
            batch_size,
            concurrency,
            max_queued,
            max_queued_bytes: usize::MAX,
            timeout: None,
            rate_limit: None,
            retry: RetryPolicy::stop(),
        }
    }
}

/// The messages of one call: a slice of a fetched batch, or after a partial failure the
/// positions in the batch that failed. `last` marks the chunk that ends the batch for this
/// lane; `attempt` counts calls on it, from 1; `epoch` is its partition's assignment.
#[derive(Debug)]
pub struct Chunk {
    pub batch: Arc<Batch>,
    pub epoch: Epoch,
    pub range: Range<usize>,
    pub subset: Option<Arc<[u32]>>,
    pub last: bool,
    pub attempt: u32,
}

impl Chunk {
    pub fn len(&self) -> usize {
        self.subset.as_ref().map_or(self.range.len(), |s| s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The offset after the slice's last message: once the chunk is finished (a retry of
    /// part of it included), the lane has finished its partition up to there.
    pub fn next_offset(&self) -> i64 {
        self.range.end.checked_sub(1).map_or(self.batch.first_offset(), |i| self.batch.get(i).offset + 1)
    }

    /// Positions in the batch of the messages, in offset order.
    pub fn indexes(&self) -> Vec<usize> {
        match &self.subset {
            Some(subset) => subset.iter().map(|&i| i as usize).collect(),
            None => self.range.clone().collect(),
        }
    }

    /// Names the call's messages, for logs and errors (without listing every position).
    pub fn describe(&self) -> String {
        let (count, first, last) = self.span();
        self.batch.describe(count, first, last)
    }

    /// How many messages, and the positions in the batch of the first and the last.
    pub fn span(&self) -> (usize, Option<usize>, Option<usize>) {
        let last = self.len().checked_sub(1).and_then(|i| self.index(i));
        (self.len(), self.index(0), last)
    }

    /// The position in the batch of the call's `position`-th message.
    pub fn index(&self, position: usize) -> Option<usize> {
        match &self.subset {
            Some(subset) => subset.get(position).map(|&i| i as usize),
            None => (position < self.range.len()).then(|| self.range.start + position),
        }
    }
}

#[derive(Debug, Default)]
struct PartitionQueue {
    chunks: VecDeque<Chunk>,
    /// A call is running (or its messages are being dead-lettered).
    running: bool,
    /// The head chunk waits for this retry timer.
    backoff: Option<TimerKey>,
}

impl PartitionQueue {
    fn busy(&self) -> bool {
        self.running || self.backoff.is_some()
    }
}

/// What `Lane::take` found.
#[derive(Debug)]
pub enum Take {
    Call(Chunk),
    /// The lane's rate limit refused the next call until then; nothing starts before.
    Throttled(Instant),
    Nothing,
}

#[derive(Debug)]
pub struct Lane {
    pub options: LaneOptions,
    partitions: HashMap<Partition, PartitionQueue>,
    /// Partitions with chunks waiting and no call running, in the order they became ready.
    ready: VecDeque<Partition>,
    running: usize,
    outstanding_bytes: usize,
    /// Set when the lane refuses a batch; cleared once it drains below half its bounds, so
    /// fetching pauses and resumes with hysteresis instead of flapping.
    full: bool,
    limiter: Option<Limiter>,
    /// Waiting for the rate limit: a wheel timer will lift it.
    throttled: bool,
    pub stats: LaneStats,
}

impl Lane {
    pub fn new(options: LaneOptions) -> crate::core::errors::Result<Self> {
        let limiter = options.rate_limit.map(Limiter::new).transpose()?;
        Ok(Lane {
            options,
            partitions: HashMap::new(),
            ready: VecDeque::new(),
            running: 0,
            outstanding_bytes: 0,
            full: false,
            limiter,
            throttled: false,
            stats: LaneStats::default(),
        })
    }

    fn outstanding(&self) -> usize {
        self.stats.queued as usize
    }

    /// Whether the lane takes `batch` now; a refusal marks it full. An empty lane takes any
    /// batch, so one larger than the bounds still makes progress.
    pub fn admits(&mut self, batch: &Batch) -> bool {
        if self.outstanding() == 0 {
            self.full = false;
            return true;
        }
        if self.full && !self.below_half() {
            return false;
        }
        self.full = false;
        if self.outstanding() + batch.len() > self.options.max_queued
            || self.outstanding_bytes + batch.byte_len() > self.options.max_queued_bytes
        {
            self.full = true;
            return false;
        }
        true
    }

    fn below_half(&self) -> bool {
        self.outstanding() <= self.options.max_queued / 2 && self.outstanding_bytes <= self.options.max_queued_bytes / 2
    }

    /// Whether the lane refused a batch and has since drained enough to take one again.
    pub fn has_room_again(&self) -> bool {
        self.full && self.below_half()
    }

    /// Queues `batch` in slices of the lane's batch size.
    pub fn push(&mut self, batch: &Arc<Batch>, epoch: Epoch) {
        let queue = self.partitions.entry(batch.partition().clone()).or_default();
        let was_idle = queue.chunks.is_empty() && !queue.busy();
        let mut start = 0;
        while start < batch.len() {
            let end = (start + self.options.batch_size).min(batch.len());
            queue.chunks.push_back(Chunk {
                batch: batch.clone(),
                epoch,
                range: start..end,
                subset: None,
                last: end == batch.len(),
                attempt: 1,
            });
            start = end;
        }
        if was_idle {
            self.ready.push_back(batch.partition().clone());
        }
        self.stats.queued += batch.len() as u64;
        self.stats.queued_peak = self.stats.queued_peak.max(self.stats.queued);
        self.outstanding_bytes += batch.byte_len();
    }

    /// Whether a call can start now.
    pub fn has_ready(&self) -> bool {
        self.running < self.options.concurrency && !self.ready.is_empty() && !self.throttled
    }

    /// Starts the next call: the oldest ready partition's next chunk, if the lane's
    /// concurrency and rate limit allow.
    pub fn take(&mut self) -> Take {
        if self.running >= self.options.concurrency || self.throttled {
            return Take::Nothing;
        }
        while let Some(partition) = self.ready.pop_front() {
            let Some(queue) = self.partitions.get_mut(&partition) else {
                continue;
            };
            let Some(next) = queue.chunks.front() else {
                continue;
            };
            debug_assert!(!queue.busy(), "one call per partition");
            if let Some(limiter) = &self.limiter {
                if let Err(until) = limiter.charge(next.len()) {
                    self.ready.push_front(partition);
                    self.throttled = true;
                    self.stats.throttled += 1;
                    return Take::Throttled(until);
                }
            }
            let Some(chunk) = queue.chunks.pop_front() else {
                continue;
            };
            queue.running = true;
            self.running += 1;
            self.stats.in_flight = self.running as u64;
            return Take::Call(chunk);
        }
        Take::Nothing
    }

    /// The rate limit's wait is over.
    pub fn unthrottle(&mut self) {
        self.throttled = false;
    }

    /// A call on `chunk` is over: it succeeded, or its messages were dead-lettered.
    pub fn finish(&mut self, chunk: &Chunk) {
        self.release(chunk, chunk.len());
        self.end_call(chunk.batch.partition());
    }

    /// A call failed and will be retried on `retry` (the chunk again, or the part that
    /// failed) once the timer `backoff` fires; the partition waits for it.
    pub fn retry_later(&mut self, failed: &Chunk, retry: Chunk, backoff: TimerKey) {
        self.release_messages(failed.len() - retry.len());
        self.stats.retries += 1;
        self.end_call(failed.batch.partition());
        let partition = retry.batch.partition().clone();
        let queue = self.partitions.entry(partition.clone()).or_default();
        queue.chunks.push_front(retry);
        queue.backoff = Some(backoff);
        self.ready.retain(|p| *p != partition);
    }

    /// A partition's retry timer fired: its head chunk may run again.
    pub fn retry_due(&mut self, partition: &Partition) {
        if let Some(queue) = self.partitions.get_mut(partition) {
            queue.backoff = None;
            if !queue.running && !queue.chunks.is_empty() {
                self.ready.push_back(partition.clone());
            }
        }
    }

    fn end_call(&mut self, partition: &Partition) {
        self.running -= 1;
        self.stats.in_flight = self.running as u64;
        if let Some(queue) = self.partitions.get_mut(partition) {
            queue.running = false;
            if queue.chunks.is_empty() && queue.backoff.is_none() {
                self.partitions.remove(partition);
            } else if queue.backoff.is_none() {
                self.ready.push_back(partition.clone());
            }
        }
    }

    fn release(&mut self, chunk: &Chunk, messages: usize) {
        self.release_messages(messages);
        if chunk.last {
            self.outstanding_bytes -= chunk.batch.byte_len();
        }
    }

    fn release_messages(&mut self, messages: usize) {
        self.stats.queued -= messages as u64;
    }

    /// Drops the waiting chunks of `partitions` (all of them if `None`), retries included;
    /// calls already running finish normally. Returns the retry timers to cancel.
    pub fn drop_waiting(&mut self, partitions: Option<&[Partition]>) -> Vec<TimerKey> {
        let mut dropped = Vec::new();
        let mut timers = Vec::new();
        for (partition, queue) in &mut self.partitions {
            if partitions.is_none_or(|ps| ps.contains(partition)) {
                dropped.extend(queue.chunks.drain(..));
                timers.extend(queue.backoff.take());
            }
        }
        for chunk in &dropped {
            self.release(chunk, chunk.len());
        }
        // Keep partitions that still have work: a running call, or chunks not dropped.
        self.partitions.retain(|_, queue| queue.busy() || !queue.chunks.is_empty());
        let partitions = &self.partitions;
        self.ready.retain(|p| partitions.get(p).is_some_and(|q| !q.busy() && !q.chunks.is_empty()));
        timers
    }

    /// Calls running on any of `partitions`.
    pub fn running_on(&self, partitions: &[Partition]) -> usize {
        partitions.iter().filter(|p| self.partitions.get(*p).is_some_and(|q| q.running)).count()
    }

    pub fn running(&self) -> usize {
        self.running
    }

    pub fn is_empty(&self) -> bool {
        self.stats.queued == 0 && self.running == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::batch::testing::batch;
    use crate::core::offsets::OffsetTracker;

    fn lane(batch_size: usize, concurrency: usize, max_queued: usize) -> Lane {
        Lane::new(LaneOptions::new("l", batch_size, concurrency, max_queued)).expect("valid")
    }

    fn take(l: &mut Lane) -> Option<Chunk> {
        match l.take() {
            Take::Call(chunk) => Some(chunk),
            Take::Throttled(_) | Take::Nothing => None,
        }
    }

    fn id(tracker: &mut OffsetTracker, b: &Batch) -> Epoch {
        if !tracker.is_assigned(b.partition()) {
            tracker.assign([b.partition().clone()]);
        }
        tracker.epoch(b.partition()).expect("assigned")
    }

    #[test]
    fn slices_by_batch_size_and_runs_one_call_per_partition_in_order() {
        let mut tracker = OffsetTracker::new(1);
        let mut l = lane(4, 2, 100);
        let b = batch(0, 0, 10);
        l.push(&b, id(&mut tracker, &b));
        let first = take(&mut l).expect("ready");
        assert_eq!((first.range.clone(), first.last), (0..4, false));
        assert!(take(&mut l).is_none(), "the partition is busy");
        l.finish(&first);
        let second = take(&mut l).expect("ready again");
        assert_eq!(second.range, 4..8);
        l.finish(&second);
        let third = take(&mut l).expect("ready");
        assert_eq!((third.range.clone(), third.last), (8..10, true));
        l.finish(&third);
        assert!(l.is_empty());
    }

    #[test]
    fn different_partitions_run_in_parallel_up_to_concurrency() {
        let mut tracker = OffsetTracker::new(1);
        let mut l = lane(100, 2, 1_000);
        for p in 0..3 {
            let b = batch(p, 0, 5);
            l.push(&b, id(&mut tracker, &b));
        }
        let a = take(&mut l).expect("one");
        let b = take(&mut l).expect("two");
        assert_ne!(a.batch.partition(), b.batch.partition());
        assert!(take(&mut l).is_none(), "concurrency 2");
        l.finish(&a);
        assert!(take(&mut l).is_some());
    }

    #[test]
    fn refuses_past_its_bound_and_admits_again_below_half() {
        let mut tracker = OffsetTracker::new(1);
        let mut l = lane(10, 1, 20);
        let b1 = batch(0, 0, 10);
        assert!(l.admits(&b1), "an empty lane admits");
        l.push(&b1, id(&mut tracker, &b1));
        let b2 = batch(0, 10, 10);
        assert!(l.admits(&b2), "fits exactly");
        l.push(&b2, id(&mut tracker, &b2));
        let b3 = batch(0, 20, 1);
        assert!(!l.admits(&b3), "full");
        let c = take(&mut l).expect("ready");
        l.finish(&c); // 10 left: at half, so it admits again
        assert_eq!(l.stats.queued, 10);
        assert!(l.admits(&b3), "admits again at half");
        assert_eq!(l.stats.queued_peak, 20);
    }

    #[test]
    fn dropping_one_partitions_work_keeps_the_others() {
        let mut tracker = OffsetTracker::new(1);
        let mut l = lane(5, 1, 100);
        let (b0, b1) = (batch(0, 0, 10), batch(1, 0, 10));
        l.push(&b0, id(&mut tracker, &b0));
        l.push(&b1, id(&mut tracker, &b1));
        l.drop_waiting(Some(&[b0.partition().clone()]));
        assert_eq!(l.stats.queued, 10);
        let first = take(&mut l).expect("partition 1 is still ready");
        assert_eq!((first.batch.partition().partition, first.range.clone()), (1, 0..5));
        l.finish(&first);
        let second = take(&mut l).expect("and keeps its order");
        assert_eq!(second.range, 5..10);
        l.finish(&second);
        assert!(l.is_empty());
    }

    #[test]
    fn dropping_waiting_chunks_keeps_the_running_call() {
        let mut tracker = OffsetTracker::new(1);
        let mut l = lane(5, 1, 100);
        let b = batch(0, 0, 15);
        l.push(&b, id(&mut tracker, &b));
        let running = take(&mut l).expect("ready");
        l.drop_waiting(Some(&[b.partition().clone()]));
        assert_eq!(l.running_on(&[b.partition().clone()]), 1);
        assert_eq!(l.stats.queued, 5);
        l.finish(&running);
        assert!(l.is_empty());
    }
}
