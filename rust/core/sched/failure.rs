//! A call's result: success moves the lane's progress (and the partition's committable
//! offset); a failure goes to the lane's policy: retry after a backoff, dead-letter, or end
//! the run.

use std::time::{Duration, Instant};

use super::{CallFailure, Effect, Scheduler, Task, Timer};
use crate::core::lane::{Chunk, OnFailure};

impl<E: CallFailure> Scheduler<E> {
    /// A call returned after `took`.
    pub fn complete(&mut self, task: Task, outcome: Result<(), E>, took: Duration, now: Instant) {
        self.call_ended(&task);
        let stats = &mut self.lanes[task.lane].stats;
        stats.batches += 1;
        stats.messages += task.chunk.len() as u64;
        stats.latency.record(took);
        match outcome {
            Ok(()) => self.finish(&task, now),
            Err(error) => {
                self.lanes[task.lane].stats.errors += 1;
                self.failed(task, error, now);
            }
        }
    }

    /// The lane is done with a task's chunk: the partition's offset may move.
    pub(super) fn finish(&mut self, task: &Task, now: Instant) {
        self.lanes[task.lane].finish(&task.chunk);
        self.lane_left(task.lane, now);
        self.advance(task.lane, &task.chunk, task.chunk.next_offset(), now);
    }

    /// Work left a lane: if the source holds batches for it and it has room again, wake the
    /// source; another call of the lane may be ready.
    fn lane_left(&mut self, lane: usize, now: Instant) {
        let lane = &self.lanes[lane];
        if self.source_waits_for_room && lane.has_room_again() {
            self.source_waits_for_room = false;
            self.wakes.driver = true;
        }
        let ready = usize::from(lane.has_ready());
        self.work_ready(ready, now);
    }

    /// The lane has finished `chunk`'s partition up to `next`: if the partition's offset
    /// moved, it is committed within the commit interval.
    fn advance(&mut self, lane: usize, chunk: &Chunk, next: i64, now: Instant) {
        let partition = chunk.batch.partition();
        if let Some(offset) = self.tracker.complete(partition, chunk.epoch, lane, next) {
            self.partitions.stored(partition, offset);
            if self.commit_timer.is_none() {
                self.commit_timer = Some(self.schedule(now + self.commit_interval, Timer::Commit).0);
            }
        }
    }

    fn failed(&mut self, task: Task, error: E, now: Instant) {
        let chunk = &task.chunk;
        if error.fatal() {
            return self.stop_with(task, error);
        }
        if !self.tracker.tracks(chunk.batch.partition(), chunk.epoch) {
            // Revoked while the call ran (past revoke_timeout): the partition's new owner
            // handles these messages; retrying or dead-lettering them here would duplicate.
            self.lanes[task.lane].finish(chunk);
            self.lane_left(task.lane, now);
            let what = chunk.describe();
            return self.warn(format!("a call failed on {what} after its partition was revoked; not retried"));
        }
        // The messages that failed, as positions in the batch.
        let failed: Vec<usize> = match error.failed_positions() {
            Some(positions) => match positions.iter().map(|&p| chunk.index(p)).collect::<Option<Vec<_>>>() {
                Some(mut indexes) => {
                    indexes.sort_unstable();
                    indexes.dedup();
                    indexes
                }
                None => chunk.indexes(), // a position out of range: take it all as failed
            },
            None => chunk.indexes(),
        };
        let lane = &self.lanes[task.lane];
        let (name, policy) = (lane.options.name.clone(), lane.options.retry.clone());
        if failed.is_empty() {
            // The plugin named no failed message: the call succeeded.
            self.finish(&task, now);
            return self.warn(format!("plugin {name:?} reported a partial failure of no message"));
        }
        // The messages before the first that failed are finished (the retry, dead letters or
        // stop concern only the failed ones and later): the lane's progress moves up to it.
        if let Some(&first) = failed.first().filter(|&&first| Some(first) != chunk.index(0)) {
            self.advance(task.lane, chunk, chunk.batch.get(first).offset, now);
        }
        let what = chunk.batch.describe(failed.len(), failed.first().copied(), failed.last().copied());
        let attempt = chunk.attempt;
        let cause = format!("{}: {}", error.kind(), error.detail());
        if policy.retries_after(attempt) {
            let backoff = policy.backoff(attempt);
            self.retry(task, &failed, backoff, now);
            let of = if policy.on_failure == OnFailure::RetryForever {
                String::new()
            } else {
                format!(" of {}", policy.retries + 1)
            };
            return self.warn(format!(
                "plugin {name:?} failed on {what} (attempt {attempt}{of}): {cause}; retrying in {:.3} s",
                backoff.as_secs_f64()
            ));
        }
        match &policy.on_failure {
            OnFailure::DeadLetter(topic) if self.dead_letters_open => {
                self.warn(format!(
                    "plugin {name:?} failed on {what} after {attempt} attempt(s): {cause}; writing them to {topic:?}"
                ));
                let topic = topic.clone();
                self.start_dead_letters(task, topic, failed, &error, now);
                // The error is not needed any more; dropped outside the lock.
                self.effects.push_back(Effect::Discard(error));
            }
            _ => self.stop_with(task, error),
        }
    }

    /// Schedules the failed messages of `task` again after `backoff`, at the head of the
    /// partition's queue in the lane.
    fn retry(&mut self, task: Task, failed: &[usize], backoff: Duration, now: Instant) {
        let chunk = &task.chunk;
        let partition = chunk.batch.partition().clone();
        let (key, _) = self.schedule(now + backoff, Timer::Retry { lane: task.lane, partition });
        let subset = (failed.len() < chunk.len() || chunk.subset.is_some())
            .then(|| failed.iter().map(|&i| i as u32).collect::<std::sync::Arc<[u32]>>());
        let retry = Chunk {
            batch: chunk.batch.clone(),
            epoch: chunk.epoch,
            range: chunk.range.clone(),
            subset,
            last: chunk.last,
            attempt: chunk.attempt + 1,
        };
        let lane = &mut self.lanes[task.lane];
        lane.stats.retry_wait += backoff;
        lane.retry_later(chunk, retry, key);
        // The messages that succeeded left the lane: it may have room again.
        self.lane_left(task.lane, now);
    }

    /// Stop: the lane's progress on the partition freezes before the call, so nothing from
    /// it on is committed, and the run ends with the error (the first one, if several).
    pub(super) fn stop_with(&mut self, task: Task, error: E) {
        let partition = task.chunk.batch.partition().clone();
        self.lanes[task.lane].finish(&task.chunk);
        self.drop_lane_partition(task.lane, &partition);
        self.tracker.fail(&partition, task.chunk.epoch, task.lane);
        self.stop();
        if self.failure.is_none() {
            self.failure = Some(error);
        } else {
            self.effects.push_back(Effect::Discard(error));
        }
    }

    fn drop_lane_partition(&mut self, lane: usize, partition: &crate::core::batch::Partition) {
        for key in self.lanes[lane].drop_waiting(Some(std::slice::from_ref(partition))) {
            self.timers.cancel(key);
        }
    }

    fn warn(&mut self, message: String) {
        self.effects.push_back(Effect::Warn(message));
    }
}
