//! The Kafka side: one OS thread runs a `BaseConsumer` poll loop and seals fetched messages
//! into per-partition batches by size and by linger, then offers them to the pool.
//! Rebalance callbacks run on this thread, inside `poll`.
//!
//! Holding back: a batch the pool refuses (a lane is full) is held here, and while anything
//! is held, or the app's rate limit (charged once per take) is over budget, the loop takes
//! nothing from librdkafka: it sleeps on an empty queue of its own. librdkafka's prefetch
//! queue, bounded by `queued.max.messages.kbytes`, then fills and its fetchers stop; when the
//! pool has room again (it wakes the loop) or the budget is back, taking resumes at once,
//! from memory. Pausing partitions instead makes librdkafka drop what it prefetched and
//! fetch it again, about 200 ms a cycle: ten times slower for a plugin that is just busy.
//!
//! This thread also drives the pool's timer wheel. It sleeps in librdkafka's queue wait
//! until the wheel's next deadline, and is woken early by a message, by an event on the
//! consumer queue (its non-empty callback), by a stop, by room in a full lane, or by an
//! earlier wheel entry: each yields the queue it sleeps on.
//!
//! Delivery: at least once. Offsets are stored up to where every lane finished (per call), and
//! committed from the wheel `auto.commit.interval.ms` after they are stored, synchronously on
//! revoke (before the partitions go) and at shutdown.

use std::collections::VecDeque;
use std::ffi::CString;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::metadata::Metadata;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::ClientContext;

use crate::batch::{Batch, BatchBuilder, Fetched, Partition};
use crate::config::SourceConfig;
use crate::errors::{ConnectFailure, Error, ErrorWatch, Result};
use crate::fetch::{FetchQueue, RawMessage};
use crate::limit::{Limiter, RateLimit};
use crate::pool::Wake;
use crate::timer::TimerKey;

/// The longest the poll loop sleeps. Every wake-up is event-driven, so this only bounds
/// what a lost one could cost; once a second is nothing next to librdkafka's own threads.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// What the source needs from the pool (which is generic over the plugins' error type).
pub trait Intake: Send + Sync {
    fn assign(&self, partitions: Vec<Partition>);
    /// Drops waiting work of the partitions and waits, bounded, for their running calls.
    fn revoke(&self, partitions: &[Partition], timeout: Duration);
    fn record_committed(&self, offsets: &TopicPartitionList);
    /// A synchronous commit of every stored offset succeeded.
    fn record_stored_committed(&self);
    /// The last high watermarks seen of partitions about to be revoked, for stats.
    fn record_high_watermarks(&self, watermarks: Vec<(Partition, i64)>);
    /// Offers a batch; `Err` gives it back when a lane is full.
    fn submit(&self, batch: Arc<Batch>) -> std::result::Result<(), Arc<Batch>>;
    /// Drain mode: whether nothing new was fetched for the idle timeout and nothing waits
    /// to be offered. Told on every turn of the poll loop (the loop
    /// keeps serving the group while idle), and `false` as soon as anything arrives.
    fn source_idle(&self, idle: bool);
    fn source_failed(&self, error: Error);
    fn stop_requested(&self) -> bool;
    /// How to wake the source when a wheel entry falls due before it planned to wake;
    /// `None` once the source is gone.
    fn set_waker(&self, wake: Option<Wake>);
    /// Puts one of the source's own deadlines on the wheel (it is driving it, so it is not
    /// woken for it).
    fn schedule_wake(&self, at: Instant) -> TimerKey;
    fn cancel_wake(&self, key: TimerKey);
    /// Fires due wheel entries; returns when the wheel is next due.
    fn drive_timers(&self, now: Instant) -> Option<Instant>;
}

/// Yields the queues the poll loop waits on, which wakes it. Cleared when the loop ends, so
/// a late wake-up (from librdkafka's threads or a worker) touches no dead queue.
#[derive(Default)]
struct Waker {
    queues: Mutex<Vec<Arc<FetchQueue>>>,
}

impl Waker {
    /// Under the lock, so that the last handle of a queue is never one a waker copied out
    /// (its drop after the consumer's would touch a destroyed handle). Yielding never blocks.
    fn wake(&self) {
        for queue in lock(&self.queues).iter() {
            queue.wake();
        }
    }
}

/// How the source shapes batches and when it calls itself idle.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub batch_size: usize,
    pub linger: Duration,
    pub idle_timeout: Option<Duration>,
    pub revoke_timeout: Duration,
    /// The app's rate limit, charged per take.
    pub rate_limit: Option<RateLimit>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// librdkafka's callbacks. `error` and `commit_callback` may run on librdkafka's threads;
/// the rebalance hooks run on the poll thread, inside `poll`.
pub struct SourceContext {
    intake: Arc<dyn Intake>,
    revoke_timeout: Duration,
    /// Partitions revoked since the poll loop last looked, so it drops their partial batches.
    revoked: Mutex<Vec<Partition>>,
    assigned_at: Mutex<Option<Instant>>,
    errors: ErrorWatch,
    /// Where assigned partitions' messages go; owned by the poll loop, which clears this
    /// when it ends so the queue is gone before the consumer is.
    fetch: Mutex<Option<Arc<FetchQueue>>>,
}

fn partitions(tpl: &TopicPartitionList) -> Vec<Partition> {
    tpl.elements().iter().map(|e| Partition { topic: Arc::from(e.topic()), partition: e.partition() }).collect()
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.record(&error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::errors::log_librdkafka(&self.errors, level, fac, log_message);
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Before librdkafka assigns, so no message of these partitions can reach the
            // consumer queue ahead of ours (which would reorder them).
            if let Some(fetch) = lock(&self.fetch).as_ref() {
                fetch.forward(consumer, &partitions(tpl));
            }
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            // Lanes empty on a revoke; drain mode must not take that for the end while
            // partitions may be assigned again.
            self.intake.source_idle(false);
            let revoked = partitions(tpl);
            let watermarks = revoked
                .iter()
                .filter_map(|p| cached_high_watermark(consumer, p).map(|high| (p.clone(), high)))
                .collect();
            self.intake.record_high_watermarks(watermarks);
            // Finish (bounded) what is running, then commit while the partitions are still
            // ours: with manual offset stores a commit after the revoke is too late
            // (librdkafka issue 4059).
            self.intake.revoke(&revoked, self.revoke_timeout);
            commit_sync(consumer, &*self.intake, "commit on revoke");
            log::info!("revoked {} partition(s)", revoked.len());
            lock(&self.revoked).extend(revoked);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let assigned = partitions(tpl);
                log::info!("assigned {} partition(s)", assigned.len());
                self.intake.assign(assigned);
                *lock(&self.assigned_at) = Some(Instant::now());
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => log::warn!("rebalance error: {e}"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => self.intake.record_committed(offsets),
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => log::warn!("commit failed: {e}"),
        }
    }
}

pub type KafkaConsumer = BaseConsumer<SourceContext>;

/// Commits the stored offsets now, and tells `intake` they are committed (a synchronous
/// commit runs no commit callback). Nothing stored yet is not an error.
pub fn commit_sync(consumer: &KafkaConsumer, intake: &dyn Intake, what: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        // No offset: everything stored was committed already.
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => intake.record_stored_committed(),
        Err(e) => log::warn!("{what} failed: {e}"),
    }
}

/// Starts a commit of the stored offsets; its result comes back through `commit_callback`.
/// (`commit_consumer_state(Async)` sends a manual commit's result nowhere: librdkafka routes
/// it only to a callback set in the configuration, which the event API leaves unset.)
pub fn commit_async(consumer: &KafkaConsumer) {
    let client = consumer.client().native_ptr();
    // SAFETY: the handle is alive for the borrow. The consumer queue reference returned is
    // ours and released right after; librdkafka holds its own while the commit runs.
    let err = unsafe {
        let queue = rdkafka::bindings::rd_kafka_queue_get_consumer(client);
        if queue.is_null() {
            log::warn!("commit: no consumer queue");
            return;
        }
        let err = rdkafka::bindings::rd_kafka_commit_queue(client, std::ptr::null(), queue, None, std::ptr::null_mut());
        rdkafka::bindings::rd_kafka_queue_destroy(queue);
        err
    };
    if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        log::warn!("commit failed: {}", RDKafkaErrorCode::from(err));
    }
}

/// The connect's metadata calls wait in slices, growing from this, so that a permanent
/// failure is noticed between two of them.
const FIRST_SLICE: Duration = Duration::from_millis(100);
/// The longest slice at first: how late an authentication or TLS failure, which librdkafka
/// sees on its first connection, may be noticed.
const EARLY_SLICE: Duration = Duration::from_millis(250);
/// After this, slices are `LATE_SLICE` long, so that a cluster whose metadata answer takes
/// longer than an early slice (far away, overloaded) still gets through.
const EARLY: Duration = Duration::from_secs(3);
const LATE_SLICE: Duration = Duration::from_secs(1);
/// How often the missing topics are named while `wait_for_topics` waits for them.
const TOPIC_WAIT_WARNING: Duration = Duration::from_secs(10);
/// How often the topics are looked up again while waiting for them.
const TOPIC_WAIT_POLL: Duration = Duration::from_secs(1);

/// Serves the consumer queue so librdkafka's error events reach the context. Nothing is
/// subscribed yet, so polling cannot join the group or return a message. Bounded, not until
/// `None`: a poll that returns nothing may still have served an event.
fn serve_errors<C: ConsumerContext>(consumer: &BaseConsumer<C>) {
    for _ in 0..32 {
        let _ = consumer.poll(Duration::ZERO);
    }
}

/// Connects: fetches the metadata of the first topic, bounded by `connect_timeout`. The wait
/// is cut into short slices, and between them librdkafka's error events are read: an
/// authentication or TLS failure ends it at once (librdkafka knows within a second, but its
/// metadata call would wait the whole timeout), and a timeout names the last meaningful error
/// (a failed resolve, a refused connection), never just "all brokers are down". `stop` is
/// asked between slices; `Ok(None)` means it said yes.
pub fn connect<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    errors: &ErrorWatch,
    config: &SourceConfig,
    stop: &dyn Fn() -> bool,
) -> Result<Option<Metadata>> {
    let started = Instant::now();
    let deadline = started + config.connect_timeout;
    let mut slice = FIRST_SLICE;
    let outcome = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let attempt = consumer.fetch_metadata(Some(&config.topics[0]), slice.min(remaining));
        serve_errors(consumer);
        let failed = match attempt {
            Ok(metadata) => break Ok(Some(metadata)),
            Err(e) => e,
        };
        let waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let bootstrap = config.bootstrap.clone();
        if let Some((failure, reason)) = errors.permanent() {
            break Err(Error::Connect { bootstrap, waited_ms, failure, last_error: Some(reason) });
        }
        if Instant::now() >= deadline {
            let last_error = errors.last().map(|(_, reason)| reason).or_else(|| Some(failed.to_string()));
            break Err(Error::Connect { bootstrap, waited_ms, failure: ConnectFailure::Unreachable, last_error });
        }
        if stop() {
            break Ok(None);
        }
        slice = if started.elapsed() < EARLY { (slice * 2).min(EARLY_SLICE) } else { LATE_SLICE };
    };
    errors.flush();
    outcome
}

/// The configured topics the cluster does not have (unknown to its metadata). `first` is the
/// metadata `connect` fetched for the first topic; the others are fetched here.
pub fn missing_topics<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    config: &SourceConfig,
    first: &Metadata,
) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for (i, topic) in config.topics.iter().enumerate() {
        let fetched;
        let metadata = if i == 0 {
            first
        } else {
            fetched = consumer
                .fetch_metadata(Some(topic), config.connect_timeout)
                .map_err(|e| Error::kafka("topic metadata", e))?;
            &fetched
        };
        let known = metadata.topics().iter().find(|t| t.name() == topic);
        let unknown = known.is_none_or(|t| {
            t.error().is_some_and(|code| RDKafkaErrorCode::from(code) == RDKafkaErrorCode::UnknownTopicOrPartition)
        });
        if unknown {
            missing.push(topic.clone());
        }
    }
    Ok(missing)
}

/// Connects and checks that every topic exists. A missing one is an error, unless
/// `wait_for_topics` is set: then this waits for them (naming them every few seconds) until
/// they exist or `stop` says so (`Ok(false)`).
fn connect_and_find_topics<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    errors: &ErrorWatch,
    config: &SourceConfig,
    stop: &dyn Fn() -> bool,
) -> Result<bool> {
    let Some(mut first) = connect(consumer, errors, config, stop)? else { return Ok(false) };
    let started = Instant::now();
    let mut warned_at: Option<Instant> = None;
    loop {
        let missing = missing_topics(consumer, config, &first)?;
        if missing.is_empty() {
            if warned_at.is_some() {
                log::info!("the topics exist now; consuming");
            }
            return Ok(true);
        }
        if !config.wait_for_topics {
            return Err(Error::UnknownTopics { bootstrap: config.bootstrap.clone(), topics: missing });
        }
        if warned_at.is_none_or(|at| at.elapsed() >= TOPIC_WAIT_WARNING) {
            log::warn!(
                "waiting for topic(s) {} to be created (wait_for_topics is set; waited {:.0} s)",
                missing.join(", "),
                started.elapsed().as_secs_f64()
            );
            warned_at = Some(Instant::now());
        }
        let until = Instant::now() + TOPIC_WAIT_POLL;
        while Instant::now() < until {
            if stop() {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // A broker that goes away meanwhile is waited for like at the start.
        match connect(consumer, errors, config, stop) {
            Ok(Some(metadata)) => first = metadata,
            Ok(None) => return Ok(false),
            Err(error @ Error::Connect { failure, .. }) if failure.is_permanent() => return Err(error),
            Err(error) => log::warn!("while waiting for topics: {error}"),
        }
    }
}

/// The high watermark librdkafka last saw for a partition, without asking the broker.
pub fn cached_high_watermark(consumer: &KafkaConsumer, partition: &Partition) -> Option<i64> {
    let topic = CString::new(partition.topic.as_bytes()).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the handle is alive for the borrow of `consumer`; the topic is a valid C string
    // and the out-pointers point to live locals. The call only reads librdkafka's cache.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition.partition,
            &raw mut low,
            &raw mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

/// A running poll thread.
pub struct Source {
    pub consumer: Arc<KafkaConsumer>,
    thread: JoinHandle<()>,
}

impl Source {
    /// Connects (bounded by `connect_timeout`), subscribes and starts the poll thread.
    pub fn start(config: &SourceConfig, shape: Shape, intake: Arc<dyn Intake>) -> Result<Source> {
        config.validate()?;
        let context = SourceContext {
            intake: intake.clone(),
            revoke_timeout: shape.revoke_timeout,
            revoked: Mutex::default(),
            assigned_at: Mutex::default(),
            errors: ErrorWatch::default(),
            fetch: Mutex::default(),
        };
        let mut consumer: KafkaConsumer =
            config.client_config().create_with_context(context).map_err(|e| Error::kafka("create consumer", e))?;
        let limiter = shape.rate_limit.map(Limiter::new).transpose()?;
        // A stop while connecting (or waiting for topics) still starts the loop, which then
        // ends at once: the run returns as stopped, having consumed nothing.
        let stop = || intake.stop_requested();
        connect_and_find_topics(&consumer, &consumer.context().errors, config, &stop)?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|e| Error::kafka("subscribe", e))?;

        let new_queue =
            || FetchQueue::new(&consumer).ok_or_else(|| Error::Internal("librdkafka could not create a queue".into()));
        let fetch = Arc::new(new_queue()?);
        // Nothing is forwarded here: the loop sleeps on it while it may take nothing.
        let held_back = Arc::new(new_queue()?);
        *lock(&consumer.context().fetch) = Some(fetch.clone());
        let waker = Arc::new(Waker::default());
        *lock(&waker.queues) = vec![fetch.clone(), held_back.clone()];
        // Events (rebalances, errors, commit results) arrive on the consumer queue, which the
        // loop does not sleep on: its non-empty callback wakes the loop instead.
        let on_event = waker.clone();
        consumer.set_nonempty_callback(move || on_event.wake());
        let on_timer = waker.clone();
        intake.set_waker(Some(Arc::new(move || on_timer.wake())));
        let consumer = Arc::new(consumer);
        let poll = PollLoop {
            waker,
            held_back,
            limiter,
            uncharged: 0,
            rate_timer: None,
            idle_timer: None,
            consumer: consumer.clone(),
            fetch,
            raw: Vec::new(),
            intake,
            shape,
            filling: Vec::new(),
            last_filled: 0,
            held: VecDeque::new(),
            last_message_at: Instant::now(),
        };
        let (intake_on_error, waker_on_error) = (poll.intake.clone(), poll.waker.clone());
        let spawned = std::thread::Builder::new().name("fastconsume-source".into()).spawn(move || poll.run());
        match spawned {
            Ok(thread) => Ok(Source { consumer, thread }),
            Err(e) => {
                // The queues must go before the consumer.
                intake_on_error.set_waker(None);
                lock(&waker_on_error.queues).clear();
                lock(&consumer.context().fetch).take();
                Err(Error::Internal(format!("cannot start the source thread: {e}")))
            }
        }
    }

    /// Waits for the poll thread to end (it ends on stop, idle or failure).
    pub fn join(self) -> Arc<KafkaConsumer> {
        if self.thread.join().is_err() {
            log::error!("the source thread panicked");
        }
        self.consumer
    }
}

/// Runs however the poll loop ends, a panic included: the fetch queue goes before the
/// consumer does, and a panic ends the run instead of leaving it waiting for batches.
struct Ending {
    consumer: Arc<KafkaConsumer>,
    intake: Arc<dyn Intake>,
    waker: Arc<Waker>,
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.intake.set_waker(None);
        lock(&self.waker.queues).clear();
        lock(&self.consumer.context().fetch).take();
        if std::thread::panicking() {
            self.intake.source_failed(Error::Internal("the source thread panicked".into()));
        }
    }
}

/// A partition's batch being filled, and when it must be sealed.
struct Filling {
    builder: BatchBuilder,
    deadline: Option<Instant>,
    /// The deadline's wheel entry.
    timer: Option<TimerKey>,
    /// librdkafka's handle of the topic, for a lookup by pointer; 0 until seen.
    topic_handle: usize,
}

struct PollLoop {
    consumer: Arc<KafkaConsumer>,
    fetch: Arc<FetchQueue>,
    /// Messages of the last bulk take, reused.
    raw: Vec<RawMessage>,
    intake: Arc<dyn Intake>,
    shape: Shape,
    filling: Vec<Filling>,
    /// Index into `filling` of the last partition pushed to: consecutive messages usually
    /// share a partition, so the lookup is one comparison.
    last_filled: usize,
    /// Sealed batches the lanes refused, oldest first; nothing is taken while there are any.
    held: VecDeque<Arc<Batch>>,
    last_message_at: Instant,
    waker: Arc<Waker>,
    /// An empty queue to sleep on while nothing may be taken.
    held_back: Arc<FetchQueue>,
    /// The app's rate limit; `uncharged` messages of `raw` wait to be charged until
    /// `rate_timer` says the budget is back.
    limiter: Option<Limiter>,
    uncharged: usize,
    rate_timer: Option<Instant>,
    /// When the idle deadline's wheel entry falls due, if one is pending.
    idle_timer: Option<Instant>,
}

impl PollLoop {
    fn run(mut self) {
        let _ending =
            Ending { consumer: self.consumer.clone(), intake: self.intake.clone(), waker: self.waker.clone() };
        if let Err(error) = self.fill() {
            self.intake.source_failed(error);
        }
    }

    fn fill(&mut self) -> Result<()> {
        loop {
            if self.intake.stop_requested() {
                return Ok(());
            }
            self.forget_revoked();
            self.offer_held();
            let now = Instant::now();
            self.intake.source_idle(self.idle(now));
            self.serve_events()?;
            // Serving events may have run a rebalance callback that waited: look again.
            let now = Instant::now();
            self.arm_idle_timer(now);
            let next_timer = self.intake.drive_timers(now);
            let wait = next_timer.map_or(MAX_SLEEP, |at| at.saturating_duration_since(now)).min(MAX_SLEEP);
            let mut raw = std::mem::take(&mut self.raw);
            let before = raw.len();
            if before == 0 && self.held.is_empty() {
                self.fetch.take(wait, self.shape.batch_size, &mut raw);
            } else {
                self.held_back.take(wait, 1, &mut raw); // never holds a message: a sleep
            }
            if raw[before..].iter().any(|m| m.error().is_none()) {
                self.last_message_at = Instant::now();
                self.intake.source_idle(false); // before the engine can see empty lanes
            }
            self.uncharged += raw.len() - before;
            if self.charge() {
                for message in raw.drain(..) {
                    self.take_raw(&message);
                }
            }
            self.raw = raw;
            let now = Instant::now();
            for index in 0..self.filling.len() {
                if self.filling[index].deadline.is_some_and(|d| d <= now) {
                    self.seal(index);
                }
            }
        }
    }

    /// Serves the consumer queue without blocking: rebalances, errors and commit results
    /// (their callbacks run here), and any message fetched before its partition's queue was
    /// forwarded.
    fn serve_events(&mut self) -> Result<()> {
        // A local handle: messages borrow it, not `self`, which files them.
        let consumer = self.consumer.clone();
        while let Some(result) = consumer.poll(Duration::ZERO) {
            let message = match result {
                Ok(message) => message,
                Err(KafkaError::PartitionEOF(_)) => continue,
                Err(e @ KafkaError::MessageConsumptionFatal(_)) => return Err(Error::kafka("consume", e)),
                Err(e) => {
                    log::warn!("consume: {e}");
                    continue;
                }
            };
            let index = self.filling_for(message.topic_ptr() as usize, message.partition(), || message.topic());
            self.last_message_at = Instant::now();
            self.push(index, &message);
        }
        Ok(())
    }

    fn take_raw(&mut self, message: &RawMessage) {
        if let Some(error) = message.error() {
            log::warn!("consume: {}[{}]: {error}", message.topic(), message.partition());
            return;
        }
        let index = self.filling_for(message.topic_handle() as usize, message.partition(), || message.topic());
        self.push(index, message);
    }

    /// Files one message; seals its batch when full.
    fn push(&mut self, index: usize, message: &impl Fetched) {
        let filling = &mut self.filling[index];
        if filling.builder.is_empty() {
            let deadline = self.last_message_at + self.shape.linger;
            filling.deadline = Some(deadline);
            filling.timer = Some(self.intake.schedule_wake(deadline));
        }
        filling.builder.push(message);
        if filling.builder.len() >= self.shape.batch_size {
            self.seal(index);
        }
    }

    /// The batch being filled for a partition. Consecutive messages usually share one, so
    /// the lookup is usually a comparison; the topic's name is read only for a new one.
    fn filling_for<'a>(&mut self, topic_handle: usize, partition: i32, topic: impl FnOnce() -> &'a str) -> usize {
        let matches = |f: &Filling| f.topic_handle == topic_handle && f.builder.partition().partition == partition;
        if self.filling.get(self.last_filled).is_some_and(matches) {
            return self.last_filled;
        }
        let index = if let Some(index) = self.filling.iter().position(matches) {
            index
        } else {
            let topic = topic();
            let by_name =
                |f: &Filling| f.builder.partition().partition == partition && &*f.builder.partition().topic == topic;
            if let Some(index) = self.filling.iter().position(by_name) {
                self.filling[index].topic_handle = topic_handle;
                index
            } else {
                let partition = Partition { topic: Arc::from(topic), partition };
                self.filling.push(Filling {
                    builder: BatchBuilder::new(partition),
                    deadline: None,
                    timer: None,
                    topic_handle,
                });
                self.filling.len() - 1
            }
        };
        self.last_filled = index;
        index
    }

    /// Seals a partition's batch and offers it, unless batches of that partition are held:
    /// then it queues behind them, keeping offset order.
    fn seal(&mut self, index: usize) {
        let filling = &mut self.filling[index];
        filling.deadline = None;
        if let Some(key) = filling.timer.take() {
            self.intake.cancel_wake(key);
        }
        if filling.builder.is_empty() {
            return;
        }
        let batch = filling.builder.take();
        if self.held.iter().any(|h| h.partition() == batch.partition()) {
            self.held.push_back(batch);
            return;
        }
        if let Err(refused) = self.intake.submit(batch) {
            self.held.push_back(refused);
        }
    }

    /// Offers held batches again, oldest first.
    fn offer_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut still_held = VecDeque::new();
        while let Some(batch) = self.held.pop_front() {
            let blocked = still_held.iter().any(|h: &Arc<Batch>| h.partition() == batch.partition());
            if blocked {
                still_held.push_back(batch);
            } else if let Err(refused) = self.intake.submit(batch) {
                still_held.push_back(refused);
            }
        }
        self.held = still_held;
        if self.held.is_empty() {
            // Taking restarts now: the idle clock must not count the wait.
            self.last_message_at = Instant::now();
        }
    }

    /// Drops partial and held batches of partitions revoked since the last look: their
    /// new owner reads them from the committed offset.
    fn forget_revoked(&mut self) {
        let revoked = std::mem::take(&mut *lock(&self.consumer.context().revoked));
        if revoked.is_empty() {
            return;
        }
        for filling in &mut self.filling {
            if revoked.contains(filling.builder.partition()) {
                filling.builder.clear();
                filling.deadline = None;
                if let Some(key) = filling.timer.take() {
                    self.intake.cancel_wake(key);
                }
                filling.topic_handle = 0; // the handle may not outlive the assignment
            }
        }
        self.held.retain(|b| !revoked.contains(b.partition()));
        // Taken but not yet charged to the rate limit: the new owner reads them again.
        let before = self.raw.len();
        self.raw.retain(|m| !revoked.iter().any(|p| p.partition == m.partition() && *p.topic == *m.topic()));
        self.uncharged = self.uncharged.saturating_sub(before - self.raw.len());
    }

    /// Charges the app's rate limit for the messages taken and not yet charged, in parts
    /// no larger than a batch. Returns whether all are charged; if not, a wheel entry wakes
    /// the loop when the budget is back.
    fn charge(&mut self) -> bool {
        let Some(limiter) = &self.limiter else {
            self.uncharged = 0;
            return true;
        };
        while self.uncharged > 0 {
            let part = self.uncharged.min(self.shape.batch_size.max(1));
            match limiter.charge(part) {
                Ok(()) => self.uncharged -= part,
                Err(until) => {
                    if self.rate_timer.is_none_or(|at| at <= Instant::now()) {
                        self.intake.schedule_wake(until);
                        self.rate_timer = Some(until);
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Keeps a wheel entry at the idle deadline (drain mode). The deadline moves with every
    /// message, so the entry is moved only once it has fallen due, not per message.
    fn arm_idle_timer(&mut self, now: Instant) {
        let Some(at) = self.idle_deadline().filter(|&at| at > now) else { return };
        if self.idle_timer.is_none_or(|armed| armed <= now) {
            self.intake.schedule_wake(at);
            self.idle_timer = Some(at);
        }
    }

    /// When drain mode calls the source idle: `idle_timeout` after the later of the last
    /// message and the last assignment (so a slow group join is not idle).
    fn idle_deadline(&self) -> Option<Instant> {
        let idle = self.shape.idle_timeout?;
        let assigned_at = (*lock(&self.consumer.context().assigned_at))?;
        Some(self.last_message_at.max(assigned_at) + idle)
    }

    fn idle(&self, now: Instant) -> bool {
        self.idle_deadline().is_some_and(|at| now >= at)
            && self.held.is_empty()
            && self.raw.is_empty()
            && self.filling.iter().all(|f| f.builder.is_empty())
    }
}
