//! A model-based property test of the scheduler: random sequences of fetched batches, jobs
//! taken, calls completed in any order with any outcome, dead-letter results, cancels,
//! revokes, assigns, stops and clock jumps, driven the way the engine drives it, against a
//! small reference model of what each plugin was given and has finished or dead-lettered.
//!
//! After every step: (a) no offset handed out to commit passes a message of the current
//! assignment that some lane has neither finished nor had dead-lettered; (b) each lane is
//! given each partition's messages in offset order, a retry (of exactly the failed ones) first,
//! one call per partition and at most `concurrency` calls at a time, and takes work whenever
//! there is some; (c) a lane queues at most `max_queued` messages, unless it took one larger
//! batch while empty; (d) the wheel holds only the entries the model can name: per (lane,
//! partition) at most one retry, one deadline and one dead-letter wait, plus the commit timer;
//! and the counters, effects, wakes and the ending match the model. At the end (nothing new
//! fetched, every call completed) every message is finished, dead-lettered, or was dropped by
//! a revoke, a stop, a failure or the closed intake, and every partition whose messages all
//! finished has its last offset handed out to commit.
//!
//! Lanes have no rate limit: the limiter reads the real clock, and the model's clock jumps.
//! Instants are whole milliseconds after the start, so the model knows which wheel entries
//! are due (the wheel rounds deadlines up and `now` down to the millisecond).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::tests::{batch_at, effects, ms, offsets_of, partition, retrying, Failure, Sched};
use super::{Effect, Ending, Job, Task, WriteBound, HELP_AFTER};
use crate::core::batch::Batch;
use crate::core::errors::Error;
use crate::core::lane::{Lane, LaneOptions, OnFailure};
use crate::core::offsets::Epoch;

const PARTITIONS: usize = 3;

#[derive(Clone, Copy, Debug)]
enum Policy {
    Stop,
    DeadLetter,
    RetryForever,
}

#[derive(Clone, Debug)]
struct LaneSpec {
    batch_size: usize,
    concurrency: usize,
    max_queued: usize,
    timeout_ms: Option<u64>,
    retries: u32,
    backoff_ms: u64,
    policy: Policy,
}

#[derive(Clone, Debug)]
struct Config {
    lanes: Vec<LaneSpec>,
    commit_ms: u64,
    /// The dead-letter producer's bound, if there is a producer.
    dead_letters: Option<WriteBound>,
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Success,
    /// Every message failed (no positions named).
    FailAll,
    /// The positions whose bits are set failed (none set: a partial failure of no message).
    Partial(u16),
    /// A position past the call's end is named: the whole call failed.
    OutOfRange,
    Fatal,
}

#[derive(Clone, Copy, Debug)]
enum Halt {
    Stop,
    SourceFailed,
    CloseIntake,
}

#[derive(Clone, Debug)]
enum Op {
    /// The source fetches `count` messages of a partition (an unassigned one: a batch sealed
    /// before its revoke); bit i of `gaps` skips an offset before the i-th. Held batches are
    /// offered first, and while any is held nothing new is fetched.
    Fetch {
        partition: usize,
        count: usize,
        gaps: u8,
    },
    /// A worker takes the next job.
    Take,
    /// The in-flight call at this index (modulo their number) returns.
    Complete {
        call: usize,
        outcome: Outcome,
    },
    /// The pending dead-letter write at this index is acknowledged, or fails.
    DeadLettered {
        write: usize,
        ok: bool,
    },
    /// The in-flight call at this index registers a cancel (an async call).
    RegisterCancel {
        call: usize,
    },
    /// Revokes the assigned partitions among these bits, as the engine does: drop their
    /// waiting work, revoke, commit the result.
    Revoke(u8),
    /// Assigns the unassigned partitions among these bits; each starts `skip` offsets past
    /// the group's commit (another member went on meanwhile).
    Assign {
        partitions: u8,
        skip: i64,
    },
    /// Kafka acknowledges the last commit handed out.
    Committed,
    SourceIdle(bool),
    Halt(Halt),
    CloseDeadLetters,
    /// Asks `ending()`.
    Ending,
    /// The clock moves on this many ms and the wheel is driven.
    Advance(u64),
}

/// What became of one message in one lane.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    /// Fetched but not in the lane: held by the source, or not admitted yet.
    Fetched,
    Waiting,
    Running,
    DeadLettering,
    Finished,
    DeadLettered,
    Dropped(Why),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Why {
    Revoke,
    Stop,
    /// Its call failed for good (stop policy, fatal, a failed dead-letter write).
    Failure,
    CloseIntake,
}

impl Fate {
    fn done(self) -> bool {
        matches!(self, Fate::Finished | Fate::DeadLettered)
    }

    fn is_final(self) -> bool {
        self.done() || matches!(self, Fate::Dropped(_))
    }
}

/// One assignment of a partition: every message fetched in it, with its fate per lane.
struct Assignment {
    partition: usize,
    /// Where fetching began (the group's commit, or past it).
    start: i64,
    messages: BTreeMap<i64, Vec<Fate>>,
}

struct Waiting {
    offset: i64,
    assignment: usize,
    batch: usize,
}

struct Retry {
    offsets: Vec<i64>,
    attempt: u32,
    assignment: usize,
    /// The backoff is between half its cap and its cap (equal jitter).
    not_before: Instant,
    due_by: Instant,
}

/// A lane's work on one partition, not running.
#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    retry: Option<Retry>,
}

struct InFlight {
    task: Task,
    partition: usize,
    assignment: usize,
    offsets: Vec<i64>,
    deadline: Option<Instant>,
    /// The deadline fell due (the wheel was driven past it).
    overdue: bool,
    cancel: Option<u64>,
}

impl InFlight {
    fn lane(&self) -> usize {
        self.task.lane
    }
}

struct PendingWrite {
    id: u64,
    lane: usize,
    partition: usize,
    assignment: usize,
    failed: Vec<i64>,
    /// The call's messages: the lane holds them all until the write ends.
    call_len: usize,
    started: Instant,
}

/// An effect the step must produce (warnings aside), in order.
#[derive(Debug, PartialEq)]
enum Expect {
    DeadLetter { lane: usize, partition: usize, assignment: usize, failed: Vec<i64>, call_len: usize, attempts: u32 },
    Discard(u64),
}

/// What each lane's counters must read.
#[derive(Default)]
struct Counts {
    batches: u64,
    messages: u64,
    errors: u64,
    retries: u64,
    dead_lettered: u64,
    overruns: u64,
    timeouts: u64,
}

#[allow(clippy::struct_excessive_bools)] // the run's independent flags, as the scheduler's
struct Model {
    sched: Sched,
    options: Vec<LaneOptions>,
    now: Instant,
    assignments: Vec<Assignment>,
    current: [Option<usize>; PARTITIONS],
    epochs: HashMap<Epoch, usize>,
    /// The next offset the source fetches, per partition.
    position: [i64; PARTITIONS],
    /// The group's committed offset, per partition: where its next assignment starts.
    group_committed: [Option<i64>; PARTITIONS],
    held: VecDeque<(Arc<Batch>, usize)>,
    /// The source holds batches a lane refused and sleeps: making room must wake it.
    source_waits: bool,
    next_batch: usize,
    queues: Vec<Vec<Queue>>,
    calls: Vec<InFlight>,
    writes: Vec<PendingWrite>,
    cancels_due: VecDeque<u64>,
    cancels_run: Arc<Mutex<Vec<u64>>>,
    next_cancel: u64,
    next_failure: u64,
    failure: Option<u64>,
    source_error: bool,
    stopping: bool,
    stop_began: bool,
    intake_closed: bool,
    idle: bool,
    dead_letters_open: bool,
    counts: Vec<Counts>,
    /// Per partition, this assignment: the last offset `take_commit` gave, the highest
    /// offset handed out any way.
    sent: [Option<i64>; PARTITIONS],
    handed: [Option<i64>; PARTITIONS],
    last_take: Vec<(usize, usize, i64)>,
    /// Per lane: the size of the batch it took while empty, while no other was added since.
    oversize: Vec<usize>,
    /// Per lane: it refused a batch and has not drained to half its bound since.
    full: Vec<bool>,
    /// When the driver of the wheel plans to wake.
    planned: Option<Instant>,
    ready_before: bool,
    expected: VecDeque<Expect>,
    /// Per lane and assignment, the last offset given for the first time.
    seen: HashMap<(usize, usize), i64>,
}

impl Model {
    fn new(config: &Config) -> Self {
        let options: Vec<LaneOptions> = config
            .lanes
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let mut options =
                    LaneOptions::new(&format!("lane{i}"), spec.batch_size, spec.concurrency, spec.max_queued);
                options.timeout = spec.timeout_ms.map(ms);
                let on_failure = match spec.policy {
                    Policy::Stop => OnFailure::Stop,
                    Policy::DeadLetter => OnFailure::DeadLetter(format!("dlq{i}")),
                    Policy::RetryForever => OnFailure::RetryForever,
                };
                retrying(options, spec.retries, ms(spec.backoff_ms), on_failure)
            })
            .collect();
        let start = Instant::now();
        let sched = Sched::new(options.clone(), ms(config.commit_ms), config.dead_letters, start).expect("valid lanes");
        let lanes = options.len();
        let mut model = Model {
            sched,
            now: start,
            assignments: Vec::new(),
            current: [None; PARTITIONS],
            epochs: HashMap::new(),
            position: [0; PARTITIONS],
            group_committed: [None; PARTITIONS],
            held: VecDeque::new(),
            source_waits: false,
            next_batch: 0,
            queues: (0..lanes).map(|_| (0..PARTITIONS).map(|_| Queue::default()).collect()).collect(),
            calls: Vec::new(),
            writes: Vec::new(),
            cancels_due: VecDeque::new(),
            cancels_run: Arc::default(),
            next_cancel: 0,
            next_failure: 0,
            failure: None,
            source_error: false,
            stopping: false,
            stop_began: false,
            intake_closed: false,
            idle: false,
            dead_letters_open: config.dead_letters.is_some(),
            counts: (0..lanes).map(|_| Counts::default()).collect(),
            sent: [None; PARTITIONS],
            handed: [None; PARTITIONS],
            last_take: Vec::new(),
            oversize: vec![0; lanes],
            full: vec![false; lanes],
            planned: None,
            ready_before: false,
            expected: VecDeque::new(),
            seen: HashMap::new(),
            options,
        };
        model.assign((0..PARTITIONS).collect(), 0);
        model
    }

    // --- the model's own bookkeeping ---------------------------------------------------------

    fn fates(&mut self, assignment: usize, offsets: &[i64], lane: usize, fate: Fate) {
        let messages = &mut self.assignments[assignment].messages;
        for offset in offsets {
            if let Some(fates) = messages.get_mut(offset) {
                fates[lane] = fate;
            }
        }
    }

    fn busy(&self, lane: usize, partition: usize) -> bool {
        self.calls.iter().any(|c| c.lane() == lane && c.partition == partition)
            || self.writes.iter().any(|w| w.lane == lane && w.partition == partition)
    }

    /// Calls holding the lane's concurrency: running, or writing dead letters.
    fn running(&self, lane: usize) -> usize {
        self.calls.iter().filter(|c| c.lane() == lane).count() + self.writes.iter().filter(|w| w.lane == lane).count()
    }

    /// Messages the lane holds: waiting, waiting for a retry, running or dead-lettering.
    fn queued(&self, lane: usize) -> usize {
        let waiting: usize =
            self.queues[lane].iter().map(|q| q.waiting.len() + q.retry.as_ref().map_or(0, |r| r.offsets.len())).sum();
        let calls: usize = self.calls.iter().filter(|c| c.lane() == lane).map(|c| c.offsets.len()).sum();
        let writes: usize = self.writes.iter().filter(|w| w.lane == lane).map(|w| w.call_len).sum();
        waiting + calls + writes
    }

    /// Whether the lane takes a batch of `len` now: an empty lane takes any; one that refused
    /// takes nothing more until drained to half its bound; otherwise up to its bound.
    fn admits(&self, lane: usize, len: usize) -> bool {
        let (queued, bound) = (self.queued(lane), self.options[lane].max_queued);
        queued == 0 || (!(self.full[lane] && queued > bound / 2) && queued + len <= bound)
    }

    /// Whether some lane could start a call now: the scheduler must hand one out.
    fn work_ready(&self) -> bool {
        (0..self.options.len()).any(|lane| {
            self.running(lane) < self.options[lane].concurrency
                && (0..PARTITIONS).any(|p| {
                    let queue = &self.queues[lane][p];
                    !self.busy(lane, p)
                        && queue.retry.as_ref().map_or(!queue.waiting.is_empty(), |r| self.now >= r.due_by)
                })
        })
    }

    /// Drops a lane's waiting work on a partition, its retry included.
    fn drop_waiting(&mut self, lane: usize, partition: usize, why: Why) {
        let queue = std::mem::take(&mut self.queues[lane][partition]);
        for waiting in queue.waiting {
            self.fates(waiting.assignment, &[waiting.offset], lane, Fate::Dropped(why));
        }
        if let Some(retry) = queue.retry {
            self.fates(retry.assignment, &retry.offsets, lane, Fate::Dropped(why));
        }
    }

    /// The group's offset after a commit of `offset`. Kafka applies commits in the order they
    /// were sent, and a partition's commits only grow: a late acknowledgement of an earlier
    /// asynchronous commit does not take it back.
    fn group_commits(&mut self, partition: usize, offset: i64) {
        self.group_committed[partition] = self.group_committed[partition].max(Some(offset));
    }

    fn begin_stop(&mut self) {
        if !self.stopping {
            self.stopping = true;
            self.stop_began = true;
        }
    }

    /// A call failed for good on `lane`: the lane's waiting work on the partition goes, and
    /// the run ends with the first such failure; later ones are discarded.
    fn fail_run(&mut self, lane: usize, partition: usize, failure: u64) {
        self.drop_waiting(lane, partition, Why::Stop);
        if self.failure.is_none() {
            self.failure = Some(failure);
        } else {
            self.expected.push_back(Expect::Discard(failure));
        }
        self.begin_stop();
    }

    // --- the steps ---------------------------------------------------------------------------

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Fetch { partition, count, gaps } => return self.fetch(partition, count, gaps),
            Op::Take => return self.take().map(|_| ()),
            Op::Complete { call, outcome } => self.complete(call, outcome),
            Op::DeadLettered { write, ok } => self.dead_lettered(write, ok),
            Op::RegisterCancel { call } => return self.register_cancel(call),
            Op::Revoke(bits) => return self.revoke(bits),
            Op::Assign { partitions, skip } => {
                let unassigned = (0..PARTITIONS).filter(|&p| partitions & (1 << p) != 0 && self.current[p].is_none());
                self.assign(unassigned.collect(), skip);
            }
            Op::Committed => self.committed(),
            Op::SourceIdle(idle) => {
                prop_assert_eq!(self.sched.source_idle(idle), self.idle != idle);
                self.idle = idle;
            }
            Op::Halt(halt) => self.halt(halt),
            Op::CloseDeadLetters => {
                self.sched.close_dead_letters();
                self.dead_letters_open = false;
            }
            Op::Ending => return self.ending(),
            Op::Advance(jump) => self.advance(ms(jump)),
        }
        Ok(())
    }

    fn fetch(&mut self, p: usize, count: usize, gaps: u8) -> Result<(), TestCaseError> {
        self.source_waits = false; // the source is awake
        if !self.held.is_empty() {
            return self.offer_held();
        }
        let mut offsets = Vec::with_capacity(count);
        let mut next = self.position.get(p).copied().unwrap_or_default();
        for i in 0..count {
            next += i64::from((gaps >> i) & 1);
            offsets.push(next);
            next += 1;
        }
        let batch = batch_at(p as i32, &offsets);
        let Some(assignment) = self.current.get(p).copied().flatten() else {
            // Sealed before its partition's revoke (or of one never assigned): dropped.
            prop_assert!(self.sched.submit(batch, self.now).is_ok(), "a batch of an unassigned partition is dropped");
            return Ok(());
        };
        self.position[p] = next;
        let lanes = self.options.len();
        let messages = &mut self.assignments[assignment].messages;
        messages.extend(offsets.iter().map(|&o| (o, vec![Fate::Fetched; lanes])));
        if self.held.iter().any(|(h, _)| h.partition() == batch.partition()) {
            self.held.push_back((batch, assignment)); // behind its partition's held batch
            return Ok(());
        }
        self.offer(batch, assignment)
    }

    /// Offers the held batches again, oldest first, as the source does.
    fn offer_held(&mut self) -> Result<(), TestCaseError> {
        let held = std::mem::take(&mut self.held);
        for (batch, assignment) in held {
            if self.held.iter().any(|(h, _)| h.partition() == batch.partition()) {
                self.held.push_back((batch, assignment));
            } else {
                self.offer(batch, assignment)?;
            }
        }
        Ok(())
    }

    fn offer(&mut self, batch: Arc<Batch>, assignment: usize) -> Result<(), TestCaseError> {
        let p = self.assignments[assignment].partition;
        let offsets: Vec<i64> = batch.iter().map(|m| m.offset).collect();
        let empty: Vec<bool> = (0..self.options.len()).map(|lane| self.queued(lane) == 0).collect();
        // Every lane is asked, so each full one marks itself full.
        let admits: Vec<bool> = (0..self.options.len()).map(|lane| self.admits(lane, offsets.len())).collect();
        let submitted = self.sched.submit(batch.clone(), self.now);
        if !self.intake_closed {
            prop_assert_eq!(submitted.is_ok(), admits.iter().all(|&a| a), "admitted? lanes: {:?}", admits);
            for (lane, admits) in admits.into_iter().enumerate() {
                self.full[lane] = !admits;
            }
        }
        match submitted {
            Ok(()) if self.intake_closed => {
                for lane in 0..self.options.len() {
                    self.fates(assignment, &offsets, lane, Fate::Dropped(Why::CloseIntake));
                }
            }
            Ok(()) => {
                let id = self.next_batch;
                self.next_batch += 1;
                for (lane, &was_empty) in empty.iter().enumerate() {
                    self.fates(assignment, &offsets, lane, Fate::Waiting);
                    let waiting = offsets.iter().map(|&offset| Waiting { offset, assignment, batch: id });
                    self.queues[lane][p].waiting.extend(waiting);
                    self.oversize[lane] = if was_empty { offsets.len() } else { 0 };
                }
            }
            Err(refused) => {
                prop_assert!(Arc::ptr_eq(&refused, &batch), "the refused batch comes back");
                self.held.push_back((refused, assignment));
                self.source_waits = true;
            }
        }
        Ok(())
    }

    /// The source drops the batches it holds of `partitions` (all if `None`).
    fn drop_held(&mut self, partitions: Option<&[usize]>, why: Why) {
        let (dropped, kept) = std::mem::take(&mut self.held).into_iter().partition::<VecDeque<_>, _>(|(batch, _)| {
            partitions.is_none_or(|ps| ps.contains(&(batch.partition().partition as usize)))
        });
        self.held = kept;
        for (batch, assignment) in dropped {
            let offsets: Vec<i64> = batch.iter().map(|m| m.offset).collect();
            for lane in 0..self.options.len() {
                self.fates(assignment, &offsets, lane, Fate::Dropped(why));
            }
        }
    }

    /// A worker asks for a job; returns whether it got one.
    fn take(&mut self) -> Result<bool, TestCaseError> {
        match self.sched.next_job(self.now) {
            Some(Job::Cancel(cancel)) => {
                let expected = self.cancels_due.pop_front();
                prop_assert!(expected.is_some(), "a cancel no deadline asked for");
                cancel();
                let ran = self.cancels_run.lock().unwrap_or_else(PoisonError::into_inner).last().copied();
                prop_assert_eq!(ran, expected, "cancels run in the order their deadlines fell due");
            }
            Some(Job::Call(task)) => {
                prop_assert!(self.cancels_due.is_empty(), "cancels come before calls");
                prop_assert!(!self.stopping, "a call started after the stop");
                self.started(task)?;
            }
            None => {
                prop_assert!(self.cancels_due.is_empty(), "a cancel is due");
                prop_assert!(self.stopping || !self.work_ready(), "work is ready but no job was handed out");
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn started(&mut self, task: Task) -> Result<(), TestCaseError> {
        let (lane, p) = (task.lane, task.chunk.batch.partition().partition as usize);
        let offsets = offsets_of(&task);
        prop_assert!(!self.busy(lane, p), "a second call on lane {} partition {}", lane, p);
        prop_assert!(self.running(lane) < self.options[lane].concurrency, "lane {} past its concurrency", lane);
        let assignment = self.epochs.get(&task.chunk.epoch).copied();
        let queue = &mut self.queues[lane][p];
        if let Some(retry) = queue.retry.take() {
            prop_assert_eq!(&offsets, &retry.offsets, "a retry is of the failed messages");
            prop_assert_eq!(task.chunk.attempt, retry.attempt);
            prop_assert_eq!(assignment, Some(retry.assignment));
            prop_assert!(self.now >= retry.not_before, "a retry started before its backoff");
        } else {
            let head = queue.waiting.front().map(|w| (w.batch, w.assignment));
            prop_assert!(head.is_some(), "a call on lane {} partition {} with nothing waiting", lane, p);
            let (batch, head_assignment) = head.unwrap_or_default();
            let same_batch = queue.waiting.iter().take_while(|w| w.batch == batch).count();
            let expected: Vec<i64> =
                queue.waiting.drain(..same_batch.min(self.options[lane].batch_size)).map(|w| w.offset).collect();
            prop_assert_eq!(&offsets, &expected, "lane {} is given partition {}'s next messages", lane, p);
            prop_assert_eq!(task.chunk.attempt, 1);
            prop_assert_eq!(assignment, Some(head_assignment));
            let last = self.seen.insert((lane, head_assignment), offsets[offsets.len() - 1]);
            prop_assert!(last.is_none_or(|last| last < offsets[0]), "offsets go back on lane {}", lane);
        }
        prop_assert!(offsets.windows(2).all(|w| w[0] < w[1]));
        let assignment = assignment.unwrap_or_default();
        self.fates(assignment, &offsets, lane, Fate::Running);
        let deadline = self.options[lane].timeout.map(|timeout| self.now + timeout);
        prop_assert_eq!(task.deadline, deadline);
        self.calls.push(InFlight { task, partition: p, assignment, offsets, deadline, overdue: false, cancel: None });
        Ok(())
    }

    fn complete(&mut self, index: usize, outcome: Outcome) {
        if self.calls.is_empty() {
            return;
        }
        let call = self.calls.swap_remove(index % self.calls.len());
        let (lane, p, assignment, len) = (call.lane(), call.partition, call.assignment, call.offsets.len());
        let counts = &mut self.counts[lane];
        counts.batches += 1;
        counts.messages += len as u64;
        let id = self.next_failure;
        let failure = match outcome {
            Outcome::Success => None,
            Outcome::FailAll => Some(Failure::all(id)),
            Outcome::Partial(bits) => {
                Some(Failure::at(id, &(0..len).filter(|i| bits & (1 << i) != 0).collect::<Vec<_>>()))
            }
            Outcome::OutOfRange => Some(Failure::at(id, &[0, len])),
            Outcome::Fatal => Some(Failure { id, positions: None, fatal: true }),
        };
        if failure.is_some() {
            self.next_failure += 1;
            counts.errors += 1;
        }
        match &failure {
            None => self.fates(assignment, &call.offsets, lane, Fate::Finished),
            Some(f) if f.fatal => {
                self.fates(assignment, &call.offsets, lane, Fate::Dropped(Why::Failure));
                self.fail_run(lane, p, id);
            }
            Some(_) if self.current[p] != Some(assignment) => {
                // Revoked while it ran: not retried, not dead-lettered.
                self.fates(assignment, &call.offsets, lane, Fate::Dropped(Why::Revoke));
            }
            Some(f) => self.failed(&call, f, id),
        }
        self.sched.complete(call.task, failure.map_or(Ok(()), Err), ms(1), self.now);
    }

    /// What the lane's policy makes of a failure of the current assignment.
    fn failed(&mut self, call: &InFlight, failure: &Failure, id: u64) {
        let (lane, p, assignment, len) = (call.lane(), call.partition, call.assignment, call.offsets.len());
        let failed: Vec<usize> = match &failure.positions {
            Some(positions) if positions.iter().all(|&i| i < len) => {
                let mut positions = positions.clone();
                positions.sort_unstable();
                positions.dedup();
                positions
            }
            _ => (0..len).collect(),
        };
        let (mut failed_offsets, mut succeeded) = (Vec::new(), Vec::new());
        for (i, &offset) in call.offsets.iter().enumerate() {
            if failed.contains(&i) {
                failed_offsets.push(offset);
            } else {
                succeeded.push(offset);
            }
        }
        self.fates(assignment, &succeeded, lane, Fate::Finished);
        if failed_offsets.is_empty() {
            return;
        }
        let policy = self.options[lane].retry.clone();
        let attempt = call.task.chunk.attempt;
        if policy.retries_after(attempt) {
            let cap =
                policy.first_backoff.saturating_mul(1 << attempt.saturating_sub(1).min(31)).min(policy.max_backoff);
            self.counts[lane].retries += 1;
            self.fates(assignment, &failed_offsets, lane, Fate::Waiting);
            self.queues[lane][p].retry = Some(Retry {
                offsets: failed_offsets,
                attempt: attempt + 1,
                assignment,
                not_before: self.now + cap / 2,
                due_by: self.now + cap,
            });
        } else if matches!(policy.on_failure, OnFailure::DeadLetter(_)) && self.dead_letters_open {
            self.fates(assignment, &failed_offsets, lane, Fate::DeadLettering);
            let write = Expect::DeadLetter {
                lane,
                partition: p,
                assignment,
                failed: failed_offsets,
                call_len: len,
                attempts: attempt,
            };
            self.expected.push_back(write);
            self.expected.push_back(Expect::Discard(id));
        } else {
            self.fates(assignment, &failed_offsets, lane, Fate::Dropped(Why::Failure));
            self.fail_run(lane, p, id);
        }
    }

    fn dead_lettered(&mut self, index: usize, ok: bool) {
        if self.writes.is_empty() {
            return;
        }
        let write = self.writes.swap_remove(index % self.writes.len());
        let result = if ok {
            self.fates(write.assignment, &write.failed, write.lane, Fate::DeadLettered);
            self.counts[write.lane].dead_lettered += write.failed.len() as u64;
            Ok(())
        } else {
            self.fates(write.assignment, &write.failed, write.lane, Fate::Dropped(Why::Failure));
            self.source_error = true;
            self.begin_stop();
            Err(Error::Internal("the broker is gone".into()))
        };
        self.sched.dead_lettered(write.id, result, self.now);
    }

    fn register_cancel(&mut self, index: usize) -> Result<(), TestCaseError> {
        let Some(call) = self.calls.iter_mut().filter(|c| c.cancel.is_none()).nth(index) else {
            return Ok(());
        };
        let id = self.next_cancel;
        self.next_cancel += 1;
        let ran = self.cancels_run.clone();
        let cancel = Box::new(move || ran.lock().unwrap_or_else(PoisonError::into_inner).push(id));
        let back = self.sched.register_cancel(call.task.call, cancel);
        call.cancel = Some(id);
        let lane = call.task.lane;
        match back {
            Some(cancel) => {
                prop_assert!(call.overdue, "a cancel handed back before the deadline");
                let counts = &mut self.counts[lane];
                counts.overruns -= 1;
                counts.timeouts += 1;
                cancel();
            }
            None => prop_assert!(!call.overdue, "an overdue call's cancel must be handed back"),
        }
        Ok(())
    }

    fn revoke(&mut self, bits: u8) -> Result<(), TestCaseError> {
        let revoked: Vec<usize> =
            (0..PARTITIONS).filter(|&p| bits & (1 << p) != 0 && self.current[p].is_some()).collect();
        if revoked.is_empty() {
            return Ok(());
        }
        let partitions: Vec<_> = revoked.iter().map(|&p| partition(p as i32)).collect();
        self.sched.drop_waiting(Some(&partitions));
        for &p in &revoked {
            for lane in 0..self.options.len() {
                self.drop_waiting(lane, p, Why::Revoke);
            }
        }
        let offsets = self.sched.revoke(&partitions);
        self.handed_out(&offsets)?;
        // Committed synchronously while the partitions are still ours.
        self.sched.committed(&offsets);
        for (partition, offset) in &offsets {
            self.group_commits(partition.partition as usize, *offset);
        }
        for &p in &revoked {
            self.current[p] = None;
        }
        self.drop_held(Some(&revoked), Why::Revoke);
        Ok(())
    }

    fn assign(&mut self, partitions: Vec<usize>, skip: i64) {
        if partitions.is_empty() {
            return;
        }
        self.sched.assign(partitions.iter().map(|&p| partition(p as i32)).collect());
        for p in partitions {
            let start = self.group_committed[p].unwrap_or(0) + skip;
            let id = self.assignments.len();
            self.assignments.push(Assignment { partition: p, start, messages: BTreeMap::new() });
            let epoch = self.sched.tracker.epoch(&partition(p as i32)).expect("assigned");
            self.epochs.insert(epoch, id);
            self.current[p] = Some(id);
            self.position[p] = start;
            self.sent[p] = None;
            self.handed[p] = None;
        }
    }

    fn committed(&mut self) {
        let still_ours: Vec<_> =
            self.last_take.drain(..).filter(|&(p, assignment, _)| self.current[p] == Some(assignment)).collect();
        let offsets: Vec<_> = still_ours.iter().map(|&(p, _, offset)| (partition(p as i32), offset)).collect();
        self.sched.committed(&offsets);
        for (p, _, offset) in still_ours {
            self.group_commits(p, offset);
        }
    }

    fn halt(&mut self, halt: Halt) {
        match halt {
            Halt::Stop => self.sched.stop(),
            Halt::SourceFailed => {
                self.sched.source_failed(Error::Internal("the source failed".into()));
                self.source_error = true;
            }
            Halt::CloseIntake => {
                self.sched.close_intake();
                self.intake_closed = true;
                self.drop_held(None, Why::CloseIntake); // the source holds nothing at shutdown
                for lane in 0..self.options.len() {
                    for p in 0..PARTITIONS {
                        self.drop_waiting(lane, p, Why::CloseIntake);
                    }
                }
            }
        }
        self.begin_stop();
    }

    fn ending(&mut self) -> Result<(), TestCaseError> {
        let ending = self.sched.ending();
        if let Some(id) = self.failure.take() {
            prop_assert!(matches!(ending, Some(Ending::Failed(Failure { id: got, .. })) if got == id), "{:?}", ending);
        } else if std::mem::take(&mut self.source_error) {
            prop_assert!(matches!(ending, Some(Ending::SourceFailed(_))), "{:?}", ending);
        } else if self.stopping {
            prop_assert!(matches!(ending, Some(Ending::Stopped)), "{:?}", ending);
        } else if self.idle && (0..self.options.len()).all(|l| self.queued(l) == 0 && self.running(l) == 0) {
            prop_assert!(matches!(ending, Some(Ending::Drained)), "{:?}", ending);
        } else {
            prop_assert!(ending.is_none(), "{:?}", ending);
        }
        Ok(())
    }

    fn advance(&mut self, jump: Duration) {
        self.now += jump;
        self.sched.handle_timeout(self.now);
        let now = self.now;
        let mut due: Vec<&mut InFlight> =
            self.calls.iter_mut().filter(|c| !c.overdue && c.deadline.is_some_and(|d| d <= now)).collect();
        // The wheel fires in deadline order, calls of one tick in the order they started.
        due.sort_by_key(|c| (c.deadline, c.task.call));
        for call in due {
            call.overdue = true;
            let counts = &mut self.counts[call.task.lane];
            match call.cancel {
                Some(cancel) => {
                    counts.timeouts += 1;
                    self.cancels_due.push_back(cancel);
                }
                None => counts.overruns += 1,
            }
        }
    }

    // --- the checks after every step ---------------------------------------------------------

    fn check(&mut self, op: &Op) -> Result<(), TestCaseError> {
        self.check_effects()?;
        self.check_wakes(op)?;
        self.check_commits()?;
        self.check_lanes()?;
        self.check_wheel()
    }

    fn check_effects(&mut self) -> Result<(), TestCaseError> {
        for effect in effects(&mut self.sched) {
            match effect {
                Effect::Warn(_) => {}
                Effect::DeadLetterWaiting(wait) => {
                    let waiting = self.writes.iter().any(|w| {
                        w.started == wait.started
                            && self.options[w.lane].name == wait.plugin
                            && wait.waited > Duration::ZERO
                    });
                    prop_assert!(waiting, "a warning for no pending write: {:?}", wait);
                }
                Effect::Discard(failure) => {
                    prop_assert_eq!(self.expected.pop_front(), Some(Expect::Discard(failure.id)));
                }
                Effect::DeadLetter(write) => {
                    let expected = self.expected.pop_front();
                    let Some(Expect::DeadLetter { lane, partition, assignment, failed, call_len, attempts }) = expected
                    else {
                        return Err(TestCaseError::fail(format!(
                            "unexpected dead letters {write:?}, expected {expected:?}"
                        )));
                    };
                    let offsets: Vec<i64> = write.indexes.iter().map(|&i| write.batch.get(i).offset).collect();
                    prop_assert_eq!(&offsets, &failed);
                    prop_assert_eq!(write.batch.partition().partition as usize, partition);
                    prop_assert_eq!((write.info.attempts, &write.info.plugin), (attempts, &self.options[lane].name));
                    prop_assert_eq!(&write.topic, &format!("dlq{lane}"));
                    let started = self.now;
                    self.writes.push(PendingWrite {
                        id: write.write,
                        lane,
                        partition,
                        assignment,
                        failed,
                        call_len,
                        started,
                    });
                }
            }
        }
        prop_assert!(self.expected.is_empty(), "effects missing: {:?}", self.expected);
        Ok(())
    }

    fn check_wakes(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let wakes = self.sched.take_wakes();
        prop_assert_eq!(wakes.stopped, std::mem::take(&mut self.stop_began), "a stop wakes once, when it begins");
        // A worker sleeps once it found nothing; whatever makes work ready must wake one (a
        // worker asking needs no wake).
        let ready = !self.sched.cancels.is_empty() || (!self.stopping && self.sched.lanes.iter().any(Lane::has_ready));
        if !matches!(op, Op::Take) && ready && !self.ready_before {
            prop_assert!(wakes.workers > 0, "work became ready and no worker was woken");
        }
        self.ready_before = ready;
        // Ready work that waits behind running calls wakes more workers within HELP_AFTER.
        if ready {
            prop_assert!(
                self.sched.help_due.is_some_and(|at| at <= self.now + HELP_AFTER),
                "work is ready and no help is due within HELP_AFTER"
            );
        }
        // The driver sleeps until its planned wake: an entry due before must wake it. Woken,
        // it drives the wheel and plans again. The source is the driver: it drives the wheel
        // right after a fetch.
        let fetched = matches!(op, Op::Fetch { .. });
        let drove = matches!(op, Op::Advance(_)) || fetched;
        let next = self.sched.poll_timeout();
        if !drove && next.is_some_and(|n| self.planned.is_none_or(|planned| n < planned)) {
            prop_assert!(wakes.driver || wakes.stopped, "an earlier wheel entry and the driver was not woken");
        }
        if fetched || (!drove && (wakes.driver || wakes.stopped)) {
            self.sched.handle_timeout(self.now); // nothing falls due: the clock did not move
        }
        if drove || wakes.driver || wakes.stopped {
            self.planned = self.sched.poll_timeout();
        }
        // The driver is the source: while it sleeps on batches a lane refused, room for one
        // must wake it. A rebalance, a commit's result and the wheel run on its thread, which
        // then offers what it holds; a fetch offers it first. Once stopping it takes nothing.
        let woken = wakes.driver || wakes.stopped;
        if self.source_waits && !woken && !self.stopping && !matches!(op, Op::Fetch { .. }) {
            let room = self.held.iter().any(|(batch, _)| (0..self.options.len()).all(|l| self.admits(l, batch.len())));
            let on_source =
                matches!(op, Op::Revoke(_) | Op::Assign { .. } | Op::Committed | Op::SourceIdle(_) | Op::Advance(_));
            prop_assert!(!room || on_source, "a lane has room for a held batch and the source was not woken");
            self.source_waits = !room;
        }
        if woken {
            self.source_waits = false;
        }
        Ok(())
    }

    /// (a) on every offset handed out: a commit never passes a message some lane has not
    /// finished or had dead-lettered, in the partition's current assignment.
    fn handed_out(&mut self, offsets: &[(crate::core::batch::Partition, i64)]) -> Result<(), TestCaseError> {
        for (partition, offset) in offsets {
            let p = partition.partition as usize;
            let assignment = self.current[p];
            prop_assert!(assignment.is_some(), "an offset of unassigned partition {}", p);
            let assignment = &self.assignments[assignment.unwrap_or_default()];
            let unfinished = assignment.messages.range(..offset).find(|(_, fates)| !fates.iter().all(|f| f.done()));
            prop_assert!(unfinished.is_none(), "commit {} of partition {} passes {:?}", offset, p, unfinished);
            prop_assert!(
                *offset > assignment.start && *offset <= self.position[p],
                "commit {} of partition {}",
                offset,
                p
            );
            self.handed[p] = self.handed[p].max(Some(*offset));
        }
        Ok(())
    }

    fn check_commits(&mut self) -> Result<(), TestCaseError> {
        let due = self.sched.take_commit();
        self.handed_out(&due)?;
        for (partition, offset) in &due {
            let p = partition.partition as usize;
            prop_assert!(self.sent[p].is_none_or(|sent| sent < *offset), "take_commit gave {} again", offset);
            self.sent[p] = Some(*offset);
        }
        if !due.is_empty() {
            let current = self.current;
            let taken = due.iter().map(|(partition, offset)| (partition.partition as usize, *offset));
            self.last_take = taken.map(|(p, offset)| (p, current[p].unwrap_or_default(), offset)).collect();
        }
        let uncommitted = self.sched.offsets_to_commit();
        self.handed_out(&uncommitted)
    }

    /// (c) and the counters.
    fn check_lanes(&self) -> Result<(), TestCaseError> {
        for (lane, counts) in self.counts.iter().enumerate() {
            let stats = &self.sched.lanes[lane].stats;
            let queued = self.queued(lane);
            prop_assert_eq!(stats.queued, queued as u64, "lane {} queued", lane);
            let bound = self.options[lane].max_queued.max(self.oversize[lane]);
            prop_assert!(queued <= bound, "lane {} holds {} messages, bound {}", lane, queued, bound);
            prop_assert_eq!(stats.in_flight, self.running(lane) as u64, "lane {} in flight", lane);
            let got = (stats.batches, stats.messages, stats.errors, stats.retries, stats.dead_lettered);
            let want = (counts.batches, counts.messages, counts.errors, counts.retries, counts.dead_lettered);
            prop_assert_eq!(got, want, "lane {}: batches, messages, errors, retries, dead-lettered", lane);
            prop_assert_eq!((stats.overruns, stats.timeouts), (counts.overruns, counts.timeouts), "lane {}", lane);
        }
        Ok(())
    }

    /// (d): per (lane, partition) at most one retry, one deadline and one dead-letter wait
    /// (the lane runs one call per partition), plus the commit timer and one help entry;
    /// and none missing.
    fn check_wheel(&self) -> Result<(), TestCaseError> {
        let retries = self.queues.iter().flatten().filter_map(|q| q.retry.as_ref());
        let (mut surely_pending, mut maybe_pending) = (0, 0);
        for retry in retries {
            maybe_pending += 1;
            surely_pending += usize::from(self.now < retry.not_before);
        }
        let deadlines = self.calls.iter().filter(|c| c.deadline.is_some() && !c.overdue).count();
        let help = usize::from(self.sched.help_due.is_some());
        let certain = deadlines + self.writes.len() + help;
        let entries = self.sched.timers.len();
        prop_assert!(
            entries >= certain + surely_pending && entries <= certain + maybe_pending + 1,
            "{} wheel entries: {} deadlines, {} dead-letter waits, {}..={} retries, a commit, help",
            entries,
            deadlines,
            self.writes.len(),
            surely_pending,
            maybe_pending
        );
        Ok(())
    }

    // --- the end -----------------------------------------------------------------------------

    /// Takes nothing new, completes everything, and checks (e).
    fn finish(&mut self) -> Result<(), TestCaseError> {
        let mut rounds = 0;
        loop {
            rounds += 1;
            prop_assert!(rounds < 1_000, "the run does not settle");
            if !self.held.is_empty() {
                self.step(&Op::Fetch { partition: 0, count: 1, gaps: 0 })?;
            }
            while self.take()? {
                self.check(&Op::Take)?;
            }
            self.check(&Op::Take)?;
            while !self.calls.is_empty() {
                self.step(&Op::Complete { call: 0, outcome: Outcome::Success })?;
            }
            while !self.writes.is_empty() {
                self.step(&Op::DeadLettered { write: 0, ok: true })?;
            }
            let waiting = self.queues.iter().flatten().any(|q| !q.waiting.is_empty() || q.retry.is_some());
            // Once stopped nothing starts: what waits is dropped by the close below.
            if self.stopping || (self.held.is_empty() && !waiting) {
                break;
            }
            // Past every backoff (at most 8 times the first, 200 ms at most) and deadline.
            self.step(&Op::Advance(2_000))?;
        }
        if !self.stopping {
            self.step(&Op::SourceIdle(true))?;
            self.step(&Op::Ending)?;
        }
        self.step(&Op::Halt(Halt::CloseIntake))?;
        self.step(&Op::Advance(1_000))?; // past the commit interval: the last commit falls due
        self.check_settled()
    }

    fn check_settled(&self) -> Result<(), TestCaseError> {
        let s = &self.sched;
        prop_assert!(s.running() == 0 && s.lanes.iter().all(Lane::is_empty), "lanes still hold work");
        prop_assert!(s.calls.is_empty() && s.dead_letter_writes.is_empty() && s.cancels.is_empty());
        prop_assert_eq!(s.timers.len(), 0, "wheel entries left");
        for assignment in &self.assignments {
            for (offset, fates) in &assignment.messages {
                prop_assert!(
                    fates.iter().all(|f| f.is_final()),
                    "partition {} offset {}: {:?}",
                    assignment.partition,
                    offset,
                    fates
                );
            }
        }
        // Liveness: a partition whose messages all finished has its last offset committed by
        // the commit timer (or known committed, by a revoke's), and handed out for the close.
        for p in 0..PARTITIONS {
            let Some(assignment) = self.current[p].map(|a| &self.assignments[a]) else { continue };
            let Some((&last, _)) = assignment.messages.last_key_value() else { continue };
            if assignment.messages.values().all(|fates| fates.iter().all(|f| f.done())) {
                let end = Some(last + 1);
                prop_assert!(self.sent[p] == end || self.group_committed[p] == end, "partition {} not committed", p);
                prop_assert_eq!(self.handed[p], end, "partition {} finished everything", p);
            }
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        self.apply(op)?;
        self.check(op)
    }
}

// --- the strategies --------------------------------------------------------------------------

fn lane_spec() -> impl Strategy<Value = LaneSpec> {
    let policy = prop_oneof![1 => Just(Policy::Stop), 3 => Just(Policy::DeadLetter), 3 => Just(Policy::RetryForever)];
    (1..=6usize, 1..=3usize, 2..=24usize, proptest::option::weighted(0.5, 10..300u64), 0..=2u32, 1..=25u64, policy)
        .prop_map(|(batch_size, concurrency, max_queued, timeout_ms, retries, backoff_ms, policy)| LaneSpec {
            batch_size,
            concurrency,
            max_queued,
            timeout_ms,
            retries,
            backoff_ms,
            policy,
        })
}

fn config() -> impl Strategy<Value = Config> {
    let bound = proptest::option::weighted(0.6, (300..10_000u64).prop_map(ms));
    let dead_letters = proptest::option::weighted(0.85, bound.prop_map(WriteBound));
    (proptest::collection::vec(lane_spec(), 1..=3), 1..=300u64, dead_letters)
        .prop_map(|(lanes, commit_ms, dead_letters)| Config { lanes, commit_ms, dead_letters })
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        150 => Just(Outcome::Success),
        10 => Just(Outcome::FailAll),
        15 => any::<u16>().prop_map(Outcome::Partial),
        2 => Just(Outcome::OutOfRange),
        1 => Just(Outcome::Fatal),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let halt = prop_oneof![Just(Halt::Stop), Just(Halt::SourceFailed), Just(Halt::CloseIntake)];
    let jump = prop_oneof![6 => 0..30u64, 3 => 30..600u64, 1 => 1_000..120_000u64];
    prop_oneof![
        8 => (0..PARTITIONS + 1, 1..=8usize, any::<u8>()).prop_map(|(partition, count, gaps)| Op::Fetch { partition, count, gaps }),
        20 => Just(Op::Take),
        20 => (any::<usize>(), outcome()).prop_map(|(call, outcome)| Op::Complete { call, outcome }),
        3 => (any::<usize>(), proptest::bool::weighted(0.95)).prop_map(|(write, ok)| Op::DeadLettered { write, ok }),
        2 => (0..4usize).prop_map(|call| Op::RegisterCancel { call }),
        1 => any::<u8>().prop_map(Op::Revoke),
        3 => (any::<u8>(), prop_oneof![3 => Just(0i64), 1 => 1..5i64]).prop_map(|(partitions, skip)| Op::Assign { partitions, skip }),
        2 => Just(Op::Committed),
        1 => any::<bool>().prop_map(Op::SourceIdle),
        1 => Just(Op::Ending),
        6 => jump.prop_map(Op::Advance),
        // Rare: each ends the interesting part of a run.
        1 => prop_oneof![30 => Just(None), 1 => halt.prop_map(Some)].prop_map(|h| h.map_or(Op::Ending, Op::Halt)),
        1 => prop_oneof![30 => Just(Op::Ending), 1 => Just(Op::CloseDeadLetters)],
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn matches_a_model(config in config(), ops in proptest::collection::vec(op(), 1..500)) {
        let mut model = Model::new(&config);
        for op in &ops {
            model.step(op)?;
        }
        model.finish()?;
    }
}
