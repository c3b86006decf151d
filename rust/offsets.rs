//! Which offsets may be stored. A partition's stored offset moves past a message only when
//! every lane has finished the batch holding it, and every batch fetched before it on that
//! partition. Batches may finish out of order across lanes; offsets may have gaps. Nothing
//! here is per message.

use std::collections::{HashMap, VecDeque};

use crate::batch::Partition;

/// Identifies a tracked batch. Ids are never reused, so a batch fetched before a revoke can
/// never complete an entry of the partition's next assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatchId(u64);

#[derive(Debug)]
struct Pending {
    batch: BatchId,
    last: i64,
    /// Lanes that have not finished this batch.
    remaining: u32,
    /// A lane failed part of it: it never finishes, so nothing at or after it is stored.
    failed: bool,
}

/// Tracks unfinished batches per assigned partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<Partition, VecDeque<Pending>>,
    next_id: u64,
}

impl OffsetTracker {
    /// Starts tracking newly assigned partitions, with nothing in flight.
    pub fn assign(&mut self, partitions: impl IntoIterator<Item = Partition>) {
        for partition in partitions {
            self.partitions.insert(partition, VecDeque::new());
        }
    }

    /// Forgets revoked partitions; their unfinished batches will complete into nothing.
    pub fn revoke<'a>(&mut self, partitions: impl IntoIterator<Item = &'a Partition>) {
        for partition in partitions {
            self.partitions.remove(partition);
        }
    }

    pub fn is_assigned(&self, partition: &Partition) -> bool {
        self.partitions.contains_key(partition)
    }

    /// Registers a fetched batch ending at offset `last` that `lanes` lanes must finish.
    /// Returns `None` if the partition is not assigned (it was revoked meanwhile).
    pub fn track(&mut self, partition: &Partition, last: i64, lanes: u32) -> Option<BatchId> {
        let pending = self.partitions.get_mut(partition)?;
        debug_assert!(pending.back().is_none_or(|p| p.last < last), "fetch order is offset order");
        let id = BatchId(self.next_id);
        self.next_id += 1;
        pending.push_back(Pending { batch: id, last, remaining: lanes, failed: false });
        Some(id)
    }

    /// One lane finished the batch. Returns the offset that may now be stored for the
    /// partition (the next one to read, as Kafka expects), if it moved.
    pub fn complete(&mut self, partition: &Partition, id: BatchId) -> Option<i64> {
        let pending = self.partitions.get_mut(partition)?;
        let entry = pending.iter_mut().find(|p| p.batch == id)?;
        debug_assert!(entry.remaining > 0, "a lane finishes a batch once");
        entry.remaining = entry.remaining.saturating_sub(1);
        let mut advanced_to = None;
        while pending.front().is_some_and(|p| p.remaining == 0 && !p.failed) {
            advanced_to = pending.pop_front().map(|p| p.last + 1);
        }
        advanced_to
    }

    /// A lane failed part of the batch: its offsets, and those after it on the partition,
    /// are never stored this assignment, whatever other lanes or later slices do.
    pub fn fail(&mut self, partition: &Partition, id: BatchId) {
        if let Some(entry) = self.partitions.get_mut(partition).and_then(|q| q.iter_mut().find(|p| p.batch == id)) {
            entry.failed = true;
        }
    }

    /// Whether the batch is still tracked: its partition was not revoked since it was fetched.
    pub fn tracks(&self, partition: &Partition, id: BatchId) -> bool {
        self.partitions.get(partition).is_some_and(|q| q.iter().any(|p| p.batch == id))
    }

    /// Unfinished batches, over all partitions.
    pub fn unfinished(&self) -> usize {
        self.partitions.values().map(VecDeque::len).sum()
    }

    pub fn assigned(&self) -> impl Iterator<Item = &Partition> {
        self.partitions.keys()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn p(partition: i32) -> Partition {
        Partition { topic: Arc::from("t"), partition }
    }

    #[test]
    fn a_batch_is_stored_once_every_lane_finished_it() {
        let mut t = OffsetTracker::default();
        t.assign([p(0)]);
        let a = t.track(&p(0), 9, 2).expect("assigned");
        assert_eq!(t.complete(&p(0), a), None, "one lane of two");
        assert_eq!(t.complete(&p(0), a), Some(10));
        assert_eq!(t.unfinished(), 0);
    }

    #[test]
    fn a_later_batch_waits_for_the_earlier_one_across_gaps() {
        let mut t = OffsetTracker::default();
        t.assign([p(0)]);
        let a = t.track(&p(0), 4, 1).expect("assigned");
        let b = t.track(&p(0), 9, 1).expect("assigned"); // 5 and 6 were compacted away
        assert_eq!(t.complete(&p(0), b), None);
        assert_eq!(t.complete(&p(0), a), Some(10));
    }

    #[test]
    fn partitions_advance_independently() {
        let mut t = OffsetTracker::default();
        t.assign([p(0), p(1)]);
        let a = t.track(&p(0), 4, 1).expect("assigned");
        let b = t.track(&p(1), 7, 1).expect("assigned");
        assert_eq!(t.complete(&p(1), b), Some(8));
        assert_eq!(t.complete(&p(0), a), Some(5));
    }

    #[test]
    fn a_failed_batch_is_never_stored_even_if_its_lanes_count_down() {
        let mut t = OffsetTracker::default();
        t.assign([p(0)]);
        let a = t.track(&p(0), 9, 2).expect("assigned");
        let b = t.track(&p(0), 19, 1).expect("assigned");
        t.fail(&p(0), a);
        assert_eq!(t.complete(&p(0), a), None);
        assert_eq!(t.complete(&p(0), a), None, "every lane finished, but one failed part of it");
        assert_eq!(t.complete(&p(0), b), None, "nothing after a failed batch is stored");
    }

    #[test]
    fn revoked_partitions_are_never_stored_even_after_reassignment() {
        let mut t = OffsetTracker::default();
        t.assign([p(0)]);
        let old = t.track(&p(0), 9, 1).expect("assigned");
        t.revoke([&p(0)]);
        assert!(!t.is_assigned(&p(0)));
        assert_eq!(t.track(&p(0), 12, 1), None, "not assigned");
        t.assign([p(0)]);
        let new = t.track(&p(0), 4, 1).expect("assigned");
        assert_eq!(t.complete(&p(0), old), None, "a stale batch must not store");
        assert_eq!(t.complete(&p(0), new), Some(5));
    }
}
