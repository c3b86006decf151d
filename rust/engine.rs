//! The run loop: takes sealed batches from the source, hands each to the batch handler (the
//! plugins), and stores the offsets that completion makes safe. It blocks on the source's
//! channel when there is nothing to do.
//!
//! Delivery: at least once. A batch's offsets are stored only after the handler returns Ok
//! for it; on stop, idle or failure the stored offsets are committed synchronously before
//! the consumer leaves the group.

use std::sync::Arc;
use std::time::Duration;

use crate::batch::Batch;
use crate::config::SourceConfig;
use crate::errors::Error;
use crate::source::{self, Shared, Source, SourceEvent};

/// Runs every plugin on one batch. Implemented by the Python boundary; the core never sees
/// Python. An error stops the run after committing what completed before it.
pub trait BatchHandler {
    type Error;
    fn handle(&mut self, batch: &Arc<Batch>) -> Result<(), Self::Error>;
}

/// Why a run ended early.
#[derive(Debug)]
pub enum RunError<E> {
    Core(Error),
    Handler(E),
}

impl<E> From<Error> for RunError<E> {
    fn from(error: Error) -> Self {
        RunError::Core(error)
    }
}

/// How one run shapes batches and when it ends by itself.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// The most messages in one fetched batch.
    pub batch_size: usize,
    /// How long a batch may wait for more messages once it holds one.
    pub linger: Duration,
    /// End once nothing new arrived for this long after assignment (drain mode).
    pub idle_timeout: Option<Duration>,
}

impl RunOptions {
    pub fn validate(&self) -> Result<(), Error> {
        if self.batch_size == 0 {
            return Err(Error::Config("batch_size must be at least 1".into()));
        }
        Ok(())
    }
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub messages: u64,
    pub batches: u64,
}

/// Lets another thread (a signal handler, a plugin) end a run gracefully.
#[derive(Clone, Default)]
pub struct StopHandle {
    shared: Arc<Shared>,
}

impl StopHandle {
    pub fn stop(&self) {
        self.shared.request_stop();
    }
}

/// Runs a consumer: connect, consume until stop, idle or failure, commit, leave. One run
/// at a time; a `stop()` that comes before a run ends that run at once.
#[derive(Default)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    #[must_use]
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            shared: self.shared.clone(),
        }
    }

    /// Consumes until `stop()`, or until nothing new arrived for `idle_timeout` after
    /// assignment and everything fetched is committed.
    pub fn run<H: BatchHandler>(
        &self,
        config: &SourceConfig,
        options: &RunOptions,
        handler: &mut H,
    ) -> Result<RunSummary, RunError<H::Error>> {
        options.validate()?;
        self.shared.reset_for_run();
        let outcome = self.run_source(config, options, handler);
        self.shared.clear_stop();
        outcome
    }

    fn run_source<H: BatchHandler>(
        &self,
        config: &SourceConfig,
        options: &RunOptions,
        handler: &mut H,
    ) -> Result<RunSummary, RunError<H::Error>> {
        let source = Source::start(config, options, self.shared.clone())?;
        let outcome = self.dispatch(&source, handler);
        // Whatever happened, stop fetching, commit what is complete and leave the group.
        self.shared.request_stop();
        let consumer = source.join();
        source::commit_sync(&consumer, "final commit");
        drop(consumer); // closes: the revoke callback runs and the group is left
        outcome.map(|()| self.progress())
    }

    /// What the current (or last) run has completed so far.
    #[must_use]
    pub fn progress(&self) -> RunSummary {
        let (messages, batches) = self.shared.completed();
        RunSummary { messages, batches }
    }

    fn dispatch<H: BatchHandler>(
        &self,
        source: &Source,
        handler: &mut H,
    ) -> Result<(), RunError<H::Error>> {
        // The source ends its loop on stop, so this loop ends with the channel.
        while let Ok(event) = source.events.recv() {
            match event {
                SourceEvent::Batch(id, batch) => {
                    if self.shared.stop_requested() {
                        return Ok(()); // not started, not stored: the next run gets it
                    }
                    if !self.shared.tracker().is_live(id, batch.spans()) {
                        continue; // every partition was revoked: the new owner gets it
                    }
                    handler.handle(&batch).map_err(RunError::Handler)?;
                    self.shared.record_completed(batch.len());
                    let mut tracker = self.shared.tracker();
                    let storable = tracker.complete(id, batch.spans());
                    source::store(&source.consumer, &storable)?;
                }
                SourceEvent::Idle => return Ok(()),
                SourceEvent::Failed(error) => return Err(RunError::Core(error)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::mock::MockKafka;
    use crate::seed::{self, Record};

    /// Records `(partition, offset)` per message; fails once on the batch holding `fail_at`.
    #[derive(Default)]
    struct Recorder {
        seen: BTreeMap<i32, Vec<i64>>,
        fail_at: Option<i64>,
    }

    impl BatchHandler for Recorder {
        type Error = i64;

        fn handle(&mut self, batch: &Arc<Batch>) -> Result<(), i64> {
            if let Some(bad) = self.fail_at {
                if batch.iter().any(|m| m.offset == bad) {
                    self.fail_at = None;
                    return Err(bad);
                }
            }
            for m in batch.iter() {
                self.seen.entry(m.partition).or_default().push(m.offset);
            }
            Ok(())
        }
    }

    fn cluster_with(partitions: i32, per_partition: usize) -> (MockKafka, SourceConfig) {
        let cluster = MockKafka::new(1).expect("mock cluster");
        cluster.create_topic("t", partitions).expect("topic");
        for p in 0..partitions {
            let values = vec![b"v".to_vec(); per_partition];
            let records = values.iter().map(|v| Record {
                key: None,
                value: v,
                partition: Some(p),
            });
            seed::produce(&cluster.bootstrap(), "t", records).expect("produce");
        }
        let config = SourceConfig {
            bootstrap: cluster.bootstrap(),
            group: "g".into(),
            topics: vec!["t".into()],
            kafka: vec![],
            connect_timeout: Duration::from_secs(10),
        };
        (cluster, config)
    }

    fn drain(batch_size: usize) -> RunOptions {
        RunOptions {
            batch_size,
            linger: Duration::from_millis(5),
            idle_timeout: Some(Duration::from_millis(500)),
        }
    }

    #[test]
    fn drains_every_message_in_order_then_a_rerun_finds_nothing() {
        let (_cluster, config) = cluster_with(3, 400);
        let engine = Engine::default();
        let mut recorder = Recorder::default();
        let summary = engine.run(&config, &drain(64), &mut recorder).expect("run");
        assert_eq!(summary.messages, 1_200);
        for p in 0..3 {
            assert_eq!(
                recorder.seen[&p],
                (0..400).collect::<Vec<_>>(),
                "partition {p}"
            );
        }
        let mut again = Recorder::default();
        let summary = engine
            .run(&config, &drain(64), &mut again)
            .expect("second run");
        assert_eq!(summary.messages, 0, "everything was committed");
    }

    #[test]
    fn a_failed_batch_is_not_committed() {
        let (_cluster, config) = cluster_with(1, 300);
        let engine = Engine::default();
        let mut failing = Recorder {
            fail_at: Some(150),
            ..Recorder::default()
        };
        match engine.run(&config, &drain(50), &mut failing) {
            Err(RunError::Handler(150)) => {}
            other => panic!("expected the handler's error, got {other:?}"),
        }
        let done = failing.seen.get(&0).map_or(0, Vec::len) as i64;
        let mut again = Recorder::default();
        engine.run(&config, &drain(50), &mut again).expect("rerun");
        let redelivered = &again.seen[&0];
        assert_eq!(
            redelivered.first(),
            Some(&done),
            "resumes at the first uncompleted offset"
        );
        assert_eq!(redelivered.last(), Some(&299));
    }

    #[test]
    fn stop_before_run_ends_that_run_at_once() {
        let (_cluster, config) = cluster_with(1, 10);
        let engine = Engine::default();
        engine.stop_handle().stop();
        let options = RunOptions {
            idle_timeout: None,
            ..drain(10)
        };
        let summary = engine
            .run(&config, &options, &mut Recorder::default())
            .expect("run");
        assert_eq!(summary.messages, 0);
    }

    #[test]
    fn unreachable_brokers_fail_within_the_connect_timeout() {
        let config = SourceConfig {
            bootstrap: "127.0.0.1:1".into(),
            group: "g".into(),
            topics: vec!["t".into()],
            kafka: vec![],
            connect_timeout: Duration::from_millis(500),
        };
        let started = std::time::Instant::now();
        let outcome = Engine::default().run(&config, &drain(10), &mut Recorder::default());
        assert!(
            matches!(outcome, Err(RunError::Core(Error::Connect { .. }))),
            "{outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
