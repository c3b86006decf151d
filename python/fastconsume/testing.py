"""Kafka without a broker, for tests, demos and benchmarks, and a kit for testing plugins.

- :class:`MockCluster` is librdkafka's in-process Kafka cluster; :func:`produce` writes to it
  (or to any broker).
- :func:`run_plugin` runs one plugin through the real engine on given messages and returns
  what it returned and raised, as a :class:`PluginRun`.
- :func:`bench_plugin` measures a plugin's messages per second and CPU microseconds per
  message under pytest-benchmark, so a plugin's own CI can catch regressions.
- The pytest plugin ``fastconsume.pytest_plugin`` (loaded automatically once fastconsume is
  installed) adds the fixtures ``fastconsume_mock`` and ``fastconsume_topic``.

>>> from fastconsume.testing import MockCluster, produce
>>> cluster = MockCluster()
>>> cluster.create_topic("events", partitions=2)
>>> produce(cluster.bootstrap, "events", [b"a", b"b", b"c"])
3

Testing a plugin (each run joins a fresh consumer group on a shared mock cluster, which takes
the mock about three seconds)::

    from fastconsume.testing import run_plugin

    def upper(batch):
        return [value.upper() for value in batch.values()]

    def test_upper():
        run = run_plugin(upper, [b"a", b"b"], batch_size=10)
        assert run.results == [[b"A", b"B"]]
        assert run.errors == []
"""

from __future__ import annotations

import inspect
import resource
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

from ._app import App
from ._core import Batch, Message, MockCluster, produce
from ._options import PluginOptions
from ._plugins import Plugin, make_plugin
from ._stats import PluginStats
from .errors import ConfigError, PartialFailure, PluginError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "Benchmark",
    "MessageSpec",
    "MockCluster",
    "PluginRun",
    "bench_plugin",
    "make_topic",
    "produce",
    "run_plugin",
]

MessageSpec: TypeAlias = bytes | str | tuple[bytes | str | None, bytes | str] | Mapping[str, Any]
"""A message to produce: a value (``bytes``, or ``str`` written as UTF-8), a ``(key, value)``
pair, or a mapping with ``value`` and optionally ``key`` and ``partition``."""

_MESSAGE_KEYS = ("key", "value", "headers", "partition")

IDLE_TIMEOUT = 10.0
"""Seconds without anything to do after which a run gives up waiting for messages. Runs
normally end sooner: as soon as the plugin has seen every message and has nothing left to do."""


@dataclass(frozen=True)
class PluginRun:
    """What a plugin did in :func:`run_plugin`. Calls are numbered in the order they started."""

    results: list[object]
    """Each successful call's return value, in call order."""
    errors: list[BaseException]
    """Each exception a call raised, in call order (a call that was retried and failed again
    appears once per attempt)."""
    calls: int
    """Plugin calls made, retries included."""
    messages: list[Message]
    """Every message the plugin was given, in call order; a retried message appears again."""
    stats: PluginStats
    """The plugin's entry of ``App.stats()["plugins"]`` after the run."""

    @property
    def values(self) -> list[bytes | None]:
        """The values of :attr:`messages`."""
        return [message.value for message in self.messages]


class Benchmark(Protocol):
    """What :func:`bench_plugin` uses of pytest-benchmark's ``benchmark`` fixture."""

    @property
    def extra_info(self) -> dict[str, Any]: ...

    def pedantic(
        self,
        target: Callable[..., object],
        *,
        setup: Callable[[], object] | None = ...,
        teardown: Callable[..., object] | None = ...,
        rounds: int = ...,
        iterations: int = ...,
    ) -> object: ...


# ------------------------------------------------------------------------------ messages


@dataclass(frozen=True)
class _Record:
    key: bytes | None
    value: bytes
    partition: int


def _bytes(value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise ConfigError(f"{what}: expected bytes or str, got {type(value).__name__}")


def _records(messages: Iterable[MessageSpec], partitions: int) -> list[_Record]:
    """The messages as records, spread round-robin over the partitions unless they name one."""
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ConfigError(f"partitions must be a positive integer, got {partitions!r}")
    if isinstance(messages, (bytes, str, Mapping)):
        raise ConfigError(f"messages must be an iterable of messages, got one {type(messages).__name__}")
    records: list[_Record] = []
    spread = 0
    for i, message in enumerate(messages):
        what = f"message {i}"
        key, value, partition = _parts(message, what)
        if partition is None:
            partition, spread = spread % partitions, spread + 1
        elif isinstance(partition, bool) or not isinstance(partition, int) or not 0 <= partition < partitions:
            raise ConfigError(f"{what}: partition must be an integer from 0 to {partitions - 1}, got {partition!r}")
        records.append(
            _Record(
                key=None if key is None else _bytes(key, f"{what} key"),
                value=_bytes(value, f"{what} value"),
                partition=partition,
            )
        )
    return records


def _parts(message: object, what: str) -> tuple[object, object, object]:
    """A message's key, value and partition, as given (``None`` where not given)."""
    if isinstance(message, (bytes, str)):
        return None, message, None
    if isinstance(message, tuple):
        if len(message) != 2:
            raise ConfigError(f"{what}: a tuple must be (key, value), got {len(message)} items")
        return message[0], message[1], None
    if isinstance(message, Mapping):
        unknown = sorted(set(message) - set(_MESSAGE_KEYS))
        if unknown:
            raise ConfigError(f"{what}: unknown key {unknown[0]!r}; a message has {', '.join(_MESSAGE_KEYS)}")
        if message.get("headers"):
            raise ConfigError(f"{what}: headers are not supported yet: produce() cannot write them")
        if "value" not in message:
            raise ConfigError(f"{what}: a message mapping needs a 'value'")
        return message.get("key"), message["value"], message.get("partition")
    raise ConfigError(f"{what}: expected bytes, str, a (key, value) tuple or a mapping, got {type(message).__name__}")


def _write(bootstrap: str, topic: str, records: list[_Record], partitions: int) -> list[int]:
    """Produces the records and returns how many each partition received. One ``produce``
    call per run of keyed or unkeyed records of a partition, since a call has keys for all
    of its values or for none; each call waits for its acknowledgements, so order holds."""
    counts = [0] * partitions
    for p in range(partitions):
        mine = [r for r in records if r.partition == p]
        start = 0
        while start < len(mine):
            keyed = mine[start].key is not None
            end = start
            while end < len(mine) and (mine[end].key is not None) == keyed:
                end += 1
            run = mine[start:end]
            keys = [r.key for r in run if r.key is not None] if keyed else None
            counts[p] += produce(bootstrap, topic, [r.value for r in run], keys=keys, partition=p)
            start = end
    return counts


def make_topic(
    cluster: MockCluster, messages: Iterable[MessageSpec] = (), *, partitions: int = 1, topic: str | None = None
) -> str:
    """Creates a topic of ``partitions`` partitions on ``cluster``, named ``topic`` or a new
    unique name, produces ``messages`` to it as :func:`run_plugin` takes them, and returns
    its name.

    >>> cluster = MockCluster()
    >>> make_topic(cluster, [b"a", ("key", "b"), {"value": b"c", "partition": 1}], partitions=2, topic="orders")
    'orders'
    """
    records = _records(messages, partitions)
    name = topic if topic is not None else _new_name("topic")
    cluster.create_topic(name, partitions)
    _write(cluster.bootstrap, name, records, partitions)
    return name


_shared_lock = threading.Lock()
_shared: MockCluster | None = None
_shared_topics: set[str] = set()


def _shared_cluster() -> MockCluster:
    """One mock cluster for every run of this process, started on first use."""
    global _shared  # noqa: PLW0603 -- created lazily, then shared for the process's life
    with _shared_lock:
        if _shared is None:
            _shared = MockCluster()
        return _shared


def _ensure_topic(cluster: MockCluster, topic: str) -> None:
    """Creates a dead-letter topic on the shared cluster once (the mock may not create it)."""
    with _shared_lock:
        if topic not in _shared_topics:
            cluster.create_topic(topic, 1)
            _shared_topics.add(topic)


def _new_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ------------------------------------------------------------------------------ the tap


class _Observer(Protocol):
    def started(self, batch: Batch) -> int: ...

    def ended(self, call: int, batch: Batch, result: object, error: BaseException | None) -> None: ...


class _Tap:
    """Stands in for a plugin in the App: calls it, tells an observer about each call, and
    passes ``setup`` and ``teardown`` through, noting whether one of them failed."""

    def __init__(self, plugin: Plugin, observer: _Observer) -> None:
        self._plugin = plugin
        self._observer = observer
        self.hook_failed = False

    def setup(self) -> object:
        return self._hook(self._plugin.setup())

    def teardown(self) -> object:
        return self._hook(self._plugin.teardown())

    def _hook(self, hook: Callable[[], object] | None) -> object:
        if hook is None:
            return None
        try:
            result = hook()
        except BaseException:
            self.hook_failed = True
            raise
        return self._awaiting(result) if inspect.isawaitable(result) else result

    async def _awaiting(self, awaitable: Awaitable[object]) -> object:
        try:
            return await awaitable
        except BaseException:
            self.hook_failed = True
            raise


class _SyncTap(_Tap):
    def __call__(self, batch: Batch) -> object:
        call = self._observer.started(batch)
        try:
            result = self._plugin.func(batch)
        except BaseException as error:
            self._observer.ended(call, batch, None, error)
            raise
        self._observer.ended(call, batch, result, None)
        return result


class _AsyncTap(_Tap):
    async def __call__(self, batch: Batch) -> object:
        call = self._observer.started(batch)
        try:
            result = await cast(Awaitable[object], self._plugin.func(batch))
        except BaseException as error:  # cancellation at the timeout included
            self._observer.ended(call, batch, None, error)
            raise
        self._observer.ended(call, batch, result, None)
        return result


def _tapped(plugin: Plugin, observer: _Observer) -> _Tap:
    return _AsyncTap(plugin, observer) if plugin.is_async else _SyncTap(plugin, observer)


def _clocks() -> tuple[float, float]:
    """Wall seconds, and CPU seconds of the whole process (every thread: librdkafka's, the
    engine's, Python's, and the in-process mock broker's)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------ run_plugin


class _Recording:
    """Every call of a :func:`run_plugin` run, in the order they started, and the run's end.

    The end is known from the calls themselves, as each one returns: once the plugin has seen
    every message, no call is running and no failed call awaits a retry, the engine has no call
    left to make, and the run is stopped there. The stop is graceful: it waits for the calls
    that just returned to be completed (their dead letters written), then commits.

    Whether a failed call is retried is the plugin's documented policy, applied as the engine
    applies it: ``on_failure="retry"``, or ``batch.attempt`` not past ``retries``; a
    ``PartialFailure`` naming no message is a success, and a returned awaitable (or, from a
    sync plugin, a generator) is a failure, since its work did not happen. Should the engine
    retry none the less (a call on a partition revoked meanwhile is not retried), the run ends
    by its idle timeout instead."""

    def __init__(self, plugin: Plugin, messages: int, stop: Callable[[], None]) -> None:
        self.batches: list[list[Message]] = []
        self.outcomes: list[tuple[object, BaseException | None] | None] = []
        self._seen: set[tuple[int, int]] = set()
        self._messages = messages
        self._retries = plugin.retries
        self._retry_forever = plugin.failure_policy == "retry"
        self._sync = not plugin.is_async
        self._stop = stop
        self._lock = threading.Lock()
        self._running = 0
        self._retry_due: set[int] = set()  # partitions whose last call failed and comes again
        self._stopped = False

    def started(self, batch: Batch) -> int:
        messages = list(batch)
        with self._lock:
            self.batches.append(messages)
            self.outcomes.append(None)
            self._seen.update((m.partition, m.offset) for m in messages)
            self._running += 1
            # A partition's next call after a failure is its retry: later messages wait for it.
            self._retry_due.discard(batch.partition)
            return len(self.batches) - 1

    def ended(self, call: int, batch: Batch, result: object, error: BaseException | None) -> None:
        with self._lock:
            self.outcomes[call] = (result, error)
            self._running -= 1
            if self._retried(batch, result, error):
                self._retry_due.add(batch.partition)
            done = not self._running and not self._retry_due and len(self._seen) >= self._messages
            stop = done and not self._stopped
            self._stopped = self._stopped or done
        if stop:
            self._stop()

    def _retried(self, batch: Batch, result: object, error: BaseException | None) -> bool:
        if error is None:
            failed = inspect.isawaitable(result) or (
                self._sync and (inspect.isgenerator(result) or inspect.isasyncgen(result))
            )
        else:
            failed = not (isinstance(error, PartialFailure) and not error.indexes)
        return failed and (self._retry_forever or batch.attempt <= self._retries)


def run_plugin(
    plugin: object,
    messages: Iterable[MessageSpec],
    *,
    partitions: int = 1,
    name: str | None = None,
    **options: Unpack[PluginOptions],
) -> PluginRun:
    """Runs ``plugin`` through the real engine on ``messages`` and returns what it did.

    The messages are written to a new topic of ``partitions`` partitions on a mock cluster
    shared by the process (spread round-robin unless a mapping names its ``partition``;
    keys do not choose it), then an :class:`~fastconsume.App` with a new consumer group
    consumes them with ``plugin`` registered by ``App.add_plugin(plugin, **options)``. So
    batching, retries, timeouts, ``setup``/``teardown``, async plugins, ``PartialFailure``
    and dead-lettering (``dlq=``: the topic is created on the mock) behave as in
    production. The run ends once the plugin has seen every message and nothing is left to
    retry or dead-letter.

    A failing call does not fail the run: its exception is recorded in
    :attr:`PluginRun.errors` and handed to the engine as usual. When retries run out with
    ``on_failure="stop"`` (the default without ``dlq``), the run ends there and later messages
    may never reach the plugin; the :class:`~fastconsume.errors.PluginError` is not raised
    (its cause is in ``errors``). With ``on_failure="retry"`` a plugin that never succeeds
    never ends the run. A failing ``setup`` or ``teardown`` raises ``PluginError``.

    Safe to call from any thread. Each call takes about three seconds on the mock cluster,
    most of it the consumer group's join.

    Args:
        plugin: A callable taking a :class:`~fastconsume.Batch` (sync or ``async``), an
            instance of a class with such a ``__call__``, or such a class.
        messages: Values (``bytes``, or ``str`` written as UTF-8), ``(key, value)`` pairs,
            or mappings with ``value`` and optionally ``key`` and ``partition``.
        partitions: Partitions of the topic.
        name: The plugin's name, as ``App.add_plugin`` takes it.
        options: Options of ``App.add_plugin`` (:class:`~fastconsume.PluginOptions`).
    """
    record = make_plugin(plugin, name, options)  # checked before anything starts
    records = _records(messages, partitions)
    cluster = _shared_cluster()
    topic = _new_name("run-plugin")
    cluster.create_topic(topic, partitions)
    counts = _write(cluster.bootstrap, topic, records, partitions)
    if record.dlq is not None:
        _ensure_topic(cluster, record.dlq)

    app = App(cluster.bootstrap, _new_name("run-plugin"), topic, read_config=False)
    recording = _Recording(record, sum(counts), app.stop)
    tap = _tapped(record, recording)
    app.add_plugin(tap, name=record.name, **options)
    try:
        # Without messages there is nothing to wait for once the partitions are assigned.
        app.run(idle_timeout=IDLE_TIMEOUT if records else 0.0)
    except PluginError:
        # A call's failure ended the run (on_failure="stop"): its cause is recorded. A
        # failing setup or teardown is the test's problem, so it goes on up.
        if tap.hook_failed or not any(o is not None and o[1] is not None for o in recording.outcomes):
            raise

    results: list[object] = []
    errors: list[BaseException] = []
    for outcome in recording.outcomes:
        if outcome is None:  # still running when a stop gave up on it
            continue
        result, error = outcome
        if error is None:
            results.append(result)
        else:
            errors.append(error)
    return PluginRun(
        results=results,
        errors=errors,
        calls=len(recording.batches),
        messages=[m for batch in recording.batches for m in batch],
        stats=app.stats()["plugins"][record.name],
    )


# ------------------------------------------------------------------------------ bench_plugin


class _BenchRound:
    """One drain of the topic by a new consumer group, on its own thread.

    The first plugin call waits at a gate, so the group join happens before the benchmark's
    timer starts (in :meth:`wait_for_first_call`, pytest-benchmark's untimed setup);
    :meth:`drain` opens the gate and returns once the plugin has returned for every message.
    """

    def __init__(self, bootstrap: str, topic: str, plugin: Plugin, options: PluginOptions, total: int) -> None:
        self.total = total
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None
        self._done_messages = 0
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._arrived = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._app = App(bootstrap, _new_name("bench-plugin"), topic, read_config=False)
        self._app.add_plugin(_tapped(plugin, self), name=plugin.name, **options)
        self._thread = threading.Thread(target=self._run, name="fastconsume-bench-plugin", daemon=True)
        self._finished = False

    def _run(self) -> None:
        try:
            self._app.run(idle_timeout=IDLE_TIMEOUT)
        except BaseException as error:  # re-raised on the benchmark's thread
            self._error = error
        finally:
            self._arrived.set()
            self._done.set()

    def started(self, batch: Batch) -> int:
        self._arrived.set()
        self._gate.wait()
        return 0

    def ended(self, call: int, batch: Batch, result: object, error: BaseException | None) -> None:
        if error is not None:
            return  # its messages come again, or never count
        with self._lock:
            self._done_messages += len(batch)
            if self._done_messages >= self.total and self.end is None:
                self.end = _clocks()
                self._done.set()

    def wait_for_first_call(self) -> None:
        self._thread.start()
        self._arrived.wait()
        self._check()

    def drain(self) -> None:
        if self.start is not None:  # called again on a drained round (pytest-benchmark's profiling)
            return
        self.start = _clocks()
        self._gate.set()
        self._done.wait()
        self._check()

    def finish(self, *, quiet: bool = False) -> None:
        """Stops the run and waits for it, then raises its error unless ``quiet``; once."""
        if self._finished:
            return
        self._finished = True
        self._gate.set()
        self._app.stop()
        if self._thread.ident is not None:
            self._thread.join()
        if self._error is not None and not quiet:
            raise self._error

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._done.is_set() and self.end is None and self.start is not None:
            raise RuntimeError(
                f"bench_plugin: the run ended after the plugin returned for {self._done_messages} "
                f"of {self.total} messages (failed calls do not count)"
            )


def bench_plugin(
    benchmark: Benchmark,
    plugin: object,
    messages: Iterable[MessageSpec],
    *,
    partitions: int = 1,
    rounds: int = 5,
    name: str | None = None,
    **options: Unpack[PluginOptions],
) -> dict[str, float]:
    """Benchmarks ``plugin`` draining ``messages`` through the engine, under pytest-benchmark.

    The messages are produced once, to a new topic on a mock cluster; each round then drains
    all of them with a new consumer group through an :class:`~fastconsume.App` with ``plugin``
    added with ``options`` (as in :func:`run_plugin`). A round is timed from the first plugin
    call to the return of the call that completes the count, so the group join is not
    measured; pytest-benchmark's statistics are those times, so
    ``--benchmark-compare-fail`` can gate on them.

    ``benchmark.extra_info`` receives ``msg_per_s`` and ``cpu_us_per_msg`` (the medians over
    rounds; CPU is the whole process's, user plus system, in-process mock broker included),
    their per-round values, ``messages`` and ``rounds``. Every message must be handled
    successfully: a round whose calls do not all succeed fails.

    In a plugin's own benchmarks (``pytest --benchmark-autosave``, then
    ``--benchmark-compare --benchmark-compare-fail=median:10%`` in CI)::

        def test_parse_speed(benchmark):
            result = bench_plugin(benchmark, parse, [b'{"n": 1}'] * 20_000, batch_size=500)
            assert result["cpu_us_per_msg"] > 0

    Returns:
        ``{"msg_per_s": ..., "cpu_us_per_msg": ...}``, the medians.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds!r}")
    record = make_plugin(plugin, name, options)
    records = _records(messages, partitions)
    if not records:
        raise ConfigError("bench_plugin needs at least one message")
    cluster = _shared_cluster()
    topic = _new_name("bench-plugin")
    cluster.create_topic(topic, partitions)
    total = sum(_write(cluster.bootstrap, topic, records, partitions))
    if record.dlq is not None:
        _ensure_topic(cluster, record.dlq)

    started: list[_BenchRound] = []

    def setup() -> tuple[tuple[_BenchRound], dict[str, Any]]:
        round_ = _BenchRound(cluster.bootstrap, topic, record, options, total)
        started.append(round_)
        round_.wait_for_first_call()
        return (round_,), {}

    try:
        benchmark.pedantic(_BenchRound.drain, setup=setup, teardown=_BenchRound.finish, rounds=rounds, iterations=1)
    except BaseException:
        for round_ in started:
            round_.finish(quiet=True)
        raise
    for round_ in started:  # with --benchmark-disable, pytest-benchmark skips teardown
        round_.finish()

    measured = [r for r in started if r.start is not None and r.end is not None]
    rates = [total / max(r.end[0] - r.start[0], 1e-9) for r in measured if r.end and r.start]
    cpu_us = [(r.end[1] - r.start[1]) / total * 1e6 for r in measured if r.end and r.start]
    summary = {"msg_per_s": statistics.median(rates), "cpu_us_per_msg": statistics.median(cpu_us)}
    benchmark.extra_info.update(
        summary,
        messages=total,
        rounds=len(measured),
        msg_per_s_rounds=rates,
        cpu_us_per_msg_rounds=cpu_us,
    )
    return summary
