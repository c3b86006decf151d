"""The engine on a real broker: isolation of a slow plugin, order under a worker pool, a
constant thread count, idling asleep, and the stats that show it."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest

import fastconsume as fc

from kafka import RealCluster, committed, fill, new_group


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_a_slow_plugin_holds_back_only_its_own_lane(real_cluster: RealCluster) -> None:
    partitions, per_partition = 4, 12_500  # 50,000 messages
    total = partitions * per_partition
    bound = 40_000
    topic = real_cluster.create_topic(partitions)
    fill(real_cluster, topic, partitions, per_partition)
    group = new_group()
    app = fc.App(real_cluster.bootstrap, group, [topic])
    counts = {"slow": 0, "b": 0, "c": 0}
    slow_done_when_fast_finished: dict[str, int] = {}
    peaks: list[int] = []
    lock = threading.Lock()

    @app.plugin(batch_size=500, max_queued=bound)
    def slow(batch: fc.Batch) -> None:
        time.sleep(0.2)
        with lock:
            counts["slow"] += len(batch)
        peaks.append(app.stats()["plugins"]["slow"]["queued"])

    def fast(name: str) -> None:
        @app.plugin(name=name, batch_size=500)
        def plugin(batch: fc.Batch) -> None:
            with lock:
                counts[name] += len(batch)
                if counts[name] == total:
                    slow_done_when_fast_finished[name] = counts["slow"]

    fast("b")
    fast("c")
    app.run(idle_timeout=2.0)

    assert counts == {"slow": total, "b": total, "c": total}
    assert sorted(slow_done_when_fast_finished) == ["b", "c"]
    for name, slow_done in slow_done_when_fast_finished.items():
        assert slow_done < total / 2, f"{name} finished when the slow plugin had done {slow_done}"
    stats = app.stats()["plugins"]["slow"]
    assert stats["max_queued"] == bound
    assert stats["queued_peak"] <= bound
    assert max(peaks) <= bound
    assert stats["queued_peak"] > total / 2, "the lane really was backed up"
    assert committed(real_cluster.bootstrap, group, topic, partitions) == [per_partition] * partitions


def test_every_plugin_sees_every_partition_in_order_on_a_pool_of_four(real_cluster: RealCluster) -> None:
    partitions, per_partition = 8, 12_500  # 100,000 messages
    topic = real_cluster.create_topic(partitions)
    fill(real_cluster, topic, partitions, per_partition)
    app = fc.App(real_cluster.bootstrap, new_group(), [topic], workers=4)
    seen: dict[str, dict[int, list[int]]] = {name: defaultdict(list) for name in ("a", "b", "c")}
    threads: list[int] = []

    def record(name: str, concurrency: int, batch_size: int) -> None:
        @app.plugin(name=name, concurrency=concurrency, batch_size=batch_size)
        def plugin(batch: fc.Batch) -> None:
            offsets = seen[name][batch.partition]  # one call per partition at a time: no lock
            offsets.extend(m.offset for m in batch)
            if name == "a":
                threads.append(app.stats()["process"]["threads"])

    record("a", 1, 500)
    record("b", 3, 200)
    record("c", 2, 1000)
    app.run(idle_timeout=2.0)

    for name, by_partition in seen.items():
        assert sorted(by_partition) == list(range(partitions)), name
        for p, offsets in by_partition.items():
            assert offsets == list(range(per_partition)), f"{name} partition {p} out of order or repeated"
    # Never more than at the first call: the run starts no thread per batch. (Fewer is not the
    # run's doing: a client of an earlier test may still be ending its threads.)
    assert max(threads) <= threads[0], f"thread count grew from {threads[0]} to {max(threads)}"
    stats = app.stats()
    for name in ("a", "b", "c"):
        assert stats["plugins"][name]["messages"] == partitions * per_partition
        assert stats["plugins"][name]["in_flight"] == 0
        assert stats["plugins"][name]["latency_p99"] >= stats["plugins"][name]["latency_p50"]


def test_idle_means_asleep(real_cluster: RealCluster) -> None:
    topic = real_cluster.create_topic(2)
    app = fc.App(real_cluster.bootstrap, new_group(), [topic])
    app.plugin(lambda batch: None, name="noop", concurrency=2)
    runner = threading.Thread(target=app.run)
    runner.start()
    try:
        wait_until(lambda: sum(p["assigned"] for p in app.stats()["partitions"].values()) == 2, 60, "assignment")
        time.sleep(1.0)  # let the group settle
        cpu_before = time.process_time()
        time.sleep(5.0)
        used = time.process_time() - cpu_before
    finally:
        app.stop()
        runner.join(timeout=60)
    assert not runner.is_alive()
    assert used < 0.05, f"{used * 1e3:.1f} ms of CPU in 5 idle seconds"


def test_stats_report_partitions_after_a_drain(real_cluster: RealCluster) -> None:
    topic = real_cluster.create_topic(2)
    fill(real_cluster, topic, 2, 300)
    app = fc.App(real_cluster.bootstrap, new_group(), [topic])
    during: list[fc.Stats] = []

    @app.plugin(batch_size=100)
    def look(batch: fc.Batch) -> None:
        during.append(app.stats())

    app.run(idle_timeout=1.5)
    assert during[0]["running"] is True
    partitions = during[-1]["partitions"]
    assert isinstance(partitions, dict)
    assert sorted(partitions) == [f"{topic}[0]", f"{topic}[1]"]
    for entry in partitions.values():
        assert entry["assigned"] is True
        assert entry["position"] == 300
        assert entry["lag"] is None or entry["lag"] >= 0
    after = app.stats()
    assert after["running"] is False
    assert after["messages"] == 600
    for entry in after["partitions"].values():
        assert entry["assigned"] is False
        assert entry["committed"] == 300
        assert entry["lag"] == 0


def test_offsets_are_committed_periodically_while_running(real_cluster: RealCluster) -> None:
    """``auto.commit.interval.ms`` after a batch finishes, its offset is committed (from the
    timer wheel) and reported by ``stats()``, while the run goes on."""
    topic, group = real_cluster.create_topic(2), new_group()
    fill(real_cluster, topic, 2, 100)
    app = fc.App(real_cluster.bootstrap, group, [topic], kafka={"auto.commit.interval.ms": 300})
    seen: list[int] = []
    app.plugin(lambda batch: seen.append(len(batch)), name="count")
    runner = threading.Thread(target=app.run)
    runner.start()
    try:
        wait_until(lambda: sum(seen) == 200, 60, "every message")
        wait_until(
            lambda: [p["committed"] for p in app.stats()["partitions"].values()] == [100, 100],
            10,
            "the periodic commit to show in stats()",
        )
        assert app.stats()["running"] is True
        assert committed(real_cluster.bootstrap, group, topic, 2) == [100, 100]
    finally:
        app.stop()
        runner.join(timeout=60)


@pytest.mark.parametrize("strategy", ["cooperative-sticky", "range"])
def test_a_rebalance_keeps_the_work_of_partitions_that_stay(real_cluster: RealCluster, strategy: str) -> None:
    """Another member joining takes some partitions away while the slow lane is full and
    partitions are paused; the first member must go on with the ones it keeps, with no gap
    (under the eager protocol they are revoked and assigned again), and drain mode must end."""
    partitions, per_partition = 4, 4000
    topic = real_cluster.create_topic(partitions)
    fill(real_cluster, topic, partitions, per_partition)
    group = new_group()
    kafka = {
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
    }
    seen: dict[str, dict[int, list[int]]] = {"slow": defaultdict(list), "fast": defaultdict(list)}
    first = fc.App(real_cluster.bootstrap, group, [topic], kafka=kafka)

    def record(name: str, delay: float) -> None:
        @first.plugin(name=name, batch_size=100, max_queued=400)
        def plugin(batch: fc.Batch) -> None:
            time.sleep(delay)
            seen[name][batch.partition].extend(m.offset for m in batch)

    record("slow", 0.1)
    record("fast", 0.0)
    first_run = threading.Thread(target=first.run, kwargs={"idle_timeout": 3.0})
    first_run.start()
    second = fc.App(real_cluster.bootstrap, group, [topic], kafka=kafka)
    second_seen: dict[int, list[int]] = defaultdict(list)
    second.plugin(name="other")(lambda batch: second_seen[batch.partition].extend(m.offset for m in batch))
    second_run = threading.Thread(target=second.run, kwargs={"idle_timeout": 3.0})
    try:
        wait_until(lambda: sum(len(v) for v in seen["slow"].values()) >= 300, 60, "the slow lane to start")
        second_run.start()
        first_run.join(timeout=120)
        second_run.join(timeout=120)
    finally:
        first.stop()
        second.stop()
        first_run.join(timeout=60)
        if second_run.ident is not None:
            second_run.join(timeout=60)
    assert not first_run.is_alive(), "drain mode must end"
    assert second_seen, "the second member got partitions"
    kept = [p for p in range(partitions) if p not in second_seen]
    assert kept, "the first member kept some partitions"
    for name in ("slow", "fast"):
        for p in kept:
            assert seen[name][p] == list(range(per_partition)), f"{name} partition {p}"
    assert committed(real_cluster.bootstrap, group, topic, partitions) == [per_partition] * partitions
