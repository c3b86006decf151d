//! A run: connect, start the source and the workers, wait (asleep) for a reason to end, then
//! shut down in order: stop fetching, finish running calls (bounded), commit, leave.
//!
//! Threads: one source thread (which also drives the timer wheel), `workers` worker
//! threads, the caller's thread, which waits, and a dead-letter producer when a plugin has a
//! dead-letter topic. Their number does not change during a run.
//!
//! Delivery: at least once. A partition's offset is stored up to where every plugin has
//! finished its calls (see `offsets`); stored offsets are committed synchronously on revoke
//! and at the end, after the drain, so what finished while it waited is included.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::SourceConfig;
use crate::dlq::DeadLetters;
use crate::errors::Error;
use crate::lane::{LaneOptions, OnFailure};
use crate::limit::RateLimit;
use crate::pool::{CallFailure, Ending, Late, Pool, Snapshot};
use crate::source::{self, Intake, Shape, Source};

/// How one run is shaped.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub lanes: Vec<LaneOptions>,
    /// How long a fetched batch may wait to fill once it holds a message.
    pub linger: Duration,
    /// End once nothing new arrived for this long after assignment (drain mode).
    pub idle_timeout: Option<Duration>,
    /// Worker threads calling plugins.
    pub workers: usize,
    /// How long a stop waits for running calls before giving up on them.
    pub shutdown_timeout: Duration,
    /// How long a revoke waits for running calls on the revoked partitions.
    pub revoke_timeout: Duration,
    /// The app's rate limit, charged per fetched batch.
    pub rate_limit: Option<RateLimit>,
    /// The bound of one dead-letter write (the producer's `message.timeout.ms`, unless the
    /// user's properties set it).
    pub dlq_timeout: Duration,
}

impl RunOptions {
    pub fn validate(&self) -> Result<(), Error> {
        if self.lanes.is_empty() {
            return Err(Error::Config("register at least one plugin".into()));
        }
        if self.workers == 0 {
            return Err(Error::Config("workers must be at least 1".into()));
        }
        for lane in &self.lanes {
            let name = &lane.name;
            if lane.batch_size == 0 || lane.concurrency == 0 {
                return Err(Error::Config(format!("plugin {name:?}: batch_size and concurrency must be at least 1")));
            }
            // Fetched batches are as large as the largest batch_size and a lane takes whole
            // batches, so a smaller bound would be overrun by a single batch.
            let fetched = self.shape().batch_size;
            if lane.max_queued < fetched {
                return Err(Error::Config(format!(
                    "plugin {name:?}: max_queued ({}) must be at least the largest batch_size ({fetched})",
                    lane.max_queued
                )));
            }
            if let Some(limit) = &lane.rate_limit {
                limit.validate(&format!("plugin {name:?}"), lane.batch_size)?;
            }
            if lane.timeout.is_some_and(|t| t.is_zero()) {
                return Err(Error::Config(format!("plugin {name:?}: timeout must be positive")));
            }
            let retry = &lane.retry;
            if retry.first_backoff > retry.max_backoff {
                return Err(Error::Config(format!("plugin {name:?}: the first backoff exceeds the maximum")));
            }
            if matches!(&retry.on_failure, OnFailure::DeadLetter(topic) if topic.trim().is_empty()) {
                return Err(Error::Config(format!("plugin {name:?}: the dead-letter topic must not be empty")));
            }
        }
        if let Some(limit) = &self.rate_limit {
            limit.validate("the app", self.shape().batch_size)?;
        }
        // librdkafka takes whole milliseconds up to i32::MAX, and must exceed the 5 ms linger.
        if self.dlq_timeout < Duration::from_millis(10) || self.dlq_timeout.as_millis() > i32::MAX as u128 {
            return Err(Error::Config(format!(
                "dlq_timeout must be between 10 ms and {} days, got {:?}",
                i32::MAX / 86_400_000,
                self.dlq_timeout
            )));
        }
        Ok(())
    }

    fn shape(&self) -> Shape {
        Shape {
            batch_size: self.lanes.iter().map(|l| l.batch_size).max().unwrap_or(1),
            linger: self.linger,
            idle_timeout: self.idle_timeout,
            revoke_timeout: self.revoke_timeout,
            rate_limit: self.rate_limit,
        }
    }
}

/// Why a run ended early.
#[derive(Debug)]
pub enum RunError<E> {
    Core(Error),
    Plugin(E),
}

impl<E> From<Error> for RunError<E> {
    fn from(error: Error) -> Self {
        RunError::Core(error)
    }
}

/// Runs consumers, one run at a time. `stop()` may come from any thread; one that comes
/// before a run ends that run at once.
pub struct Engine<E> {
    stop: Arc<AtomicBool>,
    current: Mutex<Option<Arc<Pool<E>>>>,
}

impl<E> Default for Engine<E> {
    fn default() -> Self {
        Engine { stop: Arc::default(), current: Mutex::default() }
    }
}

impl<E: CallFailure + 'static> Engine<E> {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(pool) = self.current.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            pool.request_stop();
        }
    }

    /// The current (or last) run's counters.
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|pool| pool.snapshot())
    }

    /// Consumes until `stop()`, a plugin failure, or (with `idle_timeout`) until nothing new
    /// arrived for that long and every plugin is done. `worker` is each worker thread's whole
    /// life: it takes tasks with `Pool::next_task` until `None` and reports each with
    /// `Pool::complete`.
    pub fn run<W>(&self, config: &SourceConfig, options: &RunOptions, worker: W) -> Result<(), RunError<E>>
    where
        W: Fn(&Pool<E>) + Send + Sync + 'static,
    {
        options.validate()?;
        let dead_letters = if options.lanes.iter().any(|l| matches!(l.retry.on_failure, OnFailure::DeadLetter(_))) {
            Some(Arc::new(DeadLetters::new(&config.bootstrap, &config.kafka, options.dlq_timeout)?))
        } else {
            None
        };
        // Each run has its own stop flag: a call that fails late (after a timed-out drain) must
        // not stop the next run. A stop() before this one is handed over once it can reach it.
        let pool = Pool::new(options.lanes.clone(), Arc::default(), dead_letters, config.commit_interval())?;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(pool.clone());
        if self.stop.load(Ordering::Acquire) {
            pool.request_stop();
        }
        let outcome = Self::run_pool(&pool, config, options, worker);
        self.stop.store(false, Ordering::Release);
        outcome
    }

    fn run_pool<W>(
        pool: &Arc<Pool<E>>,
        config: &SourceConfig,
        options: &RunOptions,
        worker: W,
    ) -> Result<(), RunError<E>>
    where
        W: Fn(&Pool<E>) + Send + Sync + 'static,
    {
        let intake: Arc<dyn Intake> = pool.clone();
        let source = match Source::start(config, options.shape(), intake) {
            Ok(source) => source,
            Err(error) => {
                pool.close(); // the dead-letter producer must not outlive the run
                return Err(error.into());
            }
        };
        pool.attach(&source.consumer);
        let workers = match spawn_workers(pool, options.workers, worker) {
            Ok(workers) => workers,
            Err(error) => {
                pool.request_stop();
                pool.close();
                drop(source.join());
                return Err(error.into());
            }
        };

        let ending = pool.wait_for_ending();
        // Stop fetching first, then finish what is running, then commit and leave.
        pool.request_stop();
        let consumer = source.join();
        let (finished, late_failure) = pool.drain(options.shutdown_timeout);
        if !finished {
            log::warn!("shutdown: plugin calls still running after {:?}; leaving them", options.shutdown_timeout);
        }
        source::commit_sync(&consumer, &**pool, "final commit");
        pool.detach();
        drop(consumer); // closes: the revoke callback runs and the group is left
        pool.close();
        if finished {
            for handle in workers {
                if handle.join().is_err() {
                    log::error!("a worker thread panicked");
                }
            }
        }
        match ending {
            Ending::Failed(error) => Err(RunError::Plugin(error)),
            Ending::SourceFailed(error) => Err(RunError::Core(error)),
            Ending::Stopped | Ending::Drained => match late_failure {
                None => Ok(()),
                Some(Late::Plugin(error)) => Err(RunError::Plugin(error)),
                Some(Late::Core(error)) => Err(RunError::Core(error)),
            },
        }
    }
}

fn spawn_workers<E, W>(pool: &Arc<Pool<E>>, count: usize, worker: W) -> Result<Vec<JoinHandle<()>>, Error>
where
    E: CallFailure + 'static,
    W: Fn(&Pool<E>) + Send + Sync + 'static,
{
    let worker = Arc::new(worker);
    (0..count)
        .map(|i| {
            let (pool, worker) = (pool.clone(), worker.clone());
            std::thread::Builder::new()
                .name(format!("fastconsume-worker-{i}"))
                .spawn(move || worker(&pool))
                .map_err(|e| Error::Internal(format!("cannot start worker thread {i}: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use super::*;
    use crate::lane::RetryPolicy;
    use crate::mock::{seeded, unreachable};

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

    /// A worker that records what it is given; on lane 0 it fails the first call holding
    /// `fail_at` and sleeps `slow` per call.
    fn recorder(seen: Seen, fail_at: Option<i64>, slow: Duration) -> impl Fn(&Pool<i64>) + Send + Sync + 'static {
        let failed = Arc::new(AtomicBool::new(false));
        move |pool: &Pool<i64>| {
            while let Some(task) = pool.next_task() {
                let started = Instant::now();
                let batch = &task.chunk.batch;
                let offsets: Vec<i64> = task.chunk.indexes().into_iter().map(|i| batch.get(i).offset).collect();
                if task.lane == 0 {
                    std::thread::sleep(slow);
                }
                let outcome = match fail_at {
                    Some(bad) if task.lane == 0 && offsets.contains(&bad) && !failed.swap(true, Ordering::AcqRel) => {
                        Err(bad)
                    }
                    _ => {
                        let key = (task.lane, batch.partition().partition);
                        seen.lock().expect("seen").entry(key).or_default().extend(offsets);
                        Ok(())
                    }
                };
                pool.complete(task, outcome, started.elapsed());
            }
        }
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
            idle_timeout: Some(Duration::from_millis(500)),
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
        let outcome = Engine::default().run(&config, &drain(vec![lane("a", 10, 1)]), |_: &Pool<i64>| {});
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
}
