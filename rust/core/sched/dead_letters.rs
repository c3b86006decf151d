//! Dead-letter writes. Until one is acknowledged or fails, it holds its call (the lane's
//! concurrency slot) and its messages' offsets; it shows in the stats, and one wheel entry
//! per write (none per message) warns while it waits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CallFailure, Effect, Scheduler, Task, Timer};
use crate::core::batch::Batch;
use crate::core::errors::Error;
use crate::core::timer::TimerKey;

/// A waiting write is warned about every `WARN_EVERY` (or a third of its bound, if sooner,
/// so that warnings come before it fails); once it has waited `WARN_MAX`, every `WARN_MAX`,
/// so a long bound does not flood the log.
const WARN_EVERY: Duration = Duration::from_secs(5);
const WARN_MAX: Duration = Duration::from_secs(60);

/// Why messages are dead-lettered; becomes headers.
#[derive(Clone, Debug)]
pub struct DeadLetterInfo {
    pub plugin: String,
    pub error_type: String,
    pub error_message: String,
    pub attempts: u32,
}

/// A write to start: the messages at `indexes` of `batch`, to `topic`. Its result goes
/// back through `Scheduler::dead_lettered(write, ..)`.
#[derive(Debug)]
pub struct DeadLetterWrite {
    pub write: u64,
    pub topic: String,
    pub batch: Arc<Batch>,
    pub indexes: Vec<usize>,
    pub info: DeadLetterInfo,
}

/// A write still waiting for its acknowledgement, for the warning.
#[derive(Debug)]
pub struct DeadLetterWait {
    pub plugin: String,
    pub topic: String,
    /// The messages: partition and offsets.
    pub what: String,
    pub started: Instant,
    pub waited: Duration,
    /// The bound the producer applies to it (`None`: it has none).
    pub bound: Option<Duration>,
}

/// A write in flight.
pub(super) struct Record {
    pub(super) lane: usize,
    /// Messages written.
    pub(super) count: u64,
    topic: String,
    what: String,
    pub(super) started: Instant,
    timer: Option<TimerKey>,
    /// The wait before the next warning.
    every: Duration,
    task: Task,
}

impl<E: CallFailure> Scheduler<E> {
    /// Starts writing the failed messages of `task` (positions `indexes` in its batch).
    pub(super) fn start_dead_letters(
        &mut self,
        task: Task,
        topic: String,
        indexes: Vec<usize>,
        error: &E,
        now: Instant,
    ) {
        let write = self.next_write;
        self.next_write += 1;
        let batch = task.chunk.batch.clone();
        let what = batch.describe(indexes.len(), indexes.first().copied(), indexes.last().copied());
        // Never zero: a zero interval would refire at once, forever.
        let every =
            self.dead_letter_bound.map_or(WARN_EVERY, |b| WARN_EVERY.min(b / 3)).max(Duration::from_millis(100));
        let (key, _) = self.schedule(now + every, Timer::DeadLetterWait { write });
        let info = DeadLetterInfo {
            plugin: self.lanes[task.lane].options.name.clone(),
            error_type: error.kind(),
            error_message: error.detail(),
            attempts: task.chunk.attempt,
        };
        let record = Record {
            lane: task.lane,
            count: indexes.len() as u64,
            topic: topic.clone(),
            what,
            started: now,
            timer: Some(key),
            every,
            task,
        };
        self.dead_letter_writes.insert(write, record);
        self.effects.push_back(Effect::DeadLetter(DeadLetterWrite { write, topic, batch, indexes, info }));
    }

    /// A dead-letter write finished: acknowledged, its messages count as done; failed, the
    /// lane is frozen on the partition (nothing from the call on is committed) and the run
    /// ends with the error.
    pub fn dead_lettered(&mut self, write: u64, result: Result<(), Error>, now: Instant) {
        let Some(record) = self.dead_letter_writes.remove(&write) else { return };
        if let Some(key) = record.timer {
            self.timers.cancel(key);
        }
        let task = record.task;
        match result {
            Ok(()) => {
                self.lanes[task.lane].stats.dead_lettered += record.count;
                self.finish(&task, now);
            }
            Err(error) => {
                let partition = task.chunk.batch.partition().clone();
                self.lanes[task.lane].finish(&task.chunk);
                self.tracker.fail(&partition, task.chunk.epoch, task.lane);
                self.source_failed(error);
            }
        }
    }

    /// The write is still waiting at `now`: warn, and look again later.
    pub(super) fn dead_letter_waits(&mut self, write: u64, now: Instant) {
        let Some(record) = self.dead_letter_writes.get_mut(&write) else { return };
        let waited = now.saturating_duration_since(record.started);
        if waited >= WARN_MAX {
            record.every = WARN_MAX;
        }
        let wait = DeadLetterWait {
            plugin: self.lanes[record.lane].options.name.clone(),
            topic: record.topic.clone(),
            what: record.what.clone(),
            started: record.started,
            waited,
            bound: self.dead_letter_bound,
        };
        let next = now + record.every;
        self.effects.push_back(Effect::DeadLetterWaiting(wait));
        let (key, _) = self.schedule(next, Timer::DeadLetterWait { write });
        if let Some(record) = self.dead_letter_writes.get_mut(&write) {
            record.timer = Some(key);
        }
    }
}
