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

/// How long a round of batches stays open after its first message when fetches are sized to
/// linger: time for every partition of one fetch response to arrive, and for the wheel's
/// 1 ms tick.
pub const SEAL_MARGIN: Duration = Duration::from_millis(2);

/// The `fetch.min.bytes` asked for when fetches are sized to linger: more than a linger's
/// worth of messages at any moderate rate, so the broker answers at `fetch.wait.max.ms`; a
/// backlog fills it at once.
const FETCH_MIN_BYTES: u64 = 1 << 20;

/// Below this linger, fetches are not held to gather messages. A held fetch comes back empty
/// every 3/5 of linger while idle: at the default 20 ms that was 0.5-1.2% of a core idling
/// (against 0.06% with librdkafka's 500 ms), so only lingers long enough for idle to stay
/// cheap gather by default.
const MIN_GATHERING_LINGER: Duration = Duration::from_millis(100);

/// librdkafka's own defaults, for a user's partial fetch settings.
const LIBRDKAFKA_FETCH_WAIT: Duration = Duration::from_millis(500);

/// How the consumer fetches: the properties fastconsume sets (none if the user set either
/// `fetch.wait.max.ms` or `fetch.min.bytes`: their fetch tuning wins whole), and how long
/// the broker holds a fetch to gather messages (zero if it answers as soon as any byte is
/// there), which the source counts as part of linger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchPlan {
    pub properties: Vec<(&'static str, String)>,
    pub gathering: Duration,
}

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

    /// Fetches sized to `linger`. librdkafka by default fetches as soon as any byte is there,
    /// so at a moderate rate its broker thread costs one fetch per few messages. Instead the
    /// broker holds each fetch until 3/5 of linger has passed (`fetch.wait.max.ms`) or
    /// `FETCH_MIN_BYTES` are there (`fetch.min.bytes`): about two fetches per linger at a
    /// moderate rate, full fetches in a backlog. A message waits at most that gathering, the
    /// round's `SEAL_MARGIN` and the response's travel; the rest of linger absorbs delays
    /// before the broker (the producer's own batching) and a loaded machine's scheduling.
    /// A linger under `MIN_GATHERING_LINGER` asks for no gathering (idle stays cheap).
    pub fn fetch_plan(&self, linger: Duration) -> FetchPlan {
        let property = |name: &str| self.kafka.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.trim());
        let (user_wait, user_min) = (property("fetch.wait.max.ms"), property("fetch.min.bytes"));
        if user_wait.is_some() || user_min.is_some() {
            let wait = user_wait.and_then(|ms| ms.parse().ok()).map_or(LIBRDKAFKA_FETCH_WAIT, Duration::from_millis);
            let gathers = user_min.and_then(|b| b.parse::<u64>().ok()).is_some_and(|bytes| bytes > 1);
            return FetchPlan { properties: vec![], gathering: if gathers { wait } else { Duration::ZERO } };
        }
        if linger < MIN_GATHERING_LINGER {
            return FetchPlan { properties: vec![], gathering: Duration::ZERO };
        }
        let wait = linger * 3 / 5;
        let max_bytes = property("fetch.max.bytes").and_then(|b| b.parse::<u64>().ok()).unwrap_or(u64::MAX);
        FetchPlan {
            properties: vec![
                ("fetch.wait.max.ms", wait.as_millis().to_string()),
                ("fetch.min.bytes", FETCH_MIN_BYTES.min(max_bytes).to_string()),
            ],
            gathering: Duration::from_millis(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
        }
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

    #[test]
    fn fetches_are_sized_to_linger_unless_the_user_tuned_them() {
        let plan = config().fetch_plan(Duration::from_millis(200));
        assert_eq!(
            plan,
            FetchPlan {
                properties: vec![("fetch.wait.max.ms", "120".into()), ("fetch.min.bytes", "1048576".into())],
                gathering: Duration::from_millis(120),
            }
        );
        let short = config().fetch_plan(Duration::from_millis(20));
        assert_eq!(short, FetchPlan { properties: vec![], gathering: Duration::ZERO }, "idle stays cheap");

        let mut capped = config();
        capped.kafka.push(("fetch.max.bytes".into(), "65536".into()));
        assert_eq!(capped.fetch_plan(Duration::from_millis(200)).properties[1], ("fetch.min.bytes", "65536".into()));

        let mut waits = config();
        waits.kafka.push(("fetch.wait.max.ms".into(), "100".into()));
        let plan = waits.fetch_plan(Duration::from_millis(20));
        assert_eq!(plan, FetchPlan { properties: vec![], gathering: Duration::ZERO }, "min.bytes 1: answers at once");
        waits.kafka.push(("fetch.min.bytes".into(), "100000".into()));
        assert_eq!(waits.fetch_plan(Duration::from_millis(20)).gathering, Duration::from_millis(100));

        let mut only_min = config();
        only_min.kafka.push(("fetch.min.bytes".into(), "5000".into()));
        assert_eq!(only_min.fetch_plan(Duration::from_millis(20)).gathering, LIBRDKAFKA_FETCH_WAIT);
    }
}
