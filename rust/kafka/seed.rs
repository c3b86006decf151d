//! A producer for seeding topics in tests, benchmarks and the demo: it writes many values
//! and waits until every one is acknowledged. It is not a production producer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};

use crate::core::errors::{Error, Result};
use crate::kafka::errors::to_error;

/// Counts failed deliveries; the producer is only used to seed topics.
#[derive(Default)]
struct DeliveryCount {
    failed: AtomicU64,
}

impl ClientContext for DeliveryCount {}

impl ProducerContext for DeliveryCount {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, (): ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One message to produce: an optional key and partition, and a value.
pub struct Record<'a> {
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub partition: Option<i32>,
}

/// Produces records to `topic` and waits until every one is acknowledged. Returns how many
/// were written.
pub fn produce<'a>(bootstrap: &str, topic: &str, records: impl IntoIterator<Item = Record<'a>>) -> Result<u64> {
    let producer: BaseProducer<DeliveryCount> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .create_with_context(DeliveryCount::default())
        .map_err(|e| to_error("create producer", e))?;
    let mut sent = 0u64;
    for r in records {
        let mut record = BaseRecord::<[u8], [u8]>::to(topic).payload(r.value);
        if let Some(key) = r.key {
            record = record.key(key);
        }
        if let Some(partition) = r.partition {
            record = record.partition(partition);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(to_error("produce", e)),
            }
        }
        sent += 1;
    }
    producer.flush(Duration::from_secs(60)).map_err(|e| to_error("flush producer", e))?;
    let failed = producer.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        return Err(Error::Delivery { topic: topic.to_string(), failed, sent });
    }
    Ok(sent)
}
