"""Arrow benchmark: one plugin summing value lengths with ``pyarrow.compute`` on the Arrow
export, against the same plugin looping over ``batch.values()``.

Both drain a pre-produced topic (``ARROW_FULL`` or, with ``--quick``, ``ARROW_QUICK`` values of
``VALUE_SIZE`` bytes over ``PARTITIONS`` partitions, as the drain benchmark's), each round in a
fresh process (see ``arrow.py``), alternating round by round and swapping which goes first.
Each test replays its implementation's rounds through ``benchmark.pedantic`` with a timer
that advances by each round's measured drain time (as ``test_drain.py`` does),
and records in ``extra_info``, for both implementations, the medians and per-round values of
consumer-process CPU microseconds per message, the plugin's own CPU nanoseconds per message
(its summing, timed on its thread in each call but each thread's first) and messages per
second, and the ratios; the session ends with a two-row table.

The issue's acceptance is the Arrow plugin at most ``ACCEPTED_RATIO`` times the CPU per
message of the values loop, in drain. Fetching and building batches cost both ways the same
and are most of the process's CPU (librdkafka's and the source thread's, about 0.55 us of
0.6 us per message here), so the process ratio cannot come near it; the plugin's own CPU is
what the two ways differ in, and what the test holds to that ratio.
"""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from arrow import IMPLEMENTATIONS, run_round
from confluent_kafka.admin import AdminClient
from pytest_benchmark.fixture import BenchmarkFixture

from fastconsume.testing import produce

from drain import PARTITIONS, VALUE_SIZE, DrainPlan, ReplayClock, RoundResult
from kafka import RealCluster

ARROW_FULL = DrainPlan(messages=1_000_000, rounds=5)
"""More messages than the drain benchmark's: a process's first hundred calls cost twice what
later ones do, and 1,000 calls a round keep that from weighing on the plugin's CPU."""
ARROW_QUICK = DrainPlan(messages=50_000, rounds=3)

ACCEPTED_RATIO = 0.6
"""Arrow's plugin CPU per message over the values loop's: the issue's acceptance (full runs)."""
QUICK_RATIO = 1.0
"""What a quick run must show: Arrow is cheaper. Its rounds are 50 calls, about the first
hundred calls of a process cost both ways twice what later ones do (allocators and caches
warming), and a call's CPU time on a shared 2-core machine varies by a third."""


CLOCK = ReplayClock("drain wall seconds of each round, measured in its process")


@dataclass
class ArrowReport:
    """The medians per implementation, printed as a table at the end of the session."""

    plan: DrainPlan
    rows: dict[str, dict[str, float]] = field(default_factory=dict)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.rows:
            return
        tr = terminalreporter
        tr.write_sep(
            "-",
            f"arrow: sum of value lengths, 1 plugin, {self.plan.messages:,} x {VALUE_SIZE} B, "
            f"median of {self.plan.rounds} round(s)",
        )
        tr.write_line(
            f"{'plugin':<34}{'cpu us/msg':>11}{'vs values()':>12}{'plugin ns/msg':>14}{'vs values()':>12}{'msg/s':>12}"
        )
        base = self.rows.get("values")
        labels = {"arrow": "pyarrow.compute on arrow_values()", "values": "loop over values()"}
        for impl in IMPLEMENTATIONS:
            row = self.rows.get(impl)
            if row is None:
                continue
            cpu, plugin = row["cpu_us_per_msg"], row["plugin_ns_per_msg"]
            cpu_ratio = f"{cpu / base['cpu_us_per_msg']:.2f}x" if base else "-"
            plugin_ratio = f"{plugin / base['plugin_ns_per_msg']:.2f}x" if base else "-"
            tr.write_line(
                f"{labels[impl]:<34}{cpu:>11.3f}{cpu_ratio:>12}{plugin:>14.1f}{plugin_ratio:>12}{row['msg_per_s']:>12,.0f}"
            )


@pytest.fixture(scope="module")
def arrow_plan(pytestconfig: pytest.Config) -> DrainPlan:
    return ARROW_QUICK if pytestconfig.getoption("quick") else ARROW_FULL


@pytest.fixture(scope="module")
def arrow_report(pytestconfig: pytest.Config, arrow_plan: DrainPlan) -> ArrowReport:
    """Registered as a plugin, so that its table ends the session's summary."""
    report = ArrowReport(plan=arrow_plan)
    pytestconfig.pluginmanager.register(report, "fastconsume-arrow-report")
    return report


@pytest.fixture(scope="module")
def arrow_topic(kafka_bootstrap: str, arrow_plan: DrainPlan) -> Iterator[str]:
    """A new topic holding ``arrow_plan.messages`` values of ``VALUE_SIZE`` bytes, spread
    evenly over ``PARTITIONS`` partitions; deleted afterwards (a full run's is 200 MB)."""
    assert arrow_plan.messages % PARTITIONS == 0
    topic = RealCluster(kafka_bootstrap).create_topic(PARTITIONS)
    per_partition = arrow_plan.messages // PARTITIONS
    for p in range(PARTITIONS):
        values = [f"p{p}-{i:09d}-".encode().ljust(VALUE_SIZE, b"x") for i in range(per_partition)]
        assert produce(kafka_bootstrap, topic, values, partition=p) == per_partition
    yield topic
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.delete_topics([topic])[topic].result(timeout=30)


@pytest.fixture(scope="module")
def arrow_rounds(kafka_bootstrap: str, arrow_topic: str, arrow_plan: DrainPlan) -> dict[str, list[RoundResult]]:
    """Every round of both implementations, each in a fresh process and a new consumer group
    (so each reads the whole topic), alternating and swapping which goes first."""
    results: dict[str, list[RoundResult]] = {impl: [] for impl in IMPLEMENTATIONS}
    for r in range(arrow_plan.rounds):
        order = IMPLEMENTATIONS if r % 2 == 0 else IMPLEMENTATIONS[::-1]
        for impl in order:
            group = f"bench-arrow-{impl}-{r}-{uuid.uuid4().hex[:8]}"
            results[impl].append(
                run_round(impl, bootstrap=kafka_bootstrap, topic=arrow_topic, group=group, messages=arrow_plan.messages)
            )
    return results


def plugin_ns_per_msg(result: RoundResult) -> float:
    return float(result.raw["plugin_cpu_seconds"]) * 1e9 / int(result.raw["plugin_messages"])


def medians(rounds: list[RoundResult]) -> dict[str, float]:
    return {
        "cpu_us_per_msg": statistics.median(r.cpu_us_per_msg for r in rounds),
        "plugin_ns_per_msg": statistics.median(plugin_ns_per_msg(r) for r in rounds),
        "msg_per_s": statistics.median(r.msg_per_s for r in rounds),
    }


@pytest.mark.benchmark(group="arrow", timer=CLOCK)
@pytest.mark.timeout(600)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_arrow(
    benchmark: BenchmarkFixture,
    request: pytest.FixtureRequest,
    impl: str,
    arrow_plan: DrainPlan,
    arrow_report: ArrowReport,
) -> None:
    # Requested only now, so that --benchmark-skip (which skips in the benchmark fixture)
    # does not start a broker and drain first.
    arrow_rounds: dict[str, list[RoundResult]] = request.getfixturevalue("arrow_rounds")
    n = arrow_plan.messages
    for rounds in arrow_rounds.values():
        assert len(rounds) == arrow_plan.rounds
        for r in rounds:
            assert (r.messages, r.bytes) == (n, n * VALUE_SIZE), f"{r.impl} summed {r.bytes} bytes of {r.messages}"

    replay = iter(arrow_rounds[impl])

    def replay_round() -> RoundResult:
        result = next(replay)
        CLOCK.advance(result.wall_seconds)
        return result

    benchmark.pedantic(replay_round, rounds=arrow_plan.rounds, iterations=1)  # type: ignore[no-untyped-call]

    rows = {name: medians(rounds) for name, rounds in arrow_rounds.items()}
    ratios = {
        f"{measure}_ratio_arrow_to_values": rows["arrow"][measure] / rows["values"][measure]
        for measure in ("cpu_us_per_msg", "plugin_ns_per_msg")
    }
    benchmark.extra_info.update(
        implementation=impl,
        messages=n,
        value_bytes=VALUE_SIZE,
        rounds=arrow_plan.rounds,
        **rows[impl],
        **{f"{name}_{measure}": value for name, row in rows.items() for measure, value in row.items()},
        **ratios,
        **{f"{name}_cpu_us_per_msg_rounds": [r.cpu_us_per_msg for r in rs] for name, rs in arrow_rounds.items()},
        **{f"{name}_plugin_ns_per_msg_rounds": [plugin_ns_per_msg(r) for r in rs] for name, rs in arrow_rounds.items()},
        **{f"{name}_msg_per_s_rounds": [r.msg_per_s for r in rs] for name, rs in arrow_rounds.items()},
    )
    arrow_report.rows[impl] = rows[impl]
    if impl == "arrow":
        ratio = ratios["plugin_ns_per_msg_ratio_arrow_to_values"]
        limit = QUICK_RATIO if request.config.getoption("quick") else ACCEPTED_RATIO
        assert ratio <= limit, (
            f"the Arrow plugin used {ratio:.2f}x the CPU per message of the values() loop (at most {limit}x)"
        )
