"""Test clusters: the real broker (started by ``scripts/kafka_broker.py`` or named by
``FASTCONSUME_TEST_BOOTSTRAP``) and librdkafka's mock cluster, behind one small interface."""

from __future__ import annotations

import importlib.util
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from fastconsume.testing import MockCluster, produce

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def real_broker(workdir: Path) -> Iterator[str]:
    """A real Apache Kafka broker's bootstrap: ``FASTCONSUME_TEST_BOOTSTRAP`` if set, else a
    single-node broker started in ``workdir`` by ``scripts/kafka_broker.py`` and stopped after."""
    existing = os.environ.get("FASTCONSUME_TEST_BOOTSTRAP")
    if existing:
        yield existing
        return
    spec = importlib.util.spec_from_file_location("kafka_broker", ROOT / "scripts" / "kafka_broker.py")
    assert spec is not None
    assert spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    broker = script.start(workdir)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


class Cluster(Protocol):
    name: str
    bootstrap: str

    def create_topic(self, partitions: int) -> str: ...


class RealCluster:
    name = "kafka"

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._admin = AdminClient({"bootstrap.servers": bootstrap})

    def create_topic(self, partitions: int) -> str:
        topic = f"t-{uuid.uuid4().hex[:12]}"
        futures = self._admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        futures[topic].result(timeout=30)
        return topic


class MockKafka:
    name = "mock"

    def __init__(self) -> None:
        self._cluster = MockCluster()
        self.bootstrap = self._cluster.bootstrap

    def create_topic(self, partitions: int) -> str:
        topic = f"t-{uuid.uuid4().hex[:12]}"
        self._cluster.create_topic(topic, partitions)
        return topic


def fill(cluster: Cluster, topic: str, partitions: int, per_partition: int) -> None:
    """Writes ``per_partition`` values to each partition; values name their partition and index."""
    for p in range(partitions):
        values = [f"p{p}-{i}".encode() for i in range(per_partition)]
        produce(cluster.bootstrap, topic, values, partition=p)


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    """The group's committed offset per partition (-1001 where none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=30)
        return [tp.offset for tp in tps]
    finally:
        consumer.close()


def new_group() -> str:
    return f"g-{uuid.uuid4().hex[:12]}"


def read_topic(bootstrap: str, topic: str, partitions: int = 1, timeout: float = 30.0) -> list[Message]:
    """Every message of ``topic`` from the beginning up to its end now (what a producer has had
    acknowledged), read without a group commit; in offset order within each partition."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": new_group(),
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        messages: list[Message] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(at_end) < partitions:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"reading {topic}: partitions {sorted(at_end)} of {partitions} at end after {timeout} s"
                )
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is None:
                messages.append(message)
            elif error.code() == KafkaError._PARTITION_EOF:
                at_end.add(message.partition() or 0)
            else:
                raise AssertionError(f"reading {topic}: {error}")
        return messages
    finally:
        consumer.close()


def broker_script() -> ModuleType:
    """``scripts/kafka_broker.py``, loaded by path (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("kafka_broker", ROOT / "scripts" / "kafka_broker.py")
    assert spec is not None
    assert spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@contextmanager
def kafka_cluster(workdir: Path, nodes: int = 3) -> Iterator[Any]:
    """A real N-node Kafka cluster (``kafka_broker.start_cluster``: every node broker and
    controller, RF 3, ``min.insync.replicas=2``) started in ``workdir`` and stopped after.
    Yields the script's ``Cluster``: ``bootstrap``, ``nodes``, ``kill(id)``, ``restart(id)``,
    ``stop_all()``, ``start_all()``. Always a new cluster: ``FASTCONSUME_TEST_BOOTSTRAP``
    names a single broker, which cannot take these faults."""
    cluster = broker_script().start_cluster(workdir, nodes=nodes)
    try:
        yield cluster
    finally:
        cluster.stop()


def end_offsets(bootstrap: str, topic: str, partitions: int) -> list[int]:
    """Each partition's end offset (high watermark: what is replicated to the in-sync replicas)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": new_group()})
    try:
        return [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in range(partitions)]
    finally:
        consumer.close()
