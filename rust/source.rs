//! The Kafka side: one OS thread runs a `BaseConsumer` poll loop and seals fetched messages
//! into batches by size and by linger. Rebalance callbacks run on this thread, inside
//! `poll`, so the offset tracker is only ever touched by it and by the engine's completions.
//!
//! Delivery: at least once. Offsets are stored (and then committed by librdkafka's
//! auto-commit, or synchronously on revoke and shutdown) only for complete batches; see
//! `offsets`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;

use crate::batch::{Batch, BatchBuilder};
use crate::config::SourceConfig;
use crate::engine::RunOptions;
use crate::errors::{Error, Result};
use crate::offsets::{BatchId, OffsetTracker, Storable};

/// How long the poll loop may block with nothing to do before it looks at the stop flag.
/// librdkafka's wrapper cannot be woken from outside, so this bounds the stop latency; it
/// is the only periodic wake-up and costs a few microseconds each.
const STOP_CHECK: Duration = Duration::from_millis(250);

/// Batches waiting for the engine. Two keep the engine busy while the next one fills;
/// more would only hold memory that librdkafka's own fetch queue already bounds.
const CHANNEL_DEPTH: usize = 2;

/// What the source tells the engine, in order.
pub enum SourceEvent {
    Batch(BatchId, Arc<Batch>),
    /// `idle_timeout` passed with nothing fetched, and no partial batch is pending.
    Idle,
    /// The consumer failed; nothing more will come.
    Failed(Error),
}

/// State shared by the poll thread, its rebalance callbacks and the engine.
#[derive(Default)]
pub struct Shared {
    tracker: Mutex<OffsetTracker>,
    stop: AtomicBool,
    /// When partitions were last assigned (eager or incremental), if ever.
    assigned_at: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
    /// Messages and batches every plugin has finished, this run.
    completed_messages: AtomicU64,
    completed_batches: AtomicU64,
}

/// A poisoned lock means a panic elsewhere already failed the run; the data is still sound
/// (each critical section leaves it consistent), so keep going rather than panic again.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Forgets the previous run's partitions, keeping a stop that was already requested.
    pub fn reset_for_run(&self) {
        *self.tracker() = OffsetTracker::default();
        *lock(&self.assigned_at) = None;
        *lock(&self.last_error) = None;
        self.completed_messages.store(0, Ordering::Relaxed);
        self.completed_batches.store(0, Ordering::Relaxed);
    }

    pub fn record_completed(&self, messages: usize) {
        self.completed_messages
            .fetch_add(messages as u64, Ordering::Relaxed);
        self.completed_batches.fetch_add(1, Ordering::Relaxed);
    }

    /// `(messages, batches)` completed this run.
    pub fn completed(&self) -> (u64, u64) {
        (
            self.completed_messages.load(Ordering::Relaxed),
            self.completed_batches.load(Ordering::Relaxed),
        )
    }

    pub fn clear_stop(&self) {
        self.stop.store(false, Ordering::Release);
    }

    pub fn tracker(&self) -> MutexGuard<'_, OffsetTracker> {
        lock(&self.tracker)
    }

    fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }
}

/// librdkafka's callbacks. `error` runs on librdkafka's threads; the rebalance hooks run on
/// the poll thread.
pub struct SourceContext {
    shared: Arc<Shared>,
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        log::warn!("librdkafka: {error}: {reason}");
        *lock(&self.shared.last_error) = Some(format!("{error}: {reason}"));
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Commit what is complete while the partitions are still ours (librdkafka 4059:
            // with manual offset stores, committing after the revoke is too late).
            let revoked = partitions(tpl);
            let mut tracker = self.shared.tracker();
            tracker.revoke(revoked.iter().map(|(t, p)| (t.as_str(), *p)));
            commit_sync(consumer, "commit on revoke");
            log::info!("revoked {} partition(s)", revoked.len());
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let assigned = partitions(tpl);
                self.shared
                    .tracker()
                    .assign(assigned.iter().map(|(t, p)| (t.as_str(), *p)));
                *lock(&self.shared.assigned_at) = Some(Instant::now());
                log::info!("assigned {} partition(s)", assigned.len());
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => log::warn!("rebalance error: {e}"),
        }
    }
}

pub type KafkaConsumer = BaseConsumer<SourceContext>;

/// Commits the stored offsets now. Nothing stored yet is not an error.
pub fn commit_sync(consumer: &KafkaConsumer, what: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => log::warn!("{what} failed: {e}"),
    }
}

/// Stores offsets that completion made safe. The tracker's lock is held by the caller, so a
/// concurrent revoke cannot slip between the decision and the store.
pub fn store(consumer: &KafkaConsumer, storable: &[Storable]) -> Result<()> {
    if storable.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::with_capacity(storable.len());
    for s in storable {
        tpl.add_partition_offset(&s.topic, s.partition, Offset::Offset(s.offset))
            .map_err(|e| Error::kafka("store offsets", e))?;
    }
    match consumer.store_offsets(&tpl) {
        // A partition lost between completion and store belongs to its next owner now.
        Ok(()) | Err(KafkaError::StoreOffset(RDKafkaErrorCode::State)) => Ok(()),
        Err(e) => Err(Error::kafka("store offsets", e)),
    }
}

/// A running poll thread.
pub struct Source {
    pub consumer: Arc<KafkaConsumer>,
    pub events: Receiver<SourceEvent>,
    thread: JoinHandle<()>,
}

impl Source {
    /// Connects (bounded by `connect_timeout`), subscribes and starts the poll thread.
    pub fn start(
        config: &SourceConfig,
        options: &RunOptions,
        shared: Arc<Shared>,
    ) -> Result<Source> {
        config.validate()?;
        let context = SourceContext {
            shared: shared.clone(),
        };
        let consumer: KafkaConsumer = config
            .client_config()
            .create_with_context(context)
            .map_err(|e| Error::kafka("create consumer", e))?;
        let started = Instant::now();
        if let Err(e) = consumer.fetch_metadata(Some(&config.topics[0]), config.connect_timeout) {
            return Err(Error::Connect {
                bootstrap: config.bootstrap.clone(),
                waited_ms: started.elapsed().as_millis() as u64,
                last_error: shared.last_error().or_else(|| Some(e.to_string())),
            });
        }
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| Error::kafka("subscribe", e))?;

        let consumer = Arc::new(consumer);
        let (sender, events) = crossbeam_channel::bounded(CHANNEL_DEPTH);
        let poll = PollLoop {
            consumer: consumer.clone(),
            shared,
            sender,
            batch_size: options.batch_size,
            linger: options.linger,
            idle_timeout: options.idle_timeout,
        };
        let thread = std::thread::Builder::new()
            .name("fastconsume-source".into())
            .spawn(move || poll.run())
            .map_err(|e| Error::Config(format!("cannot start the source thread: {e}")))?;
        Ok(Source {
            consumer,
            events,
            thread,
        })
    }

    /// Waits for the poll thread to end. It ends on stop, idle or failure, or once the
    /// event receiver is gone.
    pub fn join(self) -> Arc<KafkaConsumer> {
        let Source {
            consumer,
            events,
            thread,
        } = self;
        drop(events);
        if thread.join().is_err() {
            log::error!("the source thread panicked");
        }
        consumer
    }
}

struct PollLoop {
    consumer: Arc<KafkaConsumer>,
    shared: Arc<Shared>,
    sender: Sender<SourceEvent>,
    batch_size: usize,
    linger: Duration,
    idle_timeout: Option<Duration>,
}

/// Why the loop ended, if it must tell the engine.
enum Exit {
    Quiet,
    Tell(SourceEvent),
}

impl PollLoop {
    fn run(self) {
        let mut builder = BatchBuilder::default();
        if let Exit::Tell(event) = self.fill(&mut builder) {
            // The engine may already be gone (it failed); then nobody needs to know.
            let _ = self.sender.send(event);
        }
    }

    fn fill(&self, builder: &mut BatchBuilder) -> Exit {
        let mut sealed_at = Instant::now(); // when a batch last left: the idle clock
        let mut linger_until: Option<Instant> = None;
        loop {
            if self.shared.stop_requested() {
                return Exit::Quiet;
            }
            let now = Instant::now();
            let timeout = match linger_until {
                Some(deadline) => deadline.saturating_duration_since(now),
                None => self.idle_wait(now, sealed_at),
            };
            if timeout.is_zero() && linger_until.is_none() {
                return Exit::Tell(SourceEvent::Idle);
            }
            let first = self.consumer.poll(timeout);
            let mut next = first;
            // Drain what is already fetched without blocking, up to the batch size.
            while let Some(result) = next {
                match result {
                    Ok(message) => {
                        if builder.is_empty() {
                            linger_until = Some(Instant::now() + self.linger);
                        }
                        builder.push(&message);
                    }
                    Err(e) => {
                        if let Some(fatal) = self.consumption_error(e) {
                            return Exit::Tell(SourceEvent::Failed(fatal));
                        }
                    }
                }
                if builder.len() >= self.batch_size {
                    break;
                }
                next = self.consumer.poll(Duration::ZERO);
            }
            let full = builder.len() >= self.batch_size;
            let lingered = linger_until.is_some_and(|d| Instant::now() >= d);
            if !builder.is_empty() && (full || lingered) {
                let batch = builder.take();
                let id = self.shared.tracker().track(batch.spans());
                linger_until = None;
                if self.sender.send(SourceEvent::Batch(id, batch)).is_err() {
                    return Exit::Quiet;
                }
                sealed_at = Instant::now();
            }
        }
    }

    /// How long to block when no batch is filling: until the idle deadline if draining,
    /// else until the next stop check.
    fn idle_wait(&self, now: Instant, sealed_at: Instant) -> Duration {
        let Some(idle) = self.idle_timeout else {
            return STOP_CHECK;
        };
        // The idle clock starts at assignment, so a slow group join is not mistaken for idle.
        let Some(assigned_at) = *lock(&self.shared.assigned_at) else {
            return STOP_CHECK;
        };
        let since = sealed_at.max(assigned_at);
        (since + idle)
            .saturating_duration_since(now)
            .min(STOP_CHECK)
    }

    /// Logs a consumption error; returns it if the consumer cannot go on.
    fn consumption_error(&self, error: KafkaError) -> Option<Error> {
        match error {
            KafkaError::PartitionEOF(_) => None,
            KafkaError::MessageConsumptionFatal(_) => Some(Error::kafka("consume", error)),
            other => {
                log::warn!("consume: {other}");
                *lock(&self.shared.last_error) = Some(other.to_string());
                None
            }
        }
    }
}
