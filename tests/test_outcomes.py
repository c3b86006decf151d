"""Every plugin failure has an owner (issue 9, cases 1 and 2): whatever a plugin raises or
returns, sync or async, its call ends as a success or a failure under its policy, the run
ends as it should, nothing unfinished is committed and nothing finished is left uncommitted.
Plus a property-based test of all of it, on the mock cluster."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastconsume as fc
from fastconsume.errors import PluginSignatureError

from kafka import Cluster, MockKafka, committed, fill, new_group, read_topic

NONE_COMMITTED = -1001
EXITS = [SystemExit(3), KeyboardInterrupt()]


class Odd(BaseException):
    """A BaseException that does not ask the process to exit: a failure like any other."""


def run_and_time(app: fc.App, idle_timeout: float = 2.0) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        app.run(idle_timeout=idle_timeout)
    except BaseException as error:  # the test asserts which
        return error, time.monotonic() - started
    return None, time.monotonic() - started


def fastconsume_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("fastconsume-")]


# --- case 1: SystemExit / KeyboardInterrupt -----------------------------------------------


@pytest.mark.parametrize("exit_error", EXITS, ids=["SystemExit", "KeyboardInterrupt"])
@pytest.mark.parametrize("is_async", [True, False], ids=["async", "sync"])
def test_a_plugin_asking_the_process_to_exit_stops_the_run_with_a_plugin_error(
    cluster: Cluster, is_async: bool, exit_error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    topic = cluster.create_topic(1)
    fill(cluster, topic, 1, 1000)
    group = new_group()
    app = fc.App(cluster.bootstrap, group, [topic])
    attempts: list[int] = []
    other_saw: list[int] = []

    # retries=3: whatever the policy, an exit is not retried.
    if is_async:

        @app.plugin(retries=3, backoff=("10ms", "10ms"))
        async def exits(batch: fc.Batch) -> None:
            attempts.append(batch.attempt)
            raise exit_error

        @app.plugin
        async def other(batch: fc.Batch) -> None:
            other_saw.extend(m.offset for m in batch)
    else:

        @app.plugin(retries=3, backoff=("10ms", "10ms"))
        def exits(batch: fc.Batch) -> None:
            attempts.append(batch.attempt)
            raise exit_error

        @app.plugin
        def other(batch: fc.Batch) -> None:
            other_saw.extend(m.offset for m in batch)

    caplog.set_level(logging.WARNING)
    error, took = run_and_time(app, idle_timeout=2.0)
    assert isinstance(error, fc.PluginError), f"{error!r} after {took:.1f} s"
    # Once the group is joined the failure is immediate; it used to hang for good.
    assert took < 20, f"took {took:.1f} s"
    assert type(error.__cause__) is type(exit_error)
    message = str(error)
    assert '"exits"' in message
    assert f"{topic}[0] offsets 0..=" in message
    assert "whatever the plugin's policy" in message
    assert attempts == [1], "not retried"
    assert committed(cluster.bootstrap, group, topic, 1) == [NONE_COMMITTED], "nothing of exits' finished"
    assert fastconsume_threads() == [] or set(fastconsume_threads()) == {"fastconsume-log"}
    asyncio_errors = [r for r in caplog.records if r.name == "asyncio"]
    assert asyncio_errors == [], "nothing is left for asyncio to report"


def test_a_plugin_exit_leaves_finished_work_of_the_others_committed(mock_cluster: MockKafka) -> None:
    """Exits on its 3rd call (offsets 20..29): what both plugins finished before is committed."""
    topic = mock_cluster.create_topic(1)
    fill(mock_cluster, topic, 1, 100)
    group = new_group()
    app = fc.App(mock_cluster.bootstrap, group, [topic])
    calls = itertools.count()

    @app.plugin(batch_size=10)
    async def exits(batch: fc.Batch) -> None:
        if next(calls) == 2:
            raise SystemExit(1)

    @app.plugin(batch_size=100)
    def whole(batch: fc.Batch) -> None:
        pass

    error, _ = run_and_time(app)
    assert isinstance(error, fc.PluginError)
    assert "offsets 20..=29" in str(error)
    assert committed(mock_cluster.bootstrap, group, topic, 1) == [20]


def test_the_cli_exits_non_zero_when_a_plugin_raises_system_exit(real_cluster: Cluster, tmp_path: Path) -> None:
    topic = real_cluster.create_topic(1)
    fill(real_cluster, topic, 1, 1000)
    group = new_group()
    (tmp_path / "exits.py").write_text(
        "import fastconsume as fc\n"
        f"app = fc.App({real_cluster.bootstrap!r}, {group!r}, [{topic!r}])\n"
        "@app.plugin\n"
        "async def exits(batch):\n"
        "    raise SystemExit(0)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "fastconsume", "run", "exits:app", "--idle-timeout", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0, result.stderr
    assert result.returncode != 130
    assert time.monotonic() - started < 60
    assert "exits" in result.stderr
    assert committed(real_cluster.bootstrap, group, topic, 1) == [NONE_COMMITTED]


def test_an_event_loop_that_ends_under_the_plugins_fails_the_run(mock_cluster: MockKafka) -> None:
    topic = mock_cluster.create_topic(1)
    fill(mock_cluster, topic, 1, 100)
    group = new_group()
    app = fc.App(mock_cluster.bootstrap, group, [topic])

    @app.plugin(batch_size=10, retries=3)
    async def stops_the_loop(batch: fc.Batch) -> None:
        asyncio.get_running_loop().stop()
        await asyncio.sleep(0.5)

    error, took = run_and_time(app)
    assert isinstance(error, fc.PluginError), repr(error)
    assert took < 20
    assert "event loop of async plugins ended unexpectedly" in str(error)
    assert committed(mock_cluster.bootstrap, group, topic, 1) == [NONE_COMMITTED]
    assert "fastconsume-asyncio" not in fastconsume_threads()


@pytest.mark.parametrize("is_async", [True, False], ids=["async", "sync"])
def test_other_base_exceptions_are_failures_under_the_plugins_policy(mock_cluster: MockKafka, is_async: bool) -> None:
    topic, dlq = mock_cluster.create_topic(1), mock_cluster.create_topic(1)
    fill(mock_cluster, topic, 1, 20)
    group = new_group()
    app = fc.App(mock_cluster.bootstrap, group, [topic])
    attempts: list[int] = []

    def fail(batch: fc.Batch) -> None:
        attempts.append(batch.attempt)
        raise Odd("odd")

    async def fail_async(batch: fc.Batch) -> None:
        fail(batch)

    app.add_plugin(fail_async if is_async else fail, name="odd", retries=1, backoff=("10ms", "10ms"), dlq=dlq)
    error, _ = run_and_time(app, idle_timeout=1.0)
    assert error is None
    assert attempts == [1, 2], "retried like an Exception"
    assert len(read_topic(mock_cluster.bootstrap, dlq)) == 20, "then dead-lettered"
    assert committed(mock_cluster.bootstrap, group, topic, 1) == [20]


def test_an_async_plugin_cancelling_itself_is_a_failure_that_says_so(mock_cluster: MockKafka) -> None:
    topic = mock_cluster.create_topic(1)
    fill(mock_cluster, topic, 1, 10)
    app = fc.App(mock_cluster.bootstrap, new_group(), [topic])

    @app.plugin(retries=0)
    async def cancels(batch: fc.Batch) -> None:
        raise asyncio.CancelledError

    error, _ = run_and_time(app)
    assert isinstance(error, fc.PluginError), repr(error)
    assert "was cancelled, not by its deadline" in str(error)


# --- case 2: plugins whose body never runs ----------------------------------------------


def test_generator_functions_are_not_plugins() -> None:
    app = fc.App("127.0.0.1:9092", "g", ["t"])

    def gen(batch: fc.Batch) -> Iterator[None]:
        yield

    async def agen(batch: fc.Batch) -> object:
        yield

    class GeneratorCall:
        def __call__(self, batch: fc.Batch) -> Iterator[None]:
            yield

    for plugin, what in [(gen, "generator function"), (agen, "async generator"), (GeneratorCall(), "generator")]:
        with pytest.raises(PluginSignatureError, match=what) as raised:
            app.add_plugin(plugin)
        assert "never run" in str(raised.value)
        with pytest.raises(PluginSignatureError):
            app.plugin(plugin)
    assert app.plugins == ()


async def _work() -> None:
    pass


def _returns_coroutine(batch: fc.Batch) -> object:
    return _work()


def _returns_generator(batch: fc.Batch) -> object:
    return (m for m in batch)


class Pending:
    """An awaitable that is not a coroutine, as a future is."""

    def __await__(self) -> Iterator[None]:
        yield


def _returns_future(batch: fc.Batch) -> object:
    return Pending()


async def _returns_unawaited(batch: fc.Batch) -> object:
    return _work()


@pytest.mark.parametrize(
    ("plugin", "says"),
    [
        (_returns_coroutine, "declare the plugin `async def`"),
        (_returns_generator, "instead of yielding"),
        (_returns_future, "awaitable (Pending), which fastconsume does not await"),
        (_returns_unawaited, "write `await ...`"),
    ],
    ids=["sync-coroutine", "sync-generator", "sync-future", "async-unawaited"],
)
def test_a_plugin_returning_unfinished_work_fails_its_call(
    cluster: Cluster, plugin: Callable[[fc.Batch], object], says: str
) -> None:
    topic = cluster.create_topic(1)
    fill(cluster, topic, 1, 1000)
    group = new_group()
    app = fc.App(cluster.bootstrap, group, [topic])
    app.add_plugin(plugin, name="p", retries=1, backoff=("10ms", "10ms"))
    error, _ = run_and_time(app)
    assert isinstance(error, fc.PluginError), repr(error)
    assert "(attempt 2)" in str(error), "the policy applies: retried once"
    assert isinstance(error.__cause__, TypeError)
    assert says in str(error.__cause__)
    assert committed(cluster.bootstrap, group, topic, 1) == [NONE_COMMITTED]


def test_a_returned_value_is_ignored(mock_cluster: MockKafka) -> None:
    topic = mock_cluster.create_topic(1)
    fill(mock_cluster, topic, 1, 100)
    group = new_group()
    app = fc.App(mock_cluster.bootstrap, group, [topic])
    app.add_plugin(len, name="returns_a_count", batch_size=30)
    error, _ = run_and_time(app, idle_timeout=1.0)
    assert error is None
    assert committed(mock_cluster.bootstrap, group, topic, 1) == [100]


@pytest.mark.parametrize(
    "register",
    [
        lambda app: app.add_plugin(len, retires=3),
        lambda app: app.plugin(retires=3),
        lambda app: fc.App.plugin(app, len, retires=3),
    ],
    ids=["add_plugin", "plugin-decorator", "plugin-bare"],
)
def test_unknown_plugin_options_suggest_the_closest(register: Callable[[fc.App], object]) -> None:
    app = fc.App("127.0.0.1:9092", "g", ["t"])
    with pytest.raises(fc.ConfigError, match=r"retires: unknown plugin option; did you mean 'retries'\?"):
        register(app)
    with pytest.raises(fc.ConfigError, match="expected one of: name, batch_size"):
        app.add_plugin(len, zzzz=1)


# --- commits at call granularity ---------------------------------------------------------


def test_a_partial_failure_commits_up_to_the_first_failed_message(mock_cluster: MockKafka) -> None:
    topic = mock_cluster.create_topic(1)
    fill(mock_cluster, topic, 1, 100)
    group = new_group()
    app = fc.App(mock_cluster.bootstrap, group, [topic])

    @app.plugin(batch_size=50, retries=0)
    def partial(batch: fc.Batch) -> None:
        bad = [i for i, m in enumerate(batch) if m.offset in (37, 41)]
        if bad:
            raise fc.PartialFailure(bad, ValueError("bad"))

    error, _ = run_and_time(app)
    assert isinstance(error, fc.PluginError)
    assert committed(mock_cluster.bootstrap, group, topic, 1) == [37]


# --- the property ----------------------------------------------------------------------

ACTIONS = ("ok", "value", "sleep", "error", "odd", "exit", "interrupt", "partial", "mistake")
FAILING = {"error", "odd", "partial", "mistake"}
FATAL = {"exit", "interrupt"}
PARTITIONS, PER_PARTITION = 2, 40


@dataclass(frozen=True)
class Spec:
    is_async: bool
    policy: str  # "stop", "retry" (a few retries, then stop) or "dead_letter"
    retries: int
    batch_size: int
    plan: tuple[str, ...]  # the actions of the plugin's first calls; later ones succeed


@dataclass
class Call:
    partition: int
    offsets: list[int]
    attempt: int
    action: str
    failed: list[int] = field(default_factory=list)  # offsets a partial failure named


specs = st.builds(
    Spec,
    is_async=st.booleans(),
    policy=st.sampled_from(["stop", "retry", "dead_letter"]),
    retries=st.integers(0, 2),
    batch_size=st.sampled_from([5, 10, 40]),
    plan=st.lists(st.sampled_from(ACTIONS), max_size=6).map(tuple),
)


def make_plugin(spec: Spec, calls: list[Call]) -> Callable[[fc.Batch], object]:
    counter = itertools.count()
    lock = threading.Lock()

    def act(batch: fc.Batch) -> str:
        with lock:
            n = next(counter)
        action = spec.plan[n] if n < len(spec.plan) else "ok"
        offsets = [m.offset for m in batch]
        call = Call(batch.partition, offsets, batch.attempt, action)
        if action == "partial":
            call.failed = offsets[len(offsets) // 2 :]
        calls.append(call)
        if action == "error":
            raise ValueError("boom")
        if action == "odd":
            raise Odd("odd")
        if action == "exit":
            raise SystemExit(3)
        if action == "interrupt":
            raise KeyboardInterrupt
        if action == "partial":
            raise fc.PartialFailure(range(len(offsets) // 2, len(offsets)), ValueError("half"))
        return action

    def sync_plugin(batch: fc.Batch) -> object:
        action = act(batch)
        if action == "sleep":
            time.sleep(0.005)
        if action == "mistake":
            return _work() if batch.attempt % 2 else (m for m in batch)
        return 42 if action == "value" else None

    async def async_plugin(batch: fc.Batch) -> object:
        action = act(batch)
        if action == "sleep":
            await asyncio.sleep(0.005)
        if action == "mistake":
            return _work()
        return 42 if action == "value" else None

    return async_plugin if spec.is_async else sync_plugin


def options(spec: Spec, dlq: str) -> dict[str, object]:
    base: dict[str, object] = {"batch_size": spec.batch_size, "backoff": ("5ms", "10ms")}
    if spec.policy == "stop":
        return {**base, "retries": 0}
    if spec.policy == "retry":
        return {**base, "retries": max(spec.retries, 1)}
    return {**base, "retries": spec.retries, "dlq": dlq}


def thread_counts() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/task"))


def wait_for_threads(baseline: tuple[int, int], timeout: float = 5.0) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while (now := thread_counts()) != baseline and time.monotonic() < deadline:
        time.sleep(0.02)
    return now


@pytest.fixture(scope="module")
def baseline(mock_cluster: MockKafka) -> tuple[int, int]:
    """Thread counts once the process-wide ones exist (fastconsume's log thread starts at the
    first record; the mock cluster's threads at its creation): a run that logs a warning."""
    topic = mock_cluster.create_topic(1)
    fill(mock_cluster, topic, 1, 10)
    app = fc.App(mock_cluster.bootstrap, new_group(), [topic])
    app.add_plugin(lambda batch: None, name="warm", batch_size=5)

    @app.plugin(retries=1, backoff=("5ms", "5ms"))  # a retry logs a warning
    async def fails(batch: fc.Batch) -> None:
        raise ValueError("warm-up")

    with pytest.raises(fc.PluginError):
        app.run(idle_timeout=0.5)
    committed(mock_cluster.bootstrap, new_group(), topic, 1)
    time.sleep(0.2)
    return thread_counts()


def failures_that_end_the_run(plugins: list[Spec], calls: dict[str, list[Call]], dlq: str) -> set[str]:
    """The plugins whose calls the policies say end the run: an exit always does; another
    failure does when its last attempt fails, unless the plugin dead-letters."""
    final: set[str] = set()
    for (name, plugin_calls), spec in zip(calls.items(), plugins, strict=True):
        attempts = int(str(options(spec, dlq)["retries"])) + 1
        for call in plugin_calls:
            ends_run = call.action in FAILING and spec.policy != "dead_letter" and call.attempt == attempts
            if call.action in FATAL or ends_run:
                final.add(name)
    return final


def finished_or_dead_lettered(calls: dict[str, list[Call]], bootstrap: str, dlq: str) -> dict[str, dict[int, set[int]]]:
    """Per plugin and partition, the offsets it finished or had dead-lettered (acknowledged:
    they are in the topic)."""
    done: dict[str, dict[int, set[int]]] = {name: {p: set() for p in range(PARTITIONS)} for name in calls}
    for name, plugin_calls in calls.items():
        for call in plugin_calls:
            if call.action in {"ok", "value", "sleep"}:
                done[name][call.partition].update(call.offsets)
            elif call.action == "partial":
                done[name][call.partition].update(set(call.offsets) - set(call.failed))
    for message in read_topic(bootstrap, dlq):
        headers = {k: v.decode() for k, v in message.headers() or [] if v is not None}
        plugin, partition = headers["fastconsume.plugin"], int(headers["fastconsume.original.partition"])
        done[plugin][partition].add(int(headers["fastconsume.original.offset"]))
    return done


@settings(
    max_examples=int(os.environ.get("FASTCONSUME_TEST_EXAMPLES", "30")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plugins=st.lists(specs, min_size=1, max_size=3))
def test_every_outcome_is_owned_and_commits_are_exactly_what_finished(
    mock_cluster: MockKafka, baseline: tuple[int, int], plugins: list[Spec]
) -> None:
    before = wait_for_threads(baseline)  # librdkafka may still be ending an earlier client's
    topic, dlq = mock_cluster.create_topic(PARTITIONS), mock_cluster.create_topic(1)
    fill(mock_cluster, topic, PARTITIONS, PER_PARTITION)
    group = new_group()
    app = fc.App(mock_cluster.bootstrap, group, [topic], shutdown_timeout=10)
    calls: dict[str, list[Call]] = {}
    for i, spec in enumerate(plugins):
        name = f"p{i}"
        calls[name] = []
        app.add_plugin(make_plugin(spec, calls[name]), name=name, **options(spec, dlq))

    error, took = run_and_time(app, idle_timeout=0.5)
    assert took < 15, f"the run took {took:.1f} s"

    final = failures_that_end_the_run(plugins, calls, dlq)
    if final:
        assert isinstance(error, fc.PluginError), f"expected a PluginError from {sorted(final)}, got {error!r}"
        assert any(f'plugin "{name}"' in str(error) for name in final), str(error)
    else:
        assert error is None, f"expected a clean run, got {error!r}"

    done = finished_or_dead_lettered(calls, mock_cluster.bootstrap, dlq)
    offsets = committed(mock_cluster.bootstrap, group, topic, PARTITIONS)
    for p in range(PARTITIONS):
        finished_by_all = 0
        while finished_by_all < PER_PARTITION and all(finished_by_all in done[n][p] for n in done):
            finished_by_all += 1
        at = 0 if offsets[p] == NONE_COMMITTED else offsets[p]
        # No committed offset passes a message some plugin neither finished nor dead-lettered,
        # and everything every plugin finished before the (graceful) end is committed.
        assert at == finished_by_all, f"partition {p}: committed {offsets[p]}, finished by all {finished_by_all}"

    after = wait_for_threads(before)
    assert after == before, f"threads (Python, OS) {after} after the run, {before} before"
