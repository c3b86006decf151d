"""The testing kit for plugin authors: ``run_plugin`` and the pytest fixtures (``bench_plugin``
runs in ``benches/test_plugins.py``). Each run joins a consumer group on the mock cluster."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from typing import cast

import pytest

import fastconsume as fc
from fastconsume.pytest_plugin import TopicFactory
from fastconsume.testing import IDLE_TIMEOUT, MessageSpec, MockCluster, PluginRun, run_plugin


def test_a_sync_plugin_sees_every_message_in_order_and_its_results_are_kept() -> None:
    messages = [f"v{i}" for i in range(9)]
    keyed: list[MessageSpec] = [(b"k1", b"keyed-1"), {"key": "k2", "value": b"keyed-2", "partition": 0}]

    run = run_plugin(lambda batch: batch.values(), [*messages, *keyed], partitions=3, batch_size=2, name="values")

    by_partition: dict[int, list[bytes | None]] = defaultdict(list)
    for message in run.messages:
        by_partition[message.partition].append(message.value)
    # Round-robin over the partitions, in order within each; a mapping may name its partition.
    assert by_partition == {
        0: [b"v0", b"v3", b"v6", b"keyed-1", b"keyed-2"],
        1: [b"v1", b"v4", b"v7"],
        2: [b"v2", b"v5", b"v8"],
    }
    assert [(m.key, m.value) for m in run.messages if m.key is not None] == [(b"k1", b"keyed-1"), (b"k2", b"keyed-2")]
    assert run.errors == []
    assert run.calls == len(run.results) == run.stats["batches"]
    results = [cast("list[bytes]", result) for result in run.results]  # each call's batch.values()
    assert all(1 <= len(values) <= 2 for values in results)
    assert sorted(v for values in results for v in values) == sorted(m.value or b"" for m in run.messages)
    assert run.stats["messages"] == 11


def test_a_failing_call_is_recorded_once_per_attempt_and_ends_the_run_without_raising() -> None:
    def fails_on_bad(batch: fc.Batch) -> int:
        if b"bad" in batch.values():
            raise ValueError(f"bad value, attempt {batch.attempt}")
        return len(batch)

    run = run_plugin(fails_on_bad, [b"ok", b"bad", b"later"], batch_size=1, retries=1, backoff=("10ms", "20ms"))

    assert [str(error) for error in run.errors] == ["bad value, attempt 1", "bad value, attempt 2"]
    assert run.results == [1]
    # on_failure="stop": the run ended at the failure, so the partition's later message never came.
    assert run.values == [b"ok", b"bad", b"bad"]
    assert run.calls == 3
    assert run.stats["errors"] == 2


def test_an_async_plugin_runs_and_a_call_cancelled_at_its_timeout_is_an_error() -> None:
    async def slow_first_time(batch: fc.Batch) -> int:
        if batch.attempt == 1:
            await asyncio.sleep(30)
        await asyncio.sleep(0)
        return len(batch)

    run = run_plugin(slow_first_time, [b"a", b"b"], timeout="100ms", retries=1, backoff=("10ms", "10ms"))

    assert run.results == [2]
    assert len(run.errors) == 1
    assert isinstance(run.errors[0], asyncio.CancelledError)
    assert run.stats["timeouts"] == 1


def test_a_class_plugin_is_set_up_and_torn_down_once_from_a_thread() -> None:
    log: list[object] = []

    class Collect:
        def setup(self) -> None:
            log.append("setup")

        def __call__(self, batch: fc.Batch) -> None:
            log.append(batch.values())

        async def teardown(self) -> None:
            log.append("teardown")

    runs: list[PluginRun] = []
    thread = threading.Thread(target=lambda: runs.append(run_plugin(Collect, [b"a", b"b", b"c"], batch_size=2)))
    thread.start()
    thread.join()

    (run,) = runs
    assert log[0] == "setup"
    assert log[-1] == "teardown"
    assert log.count("setup") == log.count("teardown") == 1
    assert [v for values in log[1:-1] for v in values] == [b"a", b"b", b"c"]  # type: ignore[attr-defined]
    assert run.results == [None] * run.calls
    assert run.stats["messages"] == 3


def test_a_failing_setup_raises() -> None:
    class NoDatabase:
        def setup(self) -> None:
            raise ConnectionError("no database")

        def __call__(self, batch: fc.Batch) -> None:
            pass

    with pytest.raises(fc.PluginError, match="setup") as raised:
        run_plugin(NoDatabase, [b"a"])
    assert isinstance(raised.value.__cause__, ConnectionError)


def test_a_partial_failure_dead_letters_only_the_failed_message() -> None:
    def reject_poison(batch: fc.Batch) -> list[bytes | None]:
        bad = [i for i, value in enumerate(batch.values()) if value == b"poison"]
        if bad:
            raise fc.PartialFailure(bad, ValueError("poisoned"))
        return batch.values()

    run = run_plugin(
        reject_poison, [b"a", b"poison", b"c"], dlq="kit-dead-letters", retries=1, backoff=("10ms", "10ms")
    )

    assert len(run.errors) == 2
    assert all(isinstance(error, fc.PartialFailure) for error in run.errors)
    assert run.values == [b"a", b"poison", b"c", b"poison"]  # the retry holds the failed message alone
    assert run.stats["dead_lettered"] == 1


def test_a_run_ends_as_its_last_call_returns_after_retries_and_a_dead_letter() -> None:
    """The run stops once the plugin has returned for everything and no retry is due, not at
    the idle timeout; the stop still completes the last calls and their dead letters."""

    def flaky(batch: fc.Batch) -> None:
        if batch.attempt == 1:
            raise ConnectionError("first attempts fail")
        if b"poison" in batch.values():
            raise fc.PartialFailure([batch.values().index(b"poison")], ValueError("poisoned"))

    started = time.monotonic()
    run = run_plugin(
        flaky, [b"a", b"b", b"poison", b"c"], partitions=3, retries=2, backoff=("200ms", "200ms"), dlq="kit-flaky"
    )
    took = time.monotonic() - started

    assert took < IDLE_TIMEOUT * 0.8, f"the run took {took:.1f} s: it waited for the idle timeout"
    assert sorted({value or b"" for value in run.values}) == [b"a", b"b", b"c", b"poison"]
    assert all(run.values.count(value) == 2 for value in (b"a", b"b", b"c")), run.values  # failed once, then done
    assert run.values.count(b"poison") == 3  # retried twice, then dead-lettered
    assert run.stats["dead_lettered"] == 1
    assert (run.stats["queued"], run.stats["in_flight"], run.stats["dead_letters_pending"]) == (0, 0, 0)


def test_a_run_without_messages_ends_once_its_partitions_are_assigned() -> None:
    started = time.monotonic()
    run = run_plugin(len, [], partitions=2)
    assert time.monotonic() - started < IDLE_TIMEOUT * 0.8
    assert (run.calls, run.results, run.errors) == (0, [], [])
    assert run.stats["batches"] == 0


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([{"value": b"a", "headers": [("h", b"1")]}], "message 0: headers are not supported"),
        ([b"a", {"value": b"b", "partition": 2}], "message 1: partition must be an integer from 0 to 1"),
        ([(b"k", b"v", b"extra")], "message 0: a tuple must be"),
        ([{"val": b"a"}], "message 0: unknown key 'val'"),
        ([b"a", None], "message 1: expected bytes, str"),
        (b"abc", "messages must be an iterable of messages"),
    ],
)
def test_messages_it_cannot_write_are_a_config_error(messages: object, problem: str) -> None:
    with pytest.raises(fc.ConfigError, match=problem):
        run_plugin(len, messages, partitions=2)  # type: ignore[arg-type]


def test_the_pytest_fixtures_give_a_mock_cluster_and_fresh_topics(
    fastconsume_mock: MockCluster, fastconsume_topic: TopicFactory
) -> None:
    topic = fastconsume_topic([b"a", ("k", "b"), {"value": "c", "partition": 1}], partitions=2)
    assert fastconsume_topic() != topic
    app = fc.App(fastconsume_mock.bootstrap, "kit-fixtures", topic)
    seen: list[tuple[int, bytes | None, bytes | None]] = []
    app.add_plugin(lambda batch: seen.extend((m.partition, m.key, m.value) for m in batch), name="collect")
    app.run(idle_timeout=1.0)
    assert sorted(seen, key=lambda m: (m[0], m[2])) == [(0, None, b"a"), (1, b"k", b"b"), (1, None, b"c")]
