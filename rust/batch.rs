//! A batch of fetched messages, copied out of librdkafka into two flat buffers so that a
//! batch costs a handful of allocations however many messages it holds. Every plugin reads
//! the same `Arc<Batch>`; nothing is copied per plugin.

use std::ops::Range;
use std::sync::Arc;

use rdkafka::message::{Headers, Message};

/// Where one message's bytes sit in `Batch::bytes`.
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

#[derive(Clone, Debug)]
struct Record {
    topic: u32,
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    key: Option<Span>,
    value: Option<Span>,
    headers: Range<u32>,
}

/// The offsets one batch holds for one partition. Offsets are increasing but may have gaps
/// (compaction, transaction markers), so the batch records the first and last it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionSpan {
    pub topic: Arc<str>,
    pub partition: i32,
    pub first: i64,
    pub last: i64,
}

/// A read-only batch of messages.
#[derive(Debug, Default)]
pub struct Batch {
    topics: Vec<Arc<str>>,
    records: Vec<Record>,
    headers: Vec<Header>,
    bytes: Vec<u8>,
    spans: Vec<PartitionSpan>,
}

/// One message of a batch, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct MessageView<'a> {
    pub topic: &'a str,
    pub topic_index: usize,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    batch: &'a Batch,
    headers: &'a [Header],
}

impl<'a> MessageView<'a> {
    /// The headers as `(name, value)` pairs; names that are not UTF-8 are replaced lossily.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)> + 'a {
        let bytes = &self.batch.bytes;
        self.headers
            .iter()
            .map(move |h| (&bytes[h.name.range()], h.value.map(|v| &bytes[v.range()])))
    }
}

impl Batch {
    #[must_use]
    pub fn len(&self) -> usize {
        self.records.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Payload bytes held (keys, values and headers).
    #[must_use]
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// The distinct topic names, indexed by `MessageView::topic_index`.
    #[must_use]
    pub fn topics(&self) -> &[Arc<str>] {
        &self.topics
    }

    /// Per partition, the first and last offsets in this batch, in order of first appearance.
    #[must_use]
    pub fn spans(&self) -> &[PartitionSpan] {
        &self.spans
    }

    /// The message at `index`.
    ///
    /// # Panics
    /// If `index >= len()`; callers iterate over `0..len()`.
    #[must_use]
    pub fn get(&self, index: usize) -> MessageView<'_> {
        let r = &self.records[index];
        MessageView {
            topic: &self.topics[r.topic as usize],
            topic_index: r.topic as usize,
            partition: r.partition,
            offset: r.offset,
            timestamp: r.timestamp,
            key: r.key.map(|s| &self.bytes[s.range()]),
            value: r.value.map(|s| &self.bytes[s.range()]),
            batch: self,
            headers: &self.headers[r.headers.start as usize..r.headers.end as usize],
        }
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = MessageView<'_>> {
        (0..self.len()).map(|i| self.get(i))
    }
}

/// Fills a `Batch` one message at a time; reused across batches to keep its capacity.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    batch: Batch,
}

impl BatchBuilder {
    #[must_use]
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    #[must_use]
    pub fn byte_len(&self) -> usize {
        self.batch.byte_len()
    }

    fn push_bytes(&mut self, data: &[u8]) -> Span {
        let start = self.batch.bytes.len() as u32;
        self.batch.bytes.extend_from_slice(data);
        Span {
            start,
            len: data.len() as u32,
        }
    }

    fn topic_index(&mut self, topic: &str) -> u32 {
        // Batches hold one or a few topics: a linear scan beats hashing here.
        if let Some(i) = self.batch.topics.iter().position(|t| &**t == topic) {
            return i as u32;
        }
        self.batch.topics.push(Arc::from(topic));
        (self.batch.topics.len() - 1) as u32
    }

    /// Copies one fetched message into the batch.
    pub fn push<M: Message>(&mut self, message: &M) {
        let topic = self.topic_index(message.topic());
        let key = message.key().map(|k| self.push_bytes(k));
        let value = message.payload().map(|v| self.push_bytes(v));
        let header_start = self.batch.headers.len() as u32;
        if let Some(headers) = message.headers() {
            for header in headers.iter() {
                let name = self.push_bytes(header.key.as_bytes());
                let value = header.value.map(|v| self.push_bytes(v));
                self.batch.headers.push(Header { name, value });
            }
        }
        let headers = header_start..self.batch.headers.len() as u32;
        self.push_record(Record {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
            key,
            value,
            headers,
        });
    }

    fn push_record(&mut self, record: Record) {
        let spans = &mut self.batch.spans;
        let topic = &self.batch.topics[record.topic as usize];
        match spans
            .iter_mut()
            .rev()
            .find(|s| s.partition == record.partition && Arc::ptr_eq(&s.topic, topic))
        {
            Some(span) => {
                debug_assert!(
                    record.offset > span.last,
                    "offsets within a partition only grow"
                );
                span.last = record.offset;
            }
            None => spans.push(PartitionSpan {
                topic: topic.clone(),
                partition: record.partition,
                first: record.offset,
                last: record.offset,
            }),
        }
        self.batch.records.push(record);
    }

    /// Hands out the filled batch and starts an empty one with room for as many messages.
    pub fn take(&mut self) -> Arc<Batch> {
        let next = Batch {
            topics: Vec::new(),
            records: Vec::with_capacity(self.batch.records.capacity()),
            headers: Vec::new(),
            bytes: Vec::with_capacity(self.batch.bytes.capacity()),
            spans: Vec::new(),
        };
        Arc::new(std::mem::replace(&mut self.batch, next))
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header as KafkaHeader, OwnedHeaders, OwnedMessage, Timestamp};

    use super::*;

    fn message(topic: &str, partition: i32, offset: i64, value: &[u8]) -> OwnedMessage {
        message_with_headers(topic, partition, offset, value, None)
    }

    fn message_with_headers(
        topic: &str,
        partition: i32,
        offset: i64,
        value: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> OwnedMessage {
        OwnedMessage::new(
            Some(value.to_vec()),
            Some(format!("k{offset}").into_bytes()),
            topic.to_string(),
            Timestamp::CreateTime(1_000 + offset),
            partition,
            offset,
            headers,
        )
    }

    #[test]
    fn round_trips_fields() {
        let mut builder = BatchBuilder::default();
        let headers = OwnedHeaders::new()
            .insert(KafkaHeader {
                key: "h1",
                value: Some("v1"),
            })
            .insert(KafkaHeader::<&[u8]> {
                key: "h2",
                value: None,
            });
        let with_headers = message_with_headers("a", 0, 5, b"five", Some(headers));
        builder.push(&message("a", 0, 4, b"four"));
        builder.push(&with_headers);
        builder.push(&message("b", 3, 9, b""));
        let batch = builder.take();
        assert_eq!(batch.len(), 3);
        assert!(builder.is_empty());

        let first = batch.get(0);
        assert_eq!((first.topic, first.partition, first.offset), ("a", 0, 4));
        assert_eq!(first.value, Some(&b"four"[..]));
        assert_eq!(first.key, Some(&b"k4"[..]));
        assert_eq!(first.timestamp, Some(1_004));
        assert_eq!(first.headers().len(), 0);

        let second = batch.get(1);
        let headers: Vec<_> = second.headers().collect();
        assert_eq!(
            headers,
            vec![(&b"h1"[..], Some(&b"v1"[..])), (&b"h2"[..], None)]
        );

        let third = batch.get(2);
        assert_eq!(
            (third.topic, third.topic_index, third.value),
            ("b", 1, Some(&b""[..]))
        );
        assert_eq!(batch.topics().len(), 2);
    }

    #[test]
    fn spans_track_first_and_last_offset_per_partition_with_gaps() {
        let mut builder = BatchBuilder::default();
        for (p, o) in [(0, 10), (1, 3), (0, 12), (1, 4), (0, 20)] {
            builder.push(&message("t", p, o, b"x"));
        }
        let batch = builder.take();
        let spans: Vec<_> = batch
            .spans()
            .iter()
            .map(|s| (s.partition, s.first, s.last))
            .collect();
        assert_eq!(spans, vec![(0, 10, 20), (1, 3, 4)]);
    }
}
