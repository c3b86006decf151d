"""Dead-letter writes that fail or cannot complete, on the real broker: the error that ends the
run names the cause (librdkafka's code and text), the plugin, the partition and offsets; a write
that waits is logged within seconds and shows in ``stats()``; ``dlq_timeout`` bounds it; and
the messages of a failed write stay uncommitted.

Kafka 4.x caps a partition's effective ``min.insync.replicas`` at its replica count, so a
single broker cannot make ``acks=all`` writes fail with NOT_ENOUGH_REPLICAS. A write that
cannot complete is made here with a dead-letter topic that does not exist while the app's
``allow.auto.create.topics`` is false: librdkafka then waits for the topic to appear, as it
waits for in-sync replicas, until the write's bound."""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

import fastconsume as fc
from fastconsume._config import load_config
from fastconsume.errors import ConfigError
from fastconsume.testing import produce

from kafka import RealCluster, committed, new_group

POISON_PARTITION_MESSAGES = 10


class Records(logging.Handler):
    """Keeps ``(monotonic time, level, message)`` of every record it sees."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[float, int, str]] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            self.records.append((time.monotonic(), record.levelno, record.getMessage()))

    def warnings(self, text: str) -> list[tuple[float, str]]:
        with self._lock:
            return [(at, m) for at, level, m in self.records if level >= logging.WARNING and text in m]


@contextmanager
def fastconsume_records() -> Iterator[Records]:
    """The records of the ``fastconsume`` logger (and those below it), with their arrival time."""
    handler = Records()
    logger = logging.getLogger("fastconsume")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextmanager
def sampling(app: fc.App, plugin: str) -> Iterator[list[dict[str, Any]]]:
    """``app.stats()["plugins"][plugin]`` every 100 ms while the block runs."""
    samples: list[dict[str, Any]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            stats = app.stats()["plugins"].get(plugin)
            if stats is not None:
                samples.append(dict(stats))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join(5)


def poisoned_topic(cluster: RealCluster, value_size: int = 20) -> str:
    """A 1-partition topic of ``POISON_PARTITION_MESSAGES`` messages, all ``poison...``."""
    topic = cluster.create_topic(1)
    values = [b"poison-" + str(i).encode().ljust(value_size, b".") for i in range(POISON_PARTITION_MESSAGES)]
    produce(cluster.bootstrap, topic, values, partition=0)
    return topic


def test_a_dead_letter_write_that_cannot_complete_warns_shows_in_stats_and_ends_the_run_at_dlq_timeout(
    real_cluster: RealCluster,
) -> None:
    """The write waits (its topic does not exist and may not be created): a WARNING naming the
    plugin, the topic and the offsets comes within 5 s of the failure; ``stats()`` shows the
    10 pending messages and their age, and the call in flight; at ``dlq_timeout="4s"`` the run
    ends with ``KafkaError`` naming MessageTimedOut and the bound, well within 20 s; nothing
    of the batch is committed."""
    topic = poisoned_topic(real_cluster)
    dlq = f"missing-{uuid.uuid4().hex[:12]}"
    group = new_group()
    app = fc.App(
        real_cluster.bootstrap,
        group,
        [topic],
        kafka={"allow.auto.create.topics": "false"},
        dlq_timeout="4s",
    )
    failed_at: list[float] = []

    @app.plugin(batch_size=POISON_PARTITION_MESSAGES, linger="200ms", retries=0, dlq=dlq)
    def picky(batch: fc.Batch) -> None:
        failed_at.append(time.monotonic())
        raise ValueError("poison")

    with fastconsume_records() as records, sampling(app, "picky") as samples:
        with pytest.raises(fc.KafkaError) as raised:
            app.run()
        ended = time.monotonic()

    assert len(failed_at) == 1, f"the plugin was called {len(failed_at)} times"
    failed = failed_at[0]
    waiting = records.warnings("has waited")
    assert waiting, f"no warning about the waiting write; got {records.warnings('')}"
    first_at, first = waiting[0]
    assert first_at - failed <= 5.0, f"the first warning came {first_at - failed:.1f} s after the failure"
    # What librdkafka retries meanwhile (here: the topic is unknown) is named while it waits.
    unknown = f"librdkafka's last error: metadata for topic {dlq}: Broker: Unknown topic or partition"
    for part in ('"picky"', f'"{dlq}"', f"{topic}[0] offsets 0..=9", "dlq_timeout", unknown):
        assert part in first, f"{part} not in the warning {first!r}"
    # Every third of the 4 s bound: at about 1.3 s and 2.7 s (and perhaps 4 s, racing the end).
    waits = [float(m) for _, w in waiting for m in re.findall(r"has waited ([0-9.]+) s", w)]
    assert len(waits) >= 2, f"the write was warned about once, not periodically: {waiting}"
    assert waits == sorted(waits), f"waits reported: {waits}"
    assert waits[1] - waits[0] >= 1.0, f"waits reported: {waits}"

    pending = [s for s in samples if s["dead_letters_pending"] > 0]
    assert pending, f"stats never showed the pending write: {samples[-3:]}"
    assert all(s["dead_letters_pending"] == POISON_PARTITION_MESSAGES for s in pending), pending
    assert max(s["dead_letters_oldest"] for s in pending) >= 2.0, "the pending write's age did not grow"
    assert all(s["in_flight"] == 1 for s in pending), "the waiting write must hold its call"
    assert app.stats()["plugins"]["picky"]["dead_letters_pending"] == 0, "the failed write is still pending"

    message = str(raised.value)
    for part in ('"picky"', f'"{dlq}"', f"{topic}[0] offsets 0..=9", "MessageTimedOut", "after 4.0 s", unknown):
        assert part in message, f"{part} not in the error {message!r}"
    took = ended - failed
    assert 3.5 <= took < 20.0, f"the run ended {took:.1f} s after the failure, not at the 4 s bound"
    assert committed(real_cluster.bootstrap, group, topic, 1)[0] <= 0, "the poison batch was committed"


@pytest.mark.parametrize("case", ["message too large", "invalid topic name"])
def test_a_refused_dead_letter_write_names_its_cause(real_cluster: RealCluster, case: str) -> None:
    """The broker refuses the write (a dead-letter topic whose ``max.message.bytes`` is smaller
    than the message, or a topic name it rejects): the run ends at once with ``KafkaError``
    naming librdkafka's code, the plugin, the dead-letter topic, the partition and the offsets;
    the batch stays uncommitted."""
    if case == "message too large":
        topic = poisoned_topic(real_cluster, value_size=2_000)
        dlq = f"small-{uuid.uuid4().hex[:12]}"
        admin = AdminClient({"bootstrap.servers": real_cluster.bootstrap})
        new = NewTopic(dlq, num_partitions=1, replication_factor=1, config={"max.message.bytes": "500"})
        admin.create_topics([new])[dlq].result(timeout=30)
        code = "MessageSizeTooLarge"
    else:
        topic = poisoned_topic(real_cluster)
        dlq = f"bad/{uuid.uuid4().hex[:12]}"
        code = "InvalidTopic"
    group = new_group()
    app = fc.App(real_cluster.bootstrap, group, [topic])

    @app.plugin(batch_size=POISON_PARTITION_MESSAGES, linger="200ms", retries=0, dlq=dlq)
    def picky(batch: fc.Batch) -> None:
        raise ValueError("poison")

    started = time.monotonic()
    with pytest.raises(fc.KafkaError) as raised:
        app.run()
    took = time.monotonic() - started

    message = str(raised.value)
    for part in ('plugin "picky"', f'"{dlq}"', f"{topic}[0] offsets", code):
        assert part in message, f"{part} not in the error {message!r}"
    assert re.search(r"\d+ of 10 not delivered", message), message
    assert took < 15.0, f"a refused write took {took:.1f} s to end the run"
    assert committed(real_cluster.bootstrap, group, topic, 1)[0] <= 0, "the poison batch was committed"


def test_dlq_timeout_is_checked_and_comes_from_the_configuration(tmp_path: Path) -> None:
    """``dlq_timeout`` is a duration between 10 ms and 24 days; the configuration's key and
    ``FASTCONSUME_DLQ_TIMEOUT`` set it."""
    for bad in (0, "5ms", "30d", -1):
        with pytest.raises(ConfigError, match="dlq_timeout"):
            fc.App("127.0.0.1:9092", "g", "t", dlq_timeout=bad)
    assert fc.App("127.0.0.1:9092", "g", "t", dlq_timeout="2m").describe()["dlq_timeout"] == "2m"
    (tmp_path / "fastconsume.toml").write_text(
        'bootstrap = "127.0.0.1:9092"\ngroup = "g"\ntopics = ["t"]\ndlq_timeout = "45s"\n'
    )
    assert fc.App.from_config(load_config(cwd=tmp_path, environ={})).describe()["dlq_timeout"] == "45s"
    from_env = load_config(cwd=tmp_path, environ={"FASTCONSUME_DLQ_TIMEOUT": "7s"})
    assert fc.App.from_config(from_env).describe()["dlq_timeout"] == "7s"
    with pytest.raises(ConfigError, match="FASTCONSUME_DLQ_TIMEOUT"):
        load_config(cwd=tmp_path, environ={"FASTCONSUME_DLQ_TIMEOUT": "soon"})
