"""``fastconsume demo``: a broker-less end-to-end run on librdkafka's in-process mock cluster."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ._app import App
from ._core import Batch, MockCluster, produce
from ._stats import Stats

TOPIC = "demo"
# The mock cluster keeps at most 5 MiB or 100,000 messages per partition and drops older
# ones, so 200,000 values of 200 bytes need enough partitions to all stay readable.
DEFAULT_PARTITIONS = 16


@dataclass
class DemoResult:
    messages: int
    seconds: float
    cpu_seconds: float
    stats: Stats

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_message(self) -> float:
        return self.cpu_seconds / self.messages * 1e6 if self.messages else 0.0


def run_demo(messages: int = 200_000, partitions: int = DEFAULT_PARTITIONS, value_size: int = 200) -> DemoResult:
    """Produces ``messages`` values to a mock cluster and consumes them through three plugins."""
    cluster = MockCluster()
    cluster.create_topic(TOPIC, partitions)
    value = b"x" * value_size
    for partition in range(partitions):  # explicit partitions: keyless produce is sticky, not even
        share = messages // partitions + (partition < messages % partitions)
        produce(cluster.bootstrap, TOPIC, [value] * share, partition=partition)

    app = App(cluster.bootstrap, "fastconsume-demo", [TOPIC], kafka={"fetch.wait.max.ms": 10}, read_config=False)
    seen = {"count": 0, "bytes": 0}
    # (wall, cpu) at the first batch and once every message is counted: the group join and
    # the idle wait at the end are not consuming.
    marks: list[tuple[float, float]] = []

    @app.plugin(batch_size=1000)
    def count(batch: Batch) -> None:
        if not marks:
            marks.append((time.perf_counter(), time.process_time()))
        seen["count"] += len(batch)
        if seen["count"] >= messages and len(marks) == 1:
            marks.append((time.perf_counter(), time.process_time()))

    @app.plugin(batch_size=1000)
    def measure(batch: Batch) -> None:
        seen["bytes"] += sum(len(v or b"") for v in batch.values())

    @app.plugin(batch_size=500)
    def offsets(batch: Batch) -> None:
        for message in batch:
            assert message.offset >= 0

    app.run(idle_timeout=1.0)
    if len(marks) < 2:
        marks.append((time.perf_counter(), time.process_time()))
    (wall_start, cpu_start), (wall_end, cpu_end) = marks[0], marks[-1]
    return DemoResult(
        messages=seen["count"], seconds=wall_end - wall_start, cpu_seconds=cpu_end - cpu_start, stats=app.stats()
    )


def print_report(result: DemoResult) -> None:
    print(f"messages         {result.messages:>12,}")
    print(f"wall seconds     {result.seconds:>12.2f}  (first batch to last message)")
    print(f"msg/s            {result.rate:>12,.0f}")
    print(f"CPU us/msg       {result.cpu_us_per_message:>12.2f}  (process CPU; includes the in-process mock broker)")
    print()
    print(f"{'plugin':<10} {'batches':>8} {'messages':>10} {'p50 ms':>9} {'p99 ms':>9} {'queue peak':>11}")
    for name, s in result.stats["plugins"].items():
        p50, p99 = s["latency_p50"] * 1e3, s["latency_p99"] * 1e3
        print(f"{name:<10} {s['batches']:>8} {s['messages']:>10,} {p50:>9.3f} {p99:>9.3f} {s['queued_peak']:>11,}")
    partitions, process = result.stats["partitions"], result.stats["process"]
    committed = sum(p["committed"] or 0 for p in partitions.values())
    lag = sum(p["lag"] or 0 for p in partitions.values())
    print()
    print(f"partitions {len(partitions)}, committed {committed:,}, lag {lag:,}")
    print(f"threads {process['threads']}, RSS {process['rss_bytes'] / 2**20:.0f} MiB")
