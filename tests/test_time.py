"""Time in the engine: rate limits, retries with backoff, dead letters, per-call deadlines,
a bounded timer wheel, and async concurrency that is not a thread count."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from confluent_kafka import Message as KafkaMessage
from confluent_kafka import Producer

import fastconsume as fc
from fastconsume.errors import ConfigError

from kafka import Cluster, RealCluster, committed, fill, new_group, read_topic

Headers = tuple[tuple[str, bytes | None], ...]


def values_of(partitions: int, per_partition: int) -> list[bytes]:
    """The values ``fill`` writes."""
    return [f"p{p}-{i}".encode() for p in range(partitions) for i in range(per_partition)]


def fastconsume_logs(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    """Records of the ``fastconsume`` logger (or one below it) whose message contains ``text``,
    case-insensitively."""
    return [
        r
        for r in caplog.records
        if (r.name == "fastconsume" or r.name.startswith("fastconsume.")) and text.lower() in r.getMessage().lower()
    ]


# Rate limits


def test_an_app_rate_limit_paces_a_backlog_without_spinning(real_cluster: RealCluster) -> None:
    """50,000 ready messages at 5,000 msg/s take 10 s (+-10 %) from the first call to the
    last message, and waiting for the limit costs under 20 % of a CPU."""
    partitions, per_partition = 4, 12_500
    total = partitions * per_partition
    topic = real_cluster.create_topic(partitions)
    fill(real_cluster, topic, partitions, per_partition)
    app = fc.App(real_cluster.bootstrap, new_group(), [topic], rate_limit=5000)
    seen = [0]
    marks: dict[str, float] = {}

    @app.plugin
    def count(batch: fc.Batch) -> None:
        if "start" not in marks:
            marks["start"] = time.monotonic()
            marks["cpu_start"] = app.stats()["process"]["cpu_seconds"]
        seen[0] += len(batch)
        if seen[0] == total:
            marks["end"] = time.monotonic()
            marks["cpu_end"] = app.stats()["process"]["cpu_seconds"]

    app.run(idle_timeout=1.0)

    assert seen[0] == total, f"the plugin saw {seen[0]} of {total} messages"
    wall = marks["end"] - marks["start"]
    assert 9.0 <= wall <= 11.0, f"{total} messages at 5000/s took {wall:.2f} s, not 10 s +-10 %"
    cpu = marks["cpu_end"] - marks["cpu_start"]
    assert cpu < 0.2 * wall, f"{cpu:.2f} s of CPU in {wall:.2f} s throttled: the wait is not asleep"


def test_a_plugin_rate_limit_holds_back_only_its_own_lane(real_cluster: RealCluster) -> None:
    """With 10,000 messages, the unlimited plugin is done within 2 s of the first call while
    the one limited to 2,000 msg/s needs about 5 s; only the limited one reports throttling."""
    partitions, per_partition = 4, 2_500
    total = partitions * per_partition
    topic = real_cluster.create_topic(partitions)
    fill(real_cluster, topic, partitions, per_partition)
    app = fc.App(real_cluster.bootstrap, new_group(), [topic])
    counts = {"fast": 0, "limited": 0}
    marks: dict[str, float] = {}

    def counting(name: str) -> Callable[[fc.Batch], None]:
        def plugin(batch: fc.Batch) -> None:
            marks.setdefault("start", time.monotonic())
            counts[name] += len(batch)
            if counts[name] == total:
                marks[name] = time.monotonic()

        return plugin

    app.plugin(name="fast")(counting("fast"))
    # A lane big enough for the whole backlog, so the limited lane never fills and pauses
    # fetching for the fast one: this test is about the rate limit, not back-pressure.
    app.plugin(name="limited", rate_limit=2000, max_queued=2 * total)(counting("limited"))
    app.run(idle_timeout=1.0)

    assert counts == {"fast": total, "limited": total}, f"messages seen per plugin: {counts}"
    fast, limited = marks["fast"] - marks["start"], marks["limited"] - marks["start"]
    assert fast < 2.0, f"the unlimited plugin took {fast:.2f} s: the other plugin's rate limit held it back"
    assert 4.0 <= limited <= 7.0, f"{total} messages at 2000/s took {limited:.2f} s, expected about 5 s"
    stats = app.stats()["plugins"]
    assert stats["limited"]["throttled"] > 0, "the limited plugin never reported waiting for its rate limit"
    assert stats["fast"]["throttled"] == 0, f"the unlimited plugin reports {stats['fast']['throttled']} throttles"


# Retries


def test_retries_back_off_and_do_not_hold_back_other_plugins(
    real_cluster: RealCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A plugin that fails the first 2 attempts of every batch gets each batch 3 times, the
    same messages each time, and ends having handled everything; a second plugin sees every
    message once and finishes first; 2 retries per batch are counted and logged; all is
    committed."""
    caplog.set_level(logging.WARNING, logger="fastconsume")
    partitions, per_partition = 4, 1_000
    total = partitions * per_partition
    topic = real_cluster.create_topic(partitions)
    fill(real_cluster, topic, partitions, per_partition)
    group = new_group()
    app = fc.App(real_cluster.bootstrap, group, [topic])
    attempts: dict[tuple[int, int], list[int]] = defaultdict(list)
    contents: dict[tuple[int, int], list[bytes | None]] = {}
    changed: list[tuple[int, int]] = []
    succeeded: set[bytes | None] = set()
    steady_seen: list[bytes | None] = []
    done: dict[str, float] = {}

    @app.plugin(batch_size=250, retries=3, backoff=("50ms", "1s"))
    def flaky(batch: fc.Batch) -> None:
        values = batch.values()
        key = (batch.partition, batch[0].offset)
        attempts[key].append(batch.attempt)
        if batch.attempt == 1:
            contents[key] = values
        elif contents.get(key) != values:
            changed.append(key)
        if batch.attempt <= 2:
            raise ValueError(f"attempt {batch.attempt} fails on purpose")
        succeeded.update(values)
        if len(succeeded) == total:
            done["flaky"] = time.monotonic()

    @app.plugin(batch_size=250)
    def steady(batch: fc.Batch) -> None:
        steady_seen.extend(batch.values())
        if len(steady_seen) == total:
            done["steady"] = time.monotonic()

    app.run(idle_timeout=1.5)

    everything = values_of(partitions, per_partition)
    assert sorted(v or b"" for v in steady_seen) == sorted(everything), "steady must see every message once"
    assert succeeded == set(everything), f"{len(set(everything) - succeeded)} messages never succeeded in flaky"
    wrong = {key: a for key, a in attempts.items() if a != [1, 2, 3]}
    assert not wrong, f"batches (partition, first offset) not called with attempts 1, 2, 3: {wrong}"
    assert not changed, f"retries of these batches held other messages than their first attempt: {changed}"
    assert done["steady"] < done["flaky"], "the plugin without failures finished after the retrying one"
    stats = app.stats()["plugins"]
    assert stats["flaky"]["retries"] == 2 * len(attempts), (
        f"retries stat {stats['flaky']['retries']}, expected 2 x {len(attempts)} batches"
    )
    assert stats["steady"]["retries"] == 0, f"steady reports {stats['steady']['retries']} retries"
    assert stats["flaky"]["dead_lettered"] == 0, "nothing may be dead-lettered without a dlq"
    retry_logs = fastconsume_logs(caplog, "retrying in")
    assert retry_logs, "no 'retrying in' line on the fastconsume logger"
    for record in retry_logs:
        assert record.levelno == logging.WARNING, f"retry logged at {record.levelname}: {record.getMessage()}"
        delay = re.search(r"retrying in (\d+(?:\.\d+)?)", record.getMessage())
        assert delay is not None, f"no delay in seconds after 'retrying in': {record.getMessage()}"
        assert 0.0 <= float(delay.group(1)) <= 1.0, f"delay beyond the 1 s max backoff: {record.getMessage()}"
    assert committed(real_cluster.bootstrap, group, topic, partitions) == [per_partition] * partitions


@pytest.mark.parametrize("on_failure", ["stop", None])
def test_exhausted_retries_with_stop_end_the_run_uncommitted(real_cluster: RealCluster, on_failure: str | None) -> None:
    """With retries=1 an always-failing plugin is called twice on its batch, then the run
    raises PluginError (naming the plugin, caused by its exception) and the batch is not
    committed. ``on_failure=None`` without a dlq means "stop"."""
    topic = real_cluster.create_topic(1)
    fill(real_cluster, topic, 1, 500)
    group = new_group()
    app = fc.App(real_cluster.bootstrap, group, [topic])
    calls: list[tuple[int, int]] = []

    class Doomed(RuntimeError):
        pass

    @app.plugin(batch_size=100, retries=1, backoff=("10ms", "50ms"), on_failure=on_failure)
    def doomed(batch: fc.Batch) -> None:
        calls.append((batch.attempt, batch[0].offset))
        raise Doomed(f"attempt {batch.attempt} fails")

    with pytest.raises(fc.PluginError, match="doomed") as raised:
        app.run(idle_timeout=10.0)
    assert isinstance(raised.value.__cause__, Doomed), f"cause is {raised.value.__cause__!r}"
    assert [attempt for attempt, _ in calls] == [1, 2], f"calls (attempt, first offset): {calls}"
    assert calls[0][1] == calls[1][1], f"the retry was on another batch: {calls}"
    stored = committed(real_cluster.bootstrap, group, topic, 1)[0]
    assert stored <= calls[0][1], f"committed {stored}, past the failed batch starting at {calls[0][1]}"


# Dead letters


@dataclass(frozen=True)
class Sent:
    """A message as produced, with where it landed."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers
    timestamp: int

    @property
    def poison(self) -> bool:
        return b"poison" in self.value


def is_poison(value: bytes | None) -> bool:
    return value is not None and b"poison" in value


def send_with_poison(bootstrap: str, topic: str, partitions: int, per_partition: int) -> list[Sent]:
    """Writes ``p{p}-{i}`` values, 1 % of them (``i % 100 == 37``) ``p{p}-{i}-poison``, with
    explicit CreateTime timestamps; some carry a key, and some headers (a repeated name, a
    binary value, a null value). Returns them with the offsets the broker gave."""
    base = int(time.time() * 1000) - 3_600_000
    planned: dict[bytes, Sent] = {}
    landed: dict[bytes, tuple[int, int]] = {}
    failures: list[str] = []

    def delivered(error: object, message: KafkaMessage) -> None:
        if error is not None:
            failures.append(str(error))
        else:
            value = message.value()
            assert isinstance(value, bytes)
            landed[value] = (message.partition() or 0, message.offset() or 0)

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for p in range(partitions):
        for i in range(per_partition):
            poison = i % 100 == 37
            value = f"p{p}-{i}{'-poison' if poison else ''}".encode()
            n = i // 100 if poison else i  # varies over the poison messages too
            key = f"key-{p}-{i}".encode() if n % 2 == 0 else None
            headers: Headers = (
                (("trace", f"t-{p}-{i}".encode()), ("ü-bin", b"\x00\xff"), ("trace", b"again"), ("null", None)),
                (("only", b"one"),),
                (),
            )[n % 3]
            timestamp = base + p * 100_000 + i
            producer.produce(
                topic,
                value=value,
                key=key,
                partition=p,
                headers=list(headers) or None,
                timestamp=timestamp,
                on_delivery=delivered,
            )
            producer.poll(0)
            planned[value] = Sent(p, -1, key, value, headers, timestamp)
    assert producer.flush(30) == 0, "messages left unsent"
    assert not failures, f"produce failed: {failures[:3]}"
    return [dataclasses.replace(s, offset=landed[v][1]) for v, s in planned.items()]


def header_pairs(message: KafkaMessage) -> Headers:
    """A consumed message's headers as ``(name, bytes or None)`` pairs, in order."""
    raw = message.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    return tuple((name, value.encode() if isinstance(value, str) else value) for name, value in pairs)


def check_dead_letters(
    dead: list[KafkaMessage],
    expected: list[Sent],
    *,
    topic: str,
    plugin: str,
    error_type: str,
    error_message: str,
    attempts: int,
) -> None:
    """The dead-letter topic holds exactly ``expected``, each once, with its key, value and
    headers kept and the ``fastconsume.*`` headers describing the failure and the original."""
    found: dict[tuple[int, int], tuple[KafkaMessage, dict[str, str], Headers]] = {}
    for message in dead:
        headers = header_pairs(message)
        ours = [(name, value) for name, value in headers if name.startswith("fastconsume.")]
        theirs = tuple((name, value) for name, value in headers if not name.startswith("fastconsume."))
        names = [name for name, _ in ours]
        assert len(names) == len(set(names)), f"a fastconsume header is repeated: {names}"
        fields = {name: (value or b"").decode() for name, value in ours}
        missing = {"fastconsume.original.partition", "fastconsume.original.offset"} - set(fields)
        assert not missing, f"dead letter {message.value()!r} lacks {missing}"
        place = (int(fields["fastconsume.original.partition"]), int(fields["fastconsume.original.offset"]))
        assert place not in found, f"partition {place[0]} offset {place[1]} was dead-lettered twice"
        found[place] = (message, fields, theirs)
    want = sorted((s.partition, s.offset) for s in expected)
    assert sorted(found) == want, (
        f"dead letters (partition, offset): extra {sorted(set(found) - set(want))}, "
        f"missing {sorted(set(want) - set(found))}"
    )
    for sent in expected:
        message, fields, theirs = found[sent.partition, sent.offset]
        assert message.value() == sent.value, f"value changed: {message.value()!r} != {sent.value!r}"
        assert message.key() == sent.key, f"key of {sent.value!r} changed: {message.key()!r} != {sent.key!r}"
        assert theirs == sent.headers, f"headers of {sent.value!r} changed: {theirs!r} != {sent.headers!r}"
        assert fields == {
            "fastconsume.plugin": plugin,
            "fastconsume.error.type": error_type,
            "fastconsume.error.message": error_message,
            "fastconsume.attempts": str(attempts),
            "fastconsume.original.topic": topic,
            "fastconsume.original.partition": str(sent.partition),
            "fastconsume.original.offset": str(sent.offset),
            "fastconsume.original.timestamp": str(sent.timestamp),
        }, f"fastconsume headers of {sent.value!r}"


@pytest.mark.parametrize("error_style", ["error_argument", "raise_from"])
def test_a_partial_failure_dead_letters_only_the_poison_messages(real_cluster: RealCluster, error_style: str) -> None:
    """``PartialFailure`` with the poison messages' positions: only they are retried (once,
    with retries=1) and then written to the dlq, with key, value and headers kept and the
    fastconsume.* headers set (attempts "2"); every other message is processed; offsets are
    committed past the poison. The error is given as ``error=`` or as ``raise ... from``.
    ``on_failure`` is left to default: "dead_letter" since a dlq is set."""
    partitions, per_partition = 2, 1_000
    topic = real_cluster.create_topic(partitions)
    dlq = real_cluster.create_topic(1)
    sent = send_with_poison(real_cluster.bootstrap, topic, partitions, per_partition)
    poison = [s for s in sent if s.poison]
    assert len(poison) == 20
    group = new_group()
    app = fc.App(real_cluster.bootstrap, group, [topic])
    processed: list[bytes | None] = []
    retried: list[tuple[int, int, bytes | None]] = []
    retry_calls = 0

    @app.plugin(batch_size=100, retries=1, backoff=("10ms", "100ms"), dlq=dlq)
    def picky(batch: fc.Batch) -> None:
        nonlocal retry_calls
        if batch.attempt > 1:
            retry_calls += 1
            retried.extend((m.partition, m.offset, m.value) for m in batch)
        values = batch.values()
        bad = [i for i, value in enumerate(values) if is_poison(value)]
        processed.extend(value for i, value in enumerate(values) if i not in bad)
        if bad:
            if error_style == "error_argument":
                raise fc.PartialFailure(bad, error=ValueError("poison here"))
            raise fc.PartialFailure(bad) from ValueError("poison here")

    app.run(idle_timeout=1.5)

    assert sorted((p, o) for p, o, _ in retried) == sorted((s.partition, s.offset) for s in poison), (
        "the retries must hold exactly the poison messages, each once"
    )
    assert all(is_poison(v) for _, _, v in retried), "a retry held a message that had not failed"
    good = {s.value for s in sent if not s.poison}
    assert set(processed) == good, f"{len(good - set(processed))} good messages never processed"
    dead = read_topic(real_cluster.bootstrap, dlq)
    check_dead_letters(
        dead,
        poison,
        topic=topic,
        plugin="picky",
        error_type="ValueError",
        error_message="poison here",
        attempts=2,
    )
    stats = app.stats()["plugins"]["picky"]
    assert stats["dead_lettered"] == len(poison), f"dead_lettered {stats['dead_lettered']}, sent {len(poison)}"
    assert stats["retries"] == retry_calls, f"retries stat {stats['retries']}, retry calls made {retry_calls}"
    assert committed(real_cluster.bootstrap, group, topic, partitions) == [per_partition] * partitions, (
        "offsets must be committed past the dead-lettered messages"
    )


def test_a_failing_batch_is_dead_lettered_whole(real_cluster: RealCluster) -> None:
    """A plain ValueError fails the whole batch: after 2 attempts every message of it, poison
    or not, is written to the dlq (so a good message that shared a batch with poison is
    dead-lettered, not processed). Each message ends up either processed or dead-lettered,
    never neither; the headers name the error; offsets are committed to the end."""
    partitions, per_partition = 2, 1_000
    topic = real_cluster.create_topic(partitions)
    dlq = real_cluster.create_topic(1)
    sent = send_with_poison(real_cluster.bootstrap, topic, partitions, per_partition)
    by_place = {(s.partition, s.offset): s for s in sent}
    group = new_group()
    app = fc.App(real_cluster.bootstrap, group, [topic])
    processed: set[tuple[int, int]] = set()
    given_up: list[tuple[int, int]] = []
    retry_batches = 0

    @app.plugin(batch_size=20, retries=1, backoff=("10ms", "100ms"), dlq=dlq, on_failure="dead_letter")
    def strict(batch: fc.Batch) -> None:
        nonlocal retry_batches
        places = [(m.partition, m.offset) for m in batch]
        if any(is_poison(v) for v in batch.values()):
            if batch.attempt == 2:
                given_up.extend(places)
                retry_batches += 1
            raise ValueError("poison here")
        processed.update(places)

    app.run(idle_timeout=1.5)

    poison = {(s.partition, s.offset) for s in sent if s.poison}
    dead_places = set(given_up)
    assert len(given_up) == len(dead_places), "a message was given up on twice"
    assert poison <= dead_places, f"poison never dead-lettered: {sorted(poison - dead_places)}"
    assert dead_places - poison, "no good message shared a failed batch: batches are not whole"
    assert not processed & dead_places, "a dead-lettered message was also processed"
    assert processed | dead_places == set(by_place), (
        f"{len(set(by_place) - processed - dead_places)} messages neither processed nor dead-lettered"
    )
    dead = read_topic(real_cluster.bootstrap, dlq)
    check_dead_letters(
        dead,
        [by_place[place] for place in given_up],
        topic=topic,
        plugin="strict",
        error_type="ValueError",
        error_message="poison here",
        attempts=2,
    )
    stats = app.stats()["plugins"]["strict"]
    assert stats["dead_lettered"] == len(given_up), f"dead_lettered {stats['dead_lettered']}, expected {len(given_up)}"
    assert stats["retries"] == retry_batches, f"retries {stats['retries']}, failed batches retried {retry_batches}"
    assert committed(real_cluster.bootstrap, group, topic, partitions) == [per_partition] * partitions


# Deadlines


def test_an_async_call_past_its_timeout_is_cancelled_and_retried(real_cluster: RealCluster) -> None:
    """An async plugin with timeout=200ms that sleeps 10 s on every first attempt is cancelled
    at its deadline (counted as a timeout) and retried; every message is processed and the
    run takes nowhere near 10 s."""
    topic = real_cluster.create_topic(1)
    fill(real_cluster, topic, 1, 300)
    group = new_group()
    app = fc.App(real_cluster.bootstrap, group, [topic])
    first_attempts: list[int] = []
    cancelled: list[int] = []
    later_attempts: list[int] = []
    processed: list[bytes | None] = []
    marks: dict[str, float] = {}

    @app.plugin(batch_size=100, timeout="200ms")
    async def dawdler(batch: fc.Batch) -> None:
        marks.setdefault("start", time.monotonic())
        if batch.attempt == 1:
            first_attempts.append(batch[0].offset)
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.append(batch[0].offset)
                raise
            return
        later_attempts.append(batch.attempt)
        processed.extend(batch.values())
        marks["end"] = time.monotonic()

    started = time.monotonic()
    app.run(idle_timeout=1.0)
    wall = time.monotonic() - started

    assert sorted(cancelled) == sorted(first_attempts), f"first attempts {first_attempts}, cancelled {cancelled}"
    assert set(later_attempts) == {2}, f"attempts after the first: {later_attempts}, expected only 2"
    assert sorted(v or b"" for v in processed) == sorted(values_of(1, 300)), "every message must be processed once"
    stats = app.stats()["plugins"]["dawdler"]
    assert stats["timeouts"] == len(first_attempts), f"timeouts {stats['timeouts']}, calls cut {len(first_attempts)}"
    assert stats["retries"] == len(first_attempts), f"retries {stats['retries']}, calls cut {len(first_attempts)}"
    assert stats["overruns"] == 0, "an async call is cancelled, not an overrun"
    assert marks["end"] - marks["start"] < 5.0, f"calls took {marks['end'] - marks['start']:.1f} s: not cancelled"
    assert wall < 8.0, f"the run took {wall:.1f} s: a sleeping call was waited for"
    assert committed(real_cluster.bootstrap, group, topic, 1) == [300]


def test_a_sync_call_past_its_timeout_counts_as_an_overrun_and_its_result_stands(
    real_cluster: RealCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A sync call cannot be interrupted: one that sleeps 0.3 s past a 100 ms timeout is an
    overrun, logged at WARNING with the plugin name and "timeout", and its batch counts as
    done: no retry, every message processed once and committed."""
    caplog.set_level(logging.WARNING, logger="fastconsume")
    topic = real_cluster.create_topic(1)
    fill(real_cluster, topic, 1, 300)
    group = new_group()
    app = fc.App(real_cluster.bootstrap, group, [topic])
    attempts: list[int] = []
    processed: list[bytes | None] = []

    @app.plugin(batch_size=100, timeout="100ms")
    def sleepy(batch: fc.Batch) -> None:
        attempts.append(batch.attempt)
        if len(attempts) == 1:
            time.sleep(0.3)
        processed.extend(batch.values())

    app.run(idle_timeout=1.0)

    stats = app.stats()["plugins"]["sleepy"]
    assert stats["overruns"] >= 1, "a sync call 0.2 s past its timeout was not counted as an overrun"
    assert stats["retries"] == 0, f"an overrun must not be retried; retries {stats['retries']}"
    assert stats["timeouts"] == 0, f"a sync call is not cancelled; timeouts {stats['timeouts']}"
    assert set(attempts) == {1}, f"attempts seen {attempts}: an overrun batch was called again"
    assert sorted(v or b"" for v in processed) == sorted(values_of(1, 300)), "every message processed once"
    warnings = [r for r in fastconsume_logs(caplog, "timeout") if r.levelno == logging.WARNING]
    assert warnings, "no WARNING mentioning 'timeout' on the fastconsume logger"
    assert any("sleepy" in r.getMessage() for r in warnings), (
        f"the overrun warning does not name the plugin: {[r.getMessage() for r in warnings]}"
    )
    assert committed(real_cluster.bootstrap, group, topic, 1) == [300]


def test_a_batch_knows_its_deadline(cluster: Cluster) -> None:
    """With timeout="5s" a call (sync or async) starts with ``deadline`` about 5 s ahead on
    ``time.monotonic()``'s clock and ``remaining()`` in (4, 5]; without a timeout both are
    None. First calls have ``attempt`` 1."""
    topic = cluster.create_topic(2)
    fill(cluster, topic, 2, 200)
    app = fc.App(cluster.bootstrap, new_group(), [topic])
    ahead: dict[str, list[tuple[float | None, float | None]]] = defaultdict(list)
    unbounded: list[tuple[object, object]] = []
    attempts: set[int] = set()

    def look(name: str, batch: fc.Batch) -> None:
        now = time.monotonic()
        deadline = batch.deadline
        ahead[name].append((None if deadline is None else deadline - now, batch.remaining()))
        attempts.add(batch.attempt)

    @app.plugin(batch_size=100, timeout="5s")
    def bounded(batch: fc.Batch) -> None:
        look("bounded", batch)

    @app.plugin(batch_size=100, timeout="5s")
    async def bounded_async(batch: fc.Batch) -> None:
        look("bounded_async", batch)

    @app.plugin(batch_size=100)
    def free(batch: fc.Batch) -> None:
        unbounded.append((batch.deadline, batch.remaining()))
        attempts.add(batch.attempt)

    app.run(idle_timeout=1.0)

    assert sorted(ahead) == ["bounded", "bounded_async"], f"plugins that saw a deadline: {sorted(ahead)}"
    for name, samples in ahead.items():
        for left, remaining in samples:
            assert left is not None, f"{name}: deadline is None despite a timeout"
            assert 4.0 < left <= 5.5, f"{name}: deadline {left:.3f} s ahead at the call's start, expected about 5"
            assert remaining is not None, f"{name}: remaining() is None despite a timeout"
            assert 4.0 < remaining <= 5.01, f"{name}: remaining() {remaining:.3f} at the call's start"
    assert unbounded, "the plugin without a timeout was never called"
    assert set(unbounded) == {(None, None)}, f"without a timeout (deadline, remaining()) were {set(unbounded)}"
    assert attempts == {1}, f"attempts seen {attempts}: nothing should have been retried"


# Bounds: timers, threads, async concurrency


def test_timers_stay_bounded_and_threads_constant_under_load(real_cluster: RealCluster) -> None:
    """100,000 messages over 8 partitions through two plugins (one async) with a 5 s timeout
    and a 5 ms linger: the timer wheel never holds more than lanes x partitions + 8 entries
    and the thread count does not move."""
    partitions, per_partition = 8, 12_500
    total = partitions * per_partition
    bound = 2 * partitions + 8
    topic = real_cluster.create_topic(partitions)
    fill(real_cluster, topic, partitions, per_partition)
    app = fc.App(real_cluster.bootstrap, new_group(), [topic])
    counts = {"sync_lane": 0, "async_lane": 0}
    threads: list[int] = []
    entries: list[int] = []
    lock = threading.Lock()

    def sample(name: str, batch: fc.Batch) -> None:
        stats = app.stats()
        with lock:
            counts[name] += len(batch)
            threads.append(stats["process"]["threads"])
            entries.append(stats["timers"]["entries"])

    @app.plugin(timeout="5s", linger="5ms")
    def sync_lane(batch: fc.Batch) -> None:
        sample("sync_lane", batch)

    @app.plugin(timeout="5s", linger="5ms")
    async def async_lane(batch: fc.Batch) -> None:
        sample("async_lane", batch)

    app.run(idle_timeout=1.5)

    assert counts == {"sync_lane": total, "async_lane": total}, f"messages seen per plugin: {counts}"
    assert threads[0] == threads[-1], f"thread count moved from {threads[0]} to {threads[-1]}"
    assert max(threads) == min(threads), f"thread count ranged {min(threads)}..{max(threads)}"
    timers = app.stats()["timers"]
    assert timers["peak"] <= bound, f"timer wheel peaked at {timers['peak']} entries, bound {bound}"
    assert max(entries) <= timers["peak"], f"sampled {max(entries)} entries above the reported peak {timers['peak']}"
    assert timers["peak"] >= 1, "calls with a timeout never registered a timer"


def test_async_concurrency_is_not_a_thread_count(real_cluster: RealCluster) -> None:
    """An async plugin with concurrency=4 on 4 partitions has 4 calls in flight at once on a
    single worker thread, and never more than 4."""
    partitions = 4
    topic = real_cluster.create_topic(partitions)
    fill(real_cluster, topic, partitions, 200)
    app = fc.App(real_cluster.bootstrap, new_group(), [topic], workers=1)
    state: dict[str, int] = {"now": 0, "peak": 0, "stat_at_peak": -1}
    all_in: list[asyncio.Event] = []
    seen: list[bytes | None] = []

    @app.plugin(batch_size=100, concurrency=partitions)
    async def waiter(batch: fc.Batch) -> None:
        if not all_in:
            all_in.append(asyncio.Event())  # on the loop, on first use
        state["now"] += 1  # only the loop thread touches these
        state["peak"] = max(state["peak"], state["now"])
        try:
            if state["now"] == partitions and not all_in[0].is_set():
                state["stat_at_peak"] = app.stats()["plugins"]["waiter"]["in_flight"]
                all_in[0].set()
            with contextlib.suppress(asyncio.TimeoutError):  # not all 4 came: the peak below says so
                await asyncio.wait_for(all_in[0].wait(), 2.0)
            seen.extend(batch.values())
        finally:
            state["now"] -= 1

    app.run(idle_timeout=1.0)

    assert len(seen) == partitions * 200, f"saw {len(seen)} of {partitions * 200} messages"
    assert state["peak"] == partitions, f"at most {state['peak']} calls in flight at once on one worker, expected 4"
    assert state["stat_at_peak"] == partitions, f"stats in_flight was {state['stat_at_peak']} with 4 calls running"


# Validation


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param({"on_failure": "dead_letter"}, "dlq", id="dead_letter-without-dlq"),
        pytest.param({"on_failure": "explode", "dlq": "dead"}, "on_failure", id="unknown-on_failure"),
        pytest.param({"retries": -1}, "retries", id="negative-retries"),
        pytest.param({"backoff": ("2s", "1s")}, "backoff", id="backoff-min-above-max"),
        pytest.param({"backoff": ("soon", "1s")}, "backoff", id="backoff-min-not-a-duration"),
        pytest.param({"backoff": ("100ms", "forever")}, "backoff", id="backoff-max-not-a-duration"),
        pytest.param({"rate_limit": 0}, "rate_limit", id="zero-rate"),
        pytest.param({"rate_limit": -5.0}, "rate_limit", id="negative-rate"),
        pytest.param({"timeout": "0s"}, "timeout", id="zero-timeout"),
        pytest.param({"timeout": 0}, "timeout", id="zero-timeout-number"),
        pytest.param({"timeout": -1}, "timeout", id="negative-timeout"),
    ],
)
def test_bad_time_options_are_config_errors_naming_the_option(options: dict[str, object], match: str) -> None:
    """Each bad option is refused at registration with a ConfigError naming it."""
    app = fc.App("127.0.0.1:9092", "g", ["t"])
    with pytest.raises(ConfigError, match=match):
        app.plugin(**options)(lambda batch: None)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("make", "batch_size", "match"),
    [
        pytest.param(lambda: fc.RateLimit(0), 500, "rate_limit|per_second", id="zero-rate"),
        pytest.param(lambda: fc.RateLimit(-1.0), 500, "rate_limit|per_second", id="negative-rate"),
        pytest.param(lambda: fc.RateLimit(1000, burst=100), 500, "burst", id="burst-below-default-batch"),
        pytest.param(lambda: fc.RateLimit(1000, burst=199), 200, "burst", id="burst-below-batch-size"),
        pytest.param(lambda: fc.RateLimit(1000, burst=0), 1, "burst", id="zero-burst"),
    ],
)
def test_bad_rate_limit_objects_are_config_errors(make: Callable[[], object], batch_size: int, match: str) -> None:
    """A RateLimit that can never admit a batch is refused, when built or at registration."""
    app = fc.App("127.0.0.1:9092", "g", ["t"])
    with pytest.raises(ConfigError, match=match):
        app.plugin(batch_size=batch_size, rate_limit=make())(lambda batch: None)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "rate_limit",
    [
        pytest.param(lambda: 0, id="zero"),
        pytest.param(lambda: -100.0, id="negative"),
        pytest.param(lambda: fc.RateLimit(0), id="zero-RateLimit"),
    ],
)
def test_bad_app_rate_limits_are_config_errors(rate_limit: Callable[[], object]) -> None:
    """The app-wide rate limit is checked when the App is made (a bad RateLimit maybe already
    when built)."""
    with pytest.raises(ConfigError, match=r"rate_limit|per_second"):
        fc.App("127.0.0.1:9092", "g", ["t"], rate_limit=rate_limit())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "good", "bad"),
    [
        pytest.param("retries", 2, "3", id="retries-string"),
        pytest.param("retries", 2, 1.5, id="retries-float"),
        pytest.param("backoff", ("10ms", "1s"), "100ms", id="backoff-not-a-pair"),
        pytest.param("backoff", ("10ms", "1s"), ("100ms",), id="backoff-one-item"),
        pytest.param("rate_limit", 100, "fast", id="rate_limit-string"),
        pytest.param("on_failure", "stop", 1, id="on_failure-number"),
        pytest.param("timeout", "1s", [1], id="timeout-list"),
    ],
)
def test_wrongly_typed_time_options_are_refused(option: str, good: object, bad: object) -> None:
    """An option that takes ``good`` refuses a value of the wrong type at registration
    (ConfigError or TypeError)."""
    app = fc.App("127.0.0.1:9092", "g", ["t"])
    app.plugin(name="good", **{option: good})(lambda batch: None)  # type: ignore[call-overload]
    with pytest.raises((ConfigError, TypeError)):
        app.plugin(name="bad", **{option: bad})(lambda batch: None)  # type: ignore[call-overload]


def test_valid_time_options_register() -> None:
    """Every new option, in each accepted form, registers without error."""
    app = fc.App("127.0.0.1:9092", "g", ["t"], rate_limit=fc.RateLimit(10_000.0, burst=2_000))
    fc.App("127.0.0.1:9092", "g", ["t"], rate_limit=250.5)

    def noop(batch: fc.Batch) -> None:
        pass

    app.plugin(
        name="all",
        timeout="2s",
        rate_limit=fc.RateLimit(1000, burst=500),
        retries=0,
        backoff=("1ms", "1ms"),
        dlq="dead",
        on_failure="dead_letter",
    )(noop)
    app.plugin(name="numbers", timeout=0.5, rate_limit=100.0, retries=5, backoff=(0.01, 2), on_failure="retry")(noop)
    app.plugin(name="stop", batch_size=100, rate_limit=fc.RateLimit(50, burst=100), on_failure="stop")(noop)
    app.plugin(name="defaults_with_dlq", dlq="dead")(noop)
    assert [p.name for p in app.plugins] == ["all", "numbers", "stop", "defaults_with_dlq"]


def test_rate_limit_is_a_frozen_value() -> None:
    """``RateLimit`` compares by value, leaves ``burst`` unset by default and cannot change."""
    limit = fc.RateLimit(5000)
    assert limit == fc.RateLimit(5000.0)
    assert limit.per_second == 5000
    assert limit.burst is None
    assert fc.RateLimit(10, burst=600).burst == 600
    with pytest.raises(dataclasses.FrozenInstanceError):
        limit.burst = 10  # type: ignore[misc]
