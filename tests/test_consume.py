"""End to end: every plugin sees every message once, in order, and commits are exact."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest
from confluent_kafka import Producer

import fastconsume as fc
from fastconsume.testing import produce

from kafka import Cluster, committed, fill, new_group

PARTITIONS = 4
PER_PARTITION = 5_000  # 20,000 messages


class Ledger:
    """What one plugin saw: per partition, offsets in arrival order, and values."""

    def __init__(self) -> None:
        self.offsets: dict[int, list[int]] = defaultdict(list)
        self.values: dict[int, list[bytes]] = defaultdict(list)

    def __call__(self, batch: fc.Batch) -> None:
        for message in batch:
            self.offsets[message.partition].append(message.offset)
            assert message.value is not None
            self.values[message.partition].append(message.value)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.offsets.values())


def test_two_plugins_see_every_message_once_in_order_and_all_is_committed(cluster: Cluster) -> None:
    topic = cluster.create_topic(PARTITIONS)
    fill(cluster, topic, PARTITIONS, PER_PARTITION)
    group = new_group()

    app = fc.App(cluster.bootstrap, group, [topic])
    first, second = Ledger(), Ledger()
    app.plugin(name="first", batch_size=700)(first)
    app.plugin(name="second", batch_size=300, linger="5ms")(second)
    app.run(idle_timeout=2.0)

    for ledger in (first, second):
        assert sorted(ledger.offsets) == list(range(PARTITIONS))
        for p in range(PARTITIONS):
            assert ledger.offsets[p] == list(range(PER_PARTITION)), f"partition {p} out of order or repeated"
            assert ledger.values[p][:2] == [f"p{p}-0".encode(), f"p{p}-1".encode()]
    stats = app.stats()
    assert stats["messages"] == PARTITIONS * PER_PARTITION
    assert stats["plugins"]["first"]["messages"] == PARTITIONS * PER_PARTITION

    assert committed(cluster.bootstrap, group, topic, PARTITIONS) == [PER_PARTITION] * PARTITIONS

    again = fc.App(cluster.bootstrap, group, [topic])
    late = Ledger()
    again.plugin(name="late")(late)
    again.run(idle_timeout=2.0)
    assert late.total == 0, "a new consumer in the same group must find nothing uncommitted"


def test_batches_respect_each_plugins_batch_size(mock_cluster: Cluster) -> None:
    topic = mock_cluster.create_topic(1)
    fill(mock_cluster, topic, 1, 1_000)
    app = fc.App(mock_cluster.bootstrap, new_group(), topic)
    sizes: dict[str, list[int]] = defaultdict(list)

    @app.plugin(batch_size=64)
    def small(batch: fc.Batch) -> None:
        sizes[batch.plugin].append(len(batch))

    @app.plugin(batch_size=250)
    def large(batch: fc.Batch) -> None:
        sizes[batch.plugin].append(len(batch))

    app.run(idle_timeout=1.0)
    assert sum(sizes["small"]) == sum(sizes["large"]) == 1_000
    assert max(sizes["small"]) <= 64
    assert max(sizes["large"]) <= 250


def test_batch_exposes_messages_and_values(mock_cluster: Cluster) -> None:
    topic = mock_cluster.create_topic(1)
    produce(mock_cluster.bootstrap, topic, [b"a", b"bb", b"ccc"], keys=[b"1", b"2", b"3"])
    app = fc.App(mock_cluster.bootstrap, new_group(), [topic])
    seen: list[tuple[object, ...]] = []

    @app.plugin
    def inspect(batch: fc.Batch) -> None:
        assert batch.values() == [m.value for m in batch]
        assert batch[-1].offset == batch[len(batch) - 1].offset
        with pytest.raises(IndexError):
            batch[len(batch)]
        for m in batch:
            seen.append((m.key, m.value, m.topic, m.partition, m.offset, m.headers))
            assert m.timestamp is not None
            assert m.timestamp > 1_600_000_000_000

    app.run(idle_timeout=1.0)
    assert seen == [
        (b"1", b"a", topic, 0, 0, ()),
        (b"2", b"bb", topic, 0, 1, ()),
        (b"3", b"ccc", topic, 0, 2, ()),
    ]


def test_async_plugins_are_awaited(mock_cluster: Cluster) -> None:
    topic = mock_cluster.create_topic(2)
    fill(mock_cluster, topic, 2, 500)
    app = fc.App(mock_cluster.bootstrap, new_group(), [topic])
    counted: list[int] = []

    @app.plugin(batch_size=100)
    async def count(batch: fc.Batch) -> None:
        counted.append(len(batch))

    app.run(idle_timeout=1.0)
    assert sum(counted) == 1_000


def test_stop_from_another_thread_ends_the_run(mock_cluster: Cluster) -> None:
    topic = mock_cluster.create_topic(1)
    app = fc.App(mock_cluster.bootstrap, new_group(), [topic])
    app.plugin(lambda batch: None, name="noop")
    timer = threading.Timer(1.0, app.stop)
    timer.start()
    started = time.monotonic()
    app.run()
    assert time.monotonic() - started < 15
    timer.join()


def test_stop_from_a_plugin_commits_what_completed(mock_cluster: Cluster) -> None:
    topic = mock_cluster.create_topic(1)
    fill(mock_cluster, topic, 1, 2_000)
    group = new_group()
    app = fc.App(mock_cluster.bootstrap, group, [topic])
    seen: list[int] = []

    @app.plugin(batch_size=100)
    def stopper(batch: fc.Batch) -> None:
        seen.extend(m.offset for m in batch)
        if len(seen) >= 500:
            app.stop()

    app.run()
    assert seen[:500] == list(range(500))
    done = committed(mock_cluster.bootstrap, group, topic, 1)[0]
    assert 500 <= done <= len(seen), "commits cover completed batches, and only those"


def test_headers_keys_and_null_values_arrive_intact(cluster: Cluster) -> None:
    topic = cluster.create_topic(1)
    producer = Producer({"bootstrap.servers": cluster.bootstrap})
    producer.produce(topic, value=b"v0", key=b"k0", headers=[("trace", b"abc"), ("empty", None), ("trace", b"2")])
    producer.produce(topic, value=None, key=None)
    producer.produce(topic, value=b"", headers=[("ü-name", b"\x00\xff")])
    assert producer.flush(30) == 0
    app = fc.App(cluster.bootstrap, new_group(), [topic])
    seen: list[tuple[object, ...]] = []

    @app.plugin
    def record(batch: fc.Batch) -> None:
        assert batch.topic == topic
        assert batch.partition == 0
        seen.extend((m.key, m.value, m.headers) for m in batch)

    app.run(idle_timeout=1.5)
    assert seen == [
        (b"k0", b"v0", (("trace", b"abc"), ("empty", None), ("trace", b"2"))),
        (None, None, ()),
        (None, b"", (("ü-name", b"\x00\xff"),)),
    ]
