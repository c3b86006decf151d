//! The poll loop: one OS thread takes fetched messages in bulk, seals them into
//! per-partition batches by size and by linger, offers them to the intake, and drives the
//! intake's timer wheel between takes. Rebalance callbacks run on this thread, inside
//! `poll` (see `consumer`).
//!
//! Rounds: the first message after a quiet spell opens a round, and when the round's one
//! deadline comes every partition's partial batch is sealed together, so a linger costs one
//! wheel entry and one wake-up whatever the number of partitions. While a round is open and
//! the queue was emptied, the loop sleeps until the deadline instead of waking for each
//! partition's arrival. When fetches are sized to linger (`SourceConfig::fetch_plan`), the
//! broker already gathered messages for most of the linger, so the round lasts only the rest.
//!
//! Holding back: a batch the intake refuses (a lane is full) is held here, and while anything
//! is held, or the app's rate limit (charged once per take) is over budget, the loop takes
//! nothing from librdkafka: it sleeps on an empty queue of its own. librdkafka's prefetch
//! queue, bounded by `queued.max.messages.kbytes`, then fills and its fetchers stop; when a
//! lane has room again (the intake wakes the loop) or the budget is back, taking resumes at
//! once, from memory. Pausing partitions instead makes librdkafka drop what it prefetched and
//! fetch it again, about 200 ms a cycle: ten times slower for a plugin that is just busy.
//!
//! Time: the loop sleeps in librdkafka's queue wait until the wheel's next deadline, and is
//! woken early by a message, by an event on the consumer queue (its non-empty callback), by a
//! stop, by room in a full lane, or by an earlier wheel entry: each yields the queue it sleeps
//! on. Commits the wheel calls due are started here, asynchronously.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;

use crate::core::batch::{Batch, BatchBuilder, Fetched, Partition};
use crate::core::errors::{Error, Result};
use crate::core::limit::{Limiter, RateLimit};
use crate::kafka::commit::commit_async;
use crate::kafka::config::SEAL_MARGIN;
use crate::kafka::consumer::{lock, KafkaConsumer};
use crate::kafka::errors::to_error;
use crate::kafka::fetch::{FetchQueue, RawMessage};
use crate::kafka::intake::Intake;

/// The longest the poll loop sleeps. Every wake-up is event-driven, so this only bounds
/// what a lost one could cost; once a second is nothing next to librdkafka's own threads.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Yields the queues the poll loop waits on, which wakes it. Cleared when the loop ends, so
/// a late wake-up (from librdkafka's threads or a worker) touches no dead queue.
#[derive(Default)]
pub(super) struct Waker {
    pub(super) queues: Mutex<Vec<Arc<FetchQueue>>>,
}

impl Waker {
    /// Under the lock, so that the last handle of a queue is never one a waker copied out
    /// (its drop after the consumer's would touch a destroyed handle). Yielding never blocks.
    pub(super) fn wake(&self) {
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
    /// How long the broker holds a fetch to gather messages: part of linger, already spent
    /// when a message arrives.
    pub fetch_gathering: Duration,
    pub idle_timeout: Option<Duration>,
    pub revoke_timeout: Duration,
    /// The app's rate limit, charged per take.
    pub rate_limit: Option<RateLimit>,
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

impl Shape {
    /// How long a round stays open after its first message arrives: the rest of linger once
    /// the broker's gathering is counted, but at least `SEAL_MARGIN` (or linger, if shorter),
    /// so the partitions of one fetch response share a round.
    fn round_length(&self) -> Duration {
        self.linger.saturating_sub(self.fetch_gathering).max(self.linger.min(SEAL_MARGIN))
    }
}

/// A partition's batch being filled.
struct Filling {
    builder: BatchBuilder,
    /// librdkafka's handle of the topic, for a lookup by pointer; 0 until seen.
    topic_handle: usize,
}

pub(super) struct PollLoop {
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
    held: Vec<Arc<Batch>>,
    /// The batches of a round being sealed, offered together; reused.
    sealed: Vec<Arc<Batch>>,
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
    /// The open round's deadline: every partial batch is sealed then.
    round: Option<Instant>,
    /// The last take emptied the fetch queue.
    took_all: bool,
    /// Whether drain mode has said which partitions it still waits for since the last
    /// assignment.
    told_unfetched: bool,
}

impl PollLoop {
    pub(super) fn new(
        consumer: Arc<KafkaConsumer>,
        fetch: Arc<FetchQueue>,
        held_back: Arc<FetchQueue>,
        waker: Arc<Waker>,
        intake: Arc<dyn Intake>,
        shape: Shape,
        limiter: Option<Limiter>,
    ) -> Self {
        PollLoop {
            consumer,
            fetch,
            raw: Vec::new(),
            intake,
            shape,
            filling: Vec::new(),
            last_filled: 0,
            held: Vec::new(),
            sealed: Vec::new(),
            last_message_at: Instant::now(),
            waker,
            held_back,
            limiter,
            uncharged: 0,
            rate_timer: None,
            idle_timer: None,
            told_unfetched: false,
            round: None,
            took_all: false,
        }
    }

    pub(super) fn run(mut self) {
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
            let idle = self.idle(now);
            self.intake.source_idle(idle);
            self.serve_events()?;
            // Serving events may have run a rebalance callback that waited: look again.
            let now = Instant::now();
            self.arm_idle_timer(now);
            let driven = self.intake.drive_timers(now);
            if !driven.commit.is_empty() {
                commit_async(&self.consumer, &driven.commit);
            }
            let next_timer = driven.next;
            let wait = next_timer.map_or(MAX_SLEEP, |at| at.saturating_duration_since(now)).min(MAX_SLEEP);
            let mut raw = std::mem::take(&mut self.raw);
            let before = raw.len();
            let round_due = self.round.is_some_and(|at| at <= now);
            let gathering = self.round.is_some() && !round_due && self.took_all;
            if before == 0 && self.held.is_empty() && !gathering {
                let wait = if round_due { Duration::ZERO } else { wait };
                let taken = self.fetch.take(wait, self.shape.batch_size, &mut raw);
                self.took_all = taken < self.shape.batch_size;
            } else {
                // Nothing may be taken, or the round gathers in librdkafka's queue until its
                // deadline: a sleep (this queue never holds a message).
                self.held_back.take(wait, 1, &mut raw);
            }
            self.note_fetched(&raw[before..]);
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
            if self.round.is_some_and(|at| at <= Instant::now()) {
                self.round = None;
                let mut sealed = std::mem::take(&mut self.sealed);
                for index in 0..self.filling.len() {
                    self.seal_into(index, &mut sealed);
                }
                self.offer(&mut sealed);
                self.sealed = sealed;
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
                Err(KafkaError::PartitionEOF(partition)) => {
                    // Only the partition's number comes with it: any topic's will do, as
                    // ending a drain early was all this could cost.
                    self.unfetched(|p| p.retain(|p| p.partition != partition));
                    continue;
                }
                Err(e @ KafkaError::MessageConsumptionFatal(_)) => return Err(to_error("consume", e)),
                Err(e) => {
                    log::warn!("consume: {e}");
                    continue;
                }
            };
            let index = self.filling_for(message.topic_ptr() as usize, message.partition(), || message.topic());
            self.unfetched(|p| p.retain(|p| p.partition != message.partition() || *p.topic != *message.topic()));
            self.last_message_at = Instant::now();
            self.push(index, &message);
        }
        Ok(())
    }

    fn take_raw(&mut self, message: &RawMessage) {
        if message.is_partition_end() {
            return;
        }
        if let Some(error) = message.error() {
            log::warn!("consume: {}[{}]: {error}", message.topic(), message.partition());
            return;
        }
        let index = self.filling_for(message.topic_handle() as usize, message.partition(), || message.topic());
        self.push(index, message);
    }

    /// Files one message (opening a round if none is open); seals its batch when full.
    fn push(&mut self, index: usize, message: &impl Fetched) {
        if self.round.is_none() {
            let deadline = self.last_message_at + self.shape.round_length();
            self.intake.schedule_wake(deadline);
            self.round = Some(deadline);
        }
        let filling = &mut self.filling[index];
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
                self.filling.push(Filling { builder: BatchBuilder::new(partition), topic_handle });
                self.filling.len() - 1
            }
        };
        self.last_filled = index;
        index
    }

    /// Seals a partition's full batch and offers it.
    fn seal(&mut self, index: usize) {
        let mut sealed = std::mem::take(&mut self.sealed);
        self.seal_into(index, &mut sealed);
        self.offer(&mut sealed);
        self.sealed = sealed;
    }

    /// Seals a partition's batch into `sealed`, to be offered, unless batches of that
    /// partition are held: then it queues behind them, keeping offset order.
    fn seal_into(&mut self, index: usize, sealed: &mut Vec<Arc<Batch>>) {
        let builder = &mut self.filling[index].builder;
        if builder.is_empty() {
            return;
        }
        let batch = builder.take();
        if self.held.iter().any(|h| h.partition() == batch.partition()) {
            self.held.push(batch);
        } else {
            sealed.push(batch);
        }
    }

    /// Offers batches in one trip; what the intake refuses is held, in order.
    fn offer(&mut self, batches: &mut Vec<Arc<Batch>>) {
        if batches.is_empty() {
            return;
        }
        self.intake.submit(batches);
        self.held.append(batches);
    }

    /// Offers held batches again, oldest first.
    fn offer_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        self.intake.submit(&mut self.held);
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

    fn idle(&mut self, now: Instant) -> bool {
        if self.idle_deadline().is_none_or(|at| now < at)
            || !self.held.is_empty()
            || !self.raw.is_empty()
            || self.filling.iter().any(|f| !f.builder.is_empty())
        {
            return false;
        }
        let waiting = self
            .unfetched(|list| list.iter().map(|p| format!("{}[{}]", p.topic, p.partition)).collect::<Vec<_>>())
            .unwrap_or_default();
        if waiting.is_empty() {
            self.told_unfetched = false;
            return true;
        }
        if !std::mem::replace(&mut self.told_unfetched, true) {
            log::info!("drain: waiting for a first fetch from {}", waiting.join(", "));
        }
        false
    }

    /// Runs `f` on drain mode's list of assigned partitions not yet fetched from; `None`
    /// outside drain mode.
    fn unfetched<T>(&self, f: impl FnOnce(&mut Vec<Partition>) -> T) -> Option<T> {
        self.consumer.context().unfetched.as_ref().map(|list| f(&mut lock(list)))
    }

    /// Drain mode: the partitions of a take (a message or the partition's end) are fetched from.
    fn note_fetched(&self, taken: &[RawMessage]) {
        self.unfetched(|list| {
            let mut last = None;
            for message in taken {
                if list.is_empty() {
                    return;
                }
                // Takes run in partition order: one look per run of a partition.
                let this = (message.topic_handle(), message.partition());
                if last.replace(this) != Some(this) {
                    list.retain(|p| p.partition != this.1 || *p.topic != *message.topic());
                }
            }
        });
    }
}
