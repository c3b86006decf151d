//! A batch of fetched messages of one partition, copied out of the client into a few flat
//! buffers so that a batch costs a handful of allocations however many messages it holds:
//! keys and values each in a column of Arrow's layout (`column`), so that they can be
//! exported without copying, and header bytes apart. Every lane reads the same
//! `Arc<Batch>`; nothing is copied per plugin.

mod column;

use std::any::Any;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

pub use column::BinaryColumn;

/// Where one header name's or value's bytes sit in `Batch::header_bytes`.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn range(self) -> Range<usize> {
        self.start as usize..(self.start + self.len) as usize
    }
}

#[derive(Clone, Copy, Debug)]
struct Header {
    name: Span,
    value: Option<Span>,
}

/// A message's fields other than its key and value (those are entry `i` of the columns).
#[derive(Clone, Debug)]
struct Record {
    offset: i64,
    timestamp: Option<i64>,
    headers: Range<u32>,
}

/// A topic and partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    pub topic: Arc<str>,
    pub partition: i32,
}

/// A read-only batch of messages of one partition, in offset order. Offsets increase but may
/// have gaps (compaction, transaction markers).
#[derive(Debug)]
pub struct Batch {
    partition: Partition,
    records: Vec<Record>,
    keys: BinaryColumn,
    values: BinaryColumn,
    headers: Vec<Header>,
    header_bytes: Vec<u8>,
    /// Objects the host (the Python layer) builds once for this batch and shares between
    /// its plugins; the core never looks inside.
    host: OnceLock<Box<dyn Any + Send + Sync>>,
}

/// One message of a batch, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct MessageView<'a> {
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    header_bytes: &'a [u8],
    headers: &'a [Header],
}

impl<'a> MessageView<'a> {
    /// The headers as `(name, value)` pairs, in the order the producer wrote them.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)> + 'a {
        let bytes = self.header_bytes;
        self.headers.iter().map(move |h| (&bytes[h.name.range()], h.value.map(|v| &bytes[v.range()])))
    }
}

impl Batch {
    pub fn partition(&self) -> &Partition {
        &self.partition
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Payload bytes held (keys, values and headers).
    pub fn byte_len(&self) -> usize {
        self.keys.byte_len() + self.values.byte_len() + self.header_bytes.len()
    }

    /// The keys, entry `i` being message `i`'s.
    pub fn keys(&self) -> &BinaryColumn {
        &self.keys
    }

    /// The values, entry `i` being message `i`'s.
    pub fn values(&self) -> &BinaryColumn {
        &self.values
    }

    /// Names `count` messages of the batch, from position `first` to `last`, for logs and
    /// errors: "3 message(s) of t[0] offsets 10..=14".
    pub fn describe(&self, count: usize, first: Option<usize>, last: Option<usize>) -> String {
        let partition = &self.partition;
        let (Some(first), Some(last)) = (first, last) else {
            return format!("no messages of {}[{}]", partition.topic, partition.partition);
        };
        let (first, last) = (self.get(first).offset, self.get(last).offset);
        format!("{count} message(s) of {}[{}] offsets {first}..={last}", partition.topic, partition.partition)
    }

    pub fn first_offset(&self) -> i64 {
        self.records.first().map_or(-1, |r| r.offset)
    }

    pub fn last_offset(&self) -> i64 {
        self.records.last().map_or(-1, |r| r.offset)
    }

    /// The message at `index`.
    ///
    /// # Panics
    /// If `index >= len()`; callers iterate over `0..len()`.
    pub fn get(&self, index: usize) -> MessageView<'_> {
        let r = &self.records[index];
        MessageView {
            offset: r.offset,
            timestamp: r.timestamp,
            key: self.keys.get(index),
            value: self.values.get(index),
            header_bytes: &self.header_bytes,
            headers: &self.headers[r.headers.start as usize..r.headers.end as usize],
        }
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = MessageView<'_>> {
        (0..self.len()).map(|i| self.get(i))
    }

    /// The host's objects for this batch, made by `init` on first use.
    pub fn host<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Option<&T> {
        self.host.get_or_init(|| Box::new(init())).downcast_ref()
    }
}

/// Receives a header's name and value.
pub type HeaderSink<'a> = dyn FnMut(&[u8], Option<&[u8]>) + 'a;

/// A fetched message as the builder reads it (the Kafka side implements it for its
/// messages).
pub trait Fetched {
    fn offset(&self) -> i64;
    /// Milliseconds since the epoch, if the broker gave one.
    fn timestamp(&self) -> Option<i64>;
    fn key(&self) -> Option<&[u8]>;
    fn value(&self) -> Option<&[u8]>;
    /// Calls `f` with each header's name and value, in order.
    fn for_each_header(&self, f: &mut HeaderSink<'_>);
}

/// Fills batches of one partition; reused across batches to keep its capacity.
#[derive(Debug)]
pub struct BatchBuilder {
    partition: Partition,
    records: Vec<Record>,
    keys: BinaryColumn,
    values: BinaryColumn,
    headers: Vec<Header>,
    header_bytes: Vec<u8>,
}

impl BatchBuilder {
    pub fn new(partition: Partition) -> Self {
        BatchBuilder {
            partition,
            records: Vec::new(),
            keys: BinaryColumn::default(),
            values: BinaryColumn::default(),
            headers: Vec::new(),
            header_bytes: Vec::new(),
        }
    }

    pub fn partition(&self) -> &Partition {
        &self.partition
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn push_header_bytes(&mut self, data: &[u8]) -> Span {
        let start = self.header_bytes.len() as u32;
        self.header_bytes.extend_from_slice(data);
        Span { start, len: data.len() as u32 }
    }

    /// Copies one fetched message of this builder's partition into the batch.
    pub fn push(&mut self, message: &impl Fetched) {
        debug_assert!(self.records.last().is_none_or(|r| r.offset < message.offset()), "offsets only grow");
        self.keys.push(message.key());
        self.values.push(message.value());
        let header_start = self.headers.len() as u32;
        message.for_each_header(&mut |name, value| {
            let name = self.push_header_bytes(name);
            let value = value.map(|v| self.push_header_bytes(v));
            self.headers.push(Header { name, value });
        });
        self.records.push(Record {
            offset: message.offset(),
            timestamp: message.timestamp(),
            headers: header_start..self.headers.len() as u32,
        });
    }

    /// Hands out the filled batch and starts an empty one with as much room.
    pub fn take(&mut self) -> Arc<Batch> {
        let record_room = self.records.capacity();
        let records = std::mem::replace(&mut self.records, Vec::with_capacity(record_room));
        Arc::new(Batch {
            partition: self.partition.clone(),
            records,
            keys: self.keys.take(),
            values: self.values.take(),
            // Headers are rare: no room kept for them.
            headers: std::mem::take(&mut self.headers),
            header_bytes: std::mem::take(&mut self.header_bytes),
            host: OnceLock::new(),
        })
    }

    /// Drops what was gathered (the partition was revoked before the batch was sealed).
    pub fn clear(&mut self) {
        self.records.clear();
        self.keys.clear();
        self.values.clear();
        self.headers.clear();
        self.header_bytes.clear();
    }
}

/// Messages made up for tests, without a client.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use super::{Batch, BatchBuilder, Fetched, HeaderSink, Partition};

    pub(crate) struct Message {
        pub offset: i64,
        pub timestamp: Option<i64>,
        pub key: Option<Vec<u8>>,
        pub value: Option<Vec<u8>>,
        pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    }

    impl Message {
        /// A 10-byte message at `offset`.
        pub(crate) fn at(offset: i64) -> Self {
            Message { offset, timestamp: None, key: None, value: Some(vec![0; 10]), headers: Vec::new() }
        }
    }

    impl Fetched for Message {
        fn offset(&self) -> i64 {
            self.offset
        }

        fn timestamp(&self) -> Option<i64> {
            self.timestamp
        }

        fn key(&self) -> Option<&[u8]> {
            self.key.as_deref()
        }

        fn value(&self) -> Option<&[u8]> {
            self.value.as_deref()
        }

        fn for_each_header(&self, f: &mut HeaderSink<'_>) {
            for (name, value) in &self.headers {
                f(name, value.as_deref());
            }
        }
    }

    /// A batch of `count` messages of topic "t", `partition`, from offset `first`.
    pub(crate) fn batch(partition: i32, first: i64, count: i64) -> Arc<Batch> {
        let mut builder = BatchBuilder::new(Partition { topic: Arc::from("t"), partition });
        for offset in first..first + count {
            builder.push(&Message::at(offset));
        }
        builder.take()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Message;
    use super::*;

    fn message(offset: i64, value: &[u8], headers: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Message {
        Message {
            offset,
            timestamp: Some(1_000 + offset),
            key: Some(format!("k{offset}").into_bytes()),
            value: Some(value.to_vec()),
            headers,
        }
    }

    fn builder() -> BatchBuilder {
        BatchBuilder::new(Partition { topic: Arc::from("t"), partition: 3 })
    }

    #[test]
    fn round_trips_fields() {
        let mut builder = builder();
        let headers = vec![(b"h1".to_vec(), Some(b"v1".to_vec())), (b"h2".to_vec(), None)];
        builder.push(&message(4, b"four", Vec::new()));
        builder.push(&message(5, b"five", headers));
        builder.push(&message(9, b"", Vec::new())); // a gap: 6..=8 compacted away
        let batch = builder.take();
        assert_eq!(batch.len(), 3);
        assert!(builder.is_empty());
        assert_eq!((batch.first_offset(), batch.last_offset()), (4, 9));
        assert_eq!(batch.partition().partition, 3);

        let first = batch.get(0);
        assert_eq!(first.offset, 4);
        assert_eq!(first.value, Some(&b"four"[..]));
        assert_eq!(first.key, Some(&b"k4"[..]));
        assert_eq!(first.timestamp, Some(1_004));
        assert_eq!(first.headers().len(), 0);

        let headers: Vec<_> = batch.get(1).headers().collect();
        assert_eq!(headers, vec![(&b"h1"[..], Some(&b"v1"[..])), (&b"h2"[..], None)]);
        assert_eq!(batch.get(2).value, Some(&b""[..]));
    }

    #[test]
    fn keys_and_values_are_columns_and_headers_lie_apart() {
        let mut builder = builder();
        builder.push(&message(0, b"zero", vec![(b"h".to_vec(), Some(b"hv".to_vec()))]));
        builder.push(&Message { key: None, value: None, ..message(1, b"", Vec::new()) });
        builder.push(&message(2, b"", Vec::new()));
        let batch = builder.take();
        assert_eq!(batch.values().offsets(), &[0, 4, 4, 4]);
        assert_eq!(batch.values().data(), b"zero");
        assert_eq!(
            (batch.values().null_count(), batch.values().get(1), batch.values().get(2)),
            (1, None, Some(&b""[..]))
        );
        assert_eq!(batch.keys().data(), b"k0k2");
        assert_eq!(batch.keys().validity(), &[0b101]);
        assert_eq!(batch.byte_len(), 4 + 4 + 3, "values, keys and header bytes");
        assert_eq!(batch.get(0).headers().collect::<Vec<_>>(), vec![(&b"h"[..], Some(&b"hv"[..]))]);
    }

    #[test]
    fn a_taken_builder_starts_empty_and_clear_drops_messages() {
        let mut builder = builder();
        builder.push(&message(1, b"a", Vec::new()));
        let first = builder.take();
        builder.push(&message(2, b"b", Vec::new()));
        builder.clear();
        assert!(builder.is_empty());
        builder.push(&message(3, b"c", Vec::new()));
        let second = builder.take();
        assert_eq!((first.len(), second.len(), second.first_offset()), (1, 1, 3));
    }

    #[test]
    fn host_objects_are_made_once() {
        let batch = builder().take();
        let mut made = 0;
        assert_eq!(
            batch.host(|| {
                made += 1;
                7u32
            }),
            Some(&7)
        );
        assert_eq!(batch.host(|| 8u32), Some(&7));
        assert_eq!(made, 1);
    }
}
