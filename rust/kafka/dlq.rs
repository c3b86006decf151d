//! The dead-letter writer: messages a plugin failed through all its retries are written to the
//! plugin's dead-letter topic, with headers saying why and where they came from.
//!
//! A dead-lettered message counts as done only once the broker has acknowledged its copy
//! (acks=all, idempotent producer), so `send` reports through a callback that fires once per
//! call, after every write of that call is acknowledged or on its first failure. Only then may
//! the caller let the message's offset be committed; until then it is at-least-once, like the
//! rest of the consumer.
//!
//! Bound: a write librdkafka cannot complete (no leader, too few in-sync replicas, a topic
//! that does not exist) is retried by librdkafka until `message.timeout.ms`, which the app's
//! `dlq_timeout` sets unless the user's properties do; then it fails like any other. What
//! librdkafka reported meanwhile (its error callback, its warnings) is kept in `LastError`, so
//! that a waiting write and its failure can name the cause.

use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};

use crate::core::batch::{Batch, MessageView, Partition};
use crate::core::errors::{DeadLetterFailure, Error};
use crate::core::sched::DeadLetterInfo;
use crate::kafka::errors::to_error;

/// librdkafka's consumer-only properties (scope "C" in librdkafka 2.12.1's property table,
/// global and topic level). The user's `kafka=` list is written for the consumer; setting these
/// on the producer only makes librdkafka log a CONFWARN per property at startup, so they are
/// left out. An exact list rather than "try and see": librdkafka accepts every one of them on a
/// producer configuration and only warns when the client is created. A property missing here
/// (a newer librdkafka) costs one warning, nothing else.
const CONSUMER_ONLY: [&str; 31] = [
    "group.id",
    "group.instance.id",
    "group.protocol",
    "group.protocol.type",
    "group.remote.assignor",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "coordinator.query.interval.ms",
    "max.poll.interval.ms",
    "enable.auto.commit",
    "auto.commit.enable",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "offset.store.method",
    "offset.store.path",
    "offset.store.sync.interval.ms",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.queue.backoff.ms",
    "fetch.message.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.max.bytes",
    "fetch.min.bytes",
    "fetch.error.backoff.ms",
    "isolation.level",
    "enable.partition.eof",
    "check.crcs",
    "consume.callback.max.messages",
];

/// Settings the dead-letter producer needs whatever the user passed: a write counts only once
/// every in-sync replica has it, and retries must not duplicate or reorder it. The small linger
/// lets the messages of one `send` share a request without delaying the failure path noticeably.
const PRODUCER_PROPERTIES: [(&str, &str); 3] = [("acks", "all"), ("enable.idempotence", "true"), ("linger.ms", "5")];

/// How long `send` keeps retrying a message librdkafka refuses because its queue is full. The
/// queue holds up to 100 000 messages / 1 GiB by default, so a full queue means the cluster has
/// been unreachable for a while; blocking the caller much longer would stall its worker for
/// nothing, and the call fails instead.
const QUEUE_FULL_WAIT: Duration = Duration::from_secs(10);

/// The pause between retries of a full queue and between checks in `flush`.
const STEP: Duration = Duration::from_millis(5);

/// librdkafka's names for the bound of one write (aliases); a user's value wins over
/// `dlq_timeout`.
const TIMEOUT_PROPERTIES: [&str; 2] = ["message.timeout.ms", "delivery.timeout.ms"];

/// librdkafka retries some broker answers (too few in-sync replicas, no leader, a topic not
/// yet known) until the bound, and says so only in debug lines of these contexts: one per
/// produce request or metadata reply, never per message, and the dead-letter producer is idle
/// unless plugins fail. `Acks::log` keeps the error they name; a user's own `debug` wins.
const DEBUG_CONTEXTS: &str = "msg,topic";

pub const HEADER_PLUGIN: &str = "fastconsume.plugin";
pub const HEADER_ERROR_TYPE: &str = "fastconsume.error.type";
pub const HEADER_ERROR_MESSAGE: &str = "fastconsume.error.message";
pub const HEADER_ATTEMPTS: &str = "fastconsume.attempts";
pub const HEADER_ORIGINAL_TOPIC: &str = "fastconsume.original.topic";
pub const HEADER_ORIGINAL_PARTITION: &str = "fastconsume.original.partition";
pub const HEADER_ORIGINAL_OFFSET: &str = "fastconsume.original.offset";
pub const HEADER_ORIGINAL_TIMESTAMP: &str = "fastconsume.original.timestamp";

/// librdkafka's last error or warning on the dead-letter producer, and when it came. Written
/// only when librdkafka reports a problem (never per message); read when a write waits long
/// or fails.
#[derive(Default)]
pub struct LastError(Mutex<Option<(Instant, String)>>);

/// How long a specific error stays the cause of a later "all brokers are down".
const ALL_DOWN_KEEPS: Duration = Duration::from_secs(60);

impl LastError {
    fn set(&self, text: String) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), text));
    }

    /// "All brokers are down" follows each broker's own error (refused, authentication, TLS),
    /// which says more: a recent one is kept, as new.
    fn all_brokers_down(&self, text: String) {
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match last.as_mut() {
            Some((at, _)) if now.duration_since(*at) < ALL_DOWN_KEEPS => *at = now,
            _ => *last = Some((now, text)),
        }
    }

    /// The last error, if it came at or after `since` (an older one says nothing about a
    /// write started later).
    pub fn since(&self, since: Instant) -> Option<String> {
        let last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        last.as_ref().filter(|(at, _)| *at >= since).map(|(_, text)| text.clone())
    }
}

/// The outcome of one `send`, reported once.
pub type Done = Box<dyn FnOnce(Result<(), Error>) + Send>;

/// The writes of one `send` call, shared by their delivery reports.
struct Job {
    /// The dead-letter topic.
    topic: String,
    source: Partition,
    plugin: String,
    /// The messages, for the error: partition and offsets.
    what: String,
    started: Instant,
    /// The bound of each write, to say so when one timed out.
    timeout: Option<Duration>,
    last_error: Arc<LastError>,
    total: usize,
    /// Writes not yet acknowledged; `done` gets `Ok` when this reaches zero.
    remaining: AtomicUsize,
    /// Taken by whoever reports the outcome, so it is reported once: the last acknowledgement
    /// or the first failure, whichever comes first.
    done: Mutex<Option<Done>>,
}

impl Job {
    fn take_done(&self) -> Option<Done> {
        // A poisoned lock only means a thread panicked while holding it; the Option is
        // still consistent (take is the only mutation).
        self.done.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn acknowledged(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(done) = self.take_done() {
                report(done, Ok(()));
            }
        }
    }

    /// Reports the first failure; later ones of the same job are dropped (the job already
    /// failed, and one line per message would flood the log when a broker is down).
    fn failed(&self, offset: i64, not_delivered: usize, reason: &dyn std::fmt::Display, timed_out: bool) {
        if let Some(done) = self.take_done() {
            let cause = self.cause(reason, timed_out);
            log::warn!(
                "dead-letter write to {:?} failed for {}[{}] offset {offset}: {cause}",
                self.topic,
                self.source.topic,
                self.source.partition,
            );
            let failure = DeadLetterFailure {
                plugin: self.plugin.clone(),
                topic: self.topic.clone(),
                what: self.what.clone(),
                failed: not_delivered as u64,
                sent: self.total as u64,
                cause,
            };
            report(done, Err(Error::DeadLetter(Box::new(failure))));
        }
    }

    /// librdkafka's reason (its error code and text), plus the bound when the write timed
    /// out, and librdkafka's last error since the write began when it adds something: a
    /// timed-out write's error is only "Message timed out", the real cause came before.
    fn cause(&self, reason: &dyn std::fmt::Display, timed_out: bool) -> String {
        let mut cause = reason.to_string();
        if let Some(timeout) = self.timeout.filter(|_| timed_out) {
            let _ = write!(
                cause,
                " after {:.1} s (dlq_timeout, or the producer's message.timeout.ms)",
                timeout.as_secs_f64()
            );
        }
        if let Some(last) = self.last_error.since(self.started).filter(|last| !cause.contains(last.as_str())) {
            let _ = write!(cause, "; librdkafka's last error: {last}");
        }
        cause
    }
}

/// The error a librdkafka debug line reports for a write it retries, if it reports one: a
/// produce request's answer (`MSGSET ... <topic> [<partition>]: MessageSet with N message(s)
/// (...) encountered error: <text> (actions ...)`) or a metadata reply's (`METADATA Error in
/// metadata reply for topic <topic> (PartCnt N): <text>`).
fn retried_error(fac: &str, message: &str) -> Option<String> {
    match fac {
        "MSGSET" => {
            let (before, after) = message.split_once(": MessageSet with ")?;
            let (_, error) = after.split_once("encountered error: ")?;
            let error = error.split_once(" (actions ").map_or(error, |(text, _)| text);
            // `before` ends with the partition, after librdkafka's thread and broker prefixes.
            let partition = before.rsplit(": ").next().unwrap_or(before);
            Some(format!("produce to {partition}: {error}"))
        }
        "METADATA" => {
            let (_, rest) = message.split_once("rror in metadata reply for topic ")?;
            let (topic, after) = rest.split_once(" (PartCnt ")?;
            let (_, error) = after.split_once("): ")?;
            Some(format!("metadata for topic {topic}: {error}"))
        }
        _ => None,
    }
}

/// Calls `done`, keeping a panic inside it from unwinding into librdkafka's polling thread,
/// whose death would leave every later dead-letter write unreported.
fn report(done: Done, result: Result<(), Error>) {
    if catch_unwind(AssertUnwindSafe(|| done(result))).is_err() {
        log::error!("a dead-letter completion callback panicked");
    }
}

/// What each produced message carries back to its delivery report.
struct Pending {
    job: Arc<Job>,
    /// The original offset, to name the message if its write fails.
    offset: i64,
}

/// Routes delivery reports to their job, and counts the writes whose report has not run yet.
#[derive(Default)]
struct Acks {
    /// Raised before a record is handed to librdkafka, lowered once its report has run (or
    /// librdkafka refused it), so zero means no `done` is still due for anything sent.
    outstanding: AtomicUsize,
    last_error: Arc<LastError>,
    /// Whether the user asked for librdkafka's debug lines; otherwise the ones enabled for
    /// `retried_error` are read and not logged.
    log_debug: bool,
}

impl ClientContext for Acks {
    /// Logs as rust-rdkafka's default does, and keeps warnings and worse as the last error.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                log::error!(target: "librdkafka", "librdkafka: {fac} {message}");
                self.last_error.set(format!("{fac} {message}"));
            }
            RDKafkaLogLevel::Warning => {
                log::warn!(target: "librdkafka", "librdkafka: {fac} {message}");
                self.last_error.set(format!("{fac} {message}"));
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                log::info!(target: "librdkafka", "librdkafka: {fac} {message}");
            }
            RDKafkaLogLevel::Debug => {
                if self.log_debug {
                    log::debug!(target: "librdkafka", "librdkafka: {fac} {message}");
                }
                if let Some(error) = retried_error(fac, message) {
                    self.last_error.set(error);
                }
            }
        }
    }

    /// Logs as the default does, and keeps the error (a broker down, authentication, TLS, an
    /// idempotent producer that could not initialise: its fatal error names the cause).
    fn error(&self, error: KafkaError, reason: &str) {
        log::error!("librdkafka: {error}: {reason}");
        let text = format!("{error}: {reason}");
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.last_error.all_brokers_down(text);
        } else {
            self.last_error.set(text);
        }
    }
}

impl ProducerContext for Acks {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Box<Pending>) {
        match result {
            Ok(_) => pending.job.acknowledged(),
            Err((error, _)) => {
                let timed_out = matches!(error, KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut));
                pending.job.failed(pending.offset, 1, error, timed_out);
            }
        }
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

type Record<'a> = BaseRecord<'a, [u8], [u8], Box<Pending>>;

/// Writes dead letters and reports when the broker has them.
///
/// `done` callbacks run on librdkafka's producer polling thread (or, for writes still
/// outstanding when `DeadLetters` is dropped, on the dropping thread, with an error), except
/// that an empty `send` and a write librdkafka refuses at once report on the caller's thread.
/// Callbacks must be quick and must not call back into `DeadLetters::flush`.
///
/// Dropping it purges outstanding writes (their `done` gets `Err`); call `flush` first to keep
/// them.
pub struct DeadLetters {
    producer: ThreadedProducer<Acks>,
    /// How long librdkafka tries one write before failing it (`message.timeout.ms`); `None`
    /// when the user's properties set it to 0, librdkafka's "no bound".
    timeout: Option<Duration>,
}

impl DeadLetters {
    /// A producer to the same cluster as the consumer: `bootstrap` plus the user's librdkafka
    /// properties (security settings included), minus the consumer-only ones (see
    /// `CONSUMER_ONLY`), with acks=all, idempotence and a 5 ms linger on top. Each write is
    /// bounded by `timeout` (as `message.timeout.ms`) unless the properties set
    /// `message.timeout.ms` or its alias `delivery.timeout.ms`.
    pub fn new(bootstrap: &str, kafka: &[(String, String)], timeout: Duration) -> Result<Self, Error> {
        let (config, timeout) = producer_config(bootstrap, kafka, timeout);
        let acks = Acks { log_debug: kafka.iter().any(|(name, _)| name == "debug"), ..Acks::default() };
        let producer = config.create_with_context(acks).map_err(|e| to_error("create dead-letter producer", e))?;
        Ok(DeadLetters { producer, timeout })
    }

    /// The bound of one write: `dlq_timeout`, or the user's `message.timeout.ms` (`None`: 0,
    /// no bound).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// librdkafka's last error or warning on this producer, shared.
    pub fn last_error(&self) -> Arc<LastError> {
        Arc::clone(&self.producer.context().last_error)
    }

    /// Writes the messages at `indexes` of `batch` to `topic`: original key, value and headers
    /// kept, plus the `fastconsume.*` headers (see the `HEADER_*` constants; all values UTF-8
    /// text, numbers in decimal; `fastconsume.original.timestamp` in ms since the epoch, left
    /// out when the message has no timestamp). Partitions by key with librdkafka's default
    /// partitioner.
    ///
    /// `done` is called exactly once: `Ok` after every write is acknowledged, or `Err`
    /// (`Error::DeadLetter`, naming the plugin, the messages and librdkafka's reason) at the
    /// first failure. After a failure the writes already handed to
    /// librdkafka are neither cancelled nor awaited (their outcome is dropped; `flush` still
    /// waits for them), and if librdkafka refused a write at once the rest of `indexes` is not
    /// sent. The failure's original partition, offset and reason are logged at warn level. An
    /// empty `indexes` calls `done(Ok(()))` at once.
    ///
    /// Blocks only while librdkafka's queue is full, retrying every few milliseconds for up to
    /// `QUEUE_FULL_WAIT`, then fails.
    pub fn send(&self, topic: &str, batch: &Batch, indexes: &[usize], info: &DeadLetterInfo, done: Done) {
        if indexes.is_empty() {
            done(Ok(()));
            return;
        }
        let source = batch.partition();
        // Named before the loop below checks each index: a bad one must not panic here.
        let what = if indexes.iter().all(|&i| i < batch.len()) {
            batch.describe(indexes.len(), indexes.iter().min().copied(), indexes.iter().max().copied())
        } else {
            format!("{} message(s) of {}[{}]", indexes.len(), source.topic, source.partition)
        };
        let job = Arc::new(Job {
            topic: topic.to_string(),
            source: source.clone(),
            plugin: info.plugin.clone(),
            what,
            started: Instant::now(),
            timeout: self.timeout,
            last_error: self.last_error(),
            total: indexes.len(),
            remaining: AtomicUsize::new(indexes.len()),
            done: Mutex::new(Some(done)),
        });
        let numbers = Numbers { attempts: info.attempts.to_string(), partition: source.partition.to_string() };
        for (sent, &index) in indexes.iter().enumerate() {
            let unsent = indexes.len() - sent;
            if index >= batch.len() {
                let reason = format!("index {index} is outside the batch of {} messages", batch.len());
                job.failed(-1, unsent, &reason, false);
                return;
            }
            let message = batch.get(index);
            let pending = Box::new(Pending { job: Arc::clone(&job), offset: message.offset });
            let mut record = Record::with_opaque_to(topic, pending).headers(headers(&message, info, source, &numbers));
            if let Some(key) = message.key {
                record = record.key(key);
            }
            if let Some(value) = message.value {
                record = record.payload(value);
            }
            if let Err(error) = self.enqueue(record) {
                job.failed(message.offset, unsent, &error, false);
                return;
            }
        }
    }

    /// Hands one record to librdkafka, waiting out a full queue for a while.
    fn enqueue(&self, record: Record<'_>) -> Result<(), KafkaError> {
        let outstanding = &self.producer.context().outstanding;
        // Raised first: the report may run on the polling thread before `send` returns.
        outstanding.fetch_add(1, Ordering::AcqRel);
        let result = self.enqueue_counted(record);
        if result.is_err() {
            outstanding.fetch_sub(1, Ordering::AcqRel);
        }
        result
    }

    fn enqueue_counted(&self, mut record: Record<'_>) -> Result<(), KafkaError> {
        let deadline = Instant::now() + QUEUE_FULL_WAIT;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    record = back;
                    // Sleep rather than poll: the polling thread is already draining delivery
                    // reports, and polling here would run other jobs' `done` on this thread.
                    thread::sleep(STEP);
                }
                // The returned record drops here, and with it its share of the job.
                Err((error, _)) => return Err(error),
            }
        }
    }

    /// Waits up to `timeout` for outstanding writes; returns whether none is
    /// left, i.e. every write was acknowledged or failed and its `done` has run. Failures are
    /// reported through `done`, not here.
    #[cfg(test)]
    pub fn flush(&self, timeout: Duration) -> bool {
        // Not `Producer::flush`: that polls on this thread, which would run `done` callbacks
        // here too, and librdkafka's own count also holds unrelated events (logs, errors).
        let outstanding = &self.producer.context().outstanding;
        let deadline = Instant::now() + timeout;
        loop {
            if outstanding.load(Ordering::Acquire) == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            thread::sleep(STEP.min(deadline - now));
        }
    }
}

/// The decimal texts shared by every message of one `send`.
struct Numbers {
    attempts: String,
    partition: String,
}

fn headers(message: &MessageView<'_>, info: &DeadLetterInfo, source: &Partition, numbers: &Numbers) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(message.headers().len() + 8);
    for (name, value) in message.headers() {
        // Kafka header names are strings; bytes that are not UTF-8 cannot be written back as a
        // name, so they are replaced rather than the message being refused.
        let name = String::from_utf8_lossy(name);
        headers = headers.insert(Header { key: &name, value });
    }
    let offset = message.offset.to_string();
    headers = headers
        .insert(text(HEADER_PLUGIN, &info.plugin))
        .insert(text(HEADER_ERROR_TYPE, &info.error_type))
        .insert(text(HEADER_ERROR_MESSAGE, &info.error_message))
        .insert(text(HEADER_ATTEMPTS, &numbers.attempts))
        .insert(text(HEADER_ORIGINAL_TOPIC, &source.topic))
        .insert(text(HEADER_ORIGINAL_PARTITION, &numbers.partition))
        .insert(text(HEADER_ORIGINAL_OFFSET, &offset));
    if let Some(timestamp) = message.timestamp {
        headers = headers.insert(text(HEADER_ORIGINAL_TIMESTAMP, &timestamp.to_string()));
    }
    headers
}

fn text<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a [u8]> {
    Header { key, value: Some(value.as_bytes()) }
}

/// The dead-letter producer's configuration, and the bound of one write it sets: `timeout`,
/// or the user's own `message.timeout.ms` / `delivery.timeout.ms` (a value librdkafka will
/// reject is left for it to name).
fn producer_config(bootstrap: &str, kafka: &[(String, String)], timeout: Duration) -> (ClientConfig, Option<Duration>) {
    let mut config = ClientConfig::new();
    // rust-rdkafka lowers librdkafka's log level to what the `log` crate lets through, which
    // would drop the debug lines; they are only read here (`Acks::log`), not emitted.
    config.set("debug", DEBUG_CONTEXTS).set_log_level(RDKafkaLogLevel::Debug);
    let mut bound = None;
    for (name, value) in kafka {
        if !CONSUMER_ONLY.contains(&name.as_str()) {
            config.set(name, value);
        }
        if TIMEOUT_PROPERTIES.contains(&name.as_str()) {
            let millis = value.trim().parse::<u64>();
            bound = Some(millis.map_or(Some(timeout), |ms| (ms > 0).then(|| Duration::from_millis(ms))));
        }
    }
    let bound = bound.unwrap_or_else(|| {
        // At least 1 ms: librdkafka reads 0 as "no bound".
        let millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1);
        config.set(TIMEOUT_PROPERTIES[0], millis.to_string());
        Some(timeout)
    });
    config.set("bootstrap.servers", bootstrap);
    for (name, value) in PRODUCER_PROPERTIES {
        config.set(name, value);
    }
    (config, bound)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{self, Receiver, RecvTimeoutError};

    use rdkafka::config::RDKafkaLogLevel;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message, OwnedMessage, Timestamp};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::BaseProducer;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use rdkafka::{Offset, TopicPartitionList};

    use super::*;
    use crate::core::batch::BatchBuilder;
    use crate::kafka::mock::MockKafka;

    const BOUND: Duration = Duration::from_secs(30);

    /// The failure a `done` got, or a panic naming what it got instead.
    fn dead_letter_failure(result: Result<(), Error>) -> DeadLetterFailure {
        match result {
            Err(Error::DeadLetter(failure)) => *failure,
            other => panic!("expected a dead-letter failure, got {other:?}"),
        }
    }

    fn info() -> DeadLetterInfo {
        DeadLetterInfo {
            plugin: "billing".into(),
            error_type: "ValueError".into(),
            error_message: "bad amount: é".into(),
            attempts: 3,
        }
    }

    /// Five messages at offsets 10..15 of t[2]: 11 has a key, 12 headers, 14 a timestamp.
    fn batch() -> Arc<Batch> {
        let mut builder = BatchBuilder::new(Partition { topic: Arc::from("t"), partition: 2 });
        for offset in 10..15 {
            let key = (offset == 11).then(|| b"k11".to_vec());
            let headers = (offset == 12).then(|| {
                OwnedHeaders::new()
                    .insert(Header { key: "trace", value: Some("abc") })
                    .insert(Header::<&[u8]> { key: "empty", value: None })
            });
            let timestamp =
                if offset == 14 { Timestamp::CreateTime(1_700_000_000_123) } else { Timestamp::NotAvailable };
            let value = format!("v{offset}").into_bytes();
            builder.push(&OwnedMessage::new(Some(value), key, "t".into(), timestamp, 2, offset, headers));
        }
        builder.take()
    }

    /// A `Done` that sends its outcome, and the receiver; the sender drops with the callback,
    /// so a second report is impossible to miss: after the first, `recv` says disconnected.
    fn done() -> (Done, Receiver<Result<(), Error>>) {
        let (tx, rx) = mpsc::channel();
        let done: Done = Box::new(move |result| {
            let _ = tx.send(result);
        });
        (done, rx)
    }

    fn outcome(rx: &Receiver<Result<(), Error>>) -> Result<(), Error> {
        let result = rx.recv_timeout(Duration::from_secs(10)).expect("done was called");
        assert_eq!(rx.recv_timeout(Duration::from_millis(50)).err(), Some(RecvTimeoutError::Disconnected));
        result
    }

    type HeaderList = Vec<(String, Option<Vec<u8>>)>;

    /// A consumed message: key, value and headers.
    type Got = (Option<Vec<u8>>, Option<Vec<u8>>, HeaderList);

    fn consume(bootstrap: &str, topic: &str, count: usize) -> Vec<Got> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "dlq-test")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, 0, Offset::Beginning).expect("offset");
        consumer.assign(&assignment).expect("assign");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while seen.len() < count && Instant::now() < deadline {
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                let message = message.expect("message");
                let headers = message.headers().map_or_else(Vec::new, |h| {
                    h.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect()
                });
                seen.push((message.key().map(<[u8]>::to_vec), message.payload().map(<[u8]>::to_vec), headers));
            }
        }
        seen
    }

    fn header(name: &str, value: &str) -> (String, Option<Vec<u8>>) {
        (name.to_string(), Some(value.as_bytes().to_vec()))
    }

    fn fastconsume_headers(offset: i64, timestamp: Option<&str>) -> HeaderList {
        let mut headers = vec![
            header(HEADER_PLUGIN, "billing"),
            header(HEADER_ERROR_TYPE, "ValueError"),
            header(HEADER_ERROR_MESSAGE, "bad amount: é"),
            header(HEADER_ATTEMPTS, "3"),
            header(HEADER_ORIGINAL_TOPIC, "t"),
            header(HEADER_ORIGINAL_PARTITION, "2"),
            header(HEADER_ORIGINAL_OFFSET, &offset.to_string()),
        ];
        if let Some(timestamp) = timestamp {
            headers.push(header(HEADER_ORIGINAL_TIMESTAMP, timestamp));
        }
        headers
    }

    #[test]
    fn writes_messages_with_their_headers_and_reports_once() {
        let cluster = MockKafka::new(1).expect("mock cluster");
        cluster.create_topic("dlq", 1).expect("topic");
        let letters = DeadLetters::new(&cluster.bootstrap(), &[], BOUND).expect("producer");
        let (done, rx) = done();
        letters.send("dlq", &batch(), &[1, 2, 4], &info(), done);
        outcome(&rx).expect("delivered");
        assert!(letters.flush(Duration::from_secs(1)));

        let got = consume(&cluster.bootstrap(), "dlq", 3);
        let mut with_original = vec![header("trace", "abc"), ("empty".to_string(), None)];
        with_original.extend(fastconsume_headers(12, None));
        let expected = vec![
            (Some(b"k11".to_vec()), Some(b"v11".to_vec()), fastconsume_headers(11, None)),
            (None, Some(b"v12".to_vec()), with_original),
            (None, Some(b"v14".to_vec()), fastconsume_headers(14, Some("1700000000123"))),
        ];
        assert_eq!(got, expected);
    }

    #[test]
    fn nothing_to_send_reports_ok_at_once() {
        // No broker is needed: nothing is produced.
        let letters = DeadLetters::new("127.0.0.1:9", &[], BOUND).expect("producer");
        let (done, rx) = done();
        letters.send("dlq", &batch(), &[], &info(), done);
        assert!(rx.try_recv().expect("called before send returned").is_ok());
        assert!(letters.flush(Duration::ZERO));
    }

    #[test]
    fn a_failed_delivery_is_reported_once() {
        let cluster = MockKafka::new(1).expect("mock cluster");
        // The topic does not exist and may not be created, so the mock answers "unknown topic";
        // the short propagation time makes librdkafka believe it at once.
        let kafka = [
            ("allow.auto.create.topics".to_string(), "false".to_string()),
            ("topic.metadata.propagation.max.ms".to_string(), "10".to_string()),
        ];
        let letters = DeadLetters::new(&cluster.bootstrap(), &kafka, BOUND).expect("producer");
        let (done, rx) = done();
        let started = Instant::now();
        letters.send("missing", &batch(), &[0, 1, 2], &info(), done);
        let failure = dead_letter_failure(outcome(&rx));
        assert_eq!((failure.topic.as_str(), failure.failed, failure.sent), ("missing", 1, 3));
        assert_eq!(failure.plugin, "billing");
        assert_eq!(failure.what, "3 message(s) of t[2] offsets 10..=12");
        // librdkafka's code and text, not only a count.
        assert!(failure.cause.contains("UnknownTopic"), "{}", failure.cause);
        let text = Error::DeadLetter(Box::new(failure)).to_string();
        for part in ["\"billing\"", "t[2] offsets 10..=12", "\"missing\"", "1 of 3", "UnknownTopic"] {
            assert!(text.contains(part), "{part} not in {text:?}");
        }
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert!(letters.flush(Duration::from_secs(5)));
    }

    #[test]
    fn a_write_refused_at_once_is_reported_once_and_the_rest_not_sent() {
        let cluster = MockKafka::new(1).expect("mock cluster");
        cluster.create_topic("dlq", 1).expect("topic");
        // The second message is larger than message.max.bytes, so librdkafka refuses it
        // at once.
        let kafka = [("message.max.bytes".to_string(), "1000".to_string())];
        let letters = DeadLetters::new(&cluster.bootstrap(), &kafka, BOUND).expect("producer");
        let mut builder = BatchBuilder::new(Partition { topic: Arc::from("t"), partition: 0 });
        for offset in 0..3 {
            let value = vec![b'x'; if offset == 1 { 2_000 } else { 10 }];
            builder.push(&OwnedMessage::new(Some(value), None, "t".into(), Timestamp::NotAvailable, 0, offset, None));
        }
        let (done, rx) = done();
        letters.send("dlq", &builder.take(), &[0, 1, 2], &info(), done);
        let failure = dead_letter_failure(rx.try_recv().expect("called before send returned"));
        assert_eq!((failure.topic.as_str(), failure.failed, failure.sent), ("dlq", 2, 3));
        assert!(failure.cause.contains("MessageSizeTooLarge"), "{}", failure.cause);
        assert_eq!(rx.recv_timeout(Duration::from_millis(50)).err(), Some(RecvTimeoutError::Disconnected));
        assert!(letters.flush(Duration::from_secs(5)));
        // Only the message before the refused one was written.
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", cluster.bootstrap()).create().expect("consumer");
        let watermarks = consumer.fetch_watermarks("dlq", 0, Duration::from_secs(5)).expect("watermarks");
        assert_eq!(watermarks, (0, 1));
    }

    #[test]
    fn an_index_outside_the_batch_is_an_error_not_a_panic() {
        let letters = DeadLetters::new("127.0.0.1:9", &[], BOUND).expect("producer");
        let (done, rx) = done();
        letters.send("dlq", &batch(), &[5], &info(), done);
        let failure = dead_letter_failure(rx.try_recv().expect("called before send returned"));
        assert_eq!((failure.failed, failure.sent), (1, 1));
        assert!(failure.cause.contains("outside the batch"), "{}", failure.cause);
    }

    #[test]
    fn a_write_that_cannot_complete_fails_at_its_bound_and_says_so() {
        let cluster = MockKafka::new(1).expect("mock cluster");
        // A missing topic that may not be created: librdkafka waits for it to appear (up to
        // topic.metadata.propagation.max.ms, 30 s), so only the bound ends the write.
        let kafka = [("allow.auto.create.topics".to_string(), "false".to_string())];
        let letters = DeadLetters::new(&cluster.bootstrap(), &kafka, Duration::from_millis(1500)).expect("producer");
        assert_eq!(letters.timeout(), Some(Duration::from_millis(1500)));
        let (done, rx) = done();
        let started = Instant::now();
        letters.send("missing", &batch(), &[0], &info(), done);
        let failure = dead_letter_failure(outcome(&rx));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(6), "failed after {took:?}");
        assert!(failure.cause.contains("MessageTimedOut"), "{}", failure.cause);
        assert!(failure.cause.contains("after 1.5 s (dlq_timeout"), "{}", failure.cause);
        // What librdkafka retried meanwhile is the real cause.
        let unknown = "librdkafka's last error: metadata for topic missing: Broker: Unknown topic or partition";
        assert!(failure.cause.contains(unknown), "{}", failure.cause);
        assert!(letters.flush(Duration::from_secs(5)));
    }

    #[test]
    fn a_write_librdkafka_retries_names_the_brokers_answer() {
        // Every produce request is answered NOT_ENOUGH_REPLICAS, which librdkafka retries
        // until the bound, as it does for a partition short of in-sync replicas.
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("dlq", 1, 1).expect("topic");
        cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 1000]);
        let letters =
            DeadLetters::new(&cluster.bootstrap_servers(), &[], Duration::from_millis(1500)).expect("producer");
        let started = Instant::now();
        let (done, rx) = done();
        letters.send("dlq", &batch(), &[0, 1], &info(), done);
        // While it waits, the broker's answer is known...
        let deadline = started + Duration::from_secs(1);
        let mut seen = None;
        while seen.is_none() && Instant::now() < deadline {
            seen = letters.last_error().since(started);
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(seen.as_deref(), Some("produce to dlq [0]: Broker: Not enough in-sync replicas"));
        // ...and the failure at the bound names it.
        let failure = dead_letter_failure(outcome(&rx));
        assert!(failure.cause.contains("Not enough in-sync replicas"), "{}", failure.cause);
        assert!(started.elapsed() < Duration::from_secs(6), "failed after {:?}", started.elapsed());
    }

    #[test]
    fn the_errors_librdkafka_retries_are_read_from_its_debug_lines() {
        let produce = "[thrd:127.0.0.1:9092/1]: 127.0.0.1:9092/1: events.dlq [0]: MessageSet with 3 message(s) \
                       (MsgId 1, BaseSeq 0) encountered error: Broker: Not enough in-sync replicas \
                       (actions Retry,MsgNotPersisted)";
        assert_eq!(
            retried_error("MSGSET", produce).as_deref(),
            Some("produce to events.dlq [0]: Broker: Not enough in-sync replicas")
        );
        let metadata =
            "[thrd:main]: Error in metadata reply for topic dlq (PartCnt 0): Broker: Unknown topic or partition";
        assert_eq!(
            retried_error("METADATA", metadata).as_deref(),
            Some("metadata for topic dlq: Broker: Unknown topic or partition")
        );
        let delivered = "[thrd:main]: events.dlq [0]: MessageSet with 3 message(s) (MsgId 1, BaseSeq 0) delivered";
        assert_eq!(retried_error("MSGSET", delivered), None);
        assert_eq!(retried_error("METADATA", "[thrd:main]: 1/1 requested topic(s) seen in metadata"), None);
        assert_eq!(retried_error("PRODUCE", produce), None);
    }

    #[test]
    fn a_timed_out_write_names_librdkafkas_last_error() {
        // Nothing listens on port 9: librdkafka's error callback reports the refused
        // connection, and the write times out; its error must carry that cause.
        let letters = DeadLetters::new("127.0.0.1:9", &[], Duration::from_millis(1500)).expect("producer");
        let (done, rx) = done();
        letters.send("dlq", &batch(), &[0, 1], &info(), done);
        let failure = dead_letter_failure(outcome(&rx));
        assert!(failure.cause.contains("MessageTimedOut"), "{}", failure.cause);
        assert!(failure.cause.contains("librdkafka's last error: "), "{}", failure.cause);
        assert!(failure.cause.contains("127.0.0.1:9"), "{}", failure.cause);
        assert!(letters.last_error().since(Instant::now()).is_none(), "an older error is not news");
    }

    #[test]
    fn the_bound_is_dlq_timeout_unless_the_user_set_librdkafkas() {
        let (config, bound) = producer_config("127.0.0.1:9", &[], Duration::from_secs(30));
        assert_eq!((config.get("message.timeout.ms"), bound), (Some("30000"), Some(Duration::from_secs(30))));
        assert_eq!(config.get("debug"), Some(DEBUG_CONTEXTS));
        let (config, _) = producer_config("127.0.0.1:9", &[("debug".into(), "all".into())], BOUND);
        assert_eq!(config.get("debug"), Some("all"), "the user's debug contexts win");
        let (config, bound) = producer_config("127.0.0.1:9", &[], Duration::from_micros(10));
        assert_eq!((config.get("message.timeout.ms"), bound), (Some("1"), Some(Duration::from_micros(10))));
        for name in TIMEOUT_PROPERTIES {
            let kafka = [(name.to_string(), "1234".to_string())];
            let (config, bound) = producer_config("127.0.0.1:9", &kafka, Duration::from_secs(30));
            assert_eq!(bound, Some(Duration::from_millis(1234)), "{name}");
            let no_bound = [(name.to_string(), "0".to_string())];
            assert_eq!(producer_config("127.0.0.1:9", &no_bound, BOUND).1, None, "{name}=0 is librdkafka's no bound");
            assert_eq!(config.get(name), Some("1234"), "{name}");
            let other = TIMEOUT_PROPERTIES.iter().find(|&&n| n != name).expect("an alias");
            assert_eq!(config.get(other), None, "{name}: dlq_timeout must not override the user's");
        }
    }

    /// Collects librdkafka's configuration warnings.
    #[derive(Default)]
    struct Warnings(Mutex<Vec<String>>);

    impl ClientContext for Warnings {
        fn log(&self, _: RDKafkaLogLevel, fac: &str, message: &str) {
            if fac == "CONFWARN" {
                self.0.lock().expect("warnings").push(message.to_string());
            }
        }
    }

    impl ProducerContext for Warnings {
        type DeliveryOpaque = ();

        fn delivery(&self, _: &DeliveryResult<'_>, (): ()) {}
    }

    fn consumer_property_warnings(config: &ClientConfig) -> Vec<String> {
        let producer: BaseProducer<Warnings> = config.create_with_context(Warnings::default()).expect("producer");
        producer.poll(Duration::from_millis(100));
        let warnings = producer.context().0.lock().expect("warnings").clone();
        warnings.into_iter().filter(|w| w.contains("consumer property")).collect()
    }

    #[test]
    fn consumer_only_properties_are_left_out() {
        let values = [
            ("group.id", "g"),
            ("group.instance.id", "i"),
            ("group.protocol", "classic"),
            ("group.protocol.type", "consumer"),
            ("group.remote.assignor", "uniform"),
            ("partition.assignment.strategy", "range"),
            ("session.timeout.ms", "30000"),
            ("heartbeat.interval.ms", "1000"),
            ("coordinator.query.interval.ms", "600000"),
            ("max.poll.interval.ms", "300000"),
            ("enable.auto.commit", "true"),
            ("auto.commit.enable", "true"),
            ("auto.commit.interval.ms", "1000"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("offset.store.method", "broker"),
            ("offset.store.path", "."),
            ("offset.store.sync.interval.ms", "-1"),
            ("queued.min.messages", "1000"),
            ("queued.max.messages.kbytes", "1000"),
            ("fetch.wait.max.ms", "100"),
            ("fetch.queue.backoff.ms", "100"),
            ("fetch.message.max.bytes", "100000"),
            ("max.partition.fetch.bytes", "100000"),
            ("fetch.max.bytes", "1000000"),
            ("fetch.min.bytes", "1"),
            ("fetch.error.backoff.ms", "100"),
            ("isolation.level", "read_committed"),
            ("enable.partition.eof", "true"),
            ("check.crcs", "true"),
            ("consume.callback.max.messages", "10"),
        ];
        assert_eq!(values.len(), CONSUMER_ONLY.len());
        let mut kafka: Vec<(String, String)> =
            values.iter().map(|(n, v)| ((*n).to_string(), (*v).to_string())).collect();
        kafka.push(("client.id".into(), "mine".into()));
        kafka.push(("acks".into(), "1".into()));

        let (config, _) = producer_config("127.0.0.1:9", &kafka, BOUND);
        assert_eq!(config.get("client.id"), Some("mine"), "other properties pass through");
        assert_eq!(config.get("acks"), Some("all"), "the producer's guarantees win");
        assert_eq!(consumer_property_warnings(&config), Vec::<String>::new());

        // The check can fail: unfiltered, librdkafka warns about every one.
        let mut unfiltered = ClientConfig::new();
        for (name, value) in &kafka {
            unfiltered.set(name, value);
        }
        let warnings = consumer_property_warnings(&unfiltered);
        // max.partition.fetch.bytes is an alias: librdkafka names it as fetch.message.max.bytes.
        for name in CONSUMER_ONLY.iter().filter(|&&n| n != "max.partition.fetch.bytes") {
            let needle = format!("property {name} is a consumer property");
            assert!(warnings.iter().any(|w| w.contains(&needle)), "no warning for {name}: {warnings:#?}");
        }
    }
}
