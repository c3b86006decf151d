//! The pool: every lane, the offset tracker, and the workers' parking spot, under one lock
//! taken a few times per batch (never per message). Workers sleep on `work` until a lane has
//! a call ready; the engine and revokes sleep on `progress` until calls finish.
//!
//! Delivery: a batch's offset is stored only once every lane has finished it (see
//! `offsets`); a failed call leaves its batch unfinished, so it is never stored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::batch::{Batch, Partition};
use crate::errors::Error;
use crate::lane::{Chunk, Lane, LaneOptions};
use crate::offsets::OffsetTracker;
use crate::source::{Intake, KafkaConsumer};
use crate::stats::LaneStats;

/// One plugin call for a worker to make.
#[derive(Debug)]
pub struct Task {
    pub lane: usize,
    pub chunk: Chunk,
}

/// Why the engine should end the run, as far as the pool knows.
#[derive(Debug)]
pub enum Ending<E> {
    Stopped,
    /// Drain mode: nothing new was fetched for the idle timeout and every lane is empty.
    Drained,
    Failed(E),
    SourceFailed(Error),
}

struct State<E> {
    lanes: Vec<Lane>,
    /// The lane to look at first, so that lanes take turns.
    next_lane: usize,
    tracker: OffsetTracker,
    /// Workers exit once this is set and they are idle.
    closed: bool,
    /// No new batches are admitted.
    intake_closed: bool,
    source_idle: bool,
    source_error: Option<Error>,
    failure: Option<E>,
    /// Next offset fetched and last committed offset, per partition.
    positions: Vec<(Partition, i64)>,
    committed: Vec<(Partition, i64)>,
    /// High watermarks of revoked partitions, as last seen.
    high_watermarks: Vec<(Partition, i64)>,
    admitted: u64,
}

/// Shared by the source, the workers and the engine.
pub struct Pool<E> {
    state: Mutex<State<E>>,
    work: Condvar,
    progress: Condvar,
    stop: Arc<AtomicBool>,
    consumer: Mutex<Weak<KafkaConsumer>>,
}

/// What `stats()` reports.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub lanes: Vec<(String, LaneStats, LaneOptions)>,
    pub partitions: Vec<PartitionSnapshot>,
    pub admitted: u64,
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

fn upsert(list: &mut Vec<(Partition, i64)>, partition: &Partition, offset: i64) {
    match list.iter_mut().find(|(p, _)| p == partition) {
        Some(entry) => entry.1 = offset,
        None => list.push((partition.clone(), offset)),
    }
}

/// Stores the next offset to read for a partition, for the next commit.
fn store(consumer: &KafkaConsumer, partition: &Partition, offset: i64) {
    let mut tpl = TopicPartitionList::with_capacity(1);
    if let Err(e) = tpl.add_partition_offset(&partition.topic, partition.partition, Offset::Offset(offset)) {
        log::warn!("store offset {offset} for {}[{}]: {e}", partition.topic, partition.partition);
        return;
    }
    match consumer.store_offsets(&tpl) {
        // A partition lost meanwhile belongs to its next owner now.
        Ok(()) | Err(KafkaError::StoreOffset(RDKafkaErrorCode::State)) => {}
        Err(e) => log::warn!("store offset {offset} for {}[{}]: {e}", partition.topic, partition.partition),
    }
}

impl<E: Send> Pool<E> {
    pub fn new(lanes: Vec<LaneOptions>, stop: Arc<AtomicBool>) -> Self {
        Pool {
            state: Mutex::new(State {
                lanes: lanes.into_iter().map(Lane::new).collect(),
                next_lane: 0,
                tracker: OffsetTracker::default(),
                closed: false,
                intake_closed: false,
                source_idle: false,
                source_error: None,
                failure: None,
                positions: Vec::new(),
                committed: Vec::new(),
                high_watermarks: Vec::new(),
                admitted: 0,
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
            stop,
            consumer: Mutex::new(Weak::new()),
        }
    }

    /// A poisoned lock means a panic already failed the run; each critical section leaves
    /// the state consistent, so keep going rather than panic again.
    fn lock(&self) -> MutexGuard<'_, State<E>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives the pool the consumer to store offsets with. Weak: the consumer's context
    /// holds the pool.
    pub fn attach(&self, consumer: &Arc<KafkaConsumer>) {
        *self.consumer.lock().unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(consumer);
    }

    /// Forgets the consumer before it closes, so no late call keeps it alive past the close.
    pub fn detach(&self) {
        *self.consumer.lock().unwrap_or_else(PoisonError::into_inner) = Weak::new();
    }

    fn consumer(&self) -> Option<Arc<KafkaConsumer>> {
        self.consumer.lock().unwrap_or_else(PoisonError::into_inner).upgrade()
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Asks the run to end; wakes the engine.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _state = self.lock();
        self.progress.notify_all();
    }

    // --- the workers' side -------------------------------------------------------------

    /// Blocks until a call is ready, and starts it; `None` once the pool is closed. Once a
    /// stop is requested no new call starts: running ones finish, waiting ones are dropped.
    pub fn next_task(&self) -> Option<Task> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            if self.stop_requested() {
                state = self.work.wait(state).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let count = state.lanes.len();
            for i in 0..count {
                let index = (state.next_lane + i) % count;
                if let Some(chunk) = state.lanes[index].take() {
                    state.next_lane = (index + 1) % count;
                    return Some(Task { lane: index, chunk });
                }
            }
            state = self.work.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// A call returned. On success, the batch is finished for this lane when its last
    /// chunk is; the offset is stored once every lane finished it. A failure marks the batch
    /// failed, drops the lane's waiting work on that partition, and ends the run.
    pub fn complete(&self, task: Task, outcome: Result<(), E>, took: Duration) {
        // Taken before the lock so that, if this is the last handle (shutdown racing a late
        // call), the consumer is dropped after the guard: dropping it runs callbacks that lock.
        let consumer = self.consumer();
        let mut later_failure = None;
        let mut guard = self.lock();
        let state = &mut *guard;
        let failed = outcome.is_err();
        let partition = task.chunk.batch.partition();
        let lane = &mut state.lanes[task.lane];
        lane.finish(&task.chunk);
        lane.stats.batches += 1;
        lane.stats.messages += task.chunk.range.len() as u64;
        lane.stats.errors += u64::from(failed);
        lane.stats.latency.record(took);
        match outcome {
            Ok(()) if task.chunk.last => {
                if let (Some(offset), Some(consumer)) = (state.tracker.complete(partition, task.chunk.id), &consumer) {
                    // Under the lock, so a revoke cannot slip between the decision and the store.
                    store(consumer, partition, offset);
                }
            }
            Ok(()) => {}
            Err(error) => {
                lane.drop_waiting(Some(std::slice::from_ref(partition)));
                state.tracker.fail(partition, task.chunk.id);
                if state.failure.is_none() {
                    state.failure = Some(error);
                } else {
                    later_failure = Some(error); // the first one is reported
                }
                self.stop.store(true, Ordering::Release);
            }
        }
        let more_ready = state.lanes[task.lane].has_ready();
        drop(guard);
        drop(later_failure); // outside the lock: it may hold Python objects
        if more_ready {
            self.work.notify_one();
        }
        self.progress.notify_all();
    }

    // --- the engine's side -------------------------------------------------------------

    /// Sleeps until the run should end, and says why.
    pub fn wait_for_ending(&self) -> Ending<E> {
        let mut state = self.lock();
        loop {
            if let Some(failure) = state.failure.take() {
                return Ending::Failed(failure);
            }
            if let Some(error) = state.source_error.take() {
                return Ending::SourceFailed(error);
            }
            if self.stop_requested() {
                return Ending::Stopped;
            }
            if state.source_idle && state.lanes.iter().all(Lane::is_empty) {
                return Ending::Drained;
            }
            state = self.progress.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Stops admitting, drops waiting work, and waits up to `timeout` for running calls.
    /// Returns whether every call finished. A failure that arrives meanwhile is returned.
    pub fn drain(&self, timeout: Duration) -> (bool, Option<E>) {
        let mut state = self.lock();
        state.intake_closed = true;
        for lane in &mut state.lanes {
            lane.drop_waiting(None);
        }
        let deadline = Instant::now() + timeout;
        while state.lanes.iter().any(|l| l.running() > 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (false, state.failure.take());
            }
            state = self.progress.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        (true, state.failure.take())
    }

    /// Lets the workers exit.
    pub fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
    }

    pub fn snapshot(&self) -> Snapshot {
        let consumer = self.consumer(); // before the lock: see `complete`
        let state = self.lock();
        let mut known: Vec<&Partition> = state.tracker.assigned().collect();
        for (partition, _) in state.positions.iter().chain(&state.committed) {
            if !known.contains(&partition) {
                known.push(partition);
            }
        }
        let mut partitions: Vec<PartitionSnapshot> = known
            .into_iter()
            .map(|partition| {
                let lookup = |list: &[(Partition, i64)]| list.iter().find(|(p, _)| p == partition).map(|(_, o)| *o);
                PartitionSnapshot {
                    partition: partition.clone(),
                    assigned: state.tracker.is_assigned(partition),
                    position: lookup(&state.positions),
                    committed: lookup(&state.committed),
                    high_watermark: consumer
                        .as_ref()
                        .and_then(|c| crate::source::cached_high_watermark(c, partition))
                        .or_else(|| lookup(&state.high_watermarks)),
                }
            })
            .collect();
        partitions.sort_by(|a, b| a.partition.cmp(&b.partition));
        Snapshot {
            lanes: state.lanes.iter().map(|l| (l.options.name.clone(), l.stats.clone(), l.options.clone())).collect(),
            partitions,
            admitted: state.admitted,
        }
    }
}

impl<E: Send> Intake for Pool<E> {
    fn assign(&self, partitions: Vec<Partition>) {
        self.lock().tracker.assign(partitions);
    }

    /// Offers a sealed batch to every lane. `Err` gives it back when a lane is full: the
    /// source holds it and pauses its partition. A batch of a partition no longer assigned
    /// is dropped.
    fn submit(&self, batch: Arc<Batch>) -> Result<(), Arc<Batch>> {
        let mut state = self.lock();
        if state.intake_closed {
            return Ok(()); // shutting down: not started, not stored; the next run gets it
        }
        if !state.tracker.is_assigned(batch.partition()) {
            return Ok(());
        }
        let mut refused = false;
        for lane in &mut state.lanes {
            // Every lane is asked, so each full one records that it is full.
            refused |= !lane.admits(&batch);
        }
        if refused {
            return Err(batch);
        }
        let lanes = state.lanes.len() as u32;
        let Some(id) = state.tracker.track(batch.partition(), batch.last_offset(), lanes) else {
            return Ok(());
        };
        for lane in &mut state.lanes {
            lane.push(&batch, id);
        }
        let ready = state.lanes.iter().filter(|l| l.has_ready()).count();
        state.admitted += batch.len() as u64;
        upsert(&mut state.positions, batch.partition(), batch.last_offset() + 1);
        drop(state);
        for _ in 0..ready {
            self.work.notify_one();
        }
        Ok(())
    }

    /// Revoke: drops the waiting work of `partitions`, waits up to `timeout` for their
    /// running calls, then stops tracking them. The caller commits afterwards, while the
    /// partitions are still assigned.
    fn revoke(&self, partitions: &[Partition], timeout: Duration) {
        let mut state = self.lock();
        for lane in &mut state.lanes {
            lane.drop_waiting(Some(partitions));
        }
        // At shutdown the drain already waited for running calls; their results can no
        // longer be stored, so waiting again would only delay the close.
        let deadline = if state.intake_closed { Instant::now() } else { Instant::now() + timeout };
        while state.lanes.iter().any(|l| l.running_on(partitions) > 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!("revoke: calls still running; their results will not be stored");
                break;
            }
            state = self.progress.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        state.tracker.revoke(partitions);
        self.progress.notify_all();
    }

    fn record_high_watermarks(&self, watermarks: Vec<(Partition, i64)>) {
        let mut state = self.lock();
        for (partition, high) in watermarks {
            upsert(&mut state.high_watermarks, &partition, high);
        }
    }

    fn source_idle(&self, idle: bool) {
        let mut state = self.lock();
        if state.source_idle != idle {
            state.source_idle = idle;
            self.progress.notify_all();
        }
    }

    fn source_failed(&self, error: Error) {
        let mut state = self.lock();
        state.source_error.get_or_insert(error);
        self.progress.notify_all();
    }

    fn record_committed(&self, offsets: &TopicPartitionList) {
        let mut state = self.lock();
        for element in offsets.elements() {
            if let (Ok(()), Offset::Offset(offset)) = (element.error(), element.offset()) {
                let partition = Partition { topic: Arc::from(element.topic()), partition: element.partition() };
                upsert(&mut state.committed, &partition, offset);
            }
        }
    }

    fn stop_requested(&self) -> bool {
        Pool::stop_requested(self)
    }
}
