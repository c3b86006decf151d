//! The read-only inspection behind `fastconsume check`: the brokers, each topic's partitions
//! with their watermarks, the group's committed offsets and lag, and the group's state,
//! members and assignment.
//!
//! The consumer it uses never subscribes, so it does not join the group or disturb a running
//! one; every broker call is bounded by the connect timeout. Only a failure that leaves
//! nothing to report is an `Err`: an unknown topic, a partition whose watermarks cannot be
//! read, or a group the cluster cannot describe is reported in place instead.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::groups::GroupInfo;
use rdkafka::metadata::Metadata;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;

use crate::core::errors::{Error, Result};
use crate::kafka::config::SourceConfig;
use crate::kafka::connect::connect;
use crate::kafka::errors::{to_error, ErrorWatch};

/// One partition of a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionReport {
    pub partition: i32,
    /// The log start offset, or -1 if the watermarks could not be read (the topic's `error`
    /// says why).
    pub low: i64,
    /// The high watermark (the offset the next message gets), or -1 as for `low`.
    pub high: i64,
    /// The group's committed offset, if it has one.
    pub committed: Option<i64>,
    /// `high - committed`, or `high - low` when nothing is committed; `None` when the
    /// watermarks are unknown.
    pub lag: Option<i64>,
    /// The member (`client.id@host`) the group assigned the partition to, if the group is
    /// active and could be described.
    pub owner: Option<String>,
}

/// One of the configured topics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicReport {
    pub topic: String,
    pub partitions: Vec<PartitionReport>,
    /// What went wrong with the topic (unknown topic, unreadable metadata, a partition's
    /// watermarks or committed offset), if anything. Partitions are listed when known.
    pub error: Option<String>,
    /// Whether the cluster does not have the topic at all.
    pub unknown: bool,
}

/// A member of the group, as the group coordinator describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMember {
    pub member_id: String,
    pub client_id: String,
    pub host: String,
    /// The partitions the group assigned the member, per topic; empty while the group
    /// rebalances or if the assignment could not be decoded.
    pub assignment: Vec<(String, Vec<i32>)>,
}

/// What `fastconsume check` prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// `host:port` of every broker in the cluster's metadata, by broker id.
    pub brokers: Vec<String>,
    pub group: String,
    /// The group's state (`Stable`, `Empty`, ...); `None` if the cluster does not know the
    /// group or could not describe it.
    pub group_state: Option<String>,
    /// Why the group could not be described, if it could not.
    pub group_error: Option<String>,
    pub members: Vec<GroupMember>,
    pub topics: Vec<TopicReport>,
}

/// Keeps librdkafka's errors, to explain a failed connect (the same way a run does).
#[derive(Default)]
struct InspectContext {
    errors: ErrorWatch,
}

impl ClientContext for InspectContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.record(&error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::kafka::errors::log_librdkafka(&self.errors, level, fac, log_message);
    }
}

impl ConsumerContext for InspectContext {}

type InspectConsumer = BaseConsumer<InspectContext>;

/// Connects, bounded by `config.connect_timeout` per broker call, and reports on the
/// configured topics and the group, without joining it.
pub fn inspect(config: &SourceConfig) -> Result<Report> {
    config.validate()?;
    let consumer: InspectConsumer = config
        .client_config()
        .create_with_context(InspectContext::default())
        .map_err(|e| to_error("create consumer", e))?;
    let timeout = config.connect_timeout;

    // The first call doubles as the connect check, as in `Source::start` (and classifies a
    // failure the same way).
    let first = connect(&consumer, &consumer.context().errors, config, &|| false)?
        .ok_or_else(|| Error::Internal("connect stopped without being asked to".into()))?;
    let brokers = broker_list(&first);

    let mut topics = Vec::with_capacity(config.topics.len());
    topics.push(topic_report(&consumer, &config.topics[0], &first, timeout));
    for topic in &config.topics[1..] {
        let report = match consumer.fetch_metadata(Some(topic), timeout) {
            Ok(metadata) => topic_report(&consumer, topic, &metadata, timeout),
            Err(e) => {
                let error = Some(format!("metadata: {e}"));
                TopicReport { topic: topic.clone(), partitions: Vec::new(), error, unknown: false }
            }
        };
        topics.push(report);
    }

    add_committed(&consumer, &mut topics, timeout)?;
    let (group_state, members, group_error) = describe_group(&consumer, &config.group, timeout);
    add_owners(&mut topics, &members);
    Ok(Report { brokers, group: config.group.clone(), group_state, group_error, members, topics })
}

fn broker_list(metadata: &Metadata) -> Vec<String> {
    let mut brokers: Vec<_> =
        metadata.brokers().iter().map(|b| (b.id(), format!("{}:{}", b.host(), b.port()))).collect();
    brokers.sort_unstable();
    brokers.into_iter().map(|(_, address)| address).collect()
}

/// A topic's partitions and watermarks, from metadata fetched for it.
fn topic_report(consumer: &InspectConsumer, topic: &str, metadata: &Metadata, timeout: Duration) -> TopicReport {
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return TopicReport {
            topic: topic.to_string(),
            partitions: Vec::new(),
            error: Some("not in the cluster's metadata".into()),
            unknown: true,
        };
    };
    if let Some(code) = found.error() {
        let code = RDKafkaErrorCode::from(code);
        return TopicReport {
            topic: topic.to_string(),
            partitions: Vec::new(),
            error: Some(code.to_string()),
            unknown: code == RDKafkaErrorCode::UnknownTopicOrPartition,
        };
    }
    let mut ids: Vec<i32> = found.partitions().iter().map(rdkafka::metadata::MetadataPartition::id).collect();
    ids.sort_unstable();
    let mut errors = Vec::new();
    let partitions = ids
        .into_iter()
        .map(|partition| {
            let (low, high) = consumer.fetch_watermarks(topic, partition, timeout).unwrap_or_else(|e| {
                errors.push(format!("partition {partition}: watermarks: {e}"));
                (-1, -1)
            });
            let lag = (low >= 0 && high >= 0).then_some(high - low);
            PartitionReport { partition, low, high, committed: None, lag, owner: None }
        })
        .collect();
    let error = if found.partitions().is_empty() {
        Some("the topic has no partitions".to_string())
    } else {
        (!errors.is_empty()).then(|| errors.join("; "))
    };
    TopicReport { topic: topic.to_string(), partitions, error, unknown: false }
}

/// Fills in the group's committed offsets, and the lag from them. Failing to read them at
/// all (no coordinator within the timeout, not authorized) fails the report: `check` must
/// not show lag that ignores the commits.
fn add_committed(consumer: &InspectConsumer, topics: &mut [TopicReport], timeout: Duration) -> Result<()> {
    let mut tpl = TopicPartitionList::new();
    for topic in topics.iter() {
        for p in &topic.partitions {
            tpl.add_partition(&topic.topic, p.partition);
        }
    }
    if tpl.count() == 0 {
        return Ok(());
    }
    let committed = consumer.committed_offsets(tpl, timeout).map_err(|e| to_error("fetch committed offsets", e))?;
    for topic in topics.iter_mut() {
        let mut errors = Vec::new();
        for elem in committed.elements_for_topic(&topic.topic) {
            let Some(p) = topic.partitions.iter_mut().find(|p| p.partition == elem.partition()) else { continue };
            if let Err(e) = elem.error() {
                errors.push(format!("partition {}: committed offset: {e}", p.partition));
                continue;
            }
            if let Offset::Offset(offset) = elem.offset() {
                if offset >= 0 {
                    p.committed = Some(offset);
                    p.lag = (p.high >= 0).then_some(p.high - offset);
                }
            }
        }
        if !errors.is_empty() {
            let joined = errors.join("; ");
            topic.error = Some(match topic.error.take() {
                Some(earlier) => format!("{earlier}; {joined}"),
                None => joined,
            });
        }
    }
    Ok(())
}

/// The group's state and members, and why they are unknown if they are. A cluster that
/// cannot describe groups (librdkafka's mock cannot; an ACL may forbid it) leaves the rest of
/// the report intact: the state is `None` and the error is reported in place.
fn describe_group(
    consumer: &InspectConsumer,
    group: &str,
    timeout: Duration,
) -> (Option<String>, Vec<GroupMember>, Option<String>) {
    let list = match consumer.fetch_group_list(Some(group), timeout) {
        Ok(list) => list,
        Err(e) => return (None, Vec::new(), Some(format!("cannot describe the group: {e}"))),
    };
    // Absent when the cluster has never heard of the group (no member, no commit).
    let Some(info) = list.groups().iter().find(|g| g.name() == group) else { return (None, Vec::new(), None) };
    (Some(info.state().to_string()), members(info), None)
}

fn members(info: &GroupInfo) -> Vec<GroupMember> {
    // Only the consumer protocol's assignment has the layout decoded here (Connect's differs).
    let decodable = info.protocol_type() == "consumer";
    info.members()
        .iter()
        .map(|m| {
            let assignment = match m.assignment() {
                Some(bytes) if decodable => decode_assignment(bytes).unwrap_or_else(|| {
                    log::warn!("member {:?}: cannot decode its assignment ({} bytes)", m.id(), bytes.len());
                    Vec::new()
                }),
                _ => Vec::new(),
            };
            GroupMember {
                member_id: m.id().to_string(),
                client_id: m.client_id().to_string(),
                host: m.client_host().to_string(),
                assignment,
            }
        })
        .collect()
}

fn add_owners(topics: &mut [TopicReport], members: &[GroupMember]) {
    let mut owners: HashMap<(&str, i32), String> = HashMap::new();
    for member in members {
        let owner = format!("{}@{}", member.client_id, member.host);
        for (topic, partitions) in &member.assignment {
            for &partition in partitions {
                owners.insert((topic.as_str(), partition), owner.clone());
            }
        }
    }
    for topic in topics {
        for p in &mut topic.partitions {
            p.owner = owners.get(&(topic.topic.as_str(), p.partition)).cloned();
        }
    }
}

/// Reads big-endian Kafka protocol primitives; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn i16(&mut self) -> Option<i16> {
        self.take(2).and_then(|b| b.try_into().ok()).map(i16::from_be_bytes)
    }

    fn i32(&mut self) -> Option<i32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(i32::from_be_bytes)
    }

    fn string(&mut self) -> Option<String> {
        let len = usize::try_from(self.i16()?).ok()?; // a null string (-1) is malformed here
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    /// An array's length; a null array (-1) is empty.
    fn array_len(&mut self) -> Option<usize> {
        match self.i32()? {
            -1 => Some(0),
            n => usize::try_from(n).ok(),
        }
    }
}

/// Decodes a member's assignment in the Kafka consumer protocol: an int16 version, then an
/// array (int32 count) of [topic (int16 length + UTF-8), array of int32 partitions], then user
/// data, ignored, as is anything a newer version appends. `None` if the bytes are malformed.
pub fn decode_assignment(bytes: &[u8]) -> Option<Vec<(String, Vec<i32>)>> {
    let mut reader = Reader { bytes };
    if reader.i16()? < 0 {
        return None;
    }
    let topics = reader.array_len()?;
    // Every element takes at least 6 bytes, so a huge count cannot allocate much.
    let mut assignment = Vec::with_capacity(topics.min(reader.bytes.len() / 6));
    for _ in 0..topics {
        let topic = reader.string()?;
        let count = reader.array_len()?;
        let mut partitions = Vec::with_capacity(count.min(reader.bytes.len() / 4));
        for _ in 0..count {
            partitions.push(reader.i32()?);
        }
        assignment.push((topic, partitions));
    }
    Some(assignment)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rdkafka::consumer::CommitMode;
    use std::time::Instant;

    use super::*;
    use crate::kafka::mock::{seeded, unreachable};

    /// A mock cluster with topic `t`: partition `p` holds `per_partition[p]` messages.
    /// Commits `offset` for partition `partition` of `t` as a member of the config's group.
    fn commit(config: &SourceConfig, partition: i32, offset: i64) {
        let consumer: BaseConsumer = config.client_config().create().expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", partition, Offset::Offset(offset)).expect("offset");
        consumer.assign(&tpl).expect("assign");
        consumer.commit(&tpl, CommitMode::Sync).expect("commit");
    }

    /// `(partition, low, high, committed, lag)`.
    type Offsets = (i32, i64, i64, Option<i64>, Option<i64>);

    fn offsets(topic: &TopicReport) -> Vec<Offsets> {
        topic.partitions.iter().map(|p| (p.partition, p.low, p.high, p.committed, p.lag)).collect()
    }

    #[test]
    fn reports_watermarks_and_lag_of_a_group_that_never_committed() {
        let (cluster, config) = seeded(&[10, 5]);
        let report = inspect(&config).expect("inspect");
        assert_eq!(report.brokers.len(), 1, "{:?}", report.brokers);
        assert!(cluster.bootstrap().contains(&report.brokers[0]), "{:?} vs {}", report.brokers, cluster.bootstrap());
        assert_eq!(report.group, "g");
        assert_eq!(report.topics.len(), 1);
        let topic = &report.topics[0];
        assert_eq!((topic.topic.as_str(), &topic.error), ("t", &None));
        assert_eq!(offsets(topic), vec![(0, 0, 10, None, Some(10)), (1, 0, 5, None, Some(5))]);
        assert!(topic.partitions.iter().all(|p| p.owner.is_none()));
    }

    #[test]
    fn lag_counts_from_the_committed_offset() {
        let (_cluster, config) = seeded(&[10, 5]);
        commit(&config, 0, 4);
        let report = inspect(&config).expect("inspect");
        assert_eq!(offsets(&report.topics[0]), vec![(0, 0, 10, Some(4), Some(6)), (1, 0, 5, None, Some(5))]);
    }

    #[test]
    fn a_cluster_that_cannot_describe_groups_still_gets_a_report() {
        // librdkafka's mock has no ListGroups/DescribeGroups; the group exists (it committed).
        let (_cluster, config) = seeded(&[3]);
        commit(&config, 0, 1);
        let consumer: BaseConsumer = config.client_config().create().expect("consumer");
        assert!(
            consumer.fetch_group_list(Some("g"), config.connect_timeout).is_err(),
            "the mock describes groups now: test the description here instead"
        );
        let report = inspect(&config).expect("inspect");
        assert_eq!((report.group_state, report.members), (None, vec![]));
        assert_eq!(offsets(&report.topics[0]), vec![(0, 0, 3, Some(1), Some(2))]);
        assert_eq!(report.topics[0].partitions[0].owner, None);
    }

    #[test]
    fn an_unknown_topic_is_reported_in_place() {
        let (_cluster, mut config) = seeded(&[2]);
        config.topics = vec!["missing".into(), "t".into()];
        let report = inspect(&config).expect("inspect");
        let missing = &report.topics[0];
        assert_eq!(missing.topic, "missing");
        assert!(missing.partitions.is_empty());
        assert!(missing.error.as_deref().is_some_and(|e| e.contains("Unknown topic")), "{:?}", missing.error);
        assert_eq!(report.topics[1].error, None);
        assert_eq!(offsets(&report.topics[1]), vec![(0, 0, 2, None, Some(2))]);
    }

    #[test]
    fn unreachable_brokers_fail_within_the_connect_timeout() {
        let config = unreachable();
        let started = Instant::now();
        let outcome = inspect(&config);
        let elapsed = started.elapsed();
        match outcome {
            Err(Error::Connect { bootstrap, waited_ms, last_error, failure }) => {
                assert_eq!(failure, crate::core::errors::ConnectFailure::Unreachable);
                assert_eq!(bootstrap, "127.0.0.1:1");
                assert!((400..5000).contains(&waited_ms), "waited {waited_ms} ms");
                assert!(last_error.is_some());
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
        assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    }

    #[test]
    fn an_invalid_config_is_refused_before_connecting() {
        let config = SourceConfig {
            bootstrap: "127.0.0.1:1".into(),
            group: "g".into(),
            topics: vec![],
            kafka: vec![],
            connect_timeout: Duration::from_millis(500),
            wait_for_topics: false,
        };
        assert!(matches!(inspect(&config), Err(Error::Config(_))));
    }

    /// The consumer protocol's assignment, version 1, as the Java client writes it, plus a
    /// field a newer version might append.
    fn assignment_bytes() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(1i16.to_be_bytes()); // version
        b.extend(2i32.to_be_bytes()); // topics
        b.extend(1i16.to_be_bytes());
        b.extend(b"a");
        b.extend(2i32.to_be_bytes());
        b.extend(0i32.to_be_bytes());
        b.extend(7i32.to_be_bytes());
        b.extend(5i16.to_be_bytes());
        b.extend(b"topic");
        b.extend(0i32.to_be_bytes()); // no partitions
        b.extend(3i32.to_be_bytes()); // user data
        b.extend(b"xyz");
        b.extend(9i32.to_be_bytes()); // appended by a newer version
        b
    }

    #[test]
    fn decodes_an_assignment() {
        let expected = vec![("a".to_string(), vec![0, 7]), ("topic".to_string(), vec![])];
        assert_eq!(decode_assignment(&assignment_bytes()), Some(expected));
        // Null user data, and an assignment with no topics.
        let mut empty = 0i16.to_be_bytes().to_vec();
        empty.extend(0i32.to_be_bytes());
        empty.extend((-1i32).to_be_bytes());
        assert_eq!(decode_assignment(&empty), Some(vec![]));
        assert_eq!(decode_assignment(&empty[..6]), Some(vec![]), "user data is ignored, even if missing");
    }

    #[test]
    fn a_malformed_assignment_decodes_to_none() {
        let bytes = assignment_bytes();
        // Every truncation inside the topics array.
        let topics_end = bytes.len() - 4 - 3 - 4;
        for len in 0..topics_end {
            assert_eq!(decode_assignment(&bytes[..len]), None, "truncated to {len} bytes");
        }
        let with = |at: usize, value: &[u8]| {
            let mut b = bytes.clone();
            b[at..at + value.len()].copy_from_slice(value);
            b
        };
        assert_eq!(decode_assignment(&with(0, &(-1i16).to_be_bytes())), None, "negative version");
        assert_eq!(decode_assignment(&with(2, &(-2i32).to_be_bytes())), None, "negative topic count");
        assert_eq!(decode_assignment(&with(2, &i32::MAX.to_be_bytes())), None, "count beyond the bytes");
        assert_eq!(decode_assignment(&with(6, &(-1i16).to_be_bytes())), None, "null topic name");
        assert_eq!(decode_assignment(&with(8, &[0xff])), None, "topic name not UTF-8");
        assert_eq!(decode_assignment(&with(9, &i32::MAX.to_be_bytes())), None, "partition count beyond the bytes");
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_assignment(&bytes);
        }
    }

    #[test]
    fn owners_come_from_the_decoded_assignments() {
        let partition =
            |partition| PartitionReport { partition, low: 0, high: 1, committed: None, lag: Some(1), owner: None };
        let mut topics = vec![TopicReport {
            topic: "t".into(),
            partitions: vec![partition(0), partition(1)],
            error: None,
            unknown: false,
        }];
        let members = vec![GroupMember {
            member_id: "m-1".into(),
            client_id: "app".into(),
            host: "/10.0.0.1".into(),
            assignment: vec![("t".into(), vec![1]), ("other".into(), vec![0])],
        }];
        add_owners(&mut topics, &members);
        let owners: Vec<_> = topics[0].partitions.iter().map(|p| p.owner.clone()).collect();
        assert_eq!(owners, vec![None, Some("app@/10.0.0.1".to_string())]);
    }
}
