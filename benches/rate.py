#!/usr/bin/env python3
"""A consumer under a steady produced load: its CPU share of a core over a steady-state
window, its context switches and per-thread CPU, and the delivery latency of its messages.

One round is three processes, so that the consumer's CPU is its own alone:

    python benches/rate.py produce --bootstrap B --topic T --partitions P --rate R --seconds S
    python benches/rate.py consume {fastconsume|confluent} --bootstrap B --topic T --group G \\
        --partitions P --plugins N

and the parent (:func:`run_round`, used by ``test_rate.py`` through ``conftest.py``), which
starts the consumer, waits until it holds every partition, starts the producer, and samples
the consumer's ``/proc`` entries at the start and end of the window: from ``warmup`` seconds
after the producer's first message to ``tail`` seconds before its last, so that start-up,
group join and the end of the run are not measured. Once the producer is done, the parent
writes the number it sent to the consumer's stdin, and the consumer stops when every plugin
has seen that many messages, then prints one JSON line.

The producer writes ``rate`` messages/s of :data:`VALUE_SIZE` bytes round-robin over the
partitions, ``chunk`` messages at a time (:data:`PACE_MESSAGES` unless the plan says
otherwise) on a fixed schedule: a smooth stream, as from many independent producers, where
bursts of a thousand would make batching look easier than it is. Its ``linger.ms`` is
librdkafka's default, :data:`PRODUCER_LINGER_MS`. Each message's timestamp is its CreateTime,
set by librdkafka when ``produce()`` is called; the consumer runs on the same machine, so a
plugin call's ``time.time()`` minus it is the message's delivery latency.

The consumers are the two of ``drain.py``, each with its library's defaults (as a user runs
it; drain.py's ``fetch.wait.max.ms`` is for throughput, and at a steady rate fastconsume sizes
its fetches to linger unless told otherwise): ``fastconsume`` runs plugins as ``App``
plugins; ``confluent`` is the hand-written confluent-kafka loop they replace
(``consume(1000)``, then each plugin called on the list of values). The plugins are
trivial: the first sums the values' lengths (and samples latencies), the others count them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from confluent_kafka import Consumer, Producer, TopicPartition

import fastconsume as fc

from drain import BATCH_SIZE, IMPLEMENTATIONS, VALUE_SIZE

SCRIPT = Path(__file__).resolve()
SEED_RATE = 14_666
"""Messages per second of the service this project replaces."""
SEED_PARTITIONS = 6
SEED_PLUGINS = 3
PRODUCER_LINGER_MS = 5
PACE_MESSAGES = 100
"""Messages the producer writes at once: at 14,666 msg/s, every 6.8 ms. Finer pacing (a
``chunk`` of 10 is every 0.7 ms at that rate) makes the broker answer fetches more often, so
both consumers wake more often for the same messages."""
LATENCY_STRIDE = 10
"""Every 10th message a plugin sees has its latency taken: enough for a p99, and cheap
(one ``Message`` or ``timestamp()`` call per 10 messages) for both implementations."""
READY_TIMEOUT = 60.0
"""Seconds the parent waits for the consumer to hold every partition."""
END_TIMEOUT = 120.0
"""Seconds the parent waits for the consumer to finish once the producer is done."""


def json_value(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes.

    >>> value = json_value(200)
    >>> len(value), json.loads(value)["kind"]
    (200, 'event')
    """
    head = json.dumps({"id": 12345, "kind": "event", "pad": ""}, separators=(",", ":"))
    return head.replace('"pad":""', '"pad":"' + "x" * (size - len(head)) + '"').encode()


# ---------------------------------------------------------------------------- producer


def produce_main(args: argparse.Namespace) -> int:
    """Writes ``rate`` messages/s for ``seconds`` s; prints a JSON line when the first message
    is sent, and one with the totals at the end."""
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "linger.ms": PRODUCER_LINGER_MS,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
        }
    )
    failed = 0

    def delivered(error: object, _message: object) -> None:
        nonlocal failed
        if error is not None:
            failed += 1

    value = json_value(VALUE_SIZE)
    producer.list_topics(args.topic, timeout=30)  # connected and the topic known before the clock starts
    total = int(args.rate * args.seconds)
    interval = args.chunk / args.rate
    sent = ticks = 0
    started = time.monotonic()
    print(json.dumps({"event": "started", "epoch": time.time()}), flush=True)
    while sent < total:
        # On a schedule, not after a sleep of its own: a late tick is followed at once by the next.
        time.sleep(max(0.0, started + ticks * interval - time.monotonic()))
        ticks += 1
        upto = min(total, sent + args.chunk)
        while sent < upto:
            try:
                producer.produce(args.topic, value, partition=sent % args.partitions, on_delivery=delivered)
            except BufferError:
                producer.poll(0.001)  # the local queue is full: let librdkafka catch up
                continue
            sent += 1
        producer.poll(0)
    elapsed = time.monotonic() - started
    left = producer.flush(60)
    print(json.dumps({"sent": sent, "seconds": elapsed, "undelivered": left, "failed": failed}), flush=True)
    return 0 if left == 0 and failed == 0 else 1


# ---------------------------------------------------------------------------- consumer


@dataclass
class Tally:
    """What the plugins saw. ``target`` arrives on stdin once the producer is done."""

    plugins: int
    counts: list[int] = field(default_factory=list)
    total_bytes: int = 0
    target: int | None = None
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (call epoch, ms)
    sampled_upto: int = 0  # messages the latency sampler has passed

    def __post_init__(self) -> None:
        self.counts = [0] * self.plugins

    @property
    def done(self) -> bool:
        return self.target is not None and min(self.counts) >= self.target

    def sample_indices(self, n: int) -> range:
        """Of the next ``n`` messages, the indices whose latency is taken: one in
        :data:`LATENCY_STRIDE` of all messages, whatever the batch sizes.

        >>> t = Tally(plugins=1)
        >>> list(t.sample_indices(15)), list(t.sample_indices(12))
        ([0, 10], [5])
        """
        start = -self.sampled_upto % LATENCY_STRIDE
        self.sampled_upto += n
        return range(start, n, LATENCY_STRIDE)


def read_target(tally: Tally, stream: IO[str], on_target: Callable[[], None]) -> None:
    """Reads the number of messages produced from ``stream``, then calls ``on_target``."""
    line = stream.readline()
    tally.target = int(line) if line.strip() else 0
    on_target()


def consume_fastconsume(args: argparse.Namespace, tally: Tally) -> dict[str, Any]:
    app = fc.App(args.bootstrap, args.group, [args.topic])

    def finish_if_done() -> None:
        if tally.done:
            app.stop()

    # Each plugin has its own lane (one call at a time, so each counter has one writer).
    @app.plugin(batch_size=BATCH_SIZE)
    def total_bytes(batch: fc.Batch) -> None:
        now = time.time()
        for i in tally.sample_indices(len(batch)):
            ts = batch[i].timestamp
            if ts is not None:
                tally.latencies.append((now, now * 1e3 - ts))
        values = batch.values()
        tally.total_bytes += sum(len(v) for v in values if v is not None)
        tally.counts[0] += len(values)
        finish_if_done()

    def counter(index: int) -> Callable[[fc.Batch], None]:
        def count(batch: fc.Batch) -> None:
            tally.counts[index] += len(batch)
            finish_if_done()

        return count

    for index in range(1, tally.plugins):
        app.add_plugin(counter(index), name=f"count_{index}", batch_size=BATCH_SIZE)

    def announce_when_assigned() -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            assigned = sum(p["assigned"] for p in app.stats()["partitions"].values())
            if assigned >= args.partitions:
                print(json.dumps({"event": "ready"}), flush=True)
                return
            time.sleep(0.02)

    threading.Thread(target=announce_when_assigned, daemon=True).start()
    threading.Thread(target=read_target, args=(tally, sys.stdin, finish_if_done), daemon=True).start()
    app.run()
    return {"stats": app.stats()}


def consume_confluent(args: argparse.Namespace, tally: Tally) -> dict[str, Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
        }
    )

    # The same plugins, taking the list of values instead of a Batch.
    def total_bytes(values: list[bytes | None]) -> None:
        tally.total_bytes += sum(len(v) for v in values if v is not None)
        tally.counts[0] += len(values)

    def counter(index: int) -> Callable[[list[bytes | None]], None]:
        def count(values: list[bytes | None]) -> None:
            tally.counts[index] += len(values)

        return count

    plugins = [total_bytes, *(counter(index) for index in range(1, tally.plugins))]

    def on_assign(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if len(partitions) >= args.partitions:
            print(json.dumps({"event": "ready"}), flush=True)

    threading.Thread(target=read_target, args=(tally, sys.stdin, lambda: None), daemon=True).start()
    errors = 0
    consumer.subscribe([args.topic], on_assign=on_assign)
    try:
        while not tally.done:
            msgs = consumer.consume(BATCH_SIZE, timeout=1.0)
            if not msgs:
                continue
            now = time.time()
            for i in tally.sample_indices(len(msgs)):
                kind, ts = msgs[i].timestamp()
                if kind != 0:  # TIMESTAMP_NOT_AVAILABLE
                    tally.latencies.append((now, now * 1e3 - ts))
            values = [m.value() for m in msgs if m.error() is None]
            errors += len(msgs) - len(values)
            for plugin in plugins:
                plugin(values)
    finally:
        consumer.close()
    return {"errors": errors}


def consume_main(args: argparse.Namespace) -> int:
    tally = Tally(plugins=args.plugins)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the parent's give-up: end with a report
    consume = consume_fastconsume if args.impl == "fastconsume" else consume_confluent
    extra: dict[str, Any] = {}
    try:
        extra = consume(args, tally)
    except KeyboardInterrupt:
        extra = {"interrupted": True}
    report = {
        "impl": args.impl,
        "counts": tally.counts,
        "bytes": tally.total_bytes,
        "target": tally.target,
        "latencies": tally.latencies,
        **extra,
    }
    print(json.dumps(report, default=str), flush=True)
    return 0


# ---------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ThreadSample:
    name: str
    cpu_ns: int
    ctx_switches: int


@dataclass(frozen=True)
class ProcSample:
    """One look at a process: its CPU (user + system, every thread that ever ran in it, in
    clock ticks) and each live thread's CPU (ns on a CPU) and context switches."""

    monotonic: float
    epoch: float
    cpu_ticks_seconds: float
    threads: dict[int, ThreadSample]


def proc_sample(pid: int) -> ProcSample:
    """Reads ``/proc/PID/stat`` and every ``/proc/PID/task/*/{comm,schedstat,status}``."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    threads: dict[int, ThreadSample] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            cpu_ns = int((task / "schedstat").read_text().split()[0])
            status = (task / "status").read_text()
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
        switches = sum(
            int(line.split(":", 1)[1])
            for line in status.splitlines()
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
        )
        threads[int(task.name)] = ThreadSample(name, cpu_ns, switches)
    return ProcSample(time.monotonic(), time.time(), cpu, threads)


@dataclass(frozen=True)
class Window:
    """What a process did between two samples."""

    seconds: float
    cpu_seconds: float
    ctx_switches: int
    thread_cpu_seconds: dict[str, float]  # by thread name, summed over threads of one name

    @classmethod
    def between(cls, a: ProcSample, b: ProcSample) -> Window:
        """The per-thread counters are exact (ns); a thread that ended in between took its
        time with it, and then the process's clock-tick total is used instead."""
        by_name: dict[str, float] = {}
        switches = 0
        for tid, end in b.threads.items():
            start = a.threads.get(tid)
            cpu_ns = end.cpu_ns - (start.cpu_ns if start else 0)
            by_name[end.name] = by_name.get(end.name, 0.0) + cpu_ns / 1e9
            switches += end.ctx_switches - (start.ctx_switches if start else 0)
        if a.threads.keys() <= b.threads.keys():
            cpu = sum(by_name.values())
        else:
            cpu = b.cpu_ticks_seconds - a.cpu_ticks_seconds
        return cls(b.monotonic - a.monotonic, cpu, switches, by_name)

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.cpu_seconds / self.seconds

    def thread_shares(self) -> dict[str, float]:
        """Each thread name's share of the process's CPU in the window, largest first."""
        total = sum(self.thread_cpu_seconds.values()) or 1.0
        ranked = sorted(self.thread_cpu_seconds.items(), key=lambda item: -item[1])
        return {name: round(cpu / total, 4) for name, cpu in ranked if cpu > 0}


# ---------------------------------------------------------------------------- parent side


@dataclass(frozen=True)
class RatePlan:
    """One round's load and window: the producer writes ``rate`` msg/s for ``seconds`` s;
    the window runs from ``warmup`` s after its first message to ``tail`` s before its end."""

    rate: int
    seconds: float
    warmup: float
    tail: float
    partitions: int = SEED_PARTITIONS
    plugins: int = SEED_PLUGINS
    chunk: int = PACE_MESSAGES

    @property
    def window(self) -> float:
        return self.seconds - self.warmup - self.tail


@dataclass(frozen=True)
class RateResult:
    """One round's measurement."""

    impl: str
    plan: RatePlan
    sent: int
    produced_rate: float  # msg/s the producer reached
    window: Window
    latencies_ms: tuple[float, ...]  # samples in the window
    counts: tuple[int, ...]
    bytes: int
    load_average: float  # the machine's, over the last minute, at the window's end
    raw: dict[str, Any]

    @property
    def cpu_percent(self) -> float:
        return self.window.cpu_percent

    @property
    def cpu_us_per_msg(self) -> float:
        """CPU in the window over the messages produced in it."""
        messages = self.produced_rate * self.window.seconds
        return self.window.cpu_seconds * 1e6 / messages if messages else float("nan")

    @property
    def ctx_switches_per_s(self) -> float:
        return self.window.ctx_switches / self.window.seconds

    def latency_ms(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def summary(self) -> dict[str, Any]:
        """The numbers a report keeps of the round."""
        return {
            "cpu_percent": round(self.cpu_percent, 4),
            "cpu_us_per_msg": round(self.cpu_us_per_msg, 4),
            "produced_rate": round(self.produced_rate, 1),
            "window_seconds": round(self.window.seconds, 3),
            "ctx_switches_per_s": round(self.ctx_switches_per_s, 1),
            "latency_p50_ms": round(self.latency_ms(0.50), 2),
            "latency_p99_ms": round(self.latency_ms(0.99), 2),
            "latency_samples": len(self.latencies_ms),
            "thread_shares": self.window.thread_shares(),
            "load_average": round(self.load_average, 2),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (``nan`` of nothing).

    >>> percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5), percentile(range(1, 101), 0.99)
    (3.0, 99)
    """
    if not values:
        return float("nan")
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, math.ceil(q * len(ranked)) - 1))]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


class RoundError(RuntimeError):
    """A round's process failed, or the consumer missed messages."""


def _read_event(proc: subprocess.Popen[str], deadline: float, what: str, log: Path) -> dict[str, Any]:
    """The next JSON line on ``proc``'s stdout, waiting until ``deadline`` (monotonic)."""
    assert proc.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise RoundError(f"no {what} within its time limit:\n{log.read_text()[-4000:]}")
        line = proc.stdout.readline()
        if not line:
            raise RoundError(f"exited with {proc.wait()} before {what}:\n{log.read_text()[-4000:]}")
        if line.startswith("{"):
            event: dict[str, Any] = json.loads(line)
            return event


def _sleep_until(when: float) -> None:
    time.sleep(max(0.0, when - time.monotonic()))


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _consumer(
    impl: str, *, bootstrap: str, topic: str, group: str, plan: RatePlan, log: IO[str]
) -> subprocess.Popen[str]:
    cmd = [
        sys.executable, str(SCRIPT), "consume", impl, "--bootstrap", bootstrap, "--topic", topic,
        "--group", group, "--partitions", str(plan.partitions), "--plugins", str(plan.plugins),
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)


def _finish(consumer: subprocess.Popen[str], target: int, log: Path) -> dict[str, Any]:
    """Tells the consumer how many messages to expect, and returns its report."""
    assert consumer.stdin is not None
    consumer.stdin.write(f"{target}\n")
    consumer.stdin.flush()
    try:
        out, _ = consumer.communicate(timeout=END_TIMEOUT)
    except subprocess.TimeoutExpired:
        consumer.send_signal(signal.SIGTERM)  # ends with a report of what it saw
        out, _ = consumer.communicate(timeout=30)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if consumer.returncode != 0 or not lines:
        raise RoundError(f"the consumer exited with {consumer.returncode}:\n{out[-2000:]}\n{log.read_text()[-4000:]}")
    report: dict[str, Any] = json.loads(lines[-1])
    if report.get("interrupted"):
        raise RoundError(f"the consumer saw {report['counts']} of {target} messages in {END_TIMEOUT:.0f} s")
    return report


def run_round(impl: str, *, bootstrap: str, topic: str, group: str, plan: RatePlan) -> RateResult:
    """Runs one round (a fresh consumer process on ``topic``, empty, and a producer) and
    returns what it measured. Raises :class:`RoundError` if a process fails."""
    with tempfile.TemporaryDirectory(prefix="fastconsume-rate-") as tmp:
        log = Path(tmp) / "consumer.log"
        with log.open("w") as log_file:
            consumer = _consumer(impl, bootstrap=bootstrap, topic=topic, group=group, plan=plan, log=log_file)
        producer: subprocess.Popen[str] | None = None
        try:
            _read_event(consumer, time.monotonic() + READY_TIMEOUT, "assignment of every partition", log)
            producer = subprocess.Popen(
                [sys.executable, str(SCRIPT), "produce", "--bootstrap", bootstrap, "--topic", topic,
                 "--partitions", str(plan.partitions), "--rate", str(plan.rate), "--seconds", str(plan.seconds),
                 "--chunk", str(plan.chunk)],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            _read_event(producer, time.monotonic() + 60, "first message produced", log)
            began = time.monotonic()
            _sleep_until(began + plan.warmup)
            start = proc_sample(consumer.pid)
            _sleep_until(began + plan.seconds - plan.tail)
            end = proc_sample(consumer.pid)
            load_average = os.getloadavg()[0]
            out, _ = producer.communicate(timeout=plan.seconds + 90)
            totals = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
            if producer.returncode != 0:
                raise RoundError(f"the producer failed (exit {producer.returncode}): {totals}")
            report = _finish(consumer, int(totals["sent"]), log)
        finally:
            _stop(consumer)
            if producer is not None:
                _stop(producer)
    latencies = tuple(ms for t, ms in report["latencies"] if start.epoch <= t <= end.epoch)
    return RateResult(
        impl=impl,
        plan=plan,
        sent=int(totals["sent"]),
        produced_rate=int(totals["sent"]) / float(totals["seconds"]),
        window=Window.between(start, end),
        latencies_ms=latencies,
        counts=tuple(int(c) for c in report["counts"]),
        bytes=int(report["bytes"]),
        load_average=load_average,
        raw={k: v for k, v in report.items() if k != "latencies"},
    )


def run_idle(impl: str, *, bootstrap: str, topic: str, group: str, settle: float, seconds: float) -> Window:
    """A consumer of an empty topic: what it does in ``seconds`` once it has held every
    partition for ``settle`` seconds. With the library's defaults: idle, librdkafka's
    fetch long-poll (``fetch.wait.max.ms``) is most of what remains, and the benchmarks'
    100 ms (drain.py's, for throughput) would make its wake-ups five times as frequent as a
    user's."""
    plan = RatePlan(rate=0, seconds=seconds, warmup=0.0, tail=0.0)
    with tempfile.TemporaryDirectory(prefix="fastconsume-idle-") as tmp:
        log = Path(tmp) / "consumer.log"
        with log.open("w") as log_file:
            consumer = _consumer(impl, bootstrap=bootstrap, topic=topic, group=group, plan=plan, log=log_file)
        try:
            _read_event(consumer, time.monotonic() + READY_TIMEOUT, "assignment of every partition", log)
            time.sleep(settle)
            start = proc_sample(consumer.pid)
            time.sleep(seconds)
            end = proc_sample(consumer.pid)
            report = _finish(consumer, 0, log)
        finally:
            _stop(consumer)
    if any(report["counts"]):
        raise RoundError(f"the idle consumer saw messages: {report['counts']}")
    return Window.between(start, end)


@dataclass(frozen=True)
class RateSettings:
    """How long each rate round's producer writes, its window, and the rounds per plan."""

    seconds: float
    warmup: float
    tail: float
    rounds: int
    idle_seconds: float = 10.0

    def plan(self, rate: int, partitions: int = SEED_PARTITIONS, plugins: int = SEED_PLUGINS) -> RatePlan:
        return RatePlan(rate, self.seconds, self.warmup, self.tail, partitions, plugins)


@dataclass
class RateRunner:
    """Runs rate rounds on demand and keeps them: each series once per session, its plans
    and implementations in turn within a round, the order reversed every other round so that
    drift on a shared machine hits all alike. Each round has a new topic and group."""

    bootstrap: str
    create_topic: Callable[[int], str]  # partitions -> a new topic's name
    settings: RateSettings
    series: dict[str, dict[RatePlan, dict[str, list[RateResult]]]] = field(default_factory=dict)
    idle: dict[str, Window] = field(default_factory=dict)

    def rounds(
        self, name: str, plans: Sequence[RatePlan], impls: Sequence[str] = IMPLEMENTATIONS
    ) -> dict[RatePlan, dict[str, list[RateResult]]]:
        if name in self.series:
            return self.series[name]
        results: dict[RatePlan, dict[str, list[RateResult]]] = {plan: {impl: [] for impl in impls} for plan in plans}
        turns = [(plan, impl) for plan in plans for impl in impls]
        for r in range(self.settings.rounds):
            for plan, impl in turns if r % 2 == 0 else turns[::-1]:
                topic = self.create_topic(plan.partitions)
                group = f"rate-{impl}-{r}-{uuid.uuid4().hex[:8]}"
                results[plan][impl].append(
                    run_round(impl, bootstrap=self.bootstrap, topic=topic, group=group, plan=plan)
                )
        self.series[name] = results
        return results

    def idle_windows(self, impls: Sequence[str] = IMPLEMENTATIONS) -> dict[str, Window]:
        for impl in impls:
            if impl not in self.idle:
                topic = self.create_topic(SEED_PARTITIONS)
                group = f"idle-{impl}-{uuid.uuid4().hex[:8]}"
                self.idle[impl] = run_idle(
                    impl, bootstrap=self.bootstrap, topic=topic, group=group, settle=2.0,
                    seconds=self.settings.idle_seconds,
                )  # fmt: skip
        return self.idle


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    roles = parser.add_subparsers(dest="role", required=True)
    produce = roles.add_parser("produce", help="write a steady load")
    produce.add_argument("--rate", type=int, required=True)
    produce.add_argument("--seconds", type=float, required=True)
    produce.add_argument("--chunk", type=int, default=PACE_MESSAGES, help="messages written at once")
    consume = roles.add_parser("consume", help="consume through trivial plugins until told the total")
    consume.add_argument("impl", choices=IMPLEMENTATIONS)
    consume.add_argument("--group", required=True)
    consume.add_argument("--plugins", type=int, default=SEED_PLUGINS)
    for role in (produce, consume):
        role.add_argument("--bootstrap", required=True)
        role.add_argument("--topic", required=True)
        role.add_argument("--partitions", type=int, default=SEED_PARTITIONS)
    args = parser.parse_args(argv)
    return produce_main(args) if args.role == "produce" else consume_main(args)


if __name__ == "__main__":
    sys.exit(main())
