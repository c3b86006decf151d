"""Benchmark fixtures: a real broker, one pre-produced topic, and the drain rounds of both
implementations, run alternately; plus the ``--quick`` option and the closing comparison table."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHES.parent / "tests"))
sys.path.insert(0, str(BENCHES))

from fastconsume.testing import produce  # noqa: E402

from drain import IMPLEMENTATIONS, PARTITIONS, VALUE_SIZE, DrainPlan, DrainReport, RoundResult, run_round  # noqa: E402
from kafka import RealCluster, real_broker  # noqa: E402

FULL = (200_000, 5)  # messages, rounds
QUICK = (50_000, 3)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--quick",
        action="store_true",
        default=False,
        help=f"benchmarks: drain {QUICK[0]:,} messages in {QUICK[1]} round(s) instead of {FULL[0]:,} in {FULL[1]}",
    )


REPORT_KEY = pytest.StashKey[DrainReport]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[REPORT_KEY] = DrainReport()


@pytest.fixture(scope="session")
def drain_plan(pytestconfig: pytest.Config) -> DrainPlan:
    messages, rounds = QUICK if pytestconfig.getoption("quick") else FULL
    return DrainPlan(messages=messages, rounds=rounds)


@pytest.fixture(scope="session")
def drain_report(pytestconfig: pytest.Config, drain_plan: DrainPlan) -> DrainReport:
    report = pytestconfig.stash[REPORT_KEY]
    report.plan = drain_plan
    return report


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Apache Kafka broker for the session (``FASTCONSUME_TEST_BOOTSTRAP`` if set)."""
    with real_broker(tmp_path_factory.mktemp("kafka")) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def drain_topic(kafka_bootstrap: str, drain_plan: DrainPlan) -> str:
    """A new topic of ``PARTITIONS`` partitions holding ``drain_plan.messages`` values of
    ``VALUE_SIZE`` bytes, spread evenly."""
    assert drain_plan.messages % PARTITIONS == 0
    topic = RealCluster(kafka_bootstrap).create_topic(PARTITIONS)
    per_partition = drain_plan.messages // PARTITIONS
    for p in range(PARTITIONS):
        values = [f"p{p}-{i:09d}-".encode().ljust(VALUE_SIZE, b"x") for i in range(per_partition)]
        assert produce(kafka_bootstrap, topic, values, partition=p) == per_partition
    return topic


@pytest.fixture(scope="session")
def drain_rounds(kafka_bootstrap: str, drain_topic: str, drain_plan: DrainPlan) -> dict[str, list[RoundResult]]:
    """Every round of both implementations, each in a fresh process and a new consumer group
    (so each reads the whole topic), alternating round by round and swapping which goes first,
    so that drift on a shared machine hits both alike."""
    results: dict[str, list[RoundResult]] = {impl: [] for impl in IMPLEMENTATIONS}
    for r in range(drain_plan.rounds):
        order = IMPLEMENTATIONS if r % 2 == 0 else IMPLEMENTATIONS[::-1]
        for impl in order:
            group = f"bench-{impl}-{r}-{uuid.uuid4().hex[:8]}"
            results[impl].append(
                run_round(impl, bootstrap=kafka_bootstrap, topic=drain_topic, group=group, messages=drain_plan.messages)
            )
    return results


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    report = terminalreporter.config.stash.get(REPORT_KEY, None)
    if report is None or not report.rows or report.plan is None:
        return
    plan = report.plan
    tr = terminalreporter
    tr.write_sep(
        "-",
        f"drain: {plan.messages:,} x {VALUE_SIZE} B, {PARTITIONS} partitions, 3 plugins, "
        f"median of {plan.rounds} round(s)",
    )
    tr.write_line(f"{'implementation':<16}{'cpu us/msg':>12}{'msg/s':>14}{'cpu vs conf.':>14}{'msg/s vs conf.':>16}")
    base = report.rows.get("confluent")
    for impl in IMPLEMENTATIONS:
        row = report.rows.get(impl)
        if row is None:
            continue
        cpu_ratio = f"{row['cpu_us_per_msg'] / base['cpu_us_per_msg']:.2f}x" if base else "-"
        rate_ratio = f"{row['msg_per_s'] / base['msg_per_s']:.2f}x" if base else "-"
        tr.write_line(
            f"{impl:<16}{row['cpu_us_per_msg']:>12.2f}{row['msg_per_s']:>14,.0f}{cpu_ratio:>14}{rate_ratio:>16}"
        )
