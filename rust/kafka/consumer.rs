//! The consumer: its librdkafka context (rebalances, errors, commit results, logs). `source`
//! creates it and starts the poll loop (`poll`).
//!
//! Rebalance callbacks run on the poll thread, inside `poll`. A revoke finishes (bounded)
//! what is running on the revoked partitions and commits synchronously while they are still
//! ours: after the revoke would be too late (librdkafka issue 4059).
//!
//! Delivery: at least once. The offsets committed are the ones the intake hands out: up to
//! where every plugin finished (call by call); from the wheel `auto.commit.interval.ms`
//! after they moved, synchronously on revoke and at shutdown.

use std::ffi::CString;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::ClientContext;

use crate::core::batch::Partition;
use crate::kafka::commit::{commit_sync, offsets_of};
use crate::kafka::errors::ErrorWatch;
use crate::kafka::fetch::FetchQueue;
use crate::kafka::intake::Intake;

/// librdkafka's callbacks. `error` and `commit_callback` may run on librdkafka's threads;
/// the rebalance hooks run on the poll thread, inside `poll`.
pub struct SourceContext {
    intake: Arc<dyn Intake>,
    revoke_timeout: Duration,
    /// Partitions revoked since the poll loop last looked, so it drops their partial batches.
    pub(super) revoked: Mutex<Vec<Partition>>,
    pub(super) assigned_at: Mutex<Option<Instant>>,
    /// Drain mode only (else `None`): assigned partitions not yet fetched from, neither a
    /// message nor the end of the partition. The run is not drained while any is left.
    pub(super) unfetched: Option<Mutex<Vec<Partition>>>,
    pub(super) errors: ErrorWatch,
    /// Where assigned partitions' messages go; owned by the poll loop, which clears this
    /// when it ends so the queue is gone before the consumer is.
    pub(super) fetch: Mutex<Option<Arc<FetchQueue>>>,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SourceContext {
    pub(super) fn new(intake: Arc<dyn Intake>, revoke_timeout: Duration, drain: bool) -> Self {
        SourceContext {
            intake,
            revoke_timeout,
            revoked: Mutex::default(),
            assigned_at: Mutex::default(),
            unfetched: drain.then(Mutex::default),
            errors: ErrorWatch::default(),
            fetch: Mutex::default(),
        }
    }
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
            if let Some(unfetched) = &self.unfetched {
                lock(unfetched).retain(|p| !revoked.contains(p));
            }
            lock(&self.revoked).extend(revoked);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let assigned = partitions(tpl);
                log::info!("assigned {} partition(s)", assigned.len());
                if let Some(unfetched) = &self.unfetched {
                    let mut unfetched = lock(unfetched);
                    unfetched.retain(|p| !assigned.contains(p));
                    unfetched.extend(assigned.iter().cloned());
                }
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
