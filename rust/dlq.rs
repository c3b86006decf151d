//! The dead-letter writer: messages a plugin failed through all its retries are written to the
//! plugin's dead-letter topic, with headers saying why and where they came from.
//!
//! A dead-lettered message counts as done only once the broker has acknowledged its copy
//! (acks=all, idempotent producer), so `send` reports through a callback that fires once per
//! call, after every write of that call is acknowledged or on its first failure. Only then may
//! the caller let the message's offset be committed; until then it is at-least-once, like the
//! rest of the consumer.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};

use crate::batch::{Batch, MessageView, Partition};
use crate::errors::Error;

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

pub const HEADER_PLUGIN: &str = "fastconsume.plugin";
pub const HEADER_ERROR_TYPE: &str = "fastconsume.error.type";
pub const HEADER_ERROR_MESSAGE: &str = "fastconsume.error.message";
pub const HEADER_ATTEMPTS: &str = "fastconsume.attempts";
pub const HEADER_ORIGINAL_TOPIC: &str = "fastconsume.original.topic";
pub const HEADER_ORIGINAL_PARTITION: &str = "fastconsume.original.partition";
pub const HEADER_ORIGINAL_OFFSET: &str = "fastconsume.original.offset";
pub const HEADER_ORIGINAL_TIMESTAMP: &str = "fastconsume.original.timestamp";

/// Why messages are dead-lettered; becomes headers.
#[derive(Clone, Debug)]
pub struct DeadLetterInfo {
    pub plugin: String,
    pub error_type: String,
    pub error_message: String,
    pub attempts: u32,
}

/// The outcome of one `send`, reported once.
pub type Done = Box<dyn FnOnce(Result<(), Error>) + Send>;

/// The writes of one `send` call, shared by their delivery reports.
struct Job {
    /// The dead-letter topic.
    topic: String,
    source: Partition,
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
    fn failed(&self, offset: i64, not_delivered: usize, reason: &dyn std::fmt::Display) {
        if let Some(done) = self.take_done() {
            log::warn!(
                "dead-letter write to {:?} failed for {}[{}] offset {offset}: {reason}",
                self.topic,
                self.source.topic,
                self.source.partition,
            );
            let error =
                Error::Delivery { topic: self.topic.clone(), failed: not_delivered as u64, sent: self.total as u64 };
            report(done, Err(error));
        }
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
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Box<Pending>) {
        match result {
            Ok(_) => pending.job.acknowledged(),
            Err((error, _)) => pending.job.failed(pending.offset, 1, error),
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
}

impl DeadLetters {
    /// A producer to the same cluster as the consumer: `bootstrap` plus the user's librdkafka
    /// properties (security settings included), minus the consumer-only ones (see
    /// `CONSUMER_ONLY`), with acks=all, idempotence and a 5 ms linger on top.
    pub fn new(bootstrap: &str, kafka: &[(String, String)]) -> Result<Self, Error> {
        let producer = producer_config(bootstrap, kafka)
            .create_with_context(Acks::default())
            .map_err(|e| Error::kafka("create dead-letter producer", e))?;
        Ok(DeadLetters { producer })
    }

    /// Writes the messages at `indexes` of `batch` to `topic`: original key, value and headers
    /// kept, plus the `fastconsume.*` headers (see the `HEADER_*` constants; all values UTF-8
    /// text, numbers in decimal; `fastconsume.original.timestamp` in ms since the epoch, left
    /// out when the message has no timestamp). Partitions by key with librdkafka's default
    /// partitioner.
    ///
    /// `done` is called exactly once: `Ok` after every write is acknowledged, or `Err`
    /// (`Error::Delivery`) at the first failure. After a failure the writes already handed to
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
        let job = Arc::new(Job {
            topic: topic.to_string(),
            source: source.clone(),
            total: indexes.len(),
            remaining: AtomicUsize::new(indexes.len()),
            done: Mutex::new(Some(done)),
        });
        let numbers = Numbers { attempts: info.attempts.to_string(), partition: source.partition.to_string() };
        for (sent, &index) in indexes.iter().enumerate() {
            let unsent = indexes.len() - sent;
            if index >= batch.len() {
                let reason = format!("index {index} is outside the batch of {} messages", batch.len());
                job.failed(-1, unsent, &reason);
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
                job.failed(message.offset, unsent, &error);
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

    /// Waits up to `timeout` for outstanding writes (used at shutdown); returns whether none is
    /// left, i.e. every write was acknowledged or failed and its `done` has run. Failures are
    /// reported through `done`, not here.
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

/// The dead-letter producer's configuration.
fn producer_config(bootstrap: &str, kafka: &[(String, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (name, value) in kafka {
        if !CONSUMER_ONLY.contains(&name.as_str()) {
            config.set(name, value);
        }
    }
    config.set("bootstrap.servers", bootstrap);
    for (name, value) in PRODUCER_PROPERTIES {
        config.set(name, value);
    }
    config
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{self, Receiver, RecvTimeoutError};

    use rdkafka::config::RDKafkaLogLevel;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message, OwnedMessage, Timestamp};
    use rdkafka::producer::BaseProducer;
    use rdkafka::{Offset, TopicPartitionList};

    use super::*;
    use crate::batch::BatchBuilder;
    use crate::mock::MockKafka;

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
        let letters = DeadLetters::new(&cluster.bootstrap(), &[]).expect("producer");
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
        let letters = DeadLetters::new("127.0.0.1:9", &[]).expect("producer");
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
        let letters = DeadLetters::new(&cluster.bootstrap(), &kafka).expect("producer");
        let (done, rx) = done();
        let started = Instant::now();
        letters.send("missing", &batch(), &[0, 1, 2], &info(), done);
        match outcome(&rx) {
            Err(Error::Delivery { topic, failed: 1, sent: 3 }) => assert_eq!(topic, "missing"),
            other => panic!("expected a delivery error, got {other:?}"),
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
        let letters = DeadLetters::new(&cluster.bootstrap(), &kafka).expect("producer");
        let mut builder = BatchBuilder::new(Partition { topic: Arc::from("t"), partition: 0 });
        for offset in 0..3 {
            let value = vec![b'x'; if offset == 1 { 2_000 } else { 10 }];
            builder.push(&OwnedMessage::new(Some(value), None, "t".into(), Timestamp::NotAvailable, 0, offset, None));
        }
        let (done, rx) = done();
        letters.send("dlq", &builder.take(), &[0, 1, 2], &info(), done);
        match rx.try_recv().expect("called before send returned") {
            Err(Error::Delivery { topic, failed: 2, sent: 3 }) => assert_eq!(topic, "dlq"),
            other => panic!("expected a delivery error, got {other:?}"),
        }
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
        let letters = DeadLetters::new("127.0.0.1:9", &[]).expect("producer");
        let (done, rx) = done();
        letters.send("dlq", &batch(), &[5], &info(), done);
        assert!(matches!(rx.try_recv(), Ok(Err(Error::Delivery { failed: 1, sent: 1, .. }))));
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

        let config = producer_config("127.0.0.1:9", &kafka);
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
