"""Faults of a real 3-node cluster (KRaft, RF 3, ``min.insync.replicas=2``), started by this
module's fixture with ``scripts/kafka_broker.py`` and stopped after it: kill -9 of a
partition leader, kill -9 of the group coordinator, and every node stopped for a while, each
in the middle of a run while a producer (``acks=all``, idempotent) keeps writing.

The consumer is this file run as a script (``python test_cluster.py``, see ``main``): an app
of three plugins, each appending ``partition offset`` per message to its own ledger before it
returns; plugin ``c`` also fails every poison message (values ``poison-*``), which goes to the
dead-letter topic once its retry fails. After each fault the test waits until the group has
committed the end offsets, stops the app with SIGTERM (exit 0) and checks that every message
is in every plugin's ledger and every poison message in the dead-letter topic."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

import fastconsume as fc

from kafka import committed, end_offsets, kafka_cluster, new_group, read_topic

HERE = Path(__file__).resolve()
PARTITIONS = 6
DLQ_PARTITIONS = 2
RATE = 1_000  # messages/s written during a run
POISON_EVERY = 47  # every 47th message is poison for plugin c
# (name, batch_size, linger, concurrency): shapes that batch the same messages differently.
PLUGINS = (("a", 100, "20ms", 1), ("b", 250, "20ms", 2), ("c", 64, "5ms", 1))
DLQ_PLUGIN = "c"
# Short client timeouts, so that a run notices a dead node and recovers in seconds: the
# broker's minimum session (6 s), reconnects at most 1 s apart, metadata refreshed often.
APP_KAFKA: dict[str, object] = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "reconnect.backoff.max.ms": 1000,
    "topic.metadata.refresh.interval.ms": 2000,
}
CONNECT_TIMEOUT = 30.0
COMMIT_TIMEOUT = 120.0  # after the last write, until the group has committed the end offsets


# --- the app (this file run as a script) -------------------------------------------------


def _ledger_plugin(name: str, directory: Path) -> Callable[[fc.Batch], None]:
    fd = os.open(directory / f"{name}.ledger", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(batch: fc.Batch) -> None:
        data = "".join(f"{m.partition} {m.offset}\n" for m in batch).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if name == DLQ_PLUGIN:
            poison = [i for i, value in enumerate(batch.values()) if (value or b"").startswith(b"poison-")]
            if poison:
                raise fc.PartialFailure(poison, ValueError("poison message"))

    record.__name__ = name
    return record


def main() -> None:
    """The app under test, configured by CLUSTER_* variables; runs until SIGTERM."""
    # fastconsume's warnings (and librdkafka's, through it) go to the app's log, for failures.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    directory = Path(os.environ["CLUSTER_DIR"])
    app = fc.App(
        os.environ["CLUSTER_BOOTSTRAP"],
        os.environ["CLUSTER_GROUP"],
        [os.environ["CLUSTER_TOPIC"]],
        kafka=json.loads(os.environ["CLUSTER_KAFKA"]),
        connect_timeout=CONNECT_TIMEOUT,
    )
    for name, batch_size, linger, concurrency in PLUGINS:
        options: dict[str, Any] = {}
        if name == DLQ_PLUGIN:
            options = {"retries": 1, "backoff": ("50ms", "100ms"), "dlq": os.environ["CLUSTER_DLQ"]}
        app.plugin(name=name, batch_size=batch_size, linger=linger, concurrency=concurrency, **options)(
            _ledger_plugin(name, directory)
        )
    print(f"cluster app: pid {os.getpid()}", file=sys.stderr, flush=True)
    app.run()


# --- the test side ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def kraft(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A 3-node cluster for this module: its own, whatever FASTCONSUME_TEST_BOOTSTRAP says."""
    started = time.monotonic()
    with kafka_cluster(tmp_path_factory.mktemp("cluster")) as c:
        print(f"3-node cluster up in {time.monotonic() - started:.1f} s: {c.bootstrap}")
        yield c


@dataclass
class Written:
    """What the producer sent (messages ``0..sent-1``) and had acknowledged, by number."""

    sent: int = 0
    acknowledged: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


class WritingProducer:
    """Writes ``RATE`` messages/s round-robin over the partitions from a thread, acks=all and
    idempotent, with a delivery timeout longer than any outage of these tests."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.written = Written()
        self.sent = 0
        self._stop = threading.Event()
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 5,
                "message.timeout.ms": 180_000,
                "reconnect.backoff.max.ms": 1000,
            }
        )
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)
        self._thread.start()

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        # By number, not offset: a write retried across an outage can be acknowledged as a
        # duplicate of one already stored, with no offset.
        if error is not None:
            self.written.errors.append(str(error))
        else:
            self.written.acknowledged.add(number(message))

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - started) * RATE)
            while self.sent < due:
                n = self.sent
                value = f"poison-{n}" if n % POISON_EVERY == POISON_EVERY - 1 else f"m-{n}"
                try:
                    self._producer.produce(
                        self.topic, value.encode(), partition=n % PARTITIONS, on_delivery=self._delivered
                    )
                except BufferError:
                    break  # the local queue is full (an outage): try again on the next tick
                self.sent += 1
            self._producer.poll(0.01)

    def finish(self) -> Written:
        self._stop.set()
        self._thread.join(timeout=10)
        self.written.sent = self.sent
        left = self._producer.flush(150)
        assert left == 0, f"{left} messages not delivered after 150 s"
        assert not self.written.errors, f"delivery failed: {self.written.errors[:5]}"
        return self.written


class ClusterApp:
    """``python test_cluster.py`` (the app above) in a subprocess, its output in a file."""

    def __init__(self, bootstrap: str, group: str, topic: str, dlq: str, directory: Path) -> None:
        self.directory = directory
        self.log = directory / "app.log"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "CLUSTER_BOOTSTRAP": bootstrap,
            "CLUSTER_GROUP": group,
            "CLUSTER_TOPIC": topic,
            "CLUSTER_DLQ": dlq,
            "CLUSTER_DIR": str(directory),
            "CLUSTER_KAFKA": json.dumps(APP_KAFKA),
        }
        with self.log.open("wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, str(HERE)], cwd=HERE.parent, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return f"--- app (pid {self.popen.pid}, exit {self.popen.poll()}) output:\n{self.log.read_text()[-20_000:]}"

    def ledger_sizes(self) -> list[int]:
        sizes = []
        for name, *_ in PLUGINS:
            path = self.directory / f"{name}.ledger"
            sizes.append(path.stat().st_size if path.exists() else 0)
        return sizes

    def wait_until_consuming(self, timeout: float = 60.0) -> None:
        """Until every plugin's ledger has grown past its size now."""
        before = self.ledger_sizes()
        deadline = time.monotonic() + timeout
        while not all(n > b for n, b in zip(self.ledger_sizes(), before, strict=True)):
            assert self.popen.poll() is None, f"the app ended\n{self.output()}"
            assert time.monotonic() < deadline, f"not consuming after {timeout} s\n{self.output()}"
            time.sleep(0.05)

    def ledger(self, name: str) -> tuple[dict[int, set[int]], int]:
        """The offsets a plugin handled, by partition, and how many lines repeat one."""
        seen: dict[int, set[int]] = {}
        lines = (self.directory / f"{name}.ledger").read_text().splitlines()
        for line in lines:
            partition, offset = line.split()
            seen.setdefault(int(partition), set()).add(int(offset))
        return seen, len(lines) - sum(len(offsets) for offsets in seen.values())

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=30)


def number(message: Message) -> int:
    """A message's number, from its value (``m-N`` or ``poison-N``)."""
    return int((message.value() or b"").rsplit(b"-", 1)[1])


def create_topics(bootstrap: str, *topics: tuple[str, int]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(t, num_partitions=n, replication_factor=3) for t, n in topics])
    for future in futures.values():
        future.result(timeout=30)


def partition_leader(bootstrap: str, topic: str, partition: int) -> int:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    leader: int = admin.list_topics(topic, timeout=30).topics[topic].partitions[partition].leader
    return leader


def group_coordinator(bootstrap: str, group: str) -> int:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    description = admin.describe_consumer_groups([group], request_timeout=30)[group].result(timeout=30)
    coordinator: int = description.coordinator.id
    return coordinator


def wait_committed(app: ClusterApp, bootstrap: str, group: str, topic: str, ends: list[int]) -> float:
    """Waits until the group has committed ``ends``; returns the seconds it took."""
    started = time.monotonic()
    offsets: list[int] = []
    while time.monotonic() - started < COMMIT_TIMEOUT:
        assert app.popen.poll() is None, f"the app ended before committing everything\n{app.output()}"
        offsets = committed(bootstrap, group, topic, PARTITIONS)
        if offsets == ends:
            return time.monotonic() - started
        time.sleep(1.0)
    pytest.fail(f"committed {offsets}, end offsets {ends}, after {COMMIT_TIMEOUT} s\n{app.output()}")


Fault = Callable[[Any, str, str], str]


def run_through(cluster: Any, tmp_path: Path, fault: Fault) -> None:
    """One run with a fault in the middle (see the module's docstring), then every check."""
    topic, dlq, group = f"t-{uuid.uuid4().hex[:12]}", f"dlq-{uuid.uuid4().hex[:12]}", new_group()
    create_topics(cluster.bootstrap, (topic, PARTITIONS), (dlq, DLQ_PARTITIONS))
    started = time.monotonic()
    producer = WritingProducer(cluster.bootstrap, topic)
    app = ClusterApp(cluster.bootstrap, group, topic, dlq, tmp_path)
    try:
        app.wait_until_consuming()
        time.sleep(2.0)  # mid-stream
        what = fault(cluster, topic, group)
        faulted = time.monotonic()
        app.wait_until_consuming()  # it goes on
        recovered = time.monotonic() - faulted
        time.sleep(2.0)  # and keeps going while the producer writes
        written = producer.finish()
        ends = end_offsets(cluster.bootstrap, topic, PARTITIONS)
        took = wait_committed(app, cluster.bootstrap, group, topic, ends)
        app.popen.send_signal(signal.SIGTERM)
        code = app.popen.wait(timeout=60)
        assert code == 0, f"exit {code} after SIGTERM\n{app.output()}"
    finally:
        app.kill()
    print(
        f"{what}: consuming again {recovered:.1f} s after it; {sum(ends)} messages; "
        f"all committed {took:.1f} s after the last write; run {time.monotonic() - started:.1f} s"
    )

    # Idempotent writes: the topic holds each acknowledged message once, at offsets 0..end-1.
    stored = read_topic(cluster.bootstrap, topic, PARTITIONS)
    numbers = Counter(number(m) for m in stored)
    assert set(numbers) >= written.acknowledged, f"{len(written.acknowledged - set(numbers))} acknowledged, not stored"
    assert set(numbers) <= set(range(written.sent)), "the topic holds messages that were never sent"
    assert max(numbers.values()) == 1, f"stored twice: {[n for n, c in numbers.items() if c > 1][:10]}"
    for p in range(PARTITIONS):
        offsets = sorted(m.offset() or 0 for m in stored if m.partition() == p)
        assert offsets == list(range(ends[p])), f"partition {p}: offsets are not 0..{ends[p] - 1}"
    poison = {(m.partition() or 0, m.offset() or 0) for m in stored if (m.value() or b"").startswith(b"poison-")}
    repeated = {}
    for name, *_ in PLUGINS:
        seen, repeated[name] = app.ledger(name)
        lost = [(p, o) for p in range(PARTITIONS) for o in range(ends[p]) if o not in seen.get(p, set())]
        assert not lost, f"plugin {name} never saw {len(lost)} messages, first {lost[:10]}"
    letters = read_topic(cluster.bootstrap, dlq, DLQ_PARTITIONS)
    dead: set[tuple[int, int]] = set()
    for letter in letters:
        headers = {k: (v or b"").decode() for k, v in letter.headers() or []}
        assert headers["fastconsume.plugin"] == DLQ_PLUGIN, headers
        assert headers["fastconsume.original.topic"] == topic, headers
        assert headers["fastconsume.error.type"] == "ValueError", headers
        assert (letter.value() or b"").startswith(b"poison-"), letter.value()
        dead.add((int(headers["fastconsume.original.partition"]), int(headers["fastconsume.original.offset"])))
    assert dead == poison, (
        f"dead letters: {len(poison - dead)} poison messages missing, first "
        f"{sorted(poison - dead)[:10]}; {len(dead - poison)} unexpected"
    )
    assert poison, "the run wrote no poison message"
    # At least once: what a fault interrupted comes again (plugin c also repeats each poison
    # message once, its retry).
    print(f"{len(poison)} dead letters ({len(letters) - len(dead)} repeated); messages handled twice: {repeated}")


def test_kill_9_partition_leader(kraft: Any, tmp_path: Path) -> None:
    def fault(cluster: Any, topic: str, group: str) -> str:
        leader = partition_leader(cluster.bootstrap, topic, 0)
        cluster.kill(leader)
        time.sleep(5.0)  # past the broker session (3 s): the leadership moves
        t = time.monotonic()
        cluster.restart(leader)
        took = time.monotonic() - t
        return f"kill -9 of node {leader}, leader of {topic}[0], down 5 s, restarted (took {took:.1f} s)"

    run_through(kraft, tmp_path, fault)


def test_kill_9_group_coordinator(kraft: Any, tmp_path: Path) -> None:
    def fault(cluster: Any, topic: str, group: str) -> str:
        coordinator = group_coordinator(cluster.bootstrap, group)
        cluster.kill(coordinator)
        time.sleep(5.0)
        t = time.monotonic()
        cluster.restart(coordinator)
        took = time.monotonic() - t
        return f"kill -9 of node {coordinator}, coordinator of {group}, down 5 s, restarted (took {took:.1f} s)"

    run_through(kraft, tmp_path, fault)


def test_all_nodes_down_for_a_while(kraft: Any, tmp_path: Path) -> None:
    def fault(cluster: Any, topic: str, group: str) -> str:
        t = time.monotonic()
        cluster.stop_all()  # clean shutdowns, then kill -9 whichever still runs after 10 s
        stopping = time.monotonic() - t
        time.sleep(12.0)
        t = time.monotonic()
        cluster.start_all()
        return f"all nodes stopped ({stopping:.1f} s), down 12 s, started again ({time.monotonic() - t:.1f} s)"

    run_through(kraft, tmp_path, fault)


@dataclass
class Observed:
    """How an in-process run ended, the WARNING lines of ``fastconsume`` it logged (with when)
    and a plugin's ``dead_letters_pending`` sampled every 0.2 s."""

    outcome: BaseException | None = None
    ended: float = 0.0
    warnings: list[tuple[float, str]] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)


class _Warnings(logging.Handler):
    def __init__(self, into: list[tuple[float, str]]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append((time.monotonic(), record.getMessage()))


def observe_run(app: fc.App, plugin: str) -> Observed:
    """Runs ``app`` on a thread until it ends, watching it."""
    seen = Observed()
    logger = logging.getLogger("fastconsume")
    handler, level = _Warnings(seen.warnings), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def run() -> None:
        try:
            app.run()
        except BaseException as error:
            seen.outcome = error

    runner = threading.Thread(target=run)
    runner.start()
    try:
        while runner.is_alive():
            stats = app.stats()
            if stats["running"]:
                seen.pending.append(stats["plugins"][plugin]["dead_letters_pending"])
            time.sleep(0.2)
        seen.ended = time.monotonic()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        app.stop()
        runner.join(timeout=60)
    return seen


def test_a_dead_letter_partition_short_of_in_sync_replicas_is_loud_and_bounded(kraft: Any) -> None:
    """Issue case: the dead-letter partition has fewer in-sync replicas than it needs, so every
    acks=all write of it is refused (NOT_ENOUGH_REPLICAS) and retried by librdkafka. The
    waiting write is logged at WARNING within seconds, naming the topic, shows in ``stats()``,
    and ends the run at ``dlq_timeout`` with a ``KafkaError`` naming the refusal; the failed
    batch stays uncommitted."""
    topic, dlq, group = f"t-{uuid.uuid4().hex[:12]}", f"dlq-{uuid.uuid4().hex[:12]}", new_group()
    admin = AdminClient({"bootstrap.servers": kraft.bootstrap})
    futures = admin.create_topics(
        [
            NewTopic(topic, num_partitions=1, replication_factor=3),
            NewTopic(dlq, num_partitions=1, replication_factor=3, config={"min.insync.replicas": "3"}),
        ]
    )
    for future in futures.values():
        future.result(timeout=30)
    producer = Producer({"bootstrap.servers": kraft.bootstrap, "acks": "all"})
    for i in range(10):
        producer.produce(topic, f"poison-{i}".encode(), partition=0)
    assert producer.flush(30) == 0
    # One replica of the dead-letter partition down (not its leader): once the controller has
    # fenced it, the partition has 2 in-sync replicas of the 3 it needs.
    partition = admin.list_topics(dlq, timeout=30).topics[dlq].partitions[0]
    follower = next(r for r in partition.replicas if r != partition.leader)
    kraft.kill(follower)
    failed_at: list[float] = []
    try:
        deadline = time.monotonic() + 30
        while len(admin.list_topics(dlq, timeout=30).topics[dlq].partitions[0].isrs) > 2:
            assert time.monotonic() < deadline, "the killed replica stayed in sync"
            time.sleep(0.2)
        app = fc.App(
            kraft.bootstrap, group, [topic], kafka=APP_KAFKA, connect_timeout=CONNECT_TIMEOUT, dlq_timeout="8s"
        )

        def picky(batch: fc.Batch) -> None:
            failed_at.append(time.monotonic())
            raise ValueError("poison")

        app.add_plugin(picky, batch_size=10, linger="200ms", retries=0, dlq=dlq)
        seen = observe_run(app, "picky")
    finally:
        kraft.restart(follower)

    assert failed_at, "the plugin was never called"
    assert isinstance(seen.outcome, fc.KafkaError), f"the run ended with {seen.outcome!r}"
    message = str(seen.outcome)
    assert dlq in message, message
    assert "Not enough in-sync replicas" in message, message
    waiting = [(at, w) for at, w in seen.warnings if "has waited" in w and dlq in w]
    assert waiting, f"no warning about the waiting write: {[w for _, w in seen.warnings][-10:]}"
    assert waiting[0][0] - failed_at[0] <= 6.0, "the first warning came more than 6 s after the failure"
    assert max(seen.pending, default=0) == 10, f"stats never showed the 10 pending messages: {seen.pending[-10:]}"
    took = seen.ended - failed_at[0]
    assert 7.0 <= took < 40.0, f"the run ended {took:.1f} s after the failure, not at the 8 s bound"
    assert committed(kraft.bootstrap, group, topic, 1)[0] <= 0, "the failed batch was committed"


if __name__ == "__main__":
    main()
