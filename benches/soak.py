#!/usr/bin/env python3
"""Soak: a producer at a fixed high rate for a set time, a consumer app of three plugins, and
the consumer process's RSS, threads and open fds sampled every second.

    python benches/soak.py --seconds 60 --bootstrap HOST:PORT     # what scripts/check runs
    python benches/soak.py --seconds 600 --rate 50000             # the full soak (30 M messages)

Without ``--bootstrap`` it uses ``FASTCONSUME_TEST_BOOTSTRAP``, or else starts a single broker
with ``scripts/kafka_broker.py`` and stops it after. The producer (``soak.py produce``) and
the consumer (``soak.py consume``, an ``fc.App`` with plugins ``a``, ``b`` and ``c`` of
different batch sizes) are subprocesses of their own, so that the samples are the
consumer's alone. Once the producer is done, the consumer must have committed the topic's
end offsets within ``--drain-timeout`` seconds and, on SIGTERM, exit 0 with every plugin
having handled every message.

Fails (exit 1, one line per reason, after the summary) if, over the second half of the
production time, the consumer's RSS rises more than 10% above its value at the half-way
sample, or its thread or fd count rises above it; or if a message is missing or the
consumer does not drain or stop cleanly. A producer that cannot keep the asked rate (a
loaded machine) is reported in the summary, not failed: the check is about growth, at
whatever rate was reached. This script is not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

import fastconsume as fc

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
RSS_GROWTH_LIMIT = 0.10  # of the half-way sample


# --- the producer process ----------------------------------------------------------------


def produce_main(args: argparse.Namespace) -> int:
    """Writes ``rate`` messages/s for ``seconds`` s, paced every 10 ms; prints one JSON line."""
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "linger.ms": 5,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
        }
    )
    failed = 0

    def delivered(error: Any, _message: Any) -> None:
        nonlocal failed
        if error is not None:
            failed += 1

    value = b"x" * args.value_size
    sent = 0
    started = time.monotonic()
    end = started + args.seconds
    while (now := time.monotonic()) < end:
        due = int((now - started) * args.rate)
        while sent < due:
            try:
                producer.produce(args.topic, value, on_delivery=delivered)
            except BufferError:
                producer.poll(0.01)  # the local queue is full: let librdkafka catch up
                continue
            sent += 1
        producer.poll(0)
        time.sleep(max(0.0, 0.01 - (time.monotonic() - now)))
    elapsed = time.monotonic() - started
    left = producer.flush(60)
    print(json.dumps({"sent": sent, "seconds": elapsed, "undelivered": left, "failed": failed}), flush=True)
    return 0 if left == 0 and failed == 0 else 1


# --- the consumer process ----------------------------------------------------------------


def consume_main(args: argparse.Namespace) -> int:
    """Runs an app of three plugins until SIGTERM; prints each plugin's message count as JSON."""
    app = fc.App(args.bootstrap, args.group, [args.topic], kafka={"fetch.wait.max.ms": 100})
    counts = {"a": 0, "b": 0, "c": 0}
    payload = [0]

    @app.plugin(batch_size=500, linger="20ms")
    def a(batch: fc.Batch) -> None:
        counts["a"] += len(batch)

    @app.plugin(batch_size=1000, linger="20ms", concurrency=2)
    def b(batch: fc.Batch) -> None:
        values = batch.values()
        counts["b"] += len(values)
        payload[0] += sum(len(v or b"") for v in values)

    @app.plugin(batch_size=200, linger="20ms")
    def c(batch: fc.Batch) -> None:
        counts["c"] += len(batch)

    app.run()
    print(json.dumps({**counts, "bytes": payload[0]}), flush=True)
    return 0


# --- the soak ------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    rss: int  # bytes
    threads: int
    fds: int
    cpu: float  # seconds, user + system


def sample(pid: int, started: float) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss = int(fields["VmRSS"].split()[0]) * 1024
    threads = int(fields["Threads"])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return Sample(time.monotonic() - started, rss, threads, fds, cpu)


@contextmanager
def broker(bootstrap: str | None) -> Iterator[str]:
    given = bootstrap or os.environ.get("FASTCONSUME_TEST_BOOTSTRAP")
    if given:
        yield given
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from kafka import real_broker  # noqa: PLC0415 (tests/ is on the path only here)

    with tempfile.TemporaryDirectory(prefix="fastconsume-soak-") as workdir, real_broker(Path(workdir)) as started:
        yield started


def committed_and_end(bootstrap: str, group: str, topic: str, partitions: int) -> tuple[list[int], list[int]]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        committed = [tp.offset for tp in consumer.committed(tps, timeout=30)]
        ends = [consumer.get_watermark_offsets(tp, timeout=30)[1] for tp in tps]
        return committed, ends
    finally:
        consumer.close()


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass
class Run:
    """One soak's settings and processes."""

    args: argparse.Namespace
    bootstrap: str
    topic: str
    group: str
    consumer: subprocess.Popen[bytes]
    consumer_log: Path
    started: float = 0.0


@dataclass
class Produced:
    sent: int
    seconds: float
    samples: list[Sample]
    duration: float  # from the start until the producer exited


def soak(args: argparse.Namespace, bootstrap: str) -> list[str]:
    """Runs the soak; prints the summary; returns the reasons it failed (none: passed)."""
    topic, group = f"soak-{uuid.uuid4().hex[:12]}", f"soak-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    # replication_factor=-1: the broker's default (1 on the test broker, 3 on a cluster).
    admin.create_topics([NewTopic(topic, num_partitions=args.partitions, replication_factor=-1)])[topic].result(30)
    with tempfile.TemporaryDirectory(prefix="fastconsume-soak-") as tmp:
        consumer_log = Path(tmp) / "consumer.log"
        with consumer_log.open("wb") as log:
            consumer = subprocess.Popen(
                [sys.executable, str(SCRIPT), "consume", "--bootstrap", bootstrap, "--topic", topic, "--group", group],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        run = Run(args, bootstrap, topic, group, consumer, consumer_log, started=time.monotonic())
        try:
            produced = _produce(run)
            if isinstance(produced, str):
                return [produced]
            failures, counts, drained, end_sample = _drain_and_stop(run)
            failures += _growth(produced)
            _summary(run, produced, counts, drained, end_sample)
            return failures
        finally:
            if consumer.poll() is None:
                consumer.kill()
                consumer.wait()


def _consumer_output(run: Run) -> str:
    return run.consumer_log.read_text()[-4000:]


def _produce(run: Run) -> Produced | str:
    """Runs the producer, sampling the consumer every second; the samples, or what failed."""
    args = run.args
    producer = subprocess.Popen(
        [sys.executable, str(SCRIPT), "produce", "--bootstrap", run.bootstrap, "--topic", run.topic,
         "--seconds", str(args.seconds), "--rate", str(args.rate), "--value-size", str(args.value_size)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    samples: list[Sample] = []
    next_at = run.started
    while producer.poll() is None:
        if run.consumer.poll() is not None:
            producer.kill()
            producer.wait()
            return f"the consumer exited with {run.consumer.returncode} mid-run:\n{_consumer_output(run)}"
        samples.append(sample(run.consumer.pid, run.started))
        next_at += 1.0
        time.sleep(max(0.0, next_at - time.monotonic()))
    duration = time.monotonic() - run.started
    out = producer.stdout.read().decode().strip() if producer.stdout else ""
    if producer.returncode != 0 or not out:
        return f"the producer failed (exit {producer.returncode}): {out}"
    report = json.loads(out.splitlines()[-1])
    return Produced(int(report["sent"]), float(report["seconds"]), samples, duration)


def _drain_and_stop(run: Run) -> tuple[list[str], dict[str, int], float, Sample]:
    """Waits until the end offsets are committed, then stops the consumer with SIGTERM."""
    failures: list[str] = []
    timeout = run.args.drain_timeout
    drain_started = time.monotonic()
    committed, ends = committed_and_end(run.bootstrap, run.group, run.topic, run.args.partitions)
    while committed != ends and time.monotonic() - drain_started < timeout:
        time.sleep(0.5)
        committed, ends = committed_and_end(run.bootstrap, run.group, run.topic, run.args.partitions)
    drained = time.monotonic() - drain_started
    end_sample = sample(run.consumer.pid, run.started)
    if committed != ends:
        failures.append(f"committed {committed} != end offsets {ends} {timeout} s after the producer ended")
    run.consumer.send_signal(signal.SIGTERM)
    try:
        code = run.consumer.wait(timeout=60)
    except subprocess.TimeoutExpired:
        run.consumer.kill()
        code = run.consumer.wait()
        failures.append("the consumer did not stop within 60 s of SIGTERM")
    counts: dict[str, int] = {}
    if code != 0:
        failures.append(f"the consumer exited with {code}:\n{_consumer_output(run)}")
    elif run.consumer.stdout is not None:
        counts = json.loads(run.consumer.stdout.read().decode().strip().splitlines()[-1])
        failures += [
            f"plugin {plugin} handled {counts[plugin]:,} of {sum(ends):,} messages"
            for plugin in ("a", "b", "c")
            if counts[plugin] < sum(ends)
        ]
    return failures, counts, drained, end_sample


def _second_half(produced: Produced) -> list[Sample]:
    return [s for s in produced.samples if s.t >= produced.duration / 2]


def _growth(produced: Produced) -> list[str]:
    """RSS, threads and fds over the second half against the half-way sample."""
    half = _second_half(produced)
    if len(half) < 2:
        return [f"only {len(produced.samples)} samples: run longer (--seconds)"]
    mid = half[0]
    peak_rss = max(s.rss for s in half)
    peak_threads = max(s.threads for s in half)
    peak_fds = max(s.fds for s in half)
    failures = []
    if peak_rss > mid.rss * (1 + RSS_GROWTH_LIMIT):
        failures.append(
            f"RSS grew {peak_rss / mid.rss - 1:.0%} in the second half ({mib(mid.rss)} -> {mib(peak_rss)}; "
            f"limit {RSS_GROWTH_LIMIT:.0%})"
        )
    if peak_threads > mid.threads:
        failures.append(f"threads grew in the second half: {mid.threads} -> {peak_threads}")
    if peak_fds > mid.fds:
        failures.append(f"open fds grew in the second half: {mid.fds} -> {peak_fds}")
    return failures


def _summary(run: Run, produced: Produced, counts: dict[str, int], drained: float, end: Sample) -> None:
    args = run.args
    print(
        f"soak: {produced.sent:,} messages of {args.value_size} B in {produced.seconds:.1f} s "
        f"({produced.sent / produced.seconds:,.0f} msg/s produced, asked {args.rate:,}), "
        f"{args.partitions} partitions, 3 plugins; all committed {drained:.1f} s after the producer ended"
    )
    if produced.sent < 0.9 * args.rate * args.seconds:
        print(f"soak: note: the producer reached only {produced.sent / (args.rate * args.seconds):.0%} of the rate")
    samples, half = produced.samples, _second_half(produced) or produced.samples[-1:]
    if samples:
        first, mid = samples[0], half[0]
        print(
            f"soak: consumer RSS {mib(first.rss)} at the start, {mib(mid.rss)} half-way, "
            f"{mib(max(s.rss for s in half))} peak and {mib(samples[-1].rss)} last in the second half; "
            f"threads {first.threads}/{mid.threads}/{max(s.threads for s in half)}, "
            f"fds {first.fds}/{mid.fds}/{max(s.fds for s in half)} (start/half-way/peak); {len(samples)} samples"
        )
        cpu = end.cpu - first.cpu
        if produced.sent:
            per = cpu / produced.sent * 1e6
            print(f"soak: consumer CPU {cpu:.1f} s in all, start-up included ({per:.2f} us/msg); counts {counts}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("role", nargs="?", choices=["soak", "produce", "consume"], default="soak")
    parser.add_argument("--bootstrap", help="a broker's host:port (default: FASTCONSUME_TEST_BOOTSTRAP, or start one)")
    parser.add_argument("--seconds", type=float, default=600.0, help="how long the producer writes (default 600)")
    parser.add_argument("--rate", type=int, default=50_000, help="messages per second written (default 50,000)")
    parser.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to commit all after the producer")
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "produce":
        return produce_main(args)
    if args.role == "consume":
        return consume_main(args)
    if args.seconds < 4 or args.rate < 1:
        parser.error("--seconds must be at least 4 and --rate positive")
    with broker(args.bootstrap) as bootstrap:
        failures = soak(args, bootstrap)
    for failure in failures:
        print(f"soak: FAIL: {failure}", file=sys.stderr)
    if not failures:
        print("soak: passed (no RSS growth over 10%, no thread or fd growth in the second half)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
