//! Which offsets may be stored. A partition's stored offset moves past a message only when
//! the batch holding it, and every batch fetched before it on that partition, is complete.
//! Batches may complete out of order; offsets may have gaps. Nothing here is per message.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::batch::PartitionSpan;

/// Identifies a tracked batch. Ids are never reused, so a batch fetched before a revoke can
/// never complete an entry of the partition's next assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatchId(u64);

type PartitionKey = (Arc<str>, i32);

#[derive(Debug)]
struct Pending {
    batch: BatchId,
    last: i64,
    done: bool,
}

/// The offset to store for a partition: the next one to read, as Kafka expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Storable {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

/// Tracks in-flight batches per assigned partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<PartitionKey, VecDeque<Pending>>,
    next_id: u64,
}

impl OffsetTracker {
    /// Starts tracking partitions newly assigned to this consumer, with nothing in flight.
    pub fn assign<'a>(&mut self, partitions: impl IntoIterator<Item = (&'a str, i32)>) {
        for (topic, partition) in partitions {
            self.partitions
                .insert((Arc::from(topic), partition), VecDeque::new());
        }
    }

    /// Forgets revoked partitions; their in-flight batches will complete into nothing.
    pub fn revoke<'a>(&mut self, partitions: impl IntoIterator<Item = (&'a str, i32)>) {
        for (topic, partition) in partitions {
            self.partitions.remove(&(Arc::from(topic), partition));
        }
    }

    /// Registers a fetched batch. Spans of partitions not assigned (fetched just before a
    /// revoke) are not tracked, so their offsets are never stored.
    pub fn track(&mut self, spans: &[PartitionSpan]) -> BatchId {
        let id = BatchId(self.next_id);
        self.next_id += 1;
        for span in spans {
            if let Some(pending) = self
                .partitions
                .get_mut(&(span.topic.clone(), span.partition))
            {
                debug_assert!(
                    pending.back().is_none_or(|p| p.last < span.first),
                    "fetch order is offset order"
                );
                pending.push_back(Pending {
                    batch: id,
                    last: span.last,
                    done: false,
                });
            }
        }
        id
    }

    /// Whether any partition of the batch is still assigned: a batch whose partitions were all
    /// revoked belongs to their new owner and need not run here.
    #[must_use]
    pub fn is_live(&self, id: BatchId, spans: &[PartitionSpan]) -> bool {
        spans.iter().any(|span| {
            self.partitions
                .get(&(span.topic.clone(), span.partition))
                .is_some_and(|pending| pending.iter().any(|p| p.batch == id))
        })
    }

    /// Marks a batch complete and returns, per partition, the offset that may now be stored.
    pub fn complete(&mut self, id: BatchId, spans: &[PartitionSpan]) -> Vec<Storable> {
        let mut storable = Vec::new();
        for span in spans {
            let Some(pending) = self
                .partitions
                .get_mut(&(span.topic.clone(), span.partition))
            else {
                continue;
            };
            let Some(entry) = pending.iter_mut().find(|p| p.batch == id) else {
                continue;
            };
            entry.done = true;
            let mut advanced_to = None;
            while pending.front().is_some_and(|p| p.done) {
                advanced_to = pending.pop_front().map(|p| p.last);
            }
            if let Some(last) = advanced_to {
                storable.push(Storable {
                    topic: span.topic.clone(),
                    partition: span.partition,
                    offset: last + 1,
                });
            }
        }
        storable
    }

    /// Batches started but not complete, summed over partitions.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(partition: i32, first: i64, last: i64) -> PartitionSpan {
        PartitionSpan {
            topic: Arc::from("t"),
            partition,
            first,
            last,
        }
    }

    fn offsets(storable: &[Storable]) -> Vec<(i32, i64)> {
        storable.iter().map(|s| (s.partition, s.offset)).collect()
    }

    #[test]
    fn in_order_completion_stores_each_batch_end() {
        let mut t = OffsetTracker::default();
        t.assign([("t", 0)]);
        let a = [span(0, 0, 9)];
        let b = [span(0, 10, 19)];
        let ia = t.track(&a);
        let ib = t.track(&b);
        assert_eq!(offsets(&t.complete(ia, &a)), vec![(0, 10)]);
        assert_eq!(offsets(&t.complete(ib, &b)), vec![(0, 20)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn out_of_order_completion_waits_for_the_earlier_batch() {
        let mut t = OffsetTracker::default();
        t.assign([("t", 0), ("t", 1)]);
        let a = [span(0, 0, 4), span(1, 0, 0)];
        let b = [span(0, 7, 9)]; // a gap: 5 and 6 were compacted away
        let ia = t.track(&a);
        let ib = t.track(&b);
        assert!(t.complete(ib, &b).is_empty());
        assert_eq!(offsets(&t.complete(ia, &a)), vec![(0, 10), (1, 1)]);
    }

    #[test]
    fn revoked_partitions_are_never_stored_even_after_reassignment() {
        let mut t = OffsetTracker::default();
        t.assign([("t", 0)]);
        let old = [span(0, 0, 9)];
        let old_id = t.track(&old);
        t.revoke([("t", 0)]);
        assert!(!t.is_live(old_id, &old));
        t.assign([("t", 0)]);
        let new = [span(0, 0, 4)];
        let new_id = t.track(&new);
        assert!(
            t.complete(old_id, &old).is_empty(),
            "a stale batch must not store"
        );
        assert_eq!(offsets(&t.complete(new_id, &new)), vec![(0, 5)]);
    }

    #[test]
    fn unassigned_spans_are_not_tracked() {
        let mut t = OffsetTracker::default();
        t.assign([("t", 1)]);
        let spans = [span(0, 0, 3), span(1, 0, 3)];
        let id = t.track(&spans);
        assert!(t.is_live(id, &spans));
        assert_eq!(offsets(&t.complete(id, &spans)), vec![(1, 4)]);
    }
}
