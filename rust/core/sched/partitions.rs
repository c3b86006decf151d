//! Per partition, what the run knows of its offsets: the next one fetched, the one that may
//! be committed (every lane finished before it), the one last handed to a commit, the one
//! Kafka acknowledged, and the last high watermark seen at a revoke. Partitions stay listed
//! after a revoke, for the stats; a new assignment starts their committable offset afresh.

use crate::core::batch::Partition;
use crate::core::lane::LaneOptions;
use crate::core::offsets::OffsetTracker;
use crate::core::stats::LaneStats;

/// What `stats()` reports.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub lanes: Vec<(String, LaneStats, LaneOptions)>,
    pub partitions: Vec<PartitionSnapshot>,
    pub admitted: u64,
    pub timers: usize,
    pub timers_peak: usize,
}

#[derive(Clone, Debug)]
pub struct PartitionSnapshot {
    pub partition: Partition,
    /// Whether the partition is assigned to this consumer now; the others were this run.
    pub assigned: bool,
    pub position: Option<i64>,
    pub committed: Option<i64>,
    pub high_watermark: Option<i64>,
}

#[derive(Debug)]
struct Offsets {
    partition: Partition,
    position: Option<i64>,
    stored: Option<i64>,
    sent: Option<i64>,
    committed: Option<i64>,
    high_watermark: Option<i64>,
}

/// A handful of partitions per consumer: a list, searched linearly, a few times per batch.
#[derive(Debug, Default)]
pub(super) struct Partitions {
    list: Vec<Offsets>,
    admitted: u64,
}

impl Partitions {
    fn entry(&mut self, partition: &Partition) -> &mut Offsets {
        let index = if let Some(index) = self.list.iter().position(|o| o.partition == *partition) {
            index
        } else {
            self.list.push(Offsets {
                partition: partition.clone(),
                position: None,
                stored: None,
                sent: None,
                committed: None,
                high_watermark: None,
            });
            self.list.len() - 1
        };
        &mut self.list[index]
    }

    /// A new assignment: what an earlier one could commit no longer counts (another member
    /// may have committed further meanwhile).
    pub(super) fn assigned(&mut self, partition: &Partition) {
        let entry = self.entry(partition);
        entry.stored = None;
        entry.sent = None;
    }

    pub(super) fn fetched(&mut self, partition: &Partition, next: i64, messages: usize) {
        self.entry(partition).position = Some(next);
        self.admitted += messages as u64;
    }

    pub(super) fn stored(&mut self, partition: &Partition, offset: i64) {
        self.entry(partition).stored = Some(offset);
    }

    /// Kafka acknowledged `offset`: a timer's commit need not send it again.
    pub(super) fn committed(&mut self, partition: &Partition, offset: i64) {
        let entry = self.entry(partition);
        entry.committed = Some(offset);
        if entry.stored == Some(offset) {
            entry.sent = Some(offset);
        }
    }

    pub(super) fn high_watermark(&mut self, partition: &Partition, high: i64) {
        self.entry(partition).high_watermark = Some(high);
    }

    pub(super) fn admitted(&self) -> u64 {
        self.admitted
    }

    /// Committable offsets not known committed, of the partitions `assigned` keeps.
    pub(super) fn uncommitted(&self, assigned: impl Fn(&Partition) -> bool) -> Vec<(Partition, i64)> {
        self.list
            .iter()
            .filter(|o| assigned(&o.partition))
            .filter_map(|o| o.stored.filter(|&s| o.committed != Some(s)).map(|s| (o.partition.clone(), s)))
            .collect()
    }

    /// Committable offsets that moved since last handed to a commit; marks them handed.
    pub(super) fn unsent(&mut self, assigned: impl Fn(&Partition) -> bool) -> Vec<(Partition, i64)> {
        let mut due = Vec::new();
        for o in self.list.iter_mut().filter(|o| assigned(&o.partition)) {
            if let Some(stored) = o.stored.filter(|&s| o.sent != Some(s)) {
                o.sent = Some(stored);
                due.push((o.partition.clone(), stored));
            }
        }
        due
    }

    pub(super) fn snapshot(
        &self,
        tracker: &OffsetTracker,
        high_watermark: &dyn Fn(&Partition) -> Option<i64>,
    ) -> Vec<PartitionSnapshot> {
        let mut partitions: Vec<PartitionSnapshot> = self
            .list
            .iter()
            .map(|o| PartitionSnapshot {
                partition: o.partition.clone(),
                assigned: tracker.is_assigned(&o.partition),
                position: o.position,
                committed: o.committed,
                high_watermark: high_watermark(&o.partition).or(o.high_watermark),
            })
            .collect();
        partitions.sort_by(|a, b| a.partition.cmp(&b.partition));
        partitions
    }
}
