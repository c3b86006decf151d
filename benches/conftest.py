"""Benchmark fixtures: a real broker, one pre-produced topic, and the drain rounds of both
implementations, run alternately; the rate rounds (``rate.py``: seed load, sweep, scale,
idle); the ``--quick`` option (which deselects the tests marked ``full``), the rates JSON
document and its plot, and the closing comparison tables."""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCHES = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHES.parent / "tests"))
sys.path.insert(0, str(BENCHES))

from fastconsume.testing import produce  # noqa: E402

from drain import (  # noqa: E402
    BATCH_SIZE,
    FETCH_WAIT_MAX_MS,
    IMPLEMENTATIONS,
    PARTITIONS,
    VALUE_SIZE,
    DrainPlan,
    DrainReport,
    RoundResult,
    run_round,
)
from kafka import RealCluster, real_broker  # noqa: E402
from rate import (  # noqa: E402
    PACE_MESSAGES,
    PRODUCER_LINGER_MS,
    SEED_PARTITIONS,
    SEED_PLUGINS,
    SEED_RATE,
    RateRunner,
    RateSettings,
)
from rate_report import series_rows, summary_lines  # noqa: E402

FULL = (200_000, 5)  # messages, rounds
QUICK = (200_000, 3)


RATE_FULL = RateSettings(seconds=20.0, warmup=3.0, tail=1.0, rounds=3)
RATE_QUICK = RateSettings(seconds=8.0, warmup=2.0, tail=0.5, rounds=3)
DEFAULT_RATES_JSON = Path(".benchmarks") / "rates.json"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--quick",
        action="store_true",
        default=False,
        help=f"benchmarks: drain {QUICK[0]:,} messages in {QUICK[1]} round(s) instead of {FULL[0]:,} in {FULL[1]}; "
        f"seed load {RATE_QUICK.seconds:g} s rounds instead of {RATE_FULL.seconds:g} s; no sweep, scale or idle",
    )
    parser.addoption(
        "--rates-json",
        type=Path,
        default=DEFAULT_RATES_JSON,
        help=f"benchmarks: where the rate results go as JSON (default {DEFAULT_RATES_JSON})",
    )
    parser.addoption(
        "--rates-png",
        type=Path,
        default=None,
        help="benchmarks: also draw the rate sweep there (benches/plot_rates.py; e.g. docs/rates.png)",
    )


REPORT_KEY = pytest.StashKey[DrainReport]()
DRAIN_ROUNDS_KEY = pytest.StashKey[dict[str, list[RoundResult]]]()
RATES_KEY = pytest.StashKey[RateRunner]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[REPORT_KEY] = DrainReport()
    config.addinivalue_line("markers", "full: a benchmark of the full pass only (deselected by --quick)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("quick"):
        return
    deselected = [item for item in items if item.get_closest_marker("full")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("full")]


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
def drain_rounds(
    pytestconfig: pytest.Config, kafka_bootstrap: str, drain_topic: str, drain_plan: DrainPlan
) -> dict[str, list[RoundResult]]:
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
    pytestconfig.stash[DRAIN_ROUNDS_KEY] = results  # for the rates document's drain rows
    return results


@pytest.fixture(scope="session")
def rate_settings(pytestconfig: pytest.Config) -> RateSettings:
    return RATE_QUICK if pytestconfig.getoption("quick") else RATE_FULL


@pytest.fixture(scope="session")
def rate_runner(pytestconfig: pytest.Config, kafka_bootstrap: str, rate_settings: RateSettings) -> RateRunner:
    """The session's rate rounds (request it inside a test, after the benchmark fixture, so
    that ``--benchmark-skip`` starts no broker)."""
    runner = RateRunner(kafka_bootstrap, RealCluster(kafka_bootstrap).create_topic, rate_settings)
    pytestconfig.stash[RATES_KEY] = runner
    return runner


def rates_document(config: pytest.Config) -> dict[str, Any] | None:
    """Every rate result of the session, and the drain's, as the JSON document of
    ``rate_report.py``; ``None`` if no rate round ran."""
    runner = config.stash.get(RATES_KEY, None)
    if runner is None or not (runner.series or runner.idle):
        return None
    settings = runner.settings
    sweep = [row for name, results in runner.series.items() if name.startswith("rate-") for row in series_rows(results)]
    doc: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": "quick" if config.getoption("quick") else "full",
        "settings": {
            "seed_rate": SEED_RATE,
            "value_bytes": VALUE_SIZE,
            "partitions": SEED_PARTITIONS,
            "plugins": SEED_PLUGINS,
            "batch_size": BATCH_SIZE,
            "fetch_wait_max_ms": FETCH_WAIT_MAX_MS,
            "producer_linger_ms": PRODUCER_LINGER_MS,
            "producer_chunk": PACE_MESSAGES,
            "seconds": settings.seconds,
            "warmup": settings.warmup,
            "tail": settings.tail,
            "window_seconds": settings.seconds - settings.warmup - settings.tail,
            "rounds": settings.rounds,
        },
        "sweep": sorted(sweep, key=lambda row: (row["rate"], row["impl"])),
        "drain": _drain_rows(config),
        "scale": series_rows(runner.series.get("scale", {})),
        "idle": [
            {
                "impl": impl,
                "cpu_percent": round(window.cpu_percent, 4),
                "ctx_switches_per_s": round(window.ctx_switches / window.seconds, 1),
                "window_seconds": round(window.seconds, 3),
                "thread_shares": window.thread_shares(),
            }
            for impl, window in runner.idle.items()
        ],
    }
    return doc


def _drain_rows(config: pytest.Config) -> list[dict[str, Any]]:
    rounds = config.stash.get(DRAIN_ROUNDS_KEY, {})
    plan = config.stash[REPORT_KEY].plan
    return [
        {
            "impl": impl,
            "messages": plan.messages if plan else None,
            "partitions": PARTITIONS,
            "rounds": len(results),
            "cpu_us_per_msg": round(statistics.median(r.cpu_us_per_msg for r in results), 4),
            "msg_per_s": round(statistics.median(r.msg_per_s for r in results), 1),
            "cpu_percent": round(statistics.median(100 * r.cpu_seconds / r.wall_seconds for r in results), 2),
        }
        for impl, results in rounds.items()
        if results
    ]


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    doc = rates_document(config)
    if doc is None:
        return
    path: Path = config.getoption("rates_json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    png: Path | None = config.getoption("rates_png")
    if png is not None and doc["sweep"]:
        from plot_rates import plot  # noqa: PLC0415 (matplotlib only when a plot is asked for)

        plot(doc, png)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    _drain_summary(terminalreporter)
    doc = rates_document(terminalreporter.config)
    if doc is not None:
        for title, lines in summary_lines(doc):
            terminalreporter.write_sep("-", title)
            for line in lines:
                terminalreporter.write_line(line)
        path = terminalreporter.config.getoption("rates_json")
        terminalreporter.write_line(f"rate results: {path} (written at the end of the session)")


def _drain_summary(terminalreporter: pytest.TerminalReporter) -> None:
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
