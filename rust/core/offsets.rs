//! Which offsets may be stored. Completion is tracked per partition and per lane, at the
//! granularity of a call: a partition's stored offset is the highest offset below which every
//! lane has finished (or dead-lettered, acknowledged) every message, whatever the size of the
//! batches they were fetched in.
//!
//! Each lane runs at most one call per partition at a time, in offset order, and a failed
//! call's retry waits at the head of its partition's queue. So each lane's "finished up to"
//! offset of a partition only grows, and the offset that may be stored is the minimum over
//! lanes of it. A lane whose call failed for good (stop policy, or a dead-letter write that
//! failed) is frozen on that partition: its offset no longer moves this assignment, so
//! nothing from the failed call on is stored. Offsets may have gaps (compaction): a lane's
//! offset is the one after the last message of its last finished call, and the consumer
//! reading from there gets the next message that exists.
//!
//! Each assignment of a partition has its own epoch; a call from an earlier assignment (it
//! ran past a revoke) never stores. Nothing here is per message, and the cost of a
//! completion is one pass over the lanes.

use std::collections::HashMap;

use crate::core::batch::Partition;

/// Identifies one assignment of a partition. Epochs are never reused, so work fetched before
/// a revoke can never complete anything of the partition's next assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Epoch(u64);

#[derive(Debug)]
struct Progress {
    epoch: Epoch,
    /// Per lane: the offset after the last message of its last finished call; `None` until
    /// its first call on this partition finished.
    done: Box<[Option<i64>]>,
    /// Per lane: a call failed for good; `done` stays where it is.
    frozen: Box<[bool]>,
    /// The offset last handed out to be stored.
    stored: Option<i64>,
}

impl Progress {
    /// The minimum over lanes of what they finished, once every lane finished something.
    fn finished(&self) -> Option<i64> {
        self.done.iter().try_fold(i64::MAX, |low, done| done.map(|d| low.min(d)))
    }
}

/// Tracks, per assigned partition, how far each lane has finished.
#[derive(Debug)]
pub struct OffsetTracker {
    lanes: usize,
    partitions: HashMap<Partition, Progress>,
    next_epoch: u64,
}

impl OffsetTracker {
    /// A tracker for `lanes` lanes, every one of which sees every message.
    pub fn new(lanes: usize) -> Self {
        OffsetTracker { lanes, partitions: HashMap::new(), next_epoch: 0 }
    }

    /// Starts tracking newly assigned partitions, with nothing finished, each in a new epoch.
    pub fn assign(&mut self, partitions: impl IntoIterator<Item = Partition>) {
        for partition in partitions {
            let epoch = Epoch(self.next_epoch);
            self.next_epoch += 1;
            let progress = Progress {
                epoch,
                done: vec![None; self.lanes].into_boxed_slice(),
                frozen: vec![false; self.lanes].into_boxed_slice(),
                stored: None,
            };
            self.partitions.insert(partition, progress);
        }
    }

    /// Forgets revoked partitions; their calls still running will complete into nothing.
    pub fn revoke<'a>(&mut self, partitions: impl IntoIterator<Item = &'a Partition>) {
        for partition in partitions {
            self.partitions.remove(partition);
        }
    }

    pub fn is_assigned(&self, partition: &Partition) -> bool {
        self.partitions.contains_key(partition)
    }

    /// The partition's current epoch, for the work fetched now; `None` if it is not assigned
    /// (it was revoked meanwhile).
    pub fn epoch(&self, partition: &Partition) -> Option<Epoch> {
        self.partitions.get(partition).map(|p| p.epoch)
    }

    /// Whether work of `epoch` still counts: its partition was not revoked since.
    pub fn tracks(&self, partition: &Partition, epoch: Epoch) -> bool {
        self.progress(partition, epoch).is_some()
    }

    fn progress(&self, partition: &Partition, epoch: Epoch) -> Option<&Progress> {
        self.partitions.get(partition).filter(|p| p.epoch == epoch)
    }

    fn progress_mut(&mut self, partition: &Partition, epoch: Epoch) -> Option<&mut Progress> {
        self.partitions.get_mut(partition).filter(|p| p.epoch == epoch)
    }

    /// Lane `lane` finished every message of the partition before offset `next` (the offset
    /// after its call's last message). Returns the offset that may now be stored for the
    /// partition (the next one to read, as Kafka expects), if it moved.
    pub fn complete(&mut self, partition: &Partition, epoch: Epoch, lane: usize, next: i64) -> Option<i64> {
        let progress = self.progress_mut(partition, epoch)?;
        if *progress.frozen.get(lane)? {
            return None;
        }
        let done = progress.done.get_mut(lane)?;
        debug_assert!(done.is_none_or(|d| d <= next), "a lane finishes a partition in offset order");
        *done = Some(done.map_or(next, |d| d.max(next)));
        let finished = progress.finished()?;
        if progress.stored.is_some_and(|stored| stored >= finished) {
            return None;
        }
        progress.stored = Some(finished);
        Some(finished)
    }

    /// Lane `lane` failed a call on the partition for good: from that call on, nothing of the
    /// partition is stored this assignment, whatever the other lanes or later calls do.
    pub fn fail(&mut self, partition: &Partition, epoch: Epoch, lane: usize) {
        if let Some(frozen) = self.progress_mut(partition, epoch).and_then(|p| p.frozen.get_mut(lane)) {
            *frozen = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn p(partition: i32) -> Partition {
        Partition { topic: Arc::from("t"), partition }
    }

    fn tracker(lanes: usize, partitions: &[i32]) -> OffsetTracker {
        let mut t = OffsetTracker::new(lanes);
        t.assign(partitions.iter().map(|&i| p(i)));
        t
    }

    fn epoch(t: &OffsetTracker, partition: i32) -> Epoch {
        t.epoch(&p(partition)).expect("assigned")
    }

    #[test]
    fn an_offset_is_stored_once_every_lane_finished_it() {
        let mut t = tracker(2, &[0]);
        let e = epoch(&t, 0);
        assert_eq!(t.complete(&p(0), e, 0, 10), None, "one lane of two");
        assert_eq!(t.complete(&p(0), e, 1, 10), Some(10));
        assert_eq!(t.complete(&p(0), e, 1, 10), None, "nothing moved");
    }

    #[test]
    fn the_stored_offset_is_the_slowest_lanes_progress_call_by_call() {
        // Lane 0 finished a whole fetched batch of 500; lane 1 calls in chunks of 100. Each of
        // lane 1's calls moves the stored offset, without waiting for the fetched batch.
        let mut t = tracker(2, &[0]);
        let e = epoch(&t, 0);
        assert_eq!(t.complete(&p(0), e, 0, 500), None);
        for next in [100, 200, 300] {
            assert_eq!(t.complete(&p(0), e, 1, next), Some(next), "lane 1 at {next}");
        }
        assert_eq!(t.complete(&p(0), e, 0, 1000), None, "lane 1 is the slowest");
        assert_eq!(t.complete(&p(0), e, 1, 700), Some(700));
        assert_eq!(t.complete(&p(0), e, 1, 1200), Some(1000), "now lane 0 is");
    }

    #[test]
    fn boundaries_plus_minus_one() {
        for (a, b) in [(99, 100), (100, 100), (101, 100)] {
            let mut t = tracker(2, &[0]);
            let e = epoch(&t, 0);
            t.complete(&p(0), e, 0, a);
            assert_eq!(t.complete(&p(0), e, 1, b), Some(a.min(b)), "lanes at {a} and {b}");
        }
    }

    #[test]
    fn gaps_in_offsets_do_not_hold_anything_back() {
        // Offsets 5 and 6 were compacted away: lane 0's call ended at 4, its next began at 7.
        let mut t = tracker(1, &[0]);
        let e = epoch(&t, 0);
        assert_eq!(t.complete(&p(0), e, 0, 5), Some(5));
        assert_eq!(t.complete(&p(0), e, 0, 10), Some(10));
    }

    #[test]
    fn partitions_advance_independently() {
        let mut t = tracker(1, &[0, 1]);
        let (e0, e1) = (epoch(&t, 0), epoch(&t, 1));
        assert_ne!(e0, e1);
        assert_eq!(t.complete(&p(1), e1, 0, 8), Some(8));
        assert_eq!(t.complete(&p(0), e0, 0, 5), Some(5));
    }

    #[test]
    fn a_failed_lane_freezes_the_partition_where_it_failed() {
        let mut t = tracker(2, &[0, 1]);
        let (e0, e1) = (epoch(&t, 0), epoch(&t, 1));
        assert_eq!(t.complete(&p(0), e0, 0, 100), None);
        assert_eq!(t.complete(&p(0), e0, 1, 50), Some(50));
        t.fail(&p(0), e0, 1); // lane 1's call on 50.. failed for good
        assert_eq!(t.complete(&p(0), e0, 0, 200), None);
        assert_eq!(t.complete(&p(0), e0, 1, 200), None, "a later call of the failed lane does not store");
        assert_eq!(t.complete(&p(1), e1, 0, 7), None, "other partitions go on");
        assert_eq!(t.complete(&p(1), e1, 1, 7), Some(7));
    }

    #[test]
    fn a_lane_that_failed_before_finishing_anything_stores_nothing() {
        let mut t = tracker(2, &[0]);
        let e = epoch(&t, 0);
        t.fail(&p(0), e, 0);
        assert_eq!(t.complete(&p(0), e, 1, 100), None);
        assert_eq!(t.complete(&p(0), e, 0, 100), None);
    }

    #[test]
    fn revoked_partitions_never_store_even_after_reassignment() {
        let mut t = tracker(1, &[0]);
        let old = epoch(&t, 0);
        t.revoke([&p(0)]);
        assert!(!t.is_assigned(&p(0)));
        assert_eq!(t.epoch(&p(0)), None, "not assigned");
        assert_eq!(t.complete(&p(0), old, 0, 10), None);
        t.assign([p(0)]);
        let new = epoch(&t, 0);
        assert!(!t.tracks(&p(0), old) && t.tracks(&p(0), new));
        assert_eq!(t.complete(&p(0), old, 0, 10), None, "a stale call must not store");
        t.fail(&p(0), old, 0);
        assert_eq!(t.complete(&p(0), new, 0, 5), Some(5), "nor freeze the new assignment");
    }

    #[test]
    fn a_reassigned_partition_starts_from_nothing_finished() {
        let mut t = tracker(2, &[0]);
        let old = epoch(&t, 0);
        t.complete(&p(0), old, 0, 10);
        t.revoke([&p(0)]);
        t.assign([p(0)]);
        let new = epoch(&t, 0);
        assert_eq!(t.complete(&p(0), new, 1, 10), None, "lane 0's old progress is forgotten");
    }

    #[test]
    fn an_unknown_lane_is_ignored() {
        let mut t = tracker(1, &[0]);
        let e = epoch(&t, 0);
        assert_eq!(t.complete(&p(0), e, 3, 10), None);
        t.fail(&p(0), e, 3);
        assert_eq!(t.complete(&p(0), e, 0, 10), Some(10));
    }
}
