"""Whole processes against the real broker: kill -9 at random points, rebalances between two
processes under both assignment strategies, and a second signal. The consumers run
``tests/ledger_app.py`` (``fastconsume run ledger_app:app``), whose plugins write a ledger of
every message they handled, before returning; these tests read the ledgers back."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kafka import RealCluster, committed, fill, new_group

TESTS = Path(__file__).resolve().parent
PLUGINS = ("a", "b", "c")  # as registered by ledger_app with LEDGER_PLUGINS=3
NONE_COMMITTED = -1001

# The classic protocol waits for a kill -9ed member until its session expires: keep that
# short (6 s is the broker's minimum) so restarts do not wait 45 s.
FAST_GROUP: dict[str, object] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}

RecordProperty = Callable[[str, object], None]


@dataclass
class Entry:
    generation: int
    partition: int
    offset: int


@dataclass
class Ledger:
    """One ledger file read back: its entries in file order, and lines a kill tore."""

    entries: list[Entry] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)

    def extend(self, other: Ledger) -> None:
        self.entries.extend(other.entries)
        self.torn.extend(other.torn)

    def offsets(self) -> dict[tuple[int, int], list[int]]:
        """Offsets by (generation, partition), in the order they were written."""
        by: dict[tuple[int, int], list[int]] = defaultdict(list)
        for e in self.entries:
            by[e.generation, e.partition].append(e.offset)
        return by

    def seen(self) -> Counter[tuple[int, int]]:
        return Counter((e.partition, e.offset) for e in self.entries)

    def duplicates(self) -> int:
        return len(self.entries) - len(self.seen())


def read_ledger(path: Path) -> Ledger:
    ledger = Ledger()
    if not path.exists():
        return ledger
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 3 and all(f.isdigit() for f in fields):
            g, p, o = (int(f) for f in fields)
            ledger.entries.append(Entry(g, p, o))
        elif line:
            ledger.torn.append(line)
    return ledger


def ledger_file(directory: Path, plugin: str, process: str) -> Path:
    return directory / f"{plugin}.{process}.ledger"


def missing(ledger: Ledger, sizes: Sequence[int]) -> list[tuple[int, int]]:
    seen = ledger.seen()
    return [(p, o) for p, size in enumerate(sizes) for o in range(size) if (p, o) not in seen]


def skips(ledger: Ledger) -> list[tuple[int, int, int]]:
    """(partition, offset, next offset) where the ledger jumps forward past messages. Going
    back is allowed (after a revoke, a partition comes again from its committed offset)."""
    last: dict[int, int] = {}
    found = []
    for e in ledger.entries:
        if e.partition in last and e.offset > last[e.partition] + 1:
            found.append((e.partition, last[e.partition], e.offset))
        last[e.partition] = e.offset
    return found


def excerpt(ledger: Ledger, partition: int, around: int, width: int = 3) -> list[tuple[int, int]]:
    """(generation, offset) of the partition's entries near an offset, for failure messages."""
    near = [e for e in ledger.entries if e.partition == partition and abs(e.offset - around) <= width]
    return [(e.generation, e.offset) for e in near]


class AppProcess:
    """``fastconsume run ledger_app:app`` in a subprocess, its output in a log file."""

    def __init__(
        self,
        cluster: RealCluster,
        topic: str,
        group: str,
        directory: Path,
        *,
        process: str,
        generation: int = 0,
        plugins: int = len(PLUGINS),
        idle_timeout: float | None = None,
        sleep_ms: float = 10,
        kafka: Mapping[str, object] | None = None,
        **settings: str,
    ) -> None:
        self.name = f"{process}/gen{generation}"
        self.directory = directory
        self.process = process
        self.plugins = PLUGINS[:plugins]
        self.log = directory / f"{process}.gen{generation}.log"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "LEDGER_BOOTSTRAP": cluster.bootstrap,
            "LEDGER_TOPIC": topic,
            "LEDGER_GROUP": group,
            "LEDGER_DIR": str(directory),
            "LEDGER_PROCESS": process,
            "LEDGER_GENERATION": str(generation),
            "LEDGER_PLUGINS": str(plugins),
            "LEDGER_SLEEP_MS": str(sleep_ms),
            "LEDGER_KAFKA": json.dumps(kafka or {}),
            **settings,
        }
        args = [sys.executable, "-m", "fastconsume", "run", "ledger_app:app"]
        if idle_timeout is not None:
            args += ["--idle-timeout", str(idle_timeout)]
        self.started = time.monotonic()
        with self.log.open("wb") as log:
            self.popen = subprocess.Popen(args, cwd=TESTS, env=env, stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return f"--- {self.name} (pid {self.popen.pid}, exit {self.popen.poll()}) output:\n{self.log.read_text()}"

    def ledger_bytes(self) -> list[int]:
        return [_size(ledger_file(self.directory, p, self.process)) for p in self.plugins]

    def wait_until_consuming(self, before: Sequence[int] | None = None, timeout: float = 90) -> float:
        """Waits until every plugin's ledger has grown past ``before`` (by default, their sizes now);
        returns the seconds since the process started."""
        start = self.ledger_bytes() if before is None else list(before)
        deadline = time.monotonic() + timeout
        while True:
            now = self.ledger_bytes()
            if all(n > s for n, s in zip(now, start, strict=True)):
                return time.monotonic() - self.started
            assert self.popen.poll() is None, f"ended before consuming\n{self.output()}"
            assert time.monotonic() < deadline, f"not consuming after {timeout} s: {now}\n{self.output()}"
            time.sleep(0.02)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout} s\n{self.output()}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=30)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@contextmanager
def processes() -> Iterator[list[AppProcess]]:
    """Collects the processes a test starts and kills whichever still run at the end."""
    started: list[AppProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.kill()


def stable_committed(cluster: RealCluster, group: str, topic: str, partitions: int) -> list[int]:
    """The committed offsets once two reads a moment apart agree, so that a commit a killed
    process had already sent is not missed."""
    last = committed(cluster.bootstrap, group, topic, partitions)
    for _ in range(20):
        time.sleep(0.5)
        now = committed(cluster.bootstrap, group, topic, partitions)
        if now == last:
            return now
        last = now
    pytest.fail(f"committed offsets still moving: {last}")


def rng(record_property: RecordProperty) -> random.Random:
    seed = int(os.environ.get("FASTCONSUME_TEST_SEED", random.randrange(2**32)))
    record_property("seed", seed)
    print(f"seed {seed} (FASTCONSUME_TEST_SEED reproduces the kill points)")
    return random.Random(seed)


# --- 1. kill -9 -------------------------------------------------------------------------

KILL_PARTITIONS = 4
KILL_PER_PARTITION = 15_000  # 60,000 messages
KILLS = 3


def test_kill_9_at_random_points_loses_nothing(
    real_cluster: RealCluster, tmp_path: Path, record_property: RecordProperty
) -> None:
    random_ = rng(record_property)
    topic = real_cluster.create_topic(KILL_PARTITIONS)
    fill(real_cluster, topic, KILL_PARTITIONS, KILL_PER_PARTITION)
    sizes = [KILL_PER_PARTITION] * KILL_PARTITIONS
    group = new_group()

    # starts[g][p]: where generation g must begin partition p, from the offsets committed
    # (and read here) before it started.
    starts: list[list[int]] = [[0] * KILL_PARTITIONS]
    with processes() as started:

        def start(generation: int) -> AppProcess:
            proc = AppProcess(
                real_cluster,
                topic,
                group,
                tmp_path,
                process="k",
                generation=generation,
                idle_timeout=3.0,
                sleep_ms=20,
                kafka=FAST_GROUP,
            )
            started.append(proc)
            return proc

        for generation in range(KILLS):
            proc = start(generation)
            consuming = proc.wait_until_consuming()
            time.sleep(random_.uniform(0.2, 1.5))
            assert proc.popen.poll() is None, f"ended before the kill\n{proc.output()}"
            proc.kill()
            offsets = stable_committed(real_cluster, group, topic, KILL_PARTITIONS)
            print(f"generation {generation}: consuming after {consuming:.1f} s, killed; committed {offsets}")
            assert sum(max(o, 0) for o in offsets) < sum(sizes), "a kill landed after the stream was done"
            starts.append([max(o, 0) for o in offsets])

        last = start(KILLS)
        assert last.wait(timeout=150) == 0, last.output()
        print(f"generation {KILLS}: drained in {time.monotonic() - last.started:.1f} s")

    final = committed(real_cluster.bootstrap, group, topic, KILL_PARTITIONS)
    for plugin in PLUGINS:
        ledger = read_ledger(ledger_file(tmp_path, plugin, "k"))
        by = ledger.offsets()
        assert len(ledger.torn) <= KILLS, f"{plugin}: torn lines {ledger.torn}"
        lost = missing(ledger, sizes)
        assert not lost, f"{plugin} never saw {len(lost)} messages, first {lost[:10]}"
        for generation, expected in enumerate(starts):
            for p in range(KILL_PARTITIONS):
                offsets = by.get((generation, p), [])
                if not offsets:
                    continue
                # A new process starts exactly at the committed offset: duplicates come only
                # from the uncommitted window of the process before it.
                assert offsets[0] == expected[p], (
                    f"{plugin}: generation {generation} began partition {p} at {offsets[0]}, "
                    f"but {expected[p]} was committed; ledger near it {excerpt(ledger, p, expected[p])}"
                )
                # ... and goes on in order, one message after the other.
                assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), (
                    f"{plugin}: generation {generation} partition {p} skipped or repeated offsets"
                )
                # Everything committed before it had been written by an earlier generation.
                before = {o for g in range(generation) for o in by.get((g, p), [])}
                uncovered = [o for o in range(expected[p]) if o not in before]
                assert not uncovered, (
                    f"{plugin}: committed {expected[p]} on partition {p} before generation {generation}, "
                    f"but {len(uncovered)} offsets below it were never written, first {uncovered[:10]}"
                )
        duplicates = ledger.duplicates()
        per_generation = dict(Counter(e.generation for e in ledger.entries))
        print(f"plugin {plugin}: {len(ledger.entries)} handled, {duplicates} duplicates, {per_generation}")
        record_property(f"duplicates_{plugin}", duplicates)
    assert final == sizes


# --- 2. rebalance -----------------------------------------------------------------------

REBALANCE_PARTITIONS = 6
REBALANCE_PER_PARTITION = 7_000  # 42,000 messages


@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky"])
def test_rebalance_loses_nothing(
    real_cluster: RealCluster, tmp_path: Path, record_property: RecordProperty, strategy: str
) -> None:
    random_ = rng(record_property)
    topic = real_cluster.create_topic(REBALANCE_PARTITIONS)
    fill(real_cluster, topic, REBALANCE_PARTITIONS, REBALANCE_PER_PARTITION)
    sizes = [REBALANCE_PER_PARTITION] * REBALANCE_PARTITIONS
    group = new_group()
    kafka: dict[str, object] = {**FAST_GROUP, "partition.assignment.strategy": strategy}
    with processes() as started:

        def start(process: str) -> AppProcess:
            proc = AppProcess(
                real_cluster, topic, group, tmp_path, process=process, idle_timeout=5.0, sleep_ms=20, kafka=kafka
            )
            started.append(proc)
            return proc

        first = start("p1")
        first.wait_until_consuming()
        second = start("p2")
        joined = second.wait_until_consuming()
        # Both consume at once: p1 kept partitions through the rebalance and goes on.
        first.wait_until_consuming(timeout=30)
        time.sleep(random_.uniform(0.3, 1.5))
        assert first.popen.poll() is None, f"p1 ended before its SIGTERM\n{first.output()}"
        first_bytes = first.ledger_bytes()
        first.popen.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert first.wait(timeout=20) == 0, first.output()  # well below its shutdown_timeout (30 s)
        stopped = time.monotonic() - signalled
        assert second.wait(timeout=150) == 0, second.output()
        drained = time.monotonic() - signalled

    print(f"{strategy}: p2 consuming {joined:.1f} s after its start; p1 stopped {stopped:.2f} s after SIGTERM")
    print(f"{strategy}: p2 done {drained:.1f} s after p1's SIGTERM; p1 ledgers at SIGTERM {first_bytes} bytes")
    record_property("sigterm_to_exit_seconds", round(stopped, 2))
    assert committed(real_cluster.bootstrap, group, topic, REBALANCE_PARTITIONS) == sizes
    for plugin in PLUGINS:
        ledgers = {p: read_ledger(ledger_file(tmp_path, plugin, p)) for p in ("p1", "p2")}
        both = Ledger()
        for name, ledger in ledgers.items():
            assert not ledger.torn, f"{plugin}: torn lines {ledger.torn}"
            # No partition goes back to a process once it left it here, so a process's plugin
            # must see each of its partitions in order, without skipping any message.
            skipped = skips(ledger)
            assert not skipped, f"{plugin} in {name} skipped messages: (partition, offset, next offset seen) {skipped}"
            both.extend(ledger)
        lost = missing(both, sizes)
        assert not lost, f"{plugin} never saw {len(lost)} messages, first {lost[:10]}"
        assert ledgers["p2"].entries, f"{plugin}: p2 got no partitions\n{second.output()}"
        duplicates = both.duplicates()
        counts = {p: len(ledger.entries) for p, ledger in ledgers.items()}
        partitions = {p: sorted({e.partition for e in ledger.entries}) for p, ledger in ledgers.items()}
        print(f"{strategy} plugin {plugin}: handled {counts}, partitions {partitions}, {duplicates} duplicates")
        record_property(f"duplicates_{plugin}", duplicates)


# --- 3. a second signal -----------------------------------------------------------------


def test_second_sigint_exits_at_once(real_cluster: RealCluster, tmp_path: Path) -> None:
    topic = real_cluster.create_topic(1)
    fill(real_cluster, topic, 1, 1_000)
    group = new_group()
    with processes() as started:
        proc = AppProcess(
            real_cluster,
            topic,
            group,
            tmp_path,
            process="s",
            plugins=1,
            sleep_ms=0,
            LEDGER_STALL="60",
            LEDGER_SHUTDOWN_TIMEOUT="60",
        )
        started.append(proc)
        proc.wait_until_consuming()  # the first call has written its ledger and now sleeps
        proc.popen.send_signal(signal.SIGINT)
        time.sleep(1.5)
        assert proc.popen.poll() is None, f"the graceful stop did not wait for the running call\n{proc.output()}"
        proc.popen.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        code = proc.wait(timeout=30)
        took = time.monotonic() - signalled
    print(f"exit {code} {took:.2f} s after the second SIGINT\n{proc.output()}")
    assert took < 5, f"took {took:.1f} s to exit after the second SIGINT\n{proc.output()}"
    assert code != 0, proc.output()
    first_batch = read_ledger(ledger_file(tmp_path, "a", "s")).entries
    assert first_batch
    assert first_batch[0].offset == 0
    (offset,) = committed(real_cluster.bootstrap, group, topic, 1)
    assert offset in (NONE_COMMITTED, 0), f"committed {offset} although the first batch never returned"
