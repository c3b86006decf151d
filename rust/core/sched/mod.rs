//! The scheduler: the whole engine as a state machine with no I/O, in the manner of
//! quinn-proto's `Connection`. It owns the lanes, the offset tracker, the timer wheel and
//! the lanes' rate limits; it knows no Kafka client or Python type, no thread and no lock.
//!
//! Events come in through methods: a fetched batch (`submit`), an assignment or a revoke, a
//! call's result (`complete`), a dead-letter write's result, a stop, and the time
//! (`handle_timeout`). What must be done comes out: the next call for a worker
//! (`next_job`, the dispatch policy, in `dispatch`), the offsets to commit
//! (`take_commit`, `offsets_to_commit`), and the rarer effects (`poll_effect`): dead
//! letters to write, warnings to log. `take_wakes` says whom to wake: how many workers,
//! the thread that drives the wheel, whether a stop began.
//!
//! Delivery: a partition's offset may be committed up to where every lane has finished its
//! calls (see `offsets`), call by call: a call succeeded, or its failed messages were written
//! to the lane's dead-letter topic and acknowledged. A failed call is retried for its lane
//! alone. A call that asked the process to exit (`CallFailure::fatal`) ends the run whatever
//! the lane's policy, and is neither retried nor dead-lettered.

mod calls;
mod dead_letters;
mod dispatch;
mod failure;
mod partitions;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use self::dead_letters::{DeadLetterInfo, DeadLetterWait, DeadLetterWrite};
pub use self::dispatch::Job;
pub use self::partitions::Snapshot;

use self::calls::Call;
use self::partitions::Partitions;
use super::batch::{Batch, Partition};
use super::errors::{Error, Result};
use super::lane::{Chunk, Lane, LaneOptions};
use super::offsets::OffsetTracker;
use super::timer::{TimerKey, TimerWheel};

/// What the scheduler needs to know of a failed call.
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

/// Cancels an asynchronous call (at its deadline). Run by a worker, never by the thread
/// that drives the wheel: it may wait for the interpreter.
pub type Cancel = Box<dyn FnOnce() + Send>;

/// One plugin call for a worker to make.
#[derive(Debug)]
pub struct Task {
    pub lane: usize,
    pub chunk: Chunk,
    /// Identifies the call, to register a cancel handle for it.
    pub call: u64,
    pub deadline: Option<Instant>,
}

/// Why the run should end, as far as the scheduler knows.
#[derive(Debug)]
pub enum Ending<E> {
    Stopped,
    /// Drain mode: nothing new was fetched for the idle timeout and every lane is empty.
    Drained,
    Failed(E),
    SourceFailed(Error),
}

/// A failure that came while the run was draining.
#[derive(Debug)]
pub enum Late<E> {
    Plugin(E),
    Core(Error),
}

/// How long ready work may wait while no job starts before a sleeping worker is woken for
/// it: the bound by which a slow call can delay another plugin's call (each further slow
/// call adds as much). Longer than a loaded machine's wake-up latency, so that a round is
/// not handed to a second worker while the first is still being scheduled.
pub const HELP_AFTER: Duration = Duration::from_millis(5);

/// Whom to wake after an event, once the scheduler's lock is released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wakes {
    /// Jobs (calls or cancels) that became ready. A worker awake takes them after its call,
    /// so one sleeping worker is woken only if none is awake.
    pub workers: usize,
    /// Ready work has waited `HELP_AFTER` while no job started: wake this many sleeping
    /// workers (one at a time) whoever is awake.
    pub helpers: usize,
    /// The thread driving the wheel must look again: an entry is due before it planned to
    /// wake, a commit is due, or a full lane has room again.
    pub driver: bool,
    /// A stop began (asked for, or a failure ends the run): the source must stop taking.
    pub stopped: bool,
}

/// The rarer things an event leaves to do outside the lock.
#[derive(Debug)]
pub enum Effect<E> {
    /// Write these messages to the dead-letter topic, and report with `dead_lettered`.
    DeadLetter(DeadLetterWrite),
    /// A dead-letter write still waits for its acknowledgement: warn.
    DeadLetterWaiting(DeadLetterWait),
    Warn(String),
    /// A failure after the run's first: dropped outside the lock (it may hold objects whose
    /// drop needs the interpreter).
    Discard(E),
}

/// How long the dead-letter producer tries one write before it fails (`None`: no bound).
#[derive(Clone, Copy, Debug)]
pub struct WriteBound(pub Option<Duration>);

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
    /// Ready work may be waiting behind running calls (see `HELP_AFTER`).
    Help,
    DeadLetterWait {
        write: u64,
    },
}

#[allow(clippy::struct_excessive_bools)] // independent flags of one run
pub struct Scheduler<E> {
    lanes: Vec<Lane>,
    tracker: OffsetTracker,
    timers: TimerWheel<Timer>,
    timers_peak: usize,
    /// When the driver of the wheel plans to wake next; an earlier entry must wake it.
    driver_wakes_at: Option<Instant>,
    partitions: Partitions,
    commit_interval: Duration,
    commit_timer: Option<TimerKey>,
    commit_due: bool,
    /// When the pending `Timer::Help` is due: one at a time, so its cost is per round of
    /// work, not per job.
    help_due: Option<Instant>,
    /// When a worker last started a job.
    last_start: Option<Instant>,
    /// Calls with a deadline, by id.
    calls: HashMap<u64, Call>,
    next_call: u64,
    /// The lane to look at first, so that lanes take turns.
    next_lane: usize,
    /// Cancels due, for workers to run.
    cancels: VecDeque<Cancel>,
    dead_letter_writes: HashMap<u64, dead_letters::Record>,
    next_write: u64,
    /// The bound the producer applies to a dead-letter write (`None`: no bound), for warnings.
    dead_letter_bound: Option<Duration>,
    /// A dead-letter producer exists and is not closed yet.
    dead_letters_open: bool,
    /// The source holds batches a lane refused; wake it once a lane has room again.
    source_waits_for_room: bool,
    /// No new call starts; running ones finish.
    stopping: bool,
    /// No new batches are admitted.
    intake_closed: bool,
    source_idle: bool,
    source_error: Option<Error>,
    failure: Option<E>,
    wakes: Wakes,
    effects: VecDeque<Effect<E>>,
}

impl<E: CallFailure> Scheduler<E> {
    /// `dead_letters`: the dead-letter producer's bound, if there is one.
    pub fn new(
        lanes: Vec<LaneOptions>,
        commit_interval: Duration,
        dead_letters: Option<WriteBound>,
        now: Instant,
    ) -> Result<Self> {
        let lanes = lanes.into_iter().map(Lane::new).collect::<Result<Vec<_>>>()?;
        Ok(Scheduler {
            tracker: OffsetTracker::new(lanes.len()),
            lanes,
            timers: TimerWheel::new(now),
            timers_peak: 0,
            driver_wakes_at: None,
            partitions: Partitions::default(),
            commit_interval,
            commit_timer: None,
            commit_due: false,
            help_due: None,
            last_start: None,
            calls: HashMap::new(),
            next_call: 0,
            next_lane: 0,
            cancels: VecDeque::new(),
            dead_letter_writes: HashMap::new(),
            next_write: 0,
            dead_letter_bound: dead_letters.and_then(|bound| bound.0),
            dead_letters_open: dead_letters.is_some(),
            source_waits_for_room: false,
            stopping: false,
            intake_closed: false,
            source_idle: false,
            source_error: None,
            failure: None,
            wakes: Wakes::default(),
            effects: VecDeque::new(),
        })
    }

    // --- the outputs -----------------------------------------------------------------

    /// Whom to wake since the last call.
    pub fn take_wakes(&mut self) -> Wakes {
        std::mem::take(&mut self.wakes)
    }

    /// The next effect to apply outside the lock, oldest first.
    pub fn poll_effect(&mut self) -> Option<Effect<E>> {
        self.effects.pop_front()
    }

    /// When the wheel is next due (`None`: empty). The driver sleeps until then at most.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// Why the run should end now, if it should. A failure is handed out once.
    pub fn ending(&mut self) -> Option<Ending<E>> {
        if let Some(failure) = self.failure.take() {
            return Some(Ending::Failed(failure));
        }
        if let Some(error) = self.source_error.take() {
            return Some(Ending::SourceFailed(error));
        }
        if self.stopping {
            return Some(Ending::Stopped);
        }
        (self.source_idle && self.lanes.iter().all(Lane::is_empty)).then_some(Ending::Drained)
    }

    /// Whether `ending` has something to say, without taking it.
    pub fn would_end(&self) -> bool {
        self.failure.is_some()
            || self.source_error.is_some()
            || self.stopping
            || (self.source_idle && self.lanes.iter().all(Lane::is_empty))
    }

    /// A failure that arrived after the ending was handed out (during the drain).
    pub fn take_late(&mut self) -> Option<Late<E>> {
        self.failure.take().map(Late::Plugin).or_else(|| self.source_error.take().map(Late::Core))
    }

    pub fn is_intake_closed(&self) -> bool {
        self.intake_closed
    }

    // --- the Kafka side's events -------------------------------------------------------

    /// Starts tracking newly assigned partitions, each in a new epoch with nothing finished.
    pub fn assign(&mut self, partitions: Vec<Partition>) {
        for partition in &partitions {
            self.partitions.assigned(partition);
        }
        self.tracker.assign(partitions);
    }

    /// Offers a sealed batch to every lane. `Err` gives it back when a lane is full: the
    /// source holds it and takes nothing more, and is woken once the lane has room. A batch
    /// of a partition no longer assigned, or offered after the intake closed, is dropped.
    pub fn submit(&mut self, batch: Arc<Batch>, now: Instant) -> std::result::Result<(), Arc<Batch>> {
        if self.intake_closed {
            return Ok(()); // shutting down: not started, not committed; the next run gets it
        }
        let Some(epoch) = self.tracker.epoch(batch.partition()) else {
            return Ok(());
        };
        let mut refused = false;
        for lane in &mut self.lanes {
            // Every lane is asked, so each full one records that it is full.
            refused |= !lane.admits(&batch);
        }
        if refused {
            self.source_waits_for_room = true;
            return Err(batch);
        }
        for lane in &mut self.lanes {
            lane.push(&batch, epoch);
        }
        let ready = self.lanes.iter().filter(|l| l.has_ready()).count();
        // The source drives the wheel right after: it needs no wake for the help entry.
        let driver_woken = self.wakes.driver;
        self.work_ready(ready, now);
        self.wakes.driver = driver_woken;
        self.partitions.fetched(batch.partition(), batch.last_offset() + 1, batch.len());
        Ok(())
    }

    /// Drops the waiting work of `partitions` (all if `None`), retries included; running
    /// calls finish normally. A revoke, a stop's drain and a failure's stop all begin so.
    pub fn drop_waiting(&mut self, partitions: Option<&[Partition]>) {
        for lane in &mut self.lanes {
            for key in lane.drop_waiting(partitions) {
                self.timers.cancel(key);
            }
        }
    }

    /// Calls running (dead-letter writes included) on any of `partitions`.
    pub fn running_on(&self, partitions: &[Partition]) -> usize {
        self.lanes.iter().map(|l| l.running_on(partitions)).sum()
    }

    /// Calls running (dead-letter writes included).
    pub fn running(&self) -> usize {
        self.lanes.iter().map(Lane::running).sum()
    }

    /// Ends a revoke: returns the offsets to commit while the partitions are still ours
    /// (those of every assigned partition not yet committed), then stops tracking
    /// `partitions`; their calls still running complete into nothing.
    pub fn revoke(&mut self, partitions: &[Partition]) -> Vec<(Partition, i64)> {
        let offsets = self.offsets_to_commit();
        self.tracker.revoke(partitions);
        offsets
    }

    /// Every assigned partition's offset that may be committed and is not known committed:
    /// for a synchronous commit (revoke, the end of the run).
    pub fn offsets_to_commit(&self) -> Vec<(Partition, i64)> {
        self.partitions.uncommitted(|p| self.tracker.is_assigned(p))
    }

    /// The offsets to commit now, if the commit timer fell due: each assigned partition's
    /// whose offset moved since the last commit was started. Empty when nothing is due.
    pub fn take_commit(&mut self) -> Vec<(Partition, i64)> {
        if !std::mem::take(&mut self.commit_due) {
            return Vec::new();
        }
        let tracker = &self.tracker;
        self.partitions.unsent(|p| tracker.is_assigned(p))
    }

    /// Kafka acknowledged a commit of these offsets.
    pub fn committed(&mut self, offsets: &[(Partition, i64)]) {
        for (partition, offset) in offsets {
            self.partitions.committed(partition, *offset);
        }
    }

    /// The last high watermarks seen of partitions about to be revoked, for the stats.
    pub fn record_high_watermarks(&mut self, watermarks: Vec<(Partition, i64)>) {
        for (partition, high) in watermarks {
            self.partitions.high_watermark(&partition, high);
        }
    }

    /// Drain mode: whether nothing new was fetched for the idle timeout and nothing waits to
    /// be offered. Returns whether that changed.
    pub fn source_idle(&mut self, idle: bool) -> bool {
        std::mem::replace(&mut self.source_idle, idle) != idle
    }

    /// The source, or a thread the run relies on, failed: the run ends with `error`.
    pub fn source_failed(&mut self, error: Error) {
        self.source_error.get_or_insert(error);
        self.stop();
    }

    /// Asks the run to end: no new call starts; running ones finish.
    pub fn stop(&mut self) {
        if !self.stopping {
            self.stopping = true;
            self.wakes.stopped = true;
        }
    }

    /// A stop's drain begins: no batch is admitted any more, and waiting work is dropped.
    pub fn close_intake(&mut self) {
        self.intake_closed = true;
        self.stop();
        self.drop_waiting(None);
    }

    /// The dead-letter producer is gone: a failure that would write dead letters stops the
    /// run instead.
    pub fn close_dead_letters(&mut self) {
        self.dead_letters_open = false;
    }

    /// Puts one of the source's own deadlines on the wheel. The source drives the wheel and
    /// sleeps until its next entry right after, so it is not woken for it.
    pub fn schedule_source_wake(&mut self, at: Instant) {
        let woken = self.wakes.driver;
        self.schedule(at, Timer::Source);
        self.wakes.driver = woken;
    }

    // --- time ----------------------------------------------------------------------------

    /// Puts an entry on the wheel; wakes the driver if it is due before the driver planned
    /// to wake. Returns the key, and whether the driver is woken.
    fn schedule(&mut self, at: Instant, timer: Timer) -> (TimerKey, bool) {
        let key = self.timers.insert(at, timer);
        self.timers_peak = self.timers_peak.max(self.timers.len());
        let earlier = self.driver_wakes_at.is_none_or(|planned| at < planned);
        if earlier {
            self.driver_wakes_at = Some(at);
            self.wakes.driver = true;
        }
        (key, earlier)
    }

    /// `count` jobs became ready. A worker is awake or woken for them; if they still wait
    /// `HELP_AFTER` from now (behind running calls), more workers are.
    pub(super) fn work_ready(&mut self, count: usize, now: Instant) {
        if count == 0 {
            return;
        }
        self.wakes.workers += count;
        self.arm_help(now);
    }

    pub(super) fn arm_help(&mut self, now: Instant) {
        self.arm_help_at(now + HELP_AFTER);
    }

    fn arm_help_at(&mut self, at: Instant) {
        if self.help_due.is_none() {
            self.schedule(at, Timer::Help);
            self.help_due = Some(at);
        }
    }

    /// Jobs a worker could start now: cancels, and one per lane with a call ready.
    pub(super) fn ready_jobs(&self) -> usize {
        let calls = if self.stopping { 0 } else { self.lanes.iter().filter(|l| l.has_ready()).count() };
        self.cancels.len() + calls
    }

    /// Fires the wheel's entries due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut due = Vec::new();
        self.timers.expire(now, &mut due);
        for timer in due {
            match timer {
                Timer::Source => {}
                Timer::Retry { lane, partition } => {
                    self.lanes[lane].retry_due(&partition);
                    self.work_ready(usize::from(self.lanes[lane].has_ready()), now);
                }
                Timer::Unthrottle { lane } => {
                    self.lanes[lane].unthrottle();
                    self.work_ready(usize::from(self.lanes[lane].has_ready()), now);
                }
                Timer::Help => {
                    self.help_due = None;
                    if self.ready_jobs() == 0 {
                        continue;
                    }
                    if let Some(at) = self.last_start.map(|at| at + HELP_AFTER).filter(|&at| at > now) {
                        self.arm_help_at(at); // workers are starting jobs: no help yet
                    } else {
                        self.wakes.helpers += 1;
                        self.arm_help_at(now + HELP_AFTER);
                    }
                }
                Timer::Commit => {
                    self.commit_timer = None;
                    self.commit_due = true;
                    self.wakes.driver = true;
                }
                Timer::Deadline { call } => self.deadline_passed(call, now),
                Timer::DeadLetterWait { write } => self.dead_letter_waits(write, now),
            }
        }
        self.driver_wakes_at = self.timers.next_deadline();
    }

    // --- the counters ------------------------------------------------------------------

    /// What `stats()` reports; `high_watermark` is the Kafka side's cached view.
    pub fn snapshot(&self, now: Instant, high_watermark: &dyn Fn(&Partition) -> Option<i64>) -> Snapshot {
        let mut lanes: Vec<_> =
            self.lanes.iter().map(|l| (l.options.name.clone(), l.stats.clone(), l.options.clone())).collect();
        for record in self.dead_letter_writes.values() {
            let counts = &mut lanes[record.lane].1;
            counts.dead_letters_pending += record.count;
            counts.dead_letters_oldest = counts.dead_letters_oldest.max(now.saturating_duration_since(record.started));
        }
        Snapshot {
            lanes,
            partitions: self.partitions.snapshot(&self.tracker, high_watermark),
            admitted: self.partitions.admitted(),
            timers: self.timers.len(),
            timers_peak: self.timers_peak,
        }
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
