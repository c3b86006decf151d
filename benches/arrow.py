#!/usr/bin/env python3
"""Drain a pre-produced topic through one plugin that sums the value lengths, on the Arrow
export or over ``batch.values()``, and report the cost, as JSON.

One benchmark round, run in a fresh process so that its CPU time is the consumer's alone:

    python benches/arrow.py {arrow|values} --bootstrap B --topic T --group G --messages N

``arrow`` sums with ``pyarrow.compute.sum(pyarrow.compute.binary_length(...))`` on
``pyarrow.array(batch.arrow_values())``: no Python object per message. ``values`` loops
``sum(len(v) for v in batch.values())``: a ``bytes`` per message. Both processes import
pyarrow and warm its kernels before the run, and the clocks run from the first message's
call to the one that brings the count to N (as in ``drain.py``), so start-up, imports, group
join and close are not measured.

Two CPU times are reported: the process's (``time.process_time()``, every thread: librdkafka's,
fastconsume's source and workers, Python's), and the plugin's own (``time.thread_time()``
around the summing, in each call), which is what the two ways differ in: fetching and
building the batches costs both the same. The plugin's own leaves out each worker thread's
first call, which pays for that thread's first use of pyarrow or of the bytes allocator
(about 0.3 ms for pyarrow, that is 6 ns a message in a 50,000-message round).

Prints one JSON line; :func:`run_round` runs the script and parses that line (the
benchmark in ``test_arrow.py`` uses it).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

import fastconsume as fc

from drain import BATCH_SIZE, FETCH_WAIT_MAX_MS, IDLE_TIMEOUT, RoundResult, run_child, thread_cpu

SCRIPT = Path(__file__).resolve()
IMPLEMENTATIONS = ("arrow", "values")


@dataclass
class Tally:
    """What the plugin saw, and the clocks around the drain."""

    target: int
    seen: int = 0
    total_bytes: int = 0
    plugin_seconds: float = 0.0
    """CPU time of the calls' summing, on their threads, but for each thread's first call."""
    plugin_messages: int = 0
    """The messages of the calls in ``plugin_seconds``."""
    threads: set[int] = field(default_factory=set)
    """The threads that have made a call."""
    start: tuple[float, float] | None = None
    end: tuple[float, float] | None = None
    threads_start: dict[str, float] = field(default_factory=dict)
    threads_end: dict[str, float] = field(default_factory=dict)

    def mark_start(self) -> None:
        if self.start is None:
            self.threads_start = thread_cpu()  # read before the clocks start: not measured
            self.start = (time.process_time(), time.perf_counter())

    def count(self, messages: int, size: int) -> bool:
        """Adds a call's messages; true once the drain is complete (the clocks then stop)."""
        self.seen += messages
        self.total_bytes += size
        if self.seen >= self.target and self.end is None:
            self.end = (time.process_time(), time.perf_counter())
            self.threads_end = thread_cpu()
        return self.end is not None

    def report(self, impl: str) -> dict[str, Any]:
        out: dict[str, Any] = {"impl": impl, "messages": self.seen, "bytes": self.total_bytes}
        out.update(cpu_seconds=None, wall_seconds=None)
        out.update(plugin_cpu_seconds=self.plugin_seconds, plugin_messages=self.plugin_messages)
        if self.start is not None and self.end is not None:
            (cpu0, wall0), (cpu1, wall1) = self.start, self.end
            out.update(
                cpu_seconds=cpu1 - cpu0,
                wall_seconds=wall1 - wall0,
                thread_cpu_seconds={
                    name: round(cpu - self.threads_start.get(name, 0.0), 4)
                    for name, cpu in sorted(self.threads_end.items(), key=lambda item: -item[1])
                },
            )
        return out


def sum_with_arrow(batch: fc.Batch) -> int:
    return sum_with_arrow_of(batch.arrow_values())


def sum_with_arrow_of(column: object) -> int:
    lengths = pc.binary_length(pa.array(column))
    return int(pc.sum(lengths).as_py() or 0)


def sum_over_values(batch: fc.Batch) -> int:
    # As a plugin would write it for a topic without null values (the benchmark's has none).
    return sum(len(v) for v in batch.values())  # type: ignore[arg-type]


def drain(impl: str, bootstrap: str, topic: str, group: str, tally: Tally) -> None:
    sum_lengths = sum_with_arrow if impl == "arrow" else sum_over_values
    app = fc.App(bootstrap, group, [topic], kafka={"fetch.wait.max.ms": FETCH_WAIT_MAX_MS})

    # One lane with the default concurrency of 1: one call at a time, so one writer.
    @app.plugin(batch_size=BATCH_SIZE)
    def total_bytes(batch: fc.Batch) -> None:
        tally.mark_start()
        began = time.thread_time()
        size = sum_lengths(batch)
        took = time.thread_time() - began
        if threading.get_ident() in tally.threads:
            tally.plugin_seconds += took
            tally.plugin_messages += len(batch)
        tally.threads.add(threading.get_ident())
        if tally.count(len(batch), size):
            app.stop()

    app.run(idle_timeout=IDLE_TIMEOUT)


class _Exported:
    """A pyarrow array seen only through the PyCapsule protocol, as ``arrow_values()`` is."""

    def __init__(self, array: pa.Array) -> None:
        self._array = array

    def __arrow_c_array__(self, requested_schema: object = None) -> tuple[object, object]:
        return self._array.__arrow_c_array__(requested_schema)


def warm_up() -> None:
    """Does once what the first call would otherwise do in the measured run: pyarrow's import
    of a large binary array through the protocol, and the loading of the compute kernels."""
    for _ in range(3):
        sum_with_arrow_of(_Exported(pa.array([b"warm", None] * 500, type=pa.large_binary())))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("impl", choices=IMPLEMENTATIONS)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--messages", required=True, type=int)
    args = parser.parse_args(argv)
    warm_up()
    tally = Tally(target=args.messages)
    drain(args.impl, args.bootstrap, args.topic, args.group, tally)
    print(json.dumps(tally.report(args.impl), default=str), flush=True)
    return 0


def run_round(impl: str, *, bootstrap: str, topic: str, group: str, messages: int) -> RoundResult:
    """Runs one drain in a fresh process and returns what it reported.

    Raises ``RuntimeError`` if the process fails or reports no complete drain; the caller
    checks the count and bytes against what it produced.
    """
    raw = run_child(SCRIPT, impl, bootstrap=bootstrap, topic=topic, group=group, messages=messages)
    return RoundResult(
        impl=impl,
        messages=int(raw["messages"]),
        counts=(int(raw["messages"]),),
        bytes=int(raw["bytes"]),
        cpu_seconds=float(raw["cpu_seconds"]),
        wall_seconds=float(raw["wall_seconds"]),
        raw=raw,
    )


if __name__ == "__main__":
    sys.exit(main())
