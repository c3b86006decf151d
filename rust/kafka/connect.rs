//! Connecting: the first metadata call, bounded and cut into slices so that a permanent
//! failure (authentication, TLS) ends it at once, and the check that every topic exists.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::Metadata;

use crate::core::errors::{ConnectFailure, Error, Result};
use crate::kafka::config::SourceConfig;
use crate::kafka::errors::{to_error, ErrorWatch};

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
                .map_err(|e| to_error("topic metadata", e))?;
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
pub fn connect_and_find_topics<C: ConsumerContext>(
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
