//! The pool: every lane, the offset tracker, the timer wheel and the workers' parking spot,
//! under one lock taken a few times per batch (never per message). Workers sleep on `work`
//! until a lane has a call ready; the engine and revokes sleep on `progress` until calls
//! finish.
//!
//! Time: every deadline (linger, call deadlines, retry backoff, rate-limit waits, commits)
//! is an entry on the one wheel here. The source thread drives it between fetches; a wait
//! for running calls (revoke, shutdown) drives it while it waits. Scheduling an entry
//! earlier than the driver's next wake-up wakes it.
//!
//! Delivery: a partition's offset is stored up to where every lane has finished its calls
//! (see `offsets`), call by call: a call succeeded, or its failed messages were written to
//! the lane's dead-letter topic and acknowledged. A failed call is retried for its lane
//! alone. A call that asked the process to exit (`CallFailure::fatal`) ends the run whatever
//! the lane's policy, and is neither retried nor dead-lettered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::batch::{Batch, Partition};
use crate::dlq::{DeadLetterInfo, DeadLetters, LastError};
use crate::errors::{Error, Result as CoreResult};
use crate::lane::{Chunk, Lane, LaneOptions, OnFailure, Take};
use crate::offsets::OffsetTracker;
use crate::source::{Intake, KafkaConsumer};
use crate::stats::LaneStats;
use crate::timer::{TimerKey, TimerWheel};

/// What the pool needs to know of a failed call.
pub trait CallFailure: Send {
    /// Positions in the call's messages that failed, when the plugin named them; `None`
    /// means all of them.
    fn failed_positions(&self) -> Option<&[usize]>;
    /// The error's type name, for dead-letter headers.
    fn kind(&self) -> String;
    /// The error's message, for dead-letter headers and logs.
    fn detail(&self) -> String;
    /// The call asked the process to exit (or its runtime died under it): the run ends with
    /// it whatever the lane's retry policy, and its messages stay unfinished.
    fn fatal(&self) -> bool {
        false
    }
}

/// Cancels an asynchronous call (at its deadline).
pub type Cancel = Box<dyn FnOnce() + Send>;

/// Wakes the thread that drives the timer wheel.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// One plugin call for a worker to make.
#[derive(Debug)]
pub struct Task {
    pub lane: usize,
    pub chunk: Chunk,
    /// Identifies the call, to register a cancel handle for it.
    pub call: u64,
    pub deadline: Option<Instant>,
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

/// What a wheel entry is for.
#[derive(Debug)]
enum Timer {
    /// A deadline of the source's own (linger, its rate limit, idleness): it only needs to
    /// be awake, and looks at its state itself.
    Source,
    Retry {
        lane: usize,
        partition: Partition,
    },
    Deadline {
        call: u64,
    },
    Unthrottle {
        lane: usize,
    },
    Commit,
    /// A dead-letter write still waiting for its acknowledgement: warn, and look again later.
    DeadLetterWait {
        write: u64,
    },
}

/// A waiting dead-letter write is warned about every `DEAD_LETTER_WARN_EVERY` (or a third of
/// its bound, if sooner, so that warnings come before it fails); once it has waited
/// `DEAD_LETTER_WARN_MAX`, every `DEAD_LETTER_WARN_MAX`, so a long bound does not flood the log.
const DEAD_LETTER_WARN_EVERY: Duration = Duration::from_secs(5);
const DEAD_LETTER_WARN_MAX: Duration = Duration::from_secs(60);

/// A dead-letter write in flight: for the stats, and for the warnings while it waits.
struct DeadLetterWrite {
    lane: usize,
    /// Messages written.
    count: u64,
    topic: String,
    /// The messages: partition and offsets.
    what: String,
    started: Instant,
    /// The bound librdkafka applies to it (`None`: the user's properties set none).
    bound: Option<Duration>,
    timer: Option<TimerKey>,
    /// The wait before the next warning.
    every: Duration,
    last_error: Arc<LastError>,
}

/// A call in flight, for its deadline.
struct Call {
    lane: usize,
    deadline: Option<TimerKey>,
    overdue: bool,
    cancel: Option<Cancel>,
    /// The partition and offsets, for the overrun log line.
    what: String,
}

/// Work that timers left to do outside the lock: cancels may take the GIL, logs may too,
/// and a commit calls librdkafka.
#[derive(Default)]
struct Fired {
    cancels: Vec<Cancel>,
    warnings: Vec<String>,
    commit: bool,
    ready: bool,
}

/// A dead-letter write to start once the lock is released.
struct DeadLetterJob {
    topic: String,
    indexes: Vec<usize>,
    info: DeadLetterInfo,
    task: Task,
}

#[allow(clippy::struct_excessive_bools)] // independent flags of one run
struct State<E> {
    lanes: Vec<Lane>,
    /// The lane to look at first, so that lanes take turns.
    next_lane: usize,
    tracker: OffsetTracker,
    timers: TimerWheel<Timer>,
    timers_peak: usize,
    /// When the driver of the wheel plans to wake next; an earlier entry must wake it.
    driver_wakes_at: Option<Instant>,
    calls: HashMap<u64, Call>,
    next_call: u64,
    commit_timer: Option<TimerKey>,
    /// The source holds batches a lane refused; wake it once a lane has room again.
    source_waits_for_room: bool,
    /// Workers exit once this is set and they are idle.
    closed: bool,
    /// No new batches are admitted.
    intake_closed: bool,
    source_idle: bool,
    source_error: Option<Error>,
    failure: Option<E>,
    /// Next offset fetched, last stored and last committed offset, per partition.
    positions: Vec<(Partition, i64)>,
    stored: Vec<(Partition, i64)>,
    committed: Vec<(Partition, i64)>,
    /// High watermarks of revoked partitions, as last seen.
    high_watermarks: Vec<(Partition, i64)>,
    admitted: u64,
    /// Dead-letter writes sent and not yet acknowledged or failed, by id.
    dead_letter_writes: HashMap<u64, DeadLetterWrite>,
    next_write: u64,
}

/// Shared by the source, the workers and the engine.
pub struct Pool<E> {
    state: Mutex<State<E>>,
    work: Condvar,
    progress: Condvar,
    stop: Arc<AtomicBool>,
    consumer: Mutex<Weak<KafkaConsumer>>,
    wake_source: Mutex<Option<Wake>>,
    /// Taken at `close`, so the producer's threads end with the run, not with the app.
    dead_letters: Mutex<Option<Arc<DeadLetters>>>,
    commit_interval: Duration,
    /// Itself, for dead-letter acknowledgements that arrive on librdkafka's thread.
    this: Weak<Pool<E>>,
}

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

impl<E: CallFailure + 'static> Pool<E> {
    pub fn new(
        lanes: Vec<LaneOptions>,
        stop: Arc<AtomicBool>,
        dead_letters: Option<Arc<DeadLetters>>,
        commit_interval: Duration,
    ) -> CoreResult<Arc<Self>> {
        let lanes = lanes.into_iter().map(Lane::new).collect::<CoreResult<Vec<_>>>()?;
        Ok(Arc::new_cyclic(|this| Pool {
            state: Mutex::new(State {
                tracker: OffsetTracker::new(lanes.len()),
                lanes,
                next_lane: 0,
                timers: TimerWheel::new(Instant::now()),
                timers_peak: 0,
                driver_wakes_at: None,
                calls: HashMap::new(),
                next_call: 0,
                commit_timer: None,
                source_waits_for_room: false,
                closed: false,
                intake_closed: false,
                source_idle: false,
                source_error: None,
                failure: None,
                positions: Vec::new(),
                stored: Vec::new(),
                committed: Vec::new(),
                high_watermarks: Vec::new(),
                admitted: 0,
                dead_letter_writes: HashMap::new(),
                next_write: 0,
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
            stop,
            consumer: Mutex::new(Weak::new()),
            wake_source: Mutex::new(None),
            dead_letters: Mutex::new(dead_letters),
            commit_interval,
            this: this.clone(),
        }))
    }

    /// The pool itself, shared, for completions that arrive from other threads.
    pub fn shared(&self) -> Option<Arc<Self>> {
        self.this.upgrade()
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

    /// Asks the run to end; wakes the engine and the source.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        drop(self.lock());
        self.progress.notify_all();
        self.wake_source();
    }

    /// A thread the run relies on (a worker, the event loop of async plugins) ended: the
    /// run fails with `error` instead of waiting for calls that would never complete.
    pub fn fail_run(&self, error: Error) {
        self.lock().source_error.get_or_insert(error);
        self.request_stop();
    }

    fn wake_source(&self) {
        let wake = self.wake_source.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(wake) = wake {
            wake();
        }
    }

    // --- the timer wheel ---------------------------------------------------------------

    /// Puts an entry on the wheel. Returns whether the driver must be woken (after the lock
    /// is released) because the entry is due before it planned to wake.
    fn schedule(state: &mut State<E>, at: Instant, timer: Timer) -> (TimerKey, bool) {
        let key = state.timers.insert(at, timer);
        state.timers_peak = state.timers_peak.max(state.timers.len());
        let earlier = state.driver_wakes_at.is_none_or(|planned| at < planned);
        if earlier {
            state.driver_wakes_at = Some(at);
        }
        (key, earlier)
    }

    fn wake_driver(&self) {
        self.progress.notify_all();
        self.wake_source();
    }

    /// Fires the entries due at `now`; what must happen outside the lock is returned.
    fn fire(state: &mut State<E>, now: Instant) -> Fired {
        let mut due = Vec::new();
        state.timers.expire(now, &mut due);
        let mut fired = Fired::default();
        for timer in due {
            match timer {
                Timer::Source => {}
                Timer::Retry { lane, partition } => {
                    state.lanes[lane].retry_due(&partition);
                    fired.ready |= state.lanes[lane].has_ready();
                }
                Timer::Unthrottle { lane } => {
                    state.lanes[lane].unthrottle();
                    fired.ready |= state.lanes[lane].has_ready();
                }
                Timer::DeadLetterWait { write } => {
                    if let Some(warning) = Self::dead_letter_waits(state, write, now) {
                        fired.warnings.push(warning);
                    }
                }
                Timer::Commit => {
                    state.commit_timer = None;
                    fired.commit = true;
                }
                Timer::Deadline { call } => {
                    let Some(call) = state.calls.get_mut(&call) else { continue };
                    call.deadline = None;
                    call.overdue = true;
                    let lane = &mut state.lanes[call.lane];
                    if let Some(cancel) = call.cancel.take() {
                        lane.stats.timeouts += 1;
                        fired.cancels.push(cancel);
                    } else {
                        lane.stats.overruns += 1;
                        fired.warnings.push(format!(
                            "plugin {:?} is past its timeout of {:?} on {}; its result will still count",
                            lane.options.name,
                            lane.options.timeout.unwrap_or_default(),
                            call.what
                        ));
                    }
                }
            }
        }
        state.driver_wakes_at = state.timers.next_deadline();
        fired
    }

    /// Does what fired timers left to do, outside the lock.
    fn finish_firing(&self, fired: Fired) {
        for warning in fired.warnings {
            log::warn!("{warning}");
        }
        for cancel in fired.cancels {
            cancel();
        }
        if fired.commit {
            if let Some(consumer) = self.consumer() {
                crate::source::commit_async(&consumer);
            }
        }
        if fired.ready {
            self.work.notify_all();
        }
    }

    /// Fires due timers and returns when the wheel is next due (`None`: empty). The source
    /// calls this once per turn of its poll loop and sleeps until then at most.
    pub fn drive_timers(&self, now: Instant) -> Option<Instant> {
        let mut state = self.lock();
        let fired = Self::fire(&mut state, now);
        let next = state.timers.next_deadline();
        drop(state);
        self.finish_firing(fired);
        next
    }

    /// Waits on `progress` until `until` at most, firing timers that fall due meanwhile.
    /// Returns the lock for the caller to re-check its condition.
    fn wait_progress<'a>(&'a self, mut state: MutexGuard<'a, State<E>>, until: Instant) -> MutexGuard<'a, State<E>> {
        let now = Instant::now();
        let fired = Self::fire(&mut state, now);
        if fired.commit || fired.ready || !fired.cancels.is_empty() || !fired.warnings.is_empty() {
            drop(state);
            self.finish_firing(fired);
            return self.lock();
        }
        let wake = state.timers.next_deadline().map_or(until, |next| next.min(until));
        let left = wake.saturating_duration_since(now);
        self.progress.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0
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
            let mut wake = false;
            let count = state.lanes.len();
            for i in 0..count {
                let index = (state.next_lane + i) % count;
                match state.lanes[index].take() {
                    Take::Call(chunk) => {
                        state.next_lane = (index + 1) % count;
                        let task = Self::start_call(&mut state, index, chunk, &mut wake);
                        drop(state);
                        if wake {
                            self.wake_driver();
                        }
                        return Some(task);
                    }
                    Take::Throttled(until) => {
                        wake |= Self::schedule(&mut state, until, Timer::Unthrottle { lane: index }).1;
                    }
                    Take::Nothing => {}
                }
            }
            if wake {
                drop(state);
                self.wake_driver();
                state = self.lock();
                continue;
            }
            state = self.work.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn start_call(state: &mut State<E>, lane: usize, chunk: Chunk, wake: &mut bool) -> Task {
        let call = state.next_call;
        state.next_call += 1;
        let deadline = state.lanes[lane].options.timeout.map(|timeout| Instant::now() + timeout);
        let timer = deadline.map(|at| {
            let (key, earlier) = Self::schedule(state, at, Timer::Deadline { call });
            *wake |= earlier;
            key
        });
        if timer.is_some() {
            let what = chunk.describe();
            state.calls.insert(call, Call { lane, deadline: timer, overdue: false, cancel: None, what });
        }
        Task { lane, chunk, call, deadline }
    }

    /// An asynchronous call can be cancelled with `cancel` until it completes. If its
    /// deadline has already passed, it is cancelled now.
    pub fn cancel_with(&self, call: u64, cancel: Cancel) {
        let mut state = self.lock();
        let Some(record) = state.calls.get_mut(&call) else { return };
        if !record.overdue {
            record.cancel = Some(cancel);
            return;
        }
        let lane = record.lane;
        let counts = &mut state.lanes[lane].stats;
        counts.overruns -= 1; // counted as an overrun when it fell due; it is a timeout
        counts.timeouts += 1;
        drop(state);
        cancel();
    }

    /// A call returned. On success, the lane has finished its partition up to the call's
    /// last message; the offset is stored up to where every lane has. On failure the lane's
    /// retry policy decides: retry after a backoff, dead-letter, or end the run.
    pub fn complete(&self, task: Task, outcome: Result<(), E>, took: Duration) {
        // Taken before the lock so that, if this is the last handle (shutdown racing a late
        // call), the consumer is dropped after the guard: dropping it runs callbacks that lock.
        let consumer = self.consumer();
        let mut guard = self.lock();
        let state = &mut *guard;
        if let Some(call) = state.calls.remove(&task.call) {
            if let Some(key) = call.deadline {
                state.timers.cancel(key);
            }
        }
        let lane = &mut state.lanes[task.lane];
        lane.stats.batches += 1;
        lane.stats.messages += task.chunk.len() as u64;
        lane.stats.latency.record(took);
        let mut wake = false;
        let mut warning = None;
        let mut dead_letter = None;
        let mut dropped = None;
        match outcome {
            Ok(()) => self.finish(state, consumer.as_ref(), &task, &mut wake),
            Err(error) => {
                state.lanes[task.lane].stats.errors += 1;
                match self.failed(state, consumer.as_ref(), task, error, &mut wake) {
                    Failed::Retrying(message) => warning = Some(message),
                    Failed::DeadLetter(job, message) => {
                        warning = Some(message);
                        dead_letter = Some(job);
                    }
                    Failed::Stopping(second) => dropped = second,
                }
            }
        }
        drop(guard);
        drop(dropped); // outside the lock: it may hold Python objects
        if let Some(warning) = warning {
            log::warn!("{warning}");
        }
        if wake {
            self.wake_driver();
        }
        if let Some(job) = dead_letter {
            self.send_dead_letters(job);
        }
        self.work.notify_all();
        self.progress.notify_all();
    }

    /// The lane is done with a task's chunk: the partition's offset may move, and be stored.
    fn finish(&self, state: &mut State<E>, consumer: Option<&Arc<KafkaConsumer>>, task: &Task, wake: &mut bool) {
        let lane = &mut state.lanes[task.lane];
        lane.finish(&task.chunk);
        if state.source_waits_for_room && lane.has_room_again() {
            state.source_waits_for_room = false;
            *wake = true;
        }
        let chunk = &task.chunk;
        self.advance(state, consumer, task.lane, chunk, chunk.next_offset(), wake);
    }

    /// The lane has finished `chunk`'s partition up to `next`: store the partition's offset if
    /// that moved it, and have it committed soon.
    fn advance(
        &self,
        state: &mut State<E>,
        consumer: Option<&Arc<KafkaConsumer>>,
        lane: usize,
        chunk: &Chunk,
        next: i64,
        wake: &mut bool,
    ) {
        let partition = chunk.batch.partition();
        let moved = state.tracker.complete(partition, chunk.epoch, lane, next);
        if let (Some(offset), Some(consumer)) = (moved, consumer) {
            // Under the lock, so a revoke cannot slip between the decision and the store.
            store(consumer, partition, offset);
            upsert(&mut state.stored, partition, offset);
            if state.commit_timer.is_none() {
                let (key, earlier) = Self::schedule(state, Instant::now() + self.commit_interval, Timer::Commit);
                state.commit_timer = Some(key);
                *wake |= earlier;
            }
        }
    }

    fn failed(
        &self,
        state: &mut State<E>,
        consumer: Option<&Arc<KafkaConsumer>>,
        task: Task,
        error: E,
        wake: &mut bool,
    ) -> Failed<E> {
        let chunk = &task.chunk;
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
        if error.fatal() {
            return self.stop_with(state, task, error);
        }
        if !state.tracker.tracks(chunk.batch.partition(), chunk.epoch) {
            // Revoked while the call ran (past revoke_timeout): the partition's new owner
            // handles these messages; retrying or dead-lettering them here would duplicate.
            state.lanes[task.lane].finish(chunk);
            return Failed::Retrying(format!(
                "a call failed on {} after its partition was revoked; not retried",
                chunk.describe()
            ));
        }
        let lane = &state.lanes[task.lane];
        let (name, policy) = (lane.options.name.clone(), lane.options.retry.clone());
        if failed.is_empty() {
            // The plugin named no failed message: the call succeeded.
            self.finish(state, consumer, &task, wake);
            return Failed::Retrying(format!("plugin {name:?} reported a partial failure of no message"));
        }
        // The messages before the first that failed are finished (the retry, dead letters or
        // stop concern only the failed ones and later): the lane's progress moves up to it.
        if let Some(&first) = failed.first().filter(|&&first| Some(first) != chunk.index(0)) {
            self.advance(state, consumer, task.lane, chunk, chunk.batch.get(first).offset, wake);
        }
        let what = chunk.batch.describe(failed.len(), failed.first().copied(), failed.last().copied());
        let attempt = chunk.attempt;
        let cause = format!("{}: {}", error.kind(), error.detail());
        if policy.retries_after(attempt) {
            let backoff = policy.backoff(attempt);
            let partition = chunk.batch.partition().clone();
            let (key, earlier) =
                Self::schedule(state, Instant::now() + backoff, Timer::Retry { lane: task.lane, partition });
            *wake |= earlier;
            let subset = (failed.len() < chunk.len() || chunk.subset.is_some())
                .then(|| failed.iter().map(|&i| i as u32).collect::<Arc<[u32]>>());
            let retry = Chunk {
                batch: chunk.batch.clone(),
                epoch: chunk.epoch,
                range: chunk.range.clone(),
                subset,
                last: chunk.last,
                attempt: attempt + 1,
            };
            let lane = &mut state.lanes[task.lane];
            lane.stats.retry_wait += backoff;
            lane.retry_later(chunk, retry, key);
            // The messages that succeeded left the lane: it may have room again.
            if state.source_waits_for_room && lane.has_room_again() {
                state.source_waits_for_room = false;
                *wake = true;
            }
            let of = if policy.on_failure == OnFailure::RetryForever {
                String::new()
            } else {
                format!(" of {}", policy.retries + 1)
            };
            return Failed::Retrying(format!(
                "plugin {name:?} failed on {what} (attempt {attempt}{of}): {cause}; retrying in {:.3} s",
                backoff.as_secs_f64()
            ));
        }
        if let (OnFailure::DeadLetter(topic), true) = (&policy.on_failure, self.has_dead_letters()) {
            let message = format!(
                "plugin {name:?} failed on {what} after {attempt} attempt(s): {cause}; writing them to {topic:?}"
            );
            let info = DeadLetterInfo {
                plugin: name,
                error_type: error.kind(),
                error_message: error.detail(),
                attempts: attempt,
            };
            let job = DeadLetterJob { topic: topic.clone(), indexes: failed, info, task };
            return Failed::DeadLetter(Box::new(job), message);
        }
        self.stop_with(state, task, error)
    }

    /// Stop: the lane's progress on the partition freezes before the call, so nothing from
    /// it on is stored, and the run ends with the error.
    fn stop_with(&self, state: &mut State<E>, task: Task, error: E) -> Failed<E> {
        let partition = task.chunk.batch.partition().clone();
        let lane = &mut state.lanes[task.lane];
        lane.finish(&task.chunk);
        for key in lane.drop_waiting(Some(std::slice::from_ref(&partition))) {
            state.timers.cancel(key);
        }
        state.tracker.fail(&partition, task.chunk.epoch, task.lane);
        self.stop.store(true, Ordering::Release);
        if state.failure.is_none() {
            state.failure = Some(error);
            Failed::Stopping(None)
        } else {
            Failed::Stopping(Some(error)) // the first one is reported
        }
    }

    /// Starts a dead-letter write. Until it is acknowledged or fails, it holds its call (the
    /// lane's concurrency slot) and its messages' offsets; it shows in the stats, and a wheel
    /// entry warns while it waits (one entry per write, none per message).
    fn send_dead_letters(&self, job: Box<DeadLetterJob>) {
        let Some(dead_letters) = self.dead_letters() else { return };
        let pool = self.this.clone();
        let DeadLetterJob { topic, indexes, info, task } = *job;
        let count = indexes.len() as u64;
        let batch = task.chunk.batch.clone();
        // `failed` took the indexes from the chunk, so they are in the batch.
        let what = batch.describe(indexes.len(), indexes.first().copied(), indexes.last().copied());
        let started = Instant::now();
        let bound = dead_letters.timeout();
        // Never zero: a zero interval would refire at once, forever.
        let every = bound.map_or(DEAD_LETTER_WARN_EVERY, |b| DEAD_LETTER_WARN_EVERY.min(b / 3));
        let every = every.max(Duration::from_millis(100));
        let mut state = self.lock();
        let write = state.next_write;
        state.next_write += 1;
        let (key, wake) = Self::schedule(&mut state, started + every, Timer::DeadLetterWait { write });
        let record = DeadLetterWrite {
            lane: task.lane,
            count,
            topic: topic.clone(),
            what,
            started,
            bound,
            timer: Some(key),
            every,
            last_error: dead_letters.last_error(),
        };
        state.dead_letter_writes.insert(write, record);
        drop(state);
        if wake {
            self.wake_driver();
        }
        let done = Box::new(move |result: CoreResult<()>| {
            if let Some(pool) = pool.upgrade() {
                pool.dead_lettered(write, task, count, result);
            }
        });
        dead_letters.send(&topic, &batch, &indexes, &info, done);
    }

    /// The warning for a dead-letter write still waiting at `now`, if it is; schedules the
    /// next look.
    fn dead_letter_waits(state: &mut State<E>, write: u64, now: Instant) -> Option<String> {
        let record = state.dead_letter_writes.get_mut(&write)?;
        record.timer = None;
        let waited = now.saturating_duration_since(record.started);
        let last = record.last_error.since(record.started).map_or_else(
            || "; librdkafka has reported no error since it began".to_string(),
            |e| format!("; librdkafka's last error: {e}"),
        );
        let bound = record.bound.map_or_else(
            || "it has no bound: the producer's message.timeout.ms is 0".to_string(),
            |bound| format!("it fails after {:.1} s, dlq_timeout", bound.as_secs_f64()),
        );
        let warning = format!(
            "plugin {:?}: the dead-letter write of {} to {:?} has waited {:.1} s for the broker's \
             acknowledgement ({bound}); until then the call holds its concurrency slot and the \
             offsets stay uncommitted{last}",
            state.lanes[record.lane].options.name,
            record.what,
            record.topic,
            waited.as_secs_f64(),
        );
        if waited >= DEAD_LETTER_WARN_MAX {
            record.every = DEAD_LETTER_WARN_MAX;
        }
        let next = now + record.every;
        // `fire` recomputes the driver's wake-up after its entries, so no wake is needed.
        let (key, _) = Self::schedule(state, next, Timer::DeadLetterWait { write });
        if let Some(record) = state.dead_letter_writes.get_mut(&write) {
            record.timer = Some(key);
        }
        Some(warning)
    }

    /// A dead-letter write finished: acknowledged, the messages count as done; failed, the
    /// batch is never stored and the run ends with the error.
    fn dead_lettered(&self, write: u64, task: Task, count: u64, result: CoreResult<()>) {
        let consumer = self.consumer();
        let mut guard = self.lock();
        let state = &mut *guard;
        if let Some(key) = state.dead_letter_writes.remove(&write).and_then(|record| record.timer) {
            state.timers.cancel(key);
        }
        let mut wake = false;
        match result {
            Ok(()) => {
                state.lanes[task.lane].stats.dead_lettered += count;
                self.finish(state, consumer.as_ref(), &task, &mut wake);
            }
            Err(error) => {
                let partition = task.chunk.batch.partition().clone();
                state.lanes[task.lane].finish(&task.chunk);
                state.tracker.fail(&partition, task.chunk.epoch, task.lane);
                state.source_error.get_or_insert(error);
                self.stop.store(true, Ordering::Release);
            }
        }
        drop(guard);
        if wake {
            self.wake_driver();
        }
        self.work.notify_all();
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

    /// Stops admitting, drops waiting work, and waits up to `timeout` for running calls
    /// (dead-letter writes included). Returns whether every call finished, and a failure
    /// that arrived meanwhile (a plugin's, or the core's: a dead-letter write that failed).
    pub fn drain(&self, timeout: Duration) -> (bool, Option<Late<E>>) {
        let mut state = self.lock();
        state.intake_closed = true;
        let deadline = Instant::now() + timeout;
        loop {
            let state_ref = &mut *state;
            for lane in &mut state_ref.lanes {
                for key in lane.drop_waiting(None) {
                    state_ref.timers.cancel(key);
                }
            }
            let finished = state.lanes.iter().all(|l| l.running() == 0);
            if finished || Instant::now() >= deadline {
                let late = state.failure.take().map(Late::Plugin).or_else(|| state.source_error.take().map(Late::Core));
                return (finished, late);
            }
            state = self.wait_progress(state, deadline);
        }
    }

    /// Whether the producer is still there, without a handle that might be the last one
    /// (dropped under the pool's lock, it would run callbacks that take it).
    fn has_dead_letters(&self) -> bool {
        self.dead_letters.lock().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    fn dead_letters(&self) -> Option<Arc<DeadLetters>> {
        self.dead_letters.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Lets the workers exit, and ends the dead-letter producer (the drain waited for its
    /// writes): its threads must not outlive the run.
    pub fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
        let dead_letters = self.dead_letters.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(dead_letters); // outside every lock: dropping it may run its callbacks, which lock
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
        let mut lanes: Vec<(String, LaneStats, LaneOptions)> =
            state.lanes.iter().map(|l| (l.options.name.clone(), l.stats.clone(), l.options.clone())).collect();
        let now = Instant::now();
        for record in state.dead_letter_writes.values() {
            let counts = &mut lanes[record.lane].1;
            counts.dead_letters_pending += record.count;
            counts.dead_letters_oldest = counts.dead_letters_oldest.max(now.saturating_duration_since(record.started));
        }
        Snapshot {
            lanes,
            partitions,
            admitted: state.admitted,
            timers: state.timers.len(),
            timers_peak: state.timers_peak,
        }
    }
}

/// A failure that came while the run was draining.
#[derive(Debug)]
pub enum Late<E> {
    Plugin(E),
    Core(Error),
}

/// How `failed` resolved a failure.
enum Failed<E> {
    /// Scheduled again (or nothing failed); the message is logged.
    Retrying(String),
    DeadLetter(Box<DeadLetterJob>, String),
    /// The run ends; a failure after the first is handed back to be dropped.
    Stopping(Option<E>),
}

impl<E: CallFailure + 'static> Intake for Pool<E> {
    fn assign(&self, partitions: Vec<Partition>) {
        self.lock().tracker.assign(partitions);
    }

    /// Offers a sealed batch to every lane. `Err` gives it back when a lane is full: the
    /// source holds it and takes nothing more, and is woken once the lane has room. A
    /// batch of a partition no longer assigned is dropped.
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
            state.source_waits_for_room = true;
            return Err(batch);
        }
        let Some(epoch) = state.tracker.epoch(batch.partition()) else {
            return Ok(());
        };
        for lane in &mut state.lanes {
            lane.push(&batch, epoch);
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
        // At shutdown the drain already waited for running calls; their results can no
        // longer be stored, so waiting again would only delay the close.
        let deadline = if state.intake_closed { Instant::now() } else { Instant::now() + timeout };
        loop {
            let state_ref = &mut *state;
            for lane in &mut state_ref.lanes {
                for key in lane.drop_waiting(Some(partitions)) {
                    state_ref.timers.cancel(key);
                }
            }
            if state.lanes.iter().all(|l| l.running_on(partitions) == 0) {
                break;
            }
            if Instant::now() >= deadline {
                log::warn!("revoke: calls still running; their results will not be stored");
                break;
            }
            state = self.wait_progress(state, deadline);
        }
        state.tracker.revoke(partitions);
        drop(state);
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

    fn record_stored_committed(&self) {
        let mut guard = self.lock();
        let state = &mut *guard;
        for (partition, offset) in &state.stored {
            upsert(&mut state.committed, partition, *offset);
        }
    }

    fn stop_requested(&self) -> bool {
        Pool::stop_requested(self)
    }

    fn set_waker(&self, wake: Option<Wake>) {
        *self.wake_source.lock().unwrap_or_else(PoisonError::into_inner) = wake;
    }

    fn schedule_wake(&self, at: Instant) -> TimerKey {
        // The source schedules its own deadlines and sleeps until the wheel's next one right
        // after, so it needs no waking.
        Self::schedule(&mut self.lock(), at, Timer::Source).0
    }

    fn cancel_wake(&self, key: TimerKey) {
        self.lock().timers.cancel(key);
    }

    fn drive_timers(&self, now: Instant) -> Option<Instant> {
        Pool::drive_timers(self, now)
    }
}
