//! The engine against librdkafka's mock cluster: every lane sees every message in order,
//! full lanes hold fetching back, failures are retried or stop the run uncommitted.

use std::collections::BTreeMap;
use std::time::Instant;

use std::time::Duration;

use super::*;
use crate::core::lane::LaneOptions;
use crate::core::lane::RetryPolicy;
use crate::core::limit::RateLimit;
use crate::kafka::mock::{seeded, unreachable};

/// Per lane and partition, the offsets each call saw, in call order.
type Seen = Arc<Mutex<BTreeMap<(usize, i32), Vec<i64>>>>;

/// A test plugin's failure: the offset it failed at.
impl CallFailure for i64 {
    fn failed_positions(&self) -> Option<&[usize]> {
        None
    }

    fn kind(&self) -> String {
        "TestFailure".into()
    }

    fn detail(&self) -> String {
        format!("failed at offset {self}")
    }
}

/// A host that records what it is given; on lane 0 it fails the first call holding
/// `fail_at` and sleeps `slow` per call.
struct Recorder {
    seen: Seen,
    fail_at: Option<i64>,
    slow: Duration,
    failed: AtomicBool,
}

impl Host for Recorder {
    type Failure = i64;

    fn serve(&self, worker: &Worker<i64>) {
        while let Some(task) = worker.next() {
            let started = Instant::now();
            let batch = &task.chunk.batch;
            let offsets: Vec<i64> = task.chunk.indexes().into_iter().map(|i| batch.get(i).offset).collect();
            if task.lane == 0 {
                std::thread::sleep(self.slow);
            }
            let outcome = match self.fail_at {
                Some(bad) if task.lane == 0 && offsets.contains(&bad) && !self.failed.swap(true, Ordering::AcqRel) => {
                    Err(bad)
                }
                _ => {
                    let key = (task.lane, batch.partition().partition);
                    self.seen.lock().expect("seen").entry(key).or_default().extend(offsets);
                    Ok(())
                }
            };
            worker.complete(task, outcome, started.elapsed());
        }
    }
}

fn recorder(seen: Seen, fail_at: Option<i64>, slow: Duration) -> Arc<Recorder> {
    Arc::new(Recorder { seen, fail_at, slow, failed: AtomicBool::new(false) })
}

/// Asserts `seen` is exactly `0..count`, naming the first place it is not.
fn assert_all_in_order(seen: &[i64], count: i64, what: &str) {
    let first_wrong = seen.iter().zip(0..).position(|(&s, e)| s != e);
    assert!(
        first_wrong.is_none() && seen.len() as i64 == count,
        "{what}: {} offsets, first out of place at index {first_wrong:?}: {:?}",
        seen.len(),
        first_wrong.map(|i| &seen[i.saturating_sub(2)..(i + 3).min(seen.len())])
    );
}

fn lane(name: &str, batch_size: usize, concurrency: usize) -> LaneOptions {
    LaneOptions::new(name, batch_size, concurrency, 10_000)
}

fn drain(lanes: Vec<LaneOptions>) -> RunOptions {
    RunOptions {
        workers: lanes.iter().map(|l| l.concurrency).sum(),
        lanes,
        linger: Duration::from_millis(5),
        // Long enough that a partition whose first fetch lags on a loaded machine is not taken
        // for drained.
        idle_timeout: Some(Duration::from_millis(1500)),
        shutdown_timeout: Duration::from_secs(10),
        revoke_timeout: Duration::from_secs(10),
        rate_limit: None,
        dlq_timeout: Duration::from_secs(30),
    }
}

#[test]
fn every_lane_sees_every_partition_in_order_then_a_rerun_finds_nothing() {
    let (_cluster, config) = seeded(&[400; 3]);
    let engine = Engine::default();
    let seen = Seen::default();
    let options = drain(vec![lane("a", 64, 2), lane("b", 7, 1)]);
    engine.run(&config, &options, recorder(seen.clone(), None, Duration::ZERO)).expect("run");
    let seen = seen.lock().expect("seen").clone();
    for lane in 0..2 {
        for p in 0..3 {
            assert_all_in_order(&seen[&(lane, p)], 400, &format!("lane {lane} partition {p}"));
        }
    }
    let snapshot = engine.snapshot().expect("stats");
    assert!(snapshot.lanes[1].1.queued_peak <= 10_000);
    assert!(snapshot.lanes[1].1.batches >= 400 * 3 / 7);

    let again = Seen::default();
    engine.run(&config, &options, recorder(again.clone(), None, Duration::ZERO)).expect("second run");
    assert!(again.lock().expect("seen").is_empty(), "everything was committed");
}

#[test]
fn drain_mode_waits_for_every_partitions_first_fetch_however_slow() {
    let (cluster, config) = seeded(&[30; 4]);
    let engine = Engine::default();
    let seen = Seen::default();
    // Each fetch takes longer than the idle timeout, counted from the assignment.
    cluster.delay_requests(Duration::from_millis(700)).expect("round-trip time");
    let options = RunOptions { idle_timeout: Some(Duration::from_millis(200)), ..drain(vec![lane("a", 100, 1)]) };
    engine.run(&config, &options, recorder(seen.clone(), None, Duration::ZERO)).expect("run");
    let seen = seen.lock().expect("seen").clone();
    for p in 0..4 {
        assert_all_in_order(seen.get(&(0, p)).map_or(&[][..], Vec::as_slice), 30, &format!("partition {p}"));
    }
}

#[test]
fn a_full_lane_holds_back_fetching_and_never_exceeds_its_bound() {
    let (_cluster, config) = seeded(&[500; 2]);
    let engine = Engine::default();
    let seen = Seen::default();
    let mut slow = lane("slow", 50, 1);
    slow.max_queued = 200;
    let options = drain(vec![slow, lane("fast", 50, 1)]);
    engine.run(&config, &options, recorder(seen.clone(), None, Duration::from_millis(5))).expect("run");
    let seen = seen.lock().expect("seen").clone();
    for lane in 0..2 {
        for p in 0..2 {
            assert_all_in_order(&seen[&(lane, p)], 500, &format!("lane {lane} partition {p}"));
        }
    }
    let peak = engine.snapshot().expect("stats").lanes[0].1.queued_peak;
    assert!(peak <= 200, "queued peaked at {peak}");
}

#[test]
fn a_failed_batch_is_not_committed() {
    let (_cluster, config) = seeded(&[300; 1]);
    let engine = Engine::default();
    let seen = Seen::default();
    let options = drain(vec![lane("a", 50, 1)]);
    match engine.run(&config, &options, recorder(seen.clone(), Some(150), Duration::ZERO)) {
        Err(RunError::Plugin(150)) => {}
        other => panic!("expected the plugin's error, got {other:?}"),
    }
    let done = seen.lock().expect("seen").get(&(0, 0)).map_or(0, Vec::len) as i64;
    let again = Seen::default();
    engine.run(&config, &options, recorder(again.clone(), None, Duration::ZERO)).expect("rerun");
    let redelivered = again.lock().expect("seen")[&(0, 0)].clone();
    assert!(redelivered.first().is_some_and(|&first| first <= 150 && first <= done), "{redelivered:?}");
    assert_eq!(redelivered.last(), Some(&299));
}

#[test]
fn a_failed_slice_keeps_its_whole_batch_uncommitted() {
    // Fetched batches hold 100 messages (lane b's size); lane a calls in slices of 10 and
    // fails the one holding offset 25. Later slices of that batch succeeding must not
    // finish it for lane a.
    let (_cluster, config) = seeded(&[300; 1]);
    let engine = Engine::default();
    let options = drain(vec![lane("a", 10, 1), lane("b", 100, 1)]);
    let outcome = engine.run(&config, &options, recorder(Seen::default(), Some(25), Duration::ZERO));
    assert!(matches!(outcome, Err(RunError::Plugin(25))), "{outcome:?}");
    let again = Seen::default();
    engine.run(&config, &options, recorder(again.clone(), None, Duration::ZERO)).expect("rerun");
    let redelivered = again.lock().expect("seen")[&(0, 0)].clone();
    assert!(redelivered.contains(&25), "offset 25 must come again, got {:?}", redelivered.first());
}

#[test]
fn a_failed_call_is_retried_for_its_lane_alone_and_everything_is_committed() {
    let (_cluster, config) = seeded(&[300; 2]);
    let engine = Engine::default();
    let seen = Seen::default();
    let mut retried = lane("a", 50, 1);
    retried.retry = RetryPolicy {
        retries: 2,
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(50),
        on_failure: OnFailure::Stop,
    };
    let options = drain(vec![retried, lane("b", 50, 1)]);
    engine.run(&config, &options, recorder(seen.clone(), Some(120), Duration::ZERO)).expect("run");
    let seen = seen.lock().expect("seen").clone();
    for lane in 0..2 {
        for p in 0..2 {
            assert_all_in_order(&seen[&(lane, p)], 300, &format!("lane {lane} partition {p}"));
        }
    }
    let snapshot = engine.snapshot().expect("stats");
    assert_eq!((snapshot.lanes[0].1.retries, snapshot.lanes[1].1.retries), (1, 0));
    let again = Seen::default();
    engine.run(&config, &options, recorder(again.clone(), None, Duration::ZERO)).expect("rerun");
    assert!(again.lock().expect("seen").is_empty(), "everything was committed");
}

#[test]
fn a_lane_rate_limit_paces_its_calls() {
    let (_cluster, config) = seeded(&[400; 1]);
    let engine = Engine::default();
    let mut limited = lane("a", 100, 1);
    limited.rate_limit = Some(RateLimit { per_second: 1000.0, burst: 100 });
    let options = drain(vec![limited]);
    let started = Instant::now();
    engine.run(&config, &options, recorder(Seen::default(), None, Duration::ZERO)).expect("run");
    // 100 at once, then 300 at 1000/s; the drain's idle wait comes on top.
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(290), "{took:?}");
    assert!(engine.snapshot().expect("stats").lanes[0].1.throttled >= 2);
}

#[test]
fn stop_before_run_ends_that_run_at_once() {
    let (_cluster, config) = seeded(&[10; 1]);
    let engine = Engine::default();
    engine.stop();
    let options = RunOptions { idle_timeout: None, ..drain(vec![lane("a", 10, 1)]) };
    let seen = Seen::default();
    engine.run(&config, &options, recorder(seen, None, Duration::ZERO)).expect("run");
}

#[test]
fn unreachable_brokers_fail_within_the_connect_timeout() {
    let config = unreachable();
    let started = Instant::now();
    let outcome =
        Engine::default().run(&config, &drain(vec![lane("a", 10, 1)]), recorder(Seen::default(), None, Duration::ZERO));
    assert!(matches!(outcome, Err(RunError::Core(Error::Connect { .. }))), "{outcome:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A lane that writes what fails, at once, to `topic`.
fn dead_letter_lane(name: &str, topic: &str) -> LaneOptions {
    let mut options = lane(name, 10, 1);
    options.retry = RetryPolicy {
        retries: 0,
        first_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(10),
        on_failure: OnFailure::DeadLetter(topic.into()),
    };
    options
}

#[test]
fn a_dead_letter_write_that_cannot_complete_shows_while_it_waits_then_ends_the_run_at_its_bound() {
    let (_cluster, mut config) = seeded(&[20; 1]);
    // The dead-letter topic does not exist and may not be created: the write waits.
    config.kafka.push(("allow.auto.create.topics".into(), "false".into()));
    let engine = Engine::default();
    let dead_letters = dead_letter_lane("a", "missing");
    let options =
        RunOptions { idle_timeout: None, dlq_timeout: Duration::from_millis(1500), ..drain(vec![dead_letters]) };
    let started = Instant::now();
    let (outcome, pending) = std::thread::scope(|scope| {
        let run = scope.spawn(|| engine.run(&config, &options, recorder(Seen::default(), Some(5), Duration::ZERO)));
        let mut pending = None;
        while !run.is_finished() {
            let stats = engine.snapshot().map(|s| s.lanes[0].1.clone());
            if let Some(stats) = stats.filter(|s| s.dead_letters_pending > 0) {
                pending = Some((stats.dead_letters_pending, stats.dead_letters_oldest, stats.in_flight));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (run.join().expect("run"), pending)
    });
    let took = started.elapsed();
    let (count, oldest, in_flight) = pending.expect("the waiting write showed in the stats");
    assert_eq!(count, 10, "the failed call's 10 messages wait");
    assert!(oldest >= Duration::from_secs(1), "the oldest waited {oldest:?}");
    assert_eq!(in_flight, 1, "the waiting write holds its call");
    match outcome {
        Err(RunError::Core(Error::DeadLetter(failure))) => {
            assert_eq!((failure.plugin.as_str(), failure.topic.as_str()), ("a", "missing"));
            assert_eq!(failure.what, "10 message(s) of t[0] offsets 0..=9");
            assert!(failure.cause.contains("MessageTimedOut"), "{}", failure.cause);
        }
        other => panic!("expected the dead-letter failure, got {other:?}"),
    }
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(10), "ended after {took:?}");
    assert_eq!(engine.snapshot().expect("stats").lanes[0].1.dead_letters_pending, 0);
    // Nothing of the failed call was committed.
    let again = Seen::default();
    let rerun = RunOptions { dlq_timeout: Duration::from_secs(30), ..drain(vec![lane("a", 10, 1)]) };
    engine.run(&config, &rerun, recorder(again.clone(), None, Duration::ZERO)).expect("rerun");
    assert_eq!(again.lock().expect("seen")[&(0, 0)].first(), Some(&0));
}

#[test]
fn a_dead_letter_write_that_fails_during_a_stop_fails_the_run() {
    let (_cluster, mut config) = seeded(&[20; 1]);
    config.kafka.push(("allow.auto.create.topics".into(), "false".into()));
    let engine = Engine::default();
    let dead_letters = dead_letter_lane("a", "missing");
    let options =
        RunOptions { idle_timeout: None, dlq_timeout: Duration::from_millis(1500), ..drain(vec![dead_letters]) };
    let outcome = std::thread::scope(|scope| {
        let run = scope.spawn(|| engine.run(&config, &options, recorder(Seen::default(), Some(5), Duration::ZERO)));
        // Stop while the write waits: the drain waits for it, and it fails at dlq_timeout.
        while engine.snapshot().is_none_or(|s| s.lanes[0].1.dead_letters_pending == 0) {
            std::thread::sleep(Duration::from_millis(20));
        }
        engine.stop();
        run.join().expect("the run thread")
    });
    assert!(
        matches!(&outcome, Err(RunError::Core(Error::DeadLetter(_)))),
        "a failed dead-letter write must fail the run: {outcome:?}"
    );
}

#[test]
fn bad_options_are_refused() {
    let mut options = drain(vec![lane("a", 10, 1), lane("b", 500, 1)]);
    options.lanes[0].max_queued = 100;
    assert!(matches!(options.validate(), Err(Error::Config(m)) if m.contains("largest batch_size (500)")));
    assert!(drain(vec![]).validate().is_err());
    for bad in [Duration::ZERO, Duration::from_millis(9), Duration::from_secs(25 * 86_400)] {
        let options = RunOptions { dlq_timeout: bad, ..drain(vec![lane("a", 10, 1)]) };
        assert!(matches!(options.validate(), Err(Error::Config(m)) if m.contains("dlq_timeout")), "{bad:?}");
    }
    let options = RunOptions { dlq_timeout: Duration::from_millis(10), ..drain(vec![lane("a", 10, 1)]) };
    options.validate().expect("10 ms is a valid dlq_timeout");
}
