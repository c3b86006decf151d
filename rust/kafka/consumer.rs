//! The consumer: its librdkafka context (rebalances, errors, commit results, logs), and
//! `Source`, which connects, subscribes and starts the poll loop (`poll`).
//!
//! Rebalance callbacks run on the poll thread, inside `poll`. A revoke finishes (bounded)
//! what is running on the revoked partitions and commits synchronously while they are still
//! ours: after the revoke would be too late (librdkafka issue 4059).
//!
//! Delivery: at least once. The offsets committed are the ones the intake hands out: up to
//! where every plugin finished (call by call); from the wheel `auto.commit.interval.ms`
//! after they moved, synchronously on revoke and at shutdown.

use std::ffi::CString;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::ClientContext;

use crate::core::batch::Partition;
use crate::core::errors::{Error, Result};
use crate::core::limit::Limiter;
use crate::kafka::commit::{commit_sync, offsets_of};
use crate::kafka::config::SourceConfig;
use crate::kafka::connect::connect_and_find_topics;
use crate::kafka::errors::{to_error, ErrorWatch};
use crate::kafka::fetch::FetchQueue;
use crate::kafka::intake::Intake;
use crate::kafka::poll::{lock, PollLoop, Shape, Waker};

/// librdkafka's callbacks. `error` and `commit_callback` may run on librdkafka's threads;
/// the rebalance hooks run on the poll thread, inside `poll`.
pub struct SourceContext {
    intake: Arc<dyn Intake>,
    revoke_timeout: Duration,
    /// Partitions revoked since the poll loop last looked, so it drops their partial batches.
    pub(super) revoked: Mutex<Vec<Partition>>,
    pub(super) assigned_at: Mutex<Option<Instant>>,
    pub(super) errors: ErrorWatch,
    /// Where assigned partitions' messages go; owned by the poll loop, which clears this
    /// when it ends so the queue is gone before the consumer is.
    pub(super) fetch: Mutex<Option<Arc<FetchQueue>>>,
}

fn partitions(tpl: &TopicPartitionList) -> Vec<Partition> {
    tpl.elements().iter().map(|e| Partition { topic: Arc::from(e.topic()), partition: e.partition() }).collect()
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.record(&error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::kafka::errors::log_librdkafka(&self.errors, level, fac, log_message);
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
            // ours.
            let offsets = self.intake.revoke(&revoked, self.revoke_timeout);
            commit_sync(consumer, &*self.intake, &offsets, "commit on revoke");
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
            Ok(()) => self.intake.committed(&offsets_of(offsets)),
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => log::warn!("commit failed: {e}"),
        }
    }
}

pub type KafkaConsumer = BaseConsumer<SourceContext>;

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
            config.client_config().create_with_context(context).map_err(|e| to_error("create consumer", e))?;
        let limiter = shape.rate_limit.map(Limiter::new).transpose()?;
        // A stop while connecting (or waiting for topics) still starts the loop, which then
        // ends at once: the run returns as stopped, having consumed nothing.
        let stop = || intake.stop_requested();
        connect_and_find_topics(&consumer, &consumer.context().errors, config, &stop)?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|e| to_error("subscribe", e))?;

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
        let (intake_on_error, waker_on_error) = (intake.clone(), waker.clone());
        let poll = PollLoop::new(consumer.clone(), fetch, held_back, waker, intake, shape, limiter);
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
