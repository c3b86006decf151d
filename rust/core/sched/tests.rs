//! The scheduler event by event, with no broker and no Python: each test feeds a few events
//! and reads what comes out (jobs, offsets to commit, effects, wakes, the ending). Instants
//! are whole milliseconds after the scheduler's start, so the wheel fires each entry exactly
//! on its tick. The fixtures at the top are shared with the model test (`super::model`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CallFailure, Effect, Ending, Job, Late, Scheduler, Task, Wakes, WriteBound, HELP_AFTER};
use crate::core::batch::testing::{batch, Message};
use crate::core::batch::{Batch, BatchBuilder, Partition};
use crate::core::errors::Error;
use crate::core::lane::{LaneOptions, OnFailure, RetryPolicy};

// --- fixtures ----------------------------------------------------------------------------

/// A plugin's failure: `id` tells failures apart; `positions` are the call's failed
/// messages (`None`: all of them).
#[derive(Debug, PartialEq)]
pub(super) struct Failure {
    pub(super) id: u64,
    pub(super) positions: Option<Vec<usize>>,
    pub(super) fatal: bool,
}

impl Failure {
    pub(super) fn all(id: u64) -> Self {
        Failure { id, positions: None, fatal: false }
    }

    pub(super) fn at(id: u64, positions: &[usize]) -> Self {
        Failure { id, positions: Some(positions.to_vec()), fatal: false }
    }

    fn fatal(id: u64) -> Self {
        Failure { id, positions: None, fatal: true }
    }
}

impl CallFailure for Failure {
    fn failed_positions(&self) -> Option<&[usize]> {
        self.positions.as_deref()
    }

    fn kind(&self) -> String {
        "TestFailure".into()
    }

    fn detail(&self) -> String {
        format!("failure {}", self.id)
    }

    fn fatal(&self) -> bool {
        self.fatal
    }
}

pub(super) type Sched = Scheduler<Failure>;

pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(super) fn partition(index: i32) -> Partition {
    Partition { topic: Arc::from("t"), partition: index }
}

/// A batch of `partition` holding exactly `offsets` (increasing; gaps allowed).
pub(super) fn batch_at(partition_index: i32, offsets: &[i64]) -> Arc<Batch> {
    let mut builder = BatchBuilder::new(partition(partition_index));
    for &offset in offsets {
        builder.push(&Message::at(offset));
    }
    builder.take()
}

/// A lane that retries `retries` times with backoffs from `first_backoff`, then `on_failure`.
pub(super) fn retrying(
    mut options: LaneOptions,
    retries: u32,
    first_backoff: Duration,
    on_failure: OnFailure,
) -> LaneOptions {
    options.retry = RetryPolicy { retries, first_backoff, max_backoff: first_backoff * 8, on_failure };
    options
}

/// The call's messages, as offsets.
pub(super) fn offsets_of(task: &Task) -> Vec<i64> {
    task.chunk.indexes().into_iter().map(|i| task.chunk.batch.get(i).offset).collect()
}

pub(super) fn effects(sched: &mut Sched) -> Vec<Effect<Failure>> {
    std::iter::from_fn(|| sched.poll_effect()).collect()
}

const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// A scheduler with a dead-letter producer of no bound, at `start`, with `partitions`
/// assigned and the wakes of that taken.
fn sched_with(lanes: Vec<LaneOptions>, partitions: &[i32]) -> (Sched, Instant) {
    let start = Instant::now();
    let mut sched = Sched::new(lanes, COMMIT_INTERVAL, Some(WriteBound(None)), start).expect("valid lanes");
    sched.assign(partitions.iter().map(|&p| partition(p)).collect());
    sched.take_wakes();
    (sched, start)
}

fn lane(name: &str, batch_size: usize) -> LaneOptions {
    LaneOptions::new(name, batch_size, 4, 1_000)
}

fn call(sched: &mut Sched, now: Instant) -> Task {
    match sched.next_job(now) {
        Some(Job::Call(task)) => task,
        other => panic!("expected a call, got {other:?}"),
    }
}

/// The next call, which must be lane `lane`'s on `partition_index`.
fn call_on(sched: &mut Sched, now: Instant, lane: usize, partition_index: i32) -> Task {
    let task = call(sched, now);
    assert_eq!((task.lane, task.chunk.batch.partition().partition), (lane, partition_index), "{task:?}");
    task
}

fn no_job(sched: &mut Sched, now: Instant) {
    if let Some(job) = sched.next_job(now) {
        panic!("expected no job, got {job:?}");
    }
}

/// Submits at `now`: the source drives the wheel right after (and `Timer::Help` is due
/// `HELP_AFTER` later).
fn submit(sched: &mut Sched, batch: Arc<Batch>, now: Instant) {
    sched.submit(batch, now).expect("admitted");
}

fn succeed(sched: &mut Sched, task: Task, now: Instant) {
    sched.complete(task, Ok(()), ms(1), now);
}

fn fail(sched: &mut Sched, task: Task, failure: Failure, now: Instant) {
    sched.complete(task, Err(failure), ms(1), now);
}

/// The offsets a commit timer firing at `now` hands out.
fn commit_at(sched: &mut Sched, now: Instant) -> Vec<(Partition, i64)> {
    sched.handle_timeout(now);
    sorted(sched.take_commit())
}

fn sorted(mut offsets: Vec<(Partition, i64)>) -> Vec<(Partition, i64)> {
    offsets.sort();
    offsets
}

fn committable(sched: &Sched) -> Vec<(Partition, i64)> {
    sorted(sched.offsets_to_commit())
}

fn warnings(effects: &[Effect<Failure>]) -> Vec<&str> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Warn(message) => Some(message.as_str()),
            _ => None,
        })
        .collect()
}

/// A cancel that records that it ran.
fn cancel_flag() -> (Box<dyn FnOnce() + Send>, Arc<AtomicBool>) {
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    (Box::new(move || flag.store(true, Ordering::SeqCst)), ran)
}

// --- submit --------------------------------------------------------------------------------

#[test]
fn an_assigned_batch_goes_to_every_lane_and_wakes_a_worker_per_lane() {
    let (mut s, start) = sched_with(vec![lane("a", 10), lane("b", 10)], &[0]);
    submit(&mut s, batch(0, 0, 5), start);
    assert_eq!(s.take_wakes(), Wakes { workers: 2, helpers: 0, driver: false, stopped: false });
    assert_eq!(s.lanes.iter().map(|l| l.stats.queued).collect::<Vec<_>>(), [5, 5]);
    let snapshot = s.snapshot(start, &|_| None);
    assert_eq!(snapshot.admitted, 5);
    assert_eq!(snapshot.partitions[0].position, Some(5), "the next offset to fetch");
}

#[test]
fn a_full_lane_refuses_the_batch_for_every_lane_and_wakes_the_source_once_half_empty() {
    let (mut s, start) = sched_with(vec![LaneOptions::new("small", 10, 1, 10), lane("big", 10)], &[0]);
    submit(&mut s, batch(0, 0, 8), start);
    let refused = batch(0, 8, 5);
    let back = s.submit(refused.clone(), start).expect_err("8 + 5 > 10");
    assert!(Arc::ptr_eq(&back, &refused), "the same batch comes back, for the source to hold");
    assert_eq!(s.lanes[1].stats.queued, 8, "no lane took it");
    s.take_wakes();
    let task = call(&mut s, start);
    assert_eq!(task.lane, 0);
    succeed(&mut s, task, start);
    assert!(s.take_wakes().driver, "the lane has room again: the source is woken");
    submit(&mut s, refused, start);
}

#[test]
fn an_empty_lane_admits_a_batch_larger_than_its_bound() {
    let (mut s, start) = sched_with(vec![LaneOptions::new("a", 10, 1, 10)], &[0]);
    submit(&mut s, batch(0, 0, 50), start);
    assert_eq!(s.lanes[0].stats.queued, 50);
    assert!(s.submit(batch(0, 50, 1), start).is_err(), "but nothing more");
}

#[test]
fn a_batch_of_an_unassigned_partition_or_after_the_intake_closed_is_dropped() {
    let (mut s, start) = sched_with(vec![lane("a", 10)], &[0]);
    submit(&mut s, batch(1, 0, 5), start);
    assert_eq!((s.lanes[0].stats.queued, s.take_wakes()), (0, Wakes::default()));
    s.close_intake();
    assert!(s.is_intake_closed());
    submit(&mut s, batch(0, 0, 5), start);
    assert_eq!(s.lanes[0].stats.queued, 0);
    assert_eq!(s.snapshot(start, &|_| None).admitted, 0);
}

// --- next_job ------------------------------------------------------------------------------

#[test]
fn lanes_take_turns() {
    let (mut s, start) = sched_with(vec![LaneOptions::new("a", 5, 2, 100), LaneOptions::new("b", 5, 2, 100)], &[0, 1]);
    submit(&mut s, batch(0, 0, 10), start);
    submit(&mut s, batch(1, 0, 10), start);
    let calls: Vec<(usize, i32)> =
        (0..4).map(|_| call(&mut s, start)).map(|t| (t.lane, t.chunk.batch.partition().partition)).collect();
    assert_eq!(calls, [(0, 0), (1, 0), (0, 1), (1, 1)]);
    no_job(&mut s, start);
}

#[test]
fn a_lane_runs_one_call_per_partition_in_offset_order() {
    let (mut s, start) = sched_with(vec![lane("a", 5)], &[0]);
    submit(&mut s, batch(0, 0, 12), start);
    let first = call(&mut s, start);
    assert_eq!(offsets_of(&first), [0, 1, 2, 3, 4]);
    no_job(&mut s, start); // concurrency 4, but the partition is busy
    succeed(&mut s, first, start);
    assert_eq!(offsets_of(&call(&mut s, start)), [5, 6, 7, 8, 9]);
}

#[test]
fn a_lane_runs_at_most_its_concurrency_of_calls() {
    let (mut s, start) = sched_with(vec![LaneOptions::new("a", 5, 2, 100)], &[0, 1, 2]);
    for p in 0..3 {
        submit(&mut s, batch(p, 0, 5), start);
    }
    let first = call(&mut s, start);
    call(&mut s, start);
    no_job(&mut s, start);
    s.take_wakes();
    succeed(&mut s, first, start);
    assert_eq!(s.take_wakes().workers, 1, "the third partition's call is ready");
    assert_eq!(call(&mut s, start).chunk.batch.partition().partition, 2);
}

#[test]
fn no_call_starts_after_a_stop_and_running_ones_still_count() {
    let (mut s, start) = sched_with(vec![lane("a", 5)], &[0]);
    submit(&mut s, batch(0, 0, 10), start);
    let running = call(&mut s, start);
    s.take_wakes();
    s.stop();
    assert!(s.take_wakes().stopped);
    s.stop();
    assert!(!s.take_wakes().stopped, "a stop begins once");
    succeed(&mut s, running, start);
    no_job(&mut s, start);
    assert_eq!(committable(&s), [(partition(0), 5)]);
    assert!(matches!(s.ending(), Some(Ending::Stopped)));
}

#[test]
fn cancels_come_before_calls() {
    let mut timed = LaneOptions::new("a", 5, 2, 100);
    timed.timeout = Some(ms(100));
    let (mut s, start) = sched_with(vec![timed], &[0, 1]);
    submit(&mut s, batch(0, 0, 5), start);
    let running = call(&mut s, start);
    assert_eq!(running.deadline, Some(start + ms(100)));
    let (cancel, ran) = cancel_flag();
    assert!(s.register_cancel(running.call, cancel).is_none(), "before its deadline it is kept");
    submit(&mut s, batch(1, 0, 5), start);
    s.take_wakes();
    s.handle_timeout(start + ms(99));
    assert_eq!(s.take_wakes().workers, 0);
    s.handle_timeout(start + ms(100));
    assert_eq!(s.take_wakes().workers, 1, "a worker runs the cancel");
    match s.next_job(start + ms(100)) {
        Some(Job::Cancel(cancel)) => cancel(),
        other => panic!("expected the cancel first, got {other:?}"),
    }
    assert!(ran.load(Ordering::SeqCst));
    assert_eq!(call(&mut s, start + ms(100)).chunk.batch.partition().partition, 1);
    assert_eq!((s.lanes[0].stats.timeouts, s.lanes[0].stats.overruns), (1, 0));
}

// --- complete: success -----------------------------------------------------------------------

#[test]
fn an_offset_is_committable_once_every_lane_finished_and_committed_when_the_timer_fires() {
    let (mut s, start) = sched_with(vec![lane("whole", 10), lane("halves", 5)], &[0, 1]);
    submit(&mut s, batch(0, 0, 10), start);
    let whole = call_on(&mut s, start, 0, 0);
    succeed(&mut s, whole, start);
    assert_eq!(committable(&s), [], "one lane of two finished");
    let first_half = call_on(&mut s, start, 1, 0);
    succeed(&mut s, first_half, start);
    assert_eq!(committable(&s), [(partition(0), 5)], "call by call, not batch by batch");
    assert_eq!(s.take_commit(), [], "the commit timer has not fired");
    assert_eq!(commit_at(&mut s, start + ms(99)), []);
    assert_eq!(commit_at(&mut s, start + COMMIT_INTERVAL), [(partition(0), 5)]);
    assert_eq!(s.take_commit(), [], "handed out once");

    let later = start + ms(150);
    submit(&mut s, batch(1, 0, 3), start);
    let p1_whole = call_on(&mut s, later, 0, 1);
    succeed(&mut s, p1_whole, later);
    let second_half = call_on(&mut s, later, 1, 0);
    succeed(&mut s, second_half, later);
    assert_eq!(commit_at(&mut s, later + COMMIT_INTERVAL), [(partition(0), 10)], "p1 waits for its second lane");
    let p1_halves = call_on(&mut s, later, 1, 1);
    succeed(&mut s, p1_halves, later + COMMIT_INTERVAL);
    assert_eq!(commit_at(&mut s, later + COMMIT_INTERVAL * 2), [(partition(1), 3)], "only what moved");
    s.committed(&[(partition(0), 10)]);
    assert_eq!(committable(&s), [(partition(1), 3)], "p0 is known committed");
}

// --- complete: failures ----------------------------------------------------------------------

#[test]
fn a_failed_call_is_retried_after_its_backoff() {
    let a = retrying(lane("a", 5), 2, ms(100), OnFailure::Stop);
    let (mut s, start) = sched_with(vec![a], &[0]);
    submit(&mut s, batch(0, 0, 8), start);
    let first = call(&mut s, start);
    s.handle_timeout(start + HELP_AFTER);
    s.take_wakes();
    fail(&mut s, first, Failure::all(1), start);
    let wakes = s.take_wakes();
    assert!(wakes.driver, "the retry is the wheel's earliest entry");
    assert!(warnings(&effects(&mut s)).iter().any(|w| w.contains("attempt 1 of 3") && w.contains("retrying")));
    // Equal jitter: the backoff of the first retry is between 50 and 100 ms.
    let due = s.poll_timeout().expect("a retry timer");
    assert!(due >= start + ms(50) && due <= start + ms(100), "{:?}", due - start);
    no_job(&mut s, start); // the partition waits, its later messages too
    s.handle_timeout(start + ms(49));
    no_job(&mut s, start + ms(49));
    s.handle_timeout(start + ms(100));
    assert_eq!(s.take_wakes().workers, 1);
    let retry = call(&mut s, start + ms(100));
    assert_eq!((offsets_of(&retry), retry.chunk.attempt), (vec![0, 1, 2, 3, 4], 2));
    assert_eq!(s.lanes[0].stats.retries, 1);
}

#[test]
fn a_partial_failure_retries_only_the_failed_and_finishes_those_before_the_first() {
    let a = retrying(LaneOptions::new("a", 10, 1, 100), 3, ms(10), OnFailure::Stop);
    let (mut s, start) = sched_with(vec![a, lane("b", 10)], &[0]);
    submit(&mut s, batch_at(0, &[0, 1, 2, 5, 6, 9, 10]), start); // offsets 3, 4, 7 and 8 compacted away
    let (task_a, task_b) = (call(&mut s, start), call(&mut s, start));
    succeed(&mut s, task_b, start);
    // Positions 5 and 3 (offsets 9 and 5), named twice and out of order.
    fail(&mut s, task_a, Failure::at(1, &[5, 3, 5]), start);
    assert_eq!(committable(&s), [(partition(0), 5)], "0, 1 and 2 are finished");
    assert_eq!(s.lanes[0].stats.queued, 2, "the messages that succeeded left the lane");
    s.handle_timeout(start + ms(10));
    let retry = call(&mut s, start + ms(10));
    assert_eq!((offsets_of(&retry), retry.chunk.attempt), (vec![5, 9], 2));
    // The retry fails again on its second message: offset 5 is finished now (6 was already).
    fail(&mut s, retry, Failure::at(2, &[1]), start + ms(10));
    assert_eq!(committable(&s), [(partition(0), 9)]);
    s.handle_timeout(start + ms(100));
    let again = call(&mut s, start + ms(100));
    assert_eq!((offsets_of(&again), again.chunk.attempt), (vec![9], 3));
    succeed(&mut s, again, start + ms(100));
    assert_eq!(committable(&s), [(partition(0), 11)]);
    assert!(s.lanes[0].is_empty());
}

#[test]
fn a_partial_failure_naming_no_message_is_a_success_and_one_out_of_range_fails_the_whole_call() {
    let a = retrying(lane("a", 10), 1, ms(10), OnFailure::Stop);
    let (mut s, start) = sched_with(vec![a], &[0, 1]);
    submit(&mut s, batch(0, 0, 4), start);
    submit(&mut s, batch(1, 0, 4), start);
    let (none_failed, out_of_range) = (call(&mut s, start), call(&mut s, start));
    fail(&mut s, none_failed, Failure::at(1, &[]), start);
    assert!(warnings(&effects(&mut s))[0].contains("partial failure of no message"));
    fail(&mut s, out_of_range, Failure::at(2, &[1, 4]), start);
    assert_eq!(committable(&s), [(partition(0), 4)]);
    s.handle_timeout(start + ms(10));
    assert_eq!(offsets_of(&call(&mut s, start + ms(10))), [0, 1, 2, 3], "all of it");
}

#[test]
fn a_failure_under_the_stop_policy_freezes_the_partition_and_ends_the_run_once() {
    let (mut s, start) = sched_with(vec![lane("a", 5), lane("b", 5)], &[0, 1]);
    submit(&mut s, batch(0, 0, 10), start);
    submit(&mut s, batch(1, 0, 5), start);
    for _ in 0..2 {
        let task = call(&mut s, start);
        succeed(&mut s, task, start); // both lanes finish p0's 0..5
    }
    // A finished partition goes to the back of its lane's ready queue: p1 comes first.
    let (a_p1, b_p1) = (call_on(&mut s, start, 0, 1), call_on(&mut s, start, 1, 1));
    let (a_p0, b_p0) = (call_on(&mut s, start, 0, 0), call_on(&mut s, start, 1, 0));
    s.take_wakes();
    fail(&mut s, a_p0, Failure::at(1, &[2]), start); // offset 7
    assert!(s.take_wakes().stopped);
    succeed(&mut s, b_p0, start);
    assert_eq!(committable(&s), [(partition(0), 7)], "frozen where it failed");
    succeed(&mut s, b_p1, start);
    fail(&mut s, a_p1, Failure::all(2), start);
    let discarded: Vec<u64> = effects(&mut s)
        .into_iter()
        .filter_map(|e| match e {
            Effect::Discard(failure) => Some(failure.id),
            _ => None,
        })
        .collect();
    assert_eq!(discarded, [2], "a second failure is only dropped");
    match s.ending() {
        Some(Ending::Failed(failure)) => assert_eq!(failure.id, 1),
        other => panic!("expected the first failure, got {other:?}"),
    }
    assert!(matches!(s.ending(), Some(Ending::Stopped)), "the failure is handed out once");
    assert_eq!(committable(&s), [(partition(0), 7)], "p1 stays where it was: lane a never finished it");
}

#[test]
fn a_failure_after_the_ending_was_handed_out_is_late() {
    let (mut s, start) = sched_with(vec![LaneOptions::new("a", 5, 2, 100)], &[0, 1]);
    submit(&mut s, batch(0, 0, 5), start);
    submit(&mut s, batch(1, 0, 5), start);
    let (first, second) = (call(&mut s, start), call(&mut s, start));
    fail(&mut s, first, Failure::all(1), start);
    assert!(matches!(s.ending(), Some(Ending::Failed(_))));
    fail(&mut s, second, Failure::all(2), start);
    assert!(matches!(s.take_late(), Some(Late::Plugin(Failure { id: 2, .. }))));
    assert!(s.take_late().is_none());
}

#[test]
fn a_fatal_failure_ends_the_run_whatever_the_policy_and_finishes_nothing() {
    let forever = retrying(lane("a", 5), 0, ms(10), OnFailure::RetryForever);
    let dead_letters = retrying(lane("b", 5), 0, ms(10), OnFailure::DeadLetter("dlq".into()));
    let (mut s, start) = sched_with(vec![forever, dead_letters], &[0]);
    submit(&mut s, batch(0, 0, 5), start);
    let (a, b) = (call(&mut s, start), call(&mut s, start));
    succeed(&mut s, b, start);
    fail(&mut s, a, Failure { positions: Some(vec![3]), ..Failure::fatal(1) }, start);
    assert_eq!(committable(&s), [], "not even the messages before the one it named");
    assert!(!effects(&mut s).iter().any(|e| matches!(e, Effect::DeadLetter(_))));
    assert_eq!(s.lanes[0].stats.retries, 0);
    assert!(matches!(s.ending(), Some(Ending::Failed(Failure { id: 1, fatal: true, .. }))));

    // Fatal on the dead-letter lane too.
    let dead_letters = retrying(lane("b", 5), 3, ms(10), OnFailure::DeadLetter("dlq".into()));
    let (mut s, start) = sched_with(vec![dead_letters], &[0]);
    submit(&mut s, batch(0, 0, 5), start);
    let task = call(&mut s, start);
    fail(&mut s, task, Failure::fatal(2), start);
    assert!(!effects(&mut s).iter().any(|e| matches!(e, Effect::DeadLetter(_))));
    assert!(matches!(s.ending(), Some(Ending::Failed(Failure { id: 2, .. }))));
}

// --- dead letters ----------------------------------------------------------------------------

/// A scheduler whose lane "a" dead-letters after its first failure, another lane "b" that
/// finished p0's five messages, and lane a's call on them failed at positions 1 and 3:
/// returns the write.
fn dead_lettering(bound: Option<Duration>) -> (Sched, Instant, u64) {
    let a = retrying(lane("a", 5), 0, ms(10), OnFailure::DeadLetter("dlq".into()));
    let start = Instant::now();
    let mut s = Sched::new(vec![a, lane("b", 5)], COMMIT_INTERVAL, Some(WriteBound(bound)), start).expect("valid");
    s.assign(vec![partition(0)]);
    submit(&mut s, batch(0, 10, 5), start);
    let (a, b) = (call(&mut s, start), call(&mut s, start));
    succeed(&mut s, b, start);
    fail(&mut s, a, Failure::at(7, &[3, 1]), start);
    let effects = effects(&mut s);
    let writes: Vec<_> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::DeadLetter(write) => Some(write),
            _ => None,
        })
        .collect();
    assert_eq!(writes.len(), 1, "{effects:?}");
    let write = writes[0];
    assert_eq!((write.topic.as_str(), write.indexes.as_slice()), ("dlq", &[1, 3][..]));
    assert_eq!(
        (write.info.plugin.as_str(), write.info.error_type.as_str(), write.info.attempts),
        ("a", "TestFailure", 1)
    );
    assert!(effects.iter().any(|e| matches!(e, Effect::Discard(Failure { id: 7, .. }))), "the error is not kept");
    (s, start, write.write)
}

#[test]
fn acknowledged_dead_letters_finish_the_call() {
    let (mut s, start, write) = dead_lettering(None);
    assert_eq!(committable(&s), [(partition(0), 11)], "the message before the first failed is finished");
    assert_eq!(s.running_on(&[partition(0)]), 1, "the write holds the call's slot");
    assert_eq!(s.snapshot(start, &|_| None).lanes[0].1.dead_letters_pending, 2);
    s.dead_lettered(write, Ok(()), start + ms(5));
    assert_eq!(committable(&s), [(partition(0), 15)]);
    assert_eq!((s.running(), s.lanes[0].stats.dead_lettered), (0, 2));
    assert!(s.ending().is_none());
}

#[test]
fn a_failed_dead_letter_write_freezes_the_partition_and_ends_the_run() {
    let (mut s, start, write) = dead_lettering(None);
    s.take_wakes();
    let error = Error::Internal("no broker".into());
    s.dead_lettered(write, Err(error), start + ms(5));
    assert!(s.take_wakes().stopped);
    assert_eq!((s.running(), committable(&s)), (0, vec![(partition(0), 11)]));
    assert!(matches!(s.ending(), Some(Ending::SourceFailed(Error::Internal(_)))));
}

#[test]
fn a_waiting_dead_letter_write_is_warned_about_every_interval() {
    /// When (seconds after the write began) the warnings come, up to 130 s.
    fn warned(bound: Option<Duration>) -> Vec<u64> {
        let (mut s, start, _) = dead_lettering(bound);
        let mut at = Vec::new();
        for tenth in 1..=1300 {
            s.handle_timeout(start + ms(100 * tenth));
            for effect in effects(&mut s) {
                if let Effect::DeadLetterWaiting(wait) = effect {
                    assert_eq!((wait.plugin.as_str(), wait.topic.as_str(), wait.bound), ("a", "dlq", bound));
                    at.push(wait.waited.as_secs());
                }
            }
        }
        at
    }
    // No bound: every 5 s, then every minute once a minute has passed.
    assert_eq!(warned(None), [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 120]);
    // A bound of 3 s: a third of it, so they come before it fails.
    assert_eq!(warned(Some(Duration::from_secs(3)))[..4], [1, 2, 3, 4]);
}

#[test]
fn after_the_dead_letter_producer_closed_a_dead_letter_failure_stops_the_run() {
    let a = retrying(lane("a", 5), 0, ms(10), OnFailure::DeadLetter("dlq".into()));
    let (mut s, start) = sched_with(vec![a], &[0]);
    s.close_dead_letters();
    submit(&mut s, batch(0, 0, 5), start);
    let task = call(&mut s, start);
    fail(&mut s, task, Failure::all(1), start);
    assert!(!effects(&mut s).iter().any(|e| matches!(e, Effect::DeadLetter(_))));
    assert!(matches!(s.ending(), Some(Ending::Failed(Failure { id: 1, .. }))));
}

// --- deadlines -------------------------------------------------------------------------------

fn timed_lane() -> LaneOptions {
    let mut options = lane("a", 5);
    options.timeout = Some(ms(100));
    options
}

#[test]
fn a_sync_call_past_its_deadline_is_warned_about_and_still_counts() {
    let (mut s, start) = sched_with(vec![timed_lane()], &[0]);
    submit(&mut s, batch(0, 0, 5), start);
    let task = call(&mut s, start);
    s.handle_timeout(start + ms(100));
    let effects = effects(&mut s);
    assert!(warnings(&effects)[0].contains("past its timeout"), "{effects:?}");
    assert_eq!(s.lanes[0].stats.overruns, 1);
    succeed(&mut s, task, start + ms(150));
    assert_eq!(committable(&s), [(partition(0), 5)]);
}

#[test]
fn a_cancel_registered_after_the_deadline_is_handed_back() {
    let (mut s, start) = sched_with(vec![timed_lane()], &[0]);
    submit(&mut s, batch(0, 0, 5), start);
    let task = call(&mut s, start);
    s.handle_timeout(start + ms(100));
    let (cancel, ran) = cancel_flag();
    let back = s.register_cancel(task.call, cancel).expect("overdue: run it now");
    back();
    assert!(ran.load(Ordering::SeqCst));
    assert_eq!((s.lanes[0].stats.overruns, s.lanes[0].stats.timeouts), (0, 1), "a timeout, not an overrun");
    assert!(s.next_job(start + ms(100)).is_none(), "nothing queued for a worker");
}

#[test]
fn a_completed_call_leaves_no_deadline_on_the_wheel() {
    let (mut s, start) = sched_with(vec![timed_lane()], &[0]);
    submit(&mut s, batch(0, 0, 5), start);
    let task = call(&mut s, start);
    s.handle_timeout(start + HELP_AFTER); // nothing waits behind the call: no help, no new entry
    assert_eq!(s.timers.len(), 1);
    succeed(&mut s, task, start);
    assert_eq!(s.timers.len(), 1, "the commit timer only");
    s.handle_timeout(start + ms(100));
    assert!(effects(&mut s).is_empty(), "no overrun of a call that is over");
    assert!(s.timers.is_empty());
}

// --- revoke and assign -----------------------------------------------------------------------

#[test]
fn a_revoke_drops_waiting_work_returns_every_assigned_offset_and_forgets_the_revoked() {
    let (mut s, start) = sched_with(vec![lane("a", 5), lane("b", 5)], &[0, 1]);
    submit(&mut s, batch(0, 0, 15), start);
    submit(&mut s, batch(1, 0, 5), start);
    for _ in 0..4 {
        let task = call(&mut s, start);
        succeed(&mut s, task, start); // p0's 0..5 and p1's 0..5, in both lanes
    }
    let running = call_on(&mut s, start, 0, 0);
    s.drop_waiting(Some(&[partition(0)]));
    assert_eq!(s.running_on(&[partition(0)]), 1);
    assert_eq!(s.lanes.iter().map(|l| l.stats.queued).collect::<Vec<_>>(), [5, 0], "only the running call is left");
    assert_eq!(sorted(s.revoke(&[partition(0)])), [(partition(0), 5), (partition(1), 5)]);
    assert_eq!(committable(&s), [(partition(1), 5)]);
    let snapshot = s.snapshot(start, &|_| None);
    assert_eq!(snapshot.partitions.iter().map(|p| p.assigned).collect::<Vec<_>>(), [false, true]);

    // The revoked call completes late, after the partition came back: lane a's new call on
    // it waits for the old one, lane b's does not.
    s.assign(vec![partition(0)]);
    submit(&mut s, batch(0, 5, 5), start);
    let new_b = call_on(&mut s, start, 1, 0);
    no_job(&mut s, start);
    succeed(&mut s, new_b, start);
    succeed(&mut s, running, start);
    assert_eq!(committable(&s), [(partition(1), 5)], "a call of the old assignment stores nothing");
    let new_a = call_on(&mut s, start, 0, 0);
    assert_eq!(offsets_of(&new_a), [5, 6, 7, 8, 9]);
    succeed(&mut s, new_a, start);
    assert_eq!(committable(&s), [(partition(0), 10), (partition(1), 5)]);
}

#[test]
fn a_call_that_fails_after_its_partition_was_revoked_is_not_retried() {
    let a = retrying(lane("a", 5), 3, ms(10), OnFailure::DeadLetter("dlq".into()));
    let (mut s, start) = sched_with(vec![a], &[0]);
    submit(&mut s, batch(0, 0, 5), start);
    let running = call(&mut s, start);
    s.revoke(&[partition(0)]);
    fail(&mut s, running, Failure::all(1), start);
    let effects = effects(&mut s);
    assert!(warnings(&effects)[0].contains("after its partition was revoked"), "{effects:?}");
    assert!(!effects.iter().any(|e| matches!(e, Effect::DeadLetter(_))));
    s.handle_timeout(start + ms(1_000));
    no_job(&mut s, start + ms(1_000));
    assert!(s.lanes[0].is_empty() && s.ending().is_none());
}

#[test]
fn a_reassigned_partition_does_not_bring_back_its_old_offsets() {
    let (mut s, start) = sched_with(vec![lane("a", 5)], &[0]);
    submit(&mut s, batch(0, 0, 5), start);
    let task = call(&mut s, start);
    succeed(&mut s, task, start);
    assert_eq!(committable(&s), [(partition(0), 5)]);
    s.drop_waiting(Some(&[partition(0)]));
    s.revoke(&[partition(0)]);
    s.assign(vec![partition(0)]);
    assert_eq!(committable(&s), []);
    assert_eq!(commit_at(&mut s, start + COMMIT_INTERVAL), [], "nor does the commit timer");
    // The new assignment starts where the group's commit was (say 3) and stores its own.
    submit(&mut s, batch(0, 3, 1), start);
    let task = call(&mut s, start + COMMIT_INTERVAL);
    succeed(&mut s, task, start + COMMIT_INTERVAL);
    assert_eq!(committable(&s), [(partition(0), 4)]);
}

// --- the ending ------------------------------------------------------------------------------

#[test]
fn drain_mode_ends_once_the_source_is_idle_and_every_lane_is_empty() {
    let (mut s, start) = sched_with(vec![lane("a", 5)], &[0]);
    assert!(s.source_idle(true), "changed");
    assert!(!s.source_idle(true), "unchanged");
    assert!(matches!(s.ending(), Some(Ending::Drained)));
    s.source_idle(false);
    submit(&mut s, batch(0, 0, 5), start);
    s.source_idle(true);
    assert!(s.ending().is_none(), "the lane has work");
    let task = call(&mut s, start);
    assert!(s.ending().is_none(), "a call is running");
    succeed(&mut s, task, start);
    assert!(matches!(s.ending(), Some(Ending::Drained)));
}

#[test]
fn close_intake_stops_and_drops_waiting_work_and_its_retries() {
    let a = retrying(lane("a", 5), 3, ms(10), OnFailure::Stop);
    let (mut s, start) = sched_with(vec![a], &[0, 1]);
    submit(&mut s, batch(0, 0, 5), start);
    submit(&mut s, batch(1, 0, 10), start);
    let failing = call(&mut s, start);
    let running = call(&mut s, start);
    s.handle_timeout(start + HELP_AFTER);
    fail(&mut s, failing, Failure::all(1), start);
    assert_eq!(s.timers.len(), 1, "p0's retry");
    s.close_intake();
    assert!(s.take_wakes().stopped);
    assert!(s.timers.is_empty(), "the retry's timer is gone with it");
    assert_eq!(s.lanes[0].stats.queued, 5, "the running call's messages only");
    succeed(&mut s, running, start);
    assert!(s.lanes[0].is_empty());
    assert!(matches!(s.ending(), Some(Ending::Stopped)));
}

// --- wakes -----------------------------------------------------------------------------------

#[test]
fn the_driver_is_woken_for_an_entry_due_before_it_planned_to_wake() {
    let a = retrying(lane("a", 5), 3, Duration::from_secs(1), OnFailure::Stop);
    let (mut s, start) = sched_with(vec![a], &[0, 1, 2]);
    s.schedule_source_wake(start + Duration::from_secs(1));
    assert!(!s.take_wakes().driver, "the source schedules its own wakes right before it sleeps");
    for p in 0..3 {
        submit(&mut s, batch(p, 0, 5), start);
    }
    let (first, second, third) = (call(&mut s, start), call(&mut s, start), call(&mut s, start));
    s.handle_timeout(start + HELP_AFTER); // the source drives the wheel; nothing waits
    s.take_wakes();
    succeed(&mut s, first, start);
    assert!(s.take_wakes().driver, "the commit, in 100 ms, comes before the source's wake");
    succeed(&mut s, second, start);
    assert!(!s.take_wakes().driver, "the commit timer is already set");
    fail(&mut s, third, Failure::all(1), start);
    assert!(!s.take_wakes().driver, "the retry, in 0.5 to 1 s, comes after the commit");
    s.handle_timeout(start + COMMIT_INTERVAL);
    assert!(s.take_wakes().driver, "a commit is due");
}

#[test]
fn a_round_of_batches_needs_one_worker_and_help_comes_only_for_work_left_waiting() {
    let (mut s, start) = sched_with(vec![lane("a", 10), lane("b", 10)], &[0, 1, 2]);
    for p in 0..3 {
        submit(&mut s, batch(p, 0, 5), start);
    }
    let wakes = s.take_wakes();
    assert_eq!((wakes.workers, wakes.helpers), (6, 0), "six calls ready; the engine wakes one worker if none is awake");
    assert_eq!(s.timers.len(), 1, "one help entry for the whole round, not one per batch or call");
    // One worker runs the round within HELP_AFTER: the help entry finds nothing waiting.
    for _ in 0..6 {
        let task = call(&mut s, start + ms(1));
        succeed(&mut s, task, start + ms(1));
    }
    s.handle_timeout(start + HELP_AFTER);
    assert_eq!(s.take_wakes().helpers, 0);
    assert_eq!(s.timers.len(), 1, "the commit timer only: no help entry re-armed");
}

#[test]
fn work_waiting_behind_a_slow_call_wakes_a_helper_after_help_after() {
    let (mut s, start) = sched_with(vec![lane("slow", 10), lane("fast", 10)], &[0]);
    submit(&mut s, batch(0, 0, 5), start);
    let slow = call(&mut s, start);
    assert_eq!(slow.lane, 0);
    s.handle_timeout(start + ms(1));
    assert_eq!(s.take_wakes().helpers, 0, "not yet");
    s.handle_timeout(start + HELP_AFTER);
    assert_eq!(s.take_wakes().helpers, 1, "the fast lane's call has waited HELP_AFTER behind the slow one");
    assert_eq!(s.poll_timeout(), Some(start + HELP_AFTER + HELP_AFTER), "still waiting: help again later");
    let fast = call(&mut s, start + HELP_AFTER);
    assert_eq!(fast.lane, 1);
    s.handle_timeout(start + HELP_AFTER * 2);
    assert_eq!(s.take_wakes().helpers, 0, "nothing waits any more");
    succeed(&mut s, fast, start + HELP_AFTER * 2);
    succeed(&mut s, slow, start + ms(500));
}
