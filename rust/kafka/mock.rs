//! librdkafka's in-process mock cluster, for the demo and for tests that need no broker.
//! It listens on real loopback sockets, so any Kafka client can talk to it.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};
use rdkafka::ClientConfig;

use crate::core::errors::{Error, Result};
use crate::kafka::errors::to_error;

/// How long the mock's group coordinator waits for more members before the first
/// assignment. Its default, 3 s like a broker's `group.initial.rebalance.delay.ms`, made
/// every short run on the mock mostly waiting.
const INITIAL_REBALANCE_DELAY_MS: i32 = 10;

/// An in-process Kafka cluster that lives as long as this value: the cluster belongs to a
/// client made with `test.mock.num.brokers`, which is never used for anything else.
pub struct MockKafka {
    owner: BaseProducer,
    bootstrap: String,
}

// SAFETY: every librdkafka mock API call only enqueues an operation for the mock cluster's
// own thread, and the handle that owns it is a thread-safe rd_kafka_t.
unsafe impl Send for MockKafka {}
// SAFETY: as above; no method mutates Rust-side state.
unsafe impl Sync for MockKafka {}

impl MockKafka {
    pub fn new(brokers: i32) -> Result<Self> {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .create()
            .map_err(|e| to_error("start mock cluster", e))?;
        // SAFETY: the handle is alive for the borrow; a non-null cluster lives as long as it.
        let cluster = unsafe { rdkafka::bindings::rd_kafka_handle_mock_cluster(owner.client().native_ptr()) };
        if cluster.is_null() {
            return Err(Error::Internal("librdkafka made no mock cluster".into()));
        }
        // SAFETY: the cluster is valid (above); the call only hands a value to its thread.
        unsafe {
            rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, INITIAL_REBALANCE_DELAY_MS);
        };
        let mut mock = MockKafka { owner, bootstrap: String::new() };
        let bootstrap = mock.cluster()?.bootstrap_servers();
        mock.bootstrap = bootstrap;
        Ok(mock)
    }

    /// The cluster, borrowed from its owner (dropping it does not destroy the cluster).
    fn cluster(&self) -> Result<MockCluster<'_, DefaultProducerContext>> {
        self.owner.client().mock_cluster().ok_or_else(|| Error::Internal("librdkafka made no mock cluster".into()))
    }

    #[must_use]
    pub fn bootstrap(&self) -> String {
        self.bootstrap.clone()
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        if partitions < 1 {
            return Err(Error::Config(format!("a topic needs at least one partition, got {partitions}")));
        }
        self.cluster()?.create_topic(topic, partitions, 1).map_err(|e| to_error("create mock topic", e))
    }
}

impl MockKafka {
    /// Delays every request to the (single) broker of `seeded` by `delay`, as a far or
    /// loaded broker would.
    #[cfg(test)]
    pub fn delay_requests(&self, delay: std::time::Duration) -> Result<()> {
        self.cluster()?.broker_round_trip_time(1, delay).map_err(|e| to_error("mock round-trip time", e))
    }
}

/// A mock cluster with a topic `t` holding `per_partition[p]` messages in partition `p`, and
/// a consumer config for it (group `g`). For the core's tests.
///
/// # Panics
/// If the mock cluster cannot be set up.
#[cfg(test)]
pub fn seeded(per_partition: &[usize]) -> (MockKafka, crate::kafka::config::SourceConfig) {
    let cluster = MockKafka::new(1).expect("mock cluster");
    cluster.create_topic("t", per_partition.len() as i32).expect("topic");
    for (p, &count) in per_partition.iter().enumerate() {
        let values = vec![b"v".to_vec(); count];
        let records =
            values.iter().map(|v| crate::kafka::seed::Record { key: None, value: v, partition: Some(p as i32) });
        crate::kafka::seed::produce(&cluster.bootstrap(), "t", records).expect("produce");
    }
    let config = crate::kafka::config::SourceConfig {
        bootstrap: cluster.bootstrap(),
        group: "g".into(),
        topics: vec!["t".into()],
        kafka: vec![],
        connect_timeout: std::time::Duration::from_secs(10),
        wait_for_topics: false,
    };
    (cluster, config)
}

/// A consumer config naming a port nothing listens on, with a 500 ms connect timeout.
#[cfg(test)]
pub fn unreachable() -> crate::kafka::config::SourceConfig {
    crate::kafka::config::SourceConfig {
        bootstrap: "127.0.0.1:1".into(),
        group: "g".into(),
        topics: vec!["t".into()],
        kafka: vec![],
        connect_timeout: std::time::Duration::from_millis(500),
        wait_for_topics: false,
    }
}
