//! Commits of the offsets the intake hands out. They are explicit: fastconsume never stores
//! offsets in librdkafka, so what a commit carries is exactly what every plugin finished,
//! read from the engine at the moment of the commit, whichever thread finished it.

use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::core::batch::Partition;
use crate::kafka::intake::Intake;

fn list(offsets: &[(Partition, i64)]) -> Option<TopicPartitionList> {
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for (partition, offset) in offsets {
        if let Err(e) = tpl.add_partition_offset(&partition.topic, partition.partition, Offset::Offset(*offset)) {
            log::warn!("commit offset {offset} for {}[{}]: {e}", partition.topic, partition.partition);
            return None;
        }
    }
    Some(tpl)
}

/// The committed offsets a commit result lists.
pub fn offsets_of(tpl: &TopicPartitionList) -> Vec<(Partition, i64)> {
    tpl.elements()
        .iter()
        .filter_map(|e| match (e.error(), e.offset()) {
            (Ok(()), Offset::Offset(offset)) => {
                Some((Partition { topic: Arc::from(e.topic()), partition: e.partition() }, offset))
            }
            _ => None,
        })
        .collect()
}

/// Commits `offsets` now, and tells `intake` they are committed (a synchronous commit runs
/// no commit callback). Nothing to commit is not an error.
pub fn commit_sync<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    intake: &dyn Intake,
    offsets: &[(Partition, i64)],
    what: &str,
) {
    if offsets.is_empty() {
        return;
    }
    let Some(tpl) = list(offsets) else { return };
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => intake.committed(offsets),
        Err(e) => log::warn!("{what} failed: {e}"),
    }
}

/// Starts a commit of `offsets`; its result comes back through the context's
/// `commit_callback`. (`commit(.., Async)` sends a manual commit's result nowhere: librdkafka
/// routes it only to a callback set in the configuration, which the event API leaves unset.)
pub fn commit_async<C: ConsumerContext>(consumer: &BaseConsumer<C>, offsets: &[(Partition, i64)]) {
    let Some(tpl) = list(offsets) else { return };
    let client = consumer.client().native_ptr();
    // SAFETY: the handle and the list are alive for the borrow; librdkafka copies the list.
    // The consumer queue reference returned is ours and released right after; librdkafka
    // holds its own while the commit runs.
    let err = unsafe {
        let queue = rdkafka::bindings::rd_kafka_queue_get_consumer(client);
        if queue.is_null() {
            log::warn!("commit: no consumer queue");
            return;
        }
        let err = rdkafka::bindings::rd_kafka_commit_queue(client, tpl.ptr(), queue, None, std::ptr::null_mut());
        rdkafka::bindings::rd_kafka_queue_destroy(queue);
        err
    };
    if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        log::warn!("commit failed: {}", RDKafkaErrorCode::from(err));
    }
}
