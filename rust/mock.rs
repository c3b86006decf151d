//! librdkafka's in-process mock cluster, for the demo and for tests that need no broker.
//! It listens on real loopback sockets, so any Kafka client can talk to it.

use rdkafka::mocking::MockCluster;

use crate::errors::{Error, Result};

/// An in-process Kafka cluster that lives as long as this value.
pub struct MockKafka {
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
}

// SAFETY: every librdkafka mock API call only enqueues an operation for the mock cluster's
// own thread, and the handle that owns it is a thread-safe rd_kafka_t.
unsafe impl Send for MockKafka {}
// SAFETY: as above; no method mutates Rust-side state.
unsafe impl Sync for MockKafka {}

impl MockKafka {
    pub fn new(brokers: i32) -> Result<Self> {
        let cluster = MockCluster::new(brokers).map_err(|e| Error::kafka("start mock cluster", e))?;
        Ok(MockKafka { cluster })
    }

    #[must_use]
    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        if partitions < 1 {
            return Err(Error::Config(format!("a topic needs at least one partition, got {partitions}")));
        }
        self.cluster.create_topic(topic, partitions, 1).map_err(|e| Error::kafka("create mock topic", e))
    }
}
