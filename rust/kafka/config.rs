//! What the consumer is told by the user, validated once, and turned into librdkafka's
//! configuration. Durations arrive here already parsed (the Python layer owns the syntax).

use std::time::Duration;

use rdkafka::ClientConfig;

use crate::core::errors::{Error, Result};
use crate::kafka::errors::to_error;

/// Properties fastconsume sets itself; a user value would break a guarantee or fight an
/// argument of `App`, so passing one through `kafka=` is rejected.
const OWNED_PROPERTIES: [(&str, &str); 4] = [
    ("bootstrap.servers", "pass it as App(bootstrap=...)"),
    ("group.id", "pass it as App(group=...)"),
    ("enable.auto.offset.store", "fastconsume commits only offsets every plugin has finished"),
    ("enable.auto.commit", "fastconsume commits offsets itself"),
];

/// Defaults that differ from librdkafka's, each overridable through `kafka=`.
const DEFAULT_PROPERTIES: [(&str, &str); 3] = [
    // A fan-out consumer that joins late should still see the topic's history.
    ("auto.offset.reset", "earliest"),
    // How often stored offsets are committed (by fastconsume's timer wheel, not librdkafka's
    // auto-commit timer); revoke and shutdown commit synchronously on top of this.
    ("auto.commit.interval.ms", "1000"),
    // When a plugin is slower than fetching, librdkafka's prefetch queue fills and each
    // partition's next fetch waits this long; at librdkafka's 1 s the queue could run dry in
    // the meantime, stalling a busy plugin for most of a second at a time (measured: 160,000
    // msg/s instead of 320,000 for a 3 us/msg plugin). Re-checking every 100 ms costs nothing.
    ("fetch.queue.backoff.ms", "100"),
];

/// How to reach Kafka and what to consume: the settings of one consumer process.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub bootstrap: String,
    pub group: String,
    pub topics: Vec<String>,
    /// librdkafka properties passed through from `App(kafka=...)`.
    pub kafka: Vec<(String, String)>,
    /// How long to wait for the brokers before giving up with a connect error.
    pub connect_timeout: Duration,
    /// Whether topics missing at start are waited for instead of an error.
    pub wait_for_topics: bool,
}

impl SourceConfig {
    /// Checks the settings and librdkafka's view of every property, without connecting.
    pub fn validate(&self) -> Result<()> {
        if self.bootstrap.trim().is_empty() {
            return Err(Error::Config("bootstrap must name at least one broker".into()));
        }
        if self.group.trim().is_empty() {
            return Err(Error::Config("group must not be empty".into()));
        }
        if self.topics.is_empty() {
            return Err(Error::Config("topics must name at least one topic".into()));
        }
        if let Some(topic) = self.topics.iter().find(|t| t.trim().is_empty()) {
            return Err(Error::Config(format!("topic names must not be empty, got {topic:?}")));
        }
        for (name, _) in &self.kafka {
            if let Some((_, why)) = OWNED_PROPERTIES.iter().find(|(owned, _)| owned == name) {
                return Err(Error::Property { name: name.clone(), reason: format!("set by fastconsume: {why}") });
            }
        }
        self.client_config().create_native_config().map_err(|e| to_error("configuration", e))?;
        Ok(())
    }

    /// librdkafka's configuration for the consumer.
    #[must_use]
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (name, value) in DEFAULT_PROPERTIES {
            config.set(name, value);
        }
        for (name, value) in &self.kafka {
            config.set(name, value);
        }
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", &self.group)
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "false");
        config
    }

    /// How long after an offset is stored it is committed: `auto.commit.interval.ms`.
    pub fn commit_interval(&self) -> Duration {
        let ms = self.kafka.iter().rev().find(|(name, _)| name == "auto.commit.interval.ms").map_or_else(
            || DEFAULT_PROPERTIES.iter().find(|(name, _)| *name == "auto.commit.interval.ms").map(|(_, v)| *v),
            |(_, value)| Some(value.as_str()),
        );
        Duration::from_millis(ms.and_then(|ms| ms.trim().parse().ok()).unwrap_or(1000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SourceConfig {
        SourceConfig {
            bootstrap: "127.0.0.1:9092".into(),
            group: "g".into(),
            topics: vec!["t".into()],
            kafka: vec![],
            connect_timeout: Duration::from_secs(1),
            wait_for_topics: false,
        }
    }

    #[test]
    fn accepts_a_plain_config() {
        config().validate().expect("valid");
    }

    #[test]
    fn unknown_property_is_named() {
        let mut c = config();
        c.kafka.push(("no.such.property".into(), "1".into()));
        match c.validate() {
            Err(Error::Property { name, .. }) => assert_eq!(name, "no.such.property"),
            other => panic!("expected a property error, got {other:?}"),
        }
    }

    #[test]
    fn owned_property_is_rejected() {
        let mut c = config();
        c.kafka.push(("enable.auto.offset.store".into(), "true".into()));
        assert!(matches!(c.validate(), Err(Error::Property { name, .. }) if name == "enable.auto.offset.store"));
    }

    #[test]
    fn empty_topics_are_rejected() {
        let mut c = config();
        c.topics.clear();
        assert!(matches!(c.validate(), Err(Error::Config(_))));
    }

    #[test]
    fn user_properties_override_defaults() {
        let mut c = config();
        c.kafka.push(("auto.offset.reset".into(), "latest".into()));
        assert_eq!(c.client_config().get("auto.offset.reset"), Some("latest"));
    }
}
