#!/usr/bin/env python3
"""Drain a pre-produced topic through three trivial plugins and report the cost, as JSON.

One benchmark round, run in a fresh process so that its CPU time is the consumer's alone:

    python benches/drain.py {fastconsume|confluent} --bootstrap B --topic T --group G --messages N

The three plugins count the values (twice) and sum their lengths. ``fastconsume`` runs them
as ``App`` plugins; ``confluent`` is the hand-written confluent-kafka loop they replace
(``consumer.consume(1000)``, then each plugin called on the list of values). The clocks start
when the first message reaches the plugins and stop once the Nth has been through all three,
so start-up, group join and close are not measured. ``time.process_time()`` counts every
thread of the process: librdkafka's, fastconsume's Rust ones and Python's.

Prints one JSON line; :func:`run_round` runs the script and parses that line (the
benchmarks in ``test_drain.py`` use it through ``conftest.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer

import fastconsume as fc

SCRIPT = Path(__file__).resolve()
IMPLEMENTATIONS = ("fastconsume", "confluent")
BATCH_SIZE = 1000
FETCH_WAIT_MAX_MS = 100
IDLE_TIMEOUT = 20.0
"""Seconds without a new message after which a round gives up (and then fails its count)."""
ROUND_TIMEOUT = 300.0
"""Seconds the parent waits for one round's process."""


# ---------------------------------------------------------------------------- child side


@dataclass
class Tally:
    """What the plugins saw, and the clocks around the drain."""

    target: int
    count_a: int = 0
    count_b: int = 0
    seen: int = 0  # messages through the third plugin; the drain ends when all three reach target
    total_bytes: int = 0
    start: tuple[float, float, os.times_result] | None = None
    end: tuple[float, float, os.times_result] | None = None
    threads_start: dict[str, float] = field(default_factory=dict)
    threads_end: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return min(self.count_a, self.count_b, self.seen) >= self.target

    def mark_start(self) -> None:
        if self.start is None:
            self.threads_start = thread_cpu()  # read before the clocks start: not measured
            self.start = _clocks()

    def mark_end(self) -> None:
        if self.end is None:
            self.end = _clocks()
            self.threads_end = thread_cpu()

    def report(self, impl: str, began: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "impl": impl,
            "messages": self.seen,
            "counts": [self.count_a, self.count_b, self.seen],
            "bytes": self.total_bytes,
            "cpu_seconds": None,
            "wall_seconds": None,
            **self.extra,
        }
        if self.start is not None and self.end is not None:
            (cpu0, wall0, times0), (cpu1, wall1, times1) = self.start, self.end
            out.update(
                cpu_seconds=cpu1 - cpu0,
                wall_seconds=wall1 - wall0,
                user_seconds=times1.user - times0.user,
                system_seconds=times1.system - times0.system,
                first_message_after=wall0 - began,
                thread_cpu_seconds={
                    name: round(cpu - self.threads_start.get(name, 0.0), 4)
                    for name, cpu in sorted(self.threads_end.items(), key=lambda item: -item[1])
                },
            )
        out["process_cpu_seconds"] = time.process_time()  # the whole process, start-up and close included
        return out


def _clocks() -> tuple[float, float, os.times_result]:
    return time.process_time(), time.perf_counter(), os.times()


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far per thread name (Linux's 15-character ``comm``), summed over the
    threads of one name; empty without /proc. For the report only: where the time goes."""
    cpu: dict[str, float] = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            # schedstat's first field: nanoseconds on a CPU. Without it, stat(5)'s utime and
            # stime (fields 14 and 15, in clock ticks) after the parenthesised name.
            if (task / "schedstat").exists():
                seconds = int((task / "schedstat").read_text().split()[0]) / 1e9
            else:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
        cpu[name] = cpu.get(name, 0.0) + seconds
    return cpu


def drain_fastconsume(bootstrap: str, topic: str, group: str, tally: Tally) -> None:
    app = fc.App(bootstrap, group, [topic], kafka={"fetch.wait.max.ms": FETCH_WAIT_MAX_MS})

    # Each plugin has its own lane (one thread at a time per lane, so each counter has one
    # writer); the drain ends when the last of the three has seen every message.
    def finish_if_done() -> None:
        if tally.done:
            tally.mark_end()
            app.stop()

    @app.plugin(batch_size=BATCH_SIZE)
    def count_a(batch: fc.Batch) -> None:
        tally.mark_start()
        tally.count_a += len(batch)
        finish_if_done()

    @app.plugin(batch_size=BATCH_SIZE)
    def count_b(batch: fc.Batch) -> None:
        tally.mark_start()
        tally.count_b += len(batch)
        finish_if_done()

    @app.plugin(batch_size=BATCH_SIZE)
    def total_bytes(batch: fc.Batch) -> None:
        tally.mark_start()
        values = batch.values()
        tally.total_bytes += sum(len(v) for v in values if v is not None)
        tally.seen += len(values)
        finish_if_done()

    app.run(idle_timeout=IDLE_TIMEOUT)
    tally.extra["stats"] = app.stats()


def drain_confluent(bootstrap: str, topic: str, group: str, tally: Tally) -> None:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
            "fetch.wait.max.ms": FETCH_WAIT_MAX_MS,
        }
    )

    # The same three plugins, taking the list of values instead of a Batch.
    def count_a(values: list[bytes | None]) -> None:
        tally.count_a += len(values)

    def count_b(values: list[bytes | None]) -> None:
        tally.count_b += len(values)

    def total_bytes(values: list[bytes | None]) -> None:
        tally.total_bytes += sum(len(v) for v in values if v is not None)
        tally.seen += len(values)

    errors = 0
    consumer.subscribe([topic])
    try:
        idle_since = time.monotonic()
        while not tally.done:
            msgs = consumer.consume(BATCH_SIZE, timeout=1.0)
            if not msgs:
                if time.monotonic() - idle_since > IDLE_TIMEOUT:
                    break
                continue
            idle_since = time.monotonic()
            tally.mark_start()
            values = [m.value() for m in msgs if m.error() is None]
            errors += len(msgs) - len(values)
            count_a(values)
            count_b(values)
            total_bytes(values)
        if tally.done:
            tally.mark_end()
    finally:
        consumer.close()
    tally.extra["errors"] = errors


def main(argv: Sequence[str] | None = None) -> int:
    began = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("impl", choices=IMPLEMENTATIONS)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--messages", required=True, type=int)
    args = parser.parse_args(argv)
    tally = Tally(target=args.messages)
    drain = drain_fastconsume if args.impl == "fastconsume" else drain_confluent
    drain(args.bootstrap, args.topic, args.group, tally)
    print(json.dumps(tally.report(args.impl, began), default=str), flush=True)
    return 0


# ---------------------------------------------------------------------------- parent side


PARTITIONS = 4
VALUE_SIZE = 200


@dataclass(frozen=True)
class DrainPlan:
    """How much one session drains: ``messages`` per round, ``rounds`` per implementation."""

    messages: int
    rounds: int


@dataclass
class DrainReport:
    """Per implementation, the medians its benchmark recorded; read by the summary table."""

    plan: DrainPlan | None = None
    rows: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundResult:
    """One round's measurement, as reported by the drain process."""

    impl: str
    messages: int
    counts: tuple[int, ...]
    bytes: int
    cpu_seconds: float
    wall_seconds: float
    raw: dict[str, Any]

    @property
    def cpu_us_per_msg(self) -> float:
        return self.cpu_seconds * 1e6 / self.messages

    @property
    def msg_per_s(self) -> float:
        return self.messages / self.wall_seconds


def run_round(impl: str, *, bootstrap: str, topic: str, group: str, messages: int) -> RoundResult:
    """Runs one drain in a fresh process and returns what it reported.

    Raises ``RuntimeError`` if the process fails or reports no complete drain; the caller
    checks the counts against what it produced.
    """
    raw = run_child(SCRIPT, impl, bootstrap=bootstrap, topic=topic, group=group, messages=messages)
    return RoundResult(
        impl=impl,
        messages=int(raw["messages"]),
        counts=tuple(int(c) for c in raw["counts"]),
        bytes=int(raw["bytes"]),
        cpu_seconds=float(raw["cpu_seconds"]),
        wall_seconds=float(raw["wall_seconds"]),
        raw=raw,
    )


def run_child(script: Path, impl: str, *, bootstrap: str, topic: str, group: str, messages: int) -> dict[str, Any]:
    """Runs ``script impl`` (a drain of ``messages`` in a fresh process) and returns the JSON
    line it printed last; raises ``RuntimeError`` if it failed or did not drain them all."""
    cmd = [
        sys.executable, str(script), impl,
        "--bootstrap", bootstrap, "--topic", topic, "--group", group, "--messages", str(messages),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=ROUND_TIMEOUT
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    raw: dict[str, Any] = json.loads(lines[-1])
    if raw["cpu_seconds"] is None or raw["wall_seconds"] is None:
        raise RuntimeError(
            f"{impl} drained {raw['messages']} of {messages} messages before giving up "
            f"(no message for {IDLE_TIMEOUT:.0f} s): {raw}\n{proc.stderr[-4000:]}"
        )
    return raw


class ReplayClock:
    """A timer for pytest-benchmark that stands still except when a round is replayed: the
    benchmarks advance it by what each round measured in its own process, so that
    pytest-benchmark's statistics hold those values rather than process start-up."""

    def __init__(self, holds: str) -> None:
        self.now = 0.0
        self.holds = holds

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __repr__(self) -> str:
        return f"ReplayClock({self.holds})"


if __name__ == "__main__":
    sys.exit(main())
