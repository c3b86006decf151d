//! A plugin's lane: its own bounded queue of work, per partition in offset order, with at
//! most one call per partition in flight and at most `concurrency` calls in all. A lane is
//! plain data; the pool owns every lane under one lock.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use crate::batch::{Batch, Partition};
use crate::offsets::BatchId;
use crate::stats::LaneStats;

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
}

/// A slice of a fetched batch for one call. `last` marks the slice that finishes the batch
/// for this lane.
#[derive(Debug)]
pub struct Chunk {
    pub batch: Arc<Batch>,
    pub id: BatchId,
    pub range: Range<usize>,
    pub last: bool,
}

#[derive(Debug, Default)]
struct PartitionQueue {
    chunks: VecDeque<Chunk>,
    busy: bool,
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
    pub stats: LaneStats,
}

impl Lane {
    pub fn new(options: LaneOptions) -> Self {
        Lane {
            options,
            partitions: HashMap::new(),
            ready: VecDeque::new(),
            running: 0,
            outstanding_bytes: 0,
            full: false,
            stats: LaneStats::default(),
        }
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
        if self.full
            && (self.outstanding() > self.options.max_queued / 2
                || self.outstanding_bytes > self.options.max_queued_bytes / 2)
        {
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

    /// Queues `batch` in slices of the lane's batch size.
    pub fn push(&mut self, batch: &Arc<Batch>, id: BatchId) {
        let queue = self.partitions.entry(batch.partition().clone()).or_default();
        let was_idle = queue.chunks.is_empty() && !queue.busy;
        let mut start = 0;
        while start < batch.len() {
            let end = (start + self.options.batch_size).min(batch.len());
            queue.chunks.push_back(Chunk { batch: batch.clone(), id, range: start..end, last: end == batch.len() });
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
        self.running < self.options.concurrency && !self.ready.is_empty()
    }

    /// Starts the next call: the oldest ready partition's next chunk.
    pub fn take(&mut self) -> Option<Chunk> {
        if self.running >= self.options.concurrency {
            return None;
        }
        while let Some(partition) = self.ready.pop_front() {
            let Some(queue) = self.partitions.get_mut(&partition) else {
                continue;
            };
            let Some(chunk) = queue.chunks.pop_front() else {
                continue;
            };
            debug_assert!(!queue.busy, "one call per partition");
            queue.busy = true;
            self.running += 1;
            self.stats.in_flight = self.running as u64;
            return Some(chunk);
        }
        None
    }

    /// A call on `chunk` returned (whatever its outcome).
    pub fn finish(&mut self, chunk: &Chunk) {
        self.running -= 1;
        self.stats.in_flight = self.running as u64;
        self.release(chunk);
        let partition = chunk.batch.partition();
        if let Some(queue) = self.partitions.get_mut(partition) {
            queue.busy = false;
            if queue.chunks.is_empty() {
                self.partitions.remove(partition);
            } else {
                self.ready.push_back(partition.clone());
            }
        }
    }

    fn release(&mut self, chunk: &Chunk) {
        self.stats.queued -= chunk.range.len() as u64;
        if chunk.last {
            self.outstanding_bytes -= chunk.batch.byte_len();
        }
    }

    /// Drops the waiting chunks of `partitions` (all of them if `None`); calls already
    /// running finish normally.
    pub fn drop_waiting(&mut self, partitions: Option<&[Partition]>) {
        let mut dropped = Vec::new();
        for (partition, queue) in &mut self.partitions {
            if partitions.is_none_or(|ps| ps.contains(partition)) {
                dropped.extend(queue.chunks.drain(..));
            }
        }
        for chunk in &dropped {
            self.release(chunk);
        }
        // Keep partitions that still have work: a running call, or chunks not dropped.
        self.partitions.retain(|_, queue| queue.busy || !queue.chunks.is_empty());
        let partitions = &self.partitions;
        self.ready.retain(|p| partitions.get(p).is_some_and(|q| !q.busy && !q.chunks.is_empty()));
    }

    /// Calls running on any of `partitions`.
    pub fn running_on(&self, partitions: &[Partition]) -> usize {
        partitions.iter().filter(|p| self.partitions.get(*p).is_some_and(|q| q.busy)).count()
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
    use rdkafka::message::{OwnedMessage, Timestamp};

    use super::*;
    use crate::batch::BatchBuilder;
    use crate::offsets::OffsetTracker;

    fn batch(partition: i32, first: i64, count: i64) -> Arc<Batch> {
        let mut builder = BatchBuilder::new(Partition { topic: Arc::from("t"), partition });
        for offset in first..first + count {
            let m = OwnedMessage::new(
                Some(vec![0; 10]),
                None,
                "t".into(),
                Timestamp::NotAvailable,
                partition,
                offset,
                None,
            );
            builder.push(&m);
        }
        builder.take()
    }

    fn lane(batch_size: usize, concurrency: usize, max_queued: usize) -> Lane {
        Lane::new(LaneOptions { name: "l".into(), batch_size, concurrency, max_queued, max_queued_bytes: usize::MAX })
    }

    fn id(tracker: &mut OffsetTracker, b: &Batch) -> BatchId {
        tracker.assign([b.partition().clone()]);
        tracker.track(b.partition(), b.last_offset(), 1).expect("assigned")
    }

    #[test]
    fn slices_by_batch_size_and_runs_one_call_per_partition_in_order() {
        let mut tracker = OffsetTracker::default();
        let mut l = lane(4, 2, 100);
        let b = batch(0, 0, 10);
        l.push(&b, id(&mut tracker, &b));
        let first = l.take().expect("ready");
        assert_eq!((first.range.clone(), first.last), (0..4, false));
        assert!(l.take().is_none(), "the partition is busy");
        l.finish(&first);
        let second = l.take().expect("ready again");
        assert_eq!(second.range, 4..8);
        l.finish(&second);
        let third = l.take().expect("ready");
        assert_eq!((third.range.clone(), third.last), (8..10, true));
        l.finish(&third);
        assert!(l.is_empty());
    }

    #[test]
    fn different_partitions_run_in_parallel_up_to_concurrency() {
        let mut tracker = OffsetTracker::default();
        let mut l = lane(100, 2, 1_000);
        for p in 0..3 {
            let b = batch(p, 0, 5);
            l.push(&b, id(&mut tracker, &b));
        }
        let a = l.take().expect("one");
        let b = l.take().expect("two");
        assert_ne!(a.batch.partition(), b.batch.partition());
        assert!(l.take().is_none(), "concurrency 2");
        l.finish(&a);
        assert!(l.take().is_some());
    }

    #[test]
    fn refuses_past_its_bound_and_admits_again_below_half() {
        let mut tracker = OffsetTracker::default();
        let mut l = lane(10, 1, 20);
        let b1 = batch(0, 0, 10);
        assert!(l.admits(&b1), "an empty lane admits");
        l.push(&b1, id(&mut tracker, &b1));
        let b2 = batch(0, 10, 10);
        assert!(l.admits(&b2), "fits exactly");
        l.push(&b2, tracker.track(b2.partition(), 19, 1).expect("assigned"));
        let b3 = batch(0, 20, 1);
        assert!(!l.admits(&b3), "full");
        let c = l.take().expect("ready");
        l.finish(&c); // 10 left: at half, so it admits again
        assert_eq!(l.stats.queued, 10);
        assert!(l.admits(&b3), "admits again at half");
        assert_eq!(l.stats.queued_peak, 20);
    }

    #[test]
    fn dropping_one_partitions_work_keeps_the_others() {
        let mut tracker = OffsetTracker::default();
        let mut l = lane(5, 1, 100);
        let (b0, b1) = (batch(0, 0, 10), batch(1, 0, 10));
        l.push(&b0, id(&mut tracker, &b0));
        l.push(&b1, id(&mut tracker, &b1));
        l.drop_waiting(Some(&[b0.partition().clone()]));
        assert_eq!(l.stats.queued, 10);
        let first = l.take().expect("partition 1 is still ready");
        assert_eq!((first.batch.partition().partition, first.range.clone()), (1, 0..5));
        l.finish(&first);
        let second = l.take().expect("and keeps its order");
        assert_eq!(second.range, 5..10);
        l.finish(&second);
        assert!(l.is_empty());
    }

    #[test]
    fn dropping_waiting_chunks_keeps_the_running_call() {
        let mut tracker = OffsetTracker::default();
        let mut l = lane(5, 1, 100);
        let b = batch(0, 0, 15);
        l.push(&b, id(&mut tracker, &b));
        let running = l.take().expect("ready");
        l.drop_waiting(Some(&[b.partition().clone()]));
        assert_eq!(l.running_on(&[b.partition().clone()]), 1);
        assert_eq!(l.stats.queued, 5);
        l.finish(&running);
        assert!(l.is_empty());
    }
}
