//! Bulk fetch. rust-rdkafka's `poll` returns one message per call, each wrapped in a freshly
//! allocated event; at a million messages a second that wrapping is most of the source
//! thread's cost. Here the assigned partitions' fetch queues are forwarded to one queue of
//! our own, drained with `rd_kafka_consume_batch_queue`: one call per batch. Events
//! (rebalances, errors, commits) stay on the consumer queue, served by `BaseConsumer::poll`.

use std::ffi::{c_void, CStr, CString};
use std::ptr::{self, NonNull};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{Headers, Message};

use crate::core::batch::{Fetched, HeaderSink, Partition};

/// Our queue of fetched messages. Owned: destroyed on drop, before the consumer.
pub struct FetchQueue {
    queue: NonNull<rd::rd_kafka_queue_t>,
}

// SAFETY: librdkafka queues are thread-safe; the handle is only a reference to one.
unsafe impl Send for FetchQueue {}
// SAFETY: as above; every operation on the queue takes librdkafka's own lock.
unsafe impl Sync for FetchQueue {}

impl FetchQueue {
    /// A new, empty queue on the consumer's handle.
    pub fn new<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Option<Self> {
        // SAFETY: the handle is alive for the borrow; the call returns an owned reference.
        let queue = unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) };
        NonNull::new(queue).map(|queue| FetchQueue { queue })
    }

    /// Sends the messages of partitions about to be assigned here. Called before every
    /// assignment: stopping a partition's fetcher clears its forward, and librdkafka does not
    /// forward it anywhere again once the application has.
    pub fn forward<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, partitions: &[Partition]) {
        for p in partitions {
            let Ok(topic) = CString::new(p.topic.as_bytes()) else {
                continue;
            };
            // SAFETY: valid handle and C string; a non-null result is a reference we release.
            unsafe {
                let partition_queue =
                    rd::rd_kafka_queue_get_partition(consumer.client().native_ptr(), topic.as_ptr(), p.partition);
                if partition_queue.is_null() {
                    log::warn!("no fetch queue for {}[{}]", p.topic, p.partition);
                    continue;
                }
                rd::rd_kafka_queue_forward(partition_queue, self.queue.as_ptr());
                rd::rd_kafka_queue_destroy(partition_queue);
            }
        }
    }

    /// Waits up to `timeout` for a first message, then takes what else is there, up to
    /// `limit` in all. (librdkafka's batch call alone waits until it has `limit` messages,
    /// which would hold the first one back past its linger.)
    /// Returns how many it took.
    pub fn take(&self, timeout: Duration, limit: usize, into: &mut Vec<RawMessage>) -> usize {
        // Rounded up: a wait shorter than a millisecond must not become a non-blocking poll.
        let timeout_ms = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let first = self.take_some(timeout_ms, 1, into);
        if first == 1 && limit > 1 {
            return 1 + self.take_some(0, limit - 1, into);
        }
        first
    }

    /// Wakes a `take` waiting on this queue, or makes the next one return at once.
    pub fn wake(&self) {
        // SAFETY: the queue is alive for the borrow; yielding only sets a flag and signals.
        unsafe { rd::rd_kafka_queue_yield(self.queue.as_ptr()) }
    }

    fn take_some(&self, timeout_ms: i32, limit: usize, into: &mut Vec<RawMessage>) -> usize {
        // librdkafka writes message pointers straight into `into`'s spare room: `RawMessage`
        // is a transparent non-null pointer, so no buffer of its own per take.
        into.reserve(limit);
        let slots = into.spare_capacity_mut().as_mut_ptr().cast::<*mut rd::rd_kafka_message_t>();
        // SAFETY: `into` has room for `limit` more pointers; librdkafka fills the first `n`.
        let n = unsafe { rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), timeout_ms, slots, limit) };
        let n = usize::try_from(n).unwrap_or(0); // -1 is an error on the queue itself: nothing taken
                                                 // SAFETY: the `n` slots were written with messages, which are never null.
        unsafe { into.set_len(into.len() + n) };
        n
    }
}

impl Drop for FetchQueue {
    fn drop(&mut self) {
        // SAFETY: we own this reference; nothing uses the queue after drop.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) }
    }
}

/// A message as librdkafka hands it out; destroyed on drop. Transparent, so `take_some`
/// can let librdkafka write these directly.
#[repr(transparent)]
pub struct RawMessage {
    message: NonNull<rd::rd_kafka_message_t>,
}

// SAFETY: a message is a self-contained heap object; librdkafka lets any thread read and
// destroy it.
unsafe impl Send for RawMessage {}

impl RawMessage {
    fn raw(&self) -> &rd::rd_kafka_message_t {
        // SAFETY: the pointer is valid until `rd_kafka_message_destroy` in drop.
        unsafe { self.message.as_ref() }
    }

    /// The error librdkafka reports in place of a message, if any.
    pub fn error(&self) -> Option<String> {
        let raw = self.raw();
        if raw.err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return None;
        }
        // SAFETY: librdkafka returns a static, NUL-terminated description.
        let text = unsafe { CStr::from_ptr(rd::rd_kafka_err2str(raw.err)) };
        Some(text.to_string_lossy().into_owned())
    }

    /// Whether this is not a message but the report that the partition's end was reached.
    pub fn is_partition_end(&self) -> bool {
        self.raw().err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__PARTITION_EOF
    }

    pub fn partition(&self) -> i32 {
        self.raw().partition
    }

    /// The topic handle: equal handles mean the same topic.
    pub fn topic_handle(&self) -> *const c_void {
        self.raw().rkt.cast_const().cast()
    }

    pub fn topic(&self) -> &str {
        // SAFETY: a message's topic handle outlives the message; its name is NUL-terminated.
        let name = unsafe { CStr::from_ptr(rd::rd_kafka_topic_name(self.raw().rkt)) };
        name.to_str().unwrap_or("")
    }
}

/// `len` bytes at `data`, or `None` for a null pointer (Kafka's null key or value).
///
/// # Safety
/// `data` must be null or point to `len` readable bytes that outlive the returned slice.
unsafe fn bytes<'a>(data: *const c_void, len: usize) -> Option<&'a [u8]> {
    // SAFETY: per the function's contract.
    (!data.is_null()).then(|| unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) })
}

impl Fetched for RawMessage {
    fn offset(&self) -> i64 {
        self.raw().offset
    }

    fn timestamp(&self) -> Option<i64> {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a valid message and a live out-pointer.
        let millis = unsafe { rd::rd_kafka_message_timestamp(self.message.as_ptr(), &raw mut kind) };
        (kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && millis >= 0).then_some(millis)
    }

    fn key(&self) -> Option<&[u8]> {
        // SAFETY: key and key_len describe the message's key buffer, alive as long as it.
        unsafe { bytes(self.raw().key, self.raw().key_len) }
    }

    fn value(&self) -> Option<&[u8]> {
        // SAFETY: payload and len describe the message's payload, alive as long as it.
        unsafe { bytes(self.raw().payload, self.raw().len) }
    }

    fn for_each_header(&self, f: &mut HeaderSink<'_>) {
        let mut headers: *mut rd::rd_kafka_headers_t = ptr::null_mut();
        // SAFETY: valid message; the headers stay owned by the message.
        let err = unsafe { rd::rd_kafka_message_headers(self.message.as_ptr(), &raw mut headers) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
            return; // no headers
        }
        for index in 0.. {
            let (mut name, mut value, mut size) = (ptr::null(), ptr::null(), 0usize);
            // SAFETY: valid headers and live out-pointers; results borrow from the message.
            let found =
                unsafe { rd::rd_kafka_header_get_all(headers, index, &raw mut name, &raw mut value, &raw mut size) };
            if found != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                break;
            }
            // SAFETY: the name is NUL-terminated and the value, if any, is `size` bytes.
            let (name, value) = unsafe { (CStr::from_ptr(name).to_bytes(), bytes(value, size)) };
            f(name, value);
        }
    }
}

impl Drop for RawMessage {
    fn drop(&mut self) {
        // SAFETY: librdkafka handed us this message; it is destroyed once, here.
        unsafe { rd::rd_kafka_message_destroy(self.message.as_ptr()) }
    }
}

/// rust-rdkafka's own messages (those `BaseConsumer::poll` returns, and the tests').
impl<M: Message> Fetched for M {
    fn offset(&self) -> i64 {
        Message::offset(self)
    }

    fn timestamp(&self) -> Option<i64> {
        Message::timestamp(self).to_millis()
    }

    fn key(&self) -> Option<&[u8]> {
        Message::key(self)
    }

    fn value(&self) -> Option<&[u8]> {
        self.payload()
    }

    fn for_each_header(&self, f: &mut HeaderSink<'_>) {
        if let Some(headers) = self.headers() {
            for header in headers.iter() {
                f(header.key.as_bytes(), header.value);
            }
        }
    }
}
