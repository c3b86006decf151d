"""Rate benchmarks: fastconsume and the hand-written confluent-kafka loop under a steady
produced load (``rate.py``), CPU % of a core of the consumer process over a steady-state
window, delivery latency, context switches and per-thread CPU.

- *seed load* (quick and full): 14,666 msg/s, 6 partitions, 3 plugins, both implementations
  alternating; the quick pass fails if fastconsume's median CPU is above the loop's
  (:func:`test_seed_load_gate`, a ratio of the same run's medians, never an absolute time);
- *sweep* (full): 1k to 50k msg/s, both implementations; with the drain benchmark's result,
  written to the rates JSON document and drawn by ``plot_rates.py``;
- *scale* (full): 1 to 48 partitions and 1 to 8 plugins at the seed rate, fastconsume;
- *idle* (full): a consumer of an empty topic, which must stay at or below 0.1% of a core.

Each test replays its rounds through ``benchmark.pedantic`` with :data:`CLOCK`, which
advances by each round's CPU seconds per window second, so pytest-benchmark's statistics
(and its saved JSON) are the consumer's share of a core (0.1 = 10%); ``extra_info`` holds
the medians and each round's values.
"""

from __future__ import annotations

import doctest
import importlib
import statistics
from collections.abc import Sequence

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from drain import IMPLEMENTATIONS, VALUE_SIZE, ReplayClock
from rate import SEED_RATE, RatePlan, RateResult, RateRunner, RateSettings, Window
from rate_report import rate_row

SWEEP_RATES = (1_000, 5_000, SEED_RATE, 50_000)
SCALE = ((1, 3), (6, 3), (24, 3), (48, 3), (6, 1), (6, 8))  # (partitions, plugins)
GATE = 1.0
"""The CI gate: fastconsume's median CPU over the loop's, at most."""
IDLE_LIMIT_PERCENT = 0.1


CLOCK = ReplayClock("consumer CPU seconds per window second of each round, measured from /proc")


@pytest.mark.parametrize("name", ["rate", "rate_report", "plot_rates"])
def test_docstring_examples(name: str) -> None:
    """The examples in the benchmark modules' docstrings hold (no broker needed)."""
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0


def replay(benchmark: BenchmarkFixture, windows: Sequence[Window]) -> None:
    it = iter(windows)

    def run_round() -> Window:
        window = next(it)
        CLOCK.advance(window.cpu_seconds / window.seconds)
        return window

    benchmark.pedantic(run_round, rounds=len(windows), iterations=1)  # type: ignore[no-untyped-call]


def check_delivered(rounds: Sequence[RateResult]) -> None:
    """Every plugin saw every message produced, and latencies were sampled in the window."""
    for r in rounds:
        expected = (r.sent,) * r.plan.plugins
        assert r.counts == expected, f"{r.impl} plugins counted {r.counts}, expected {r.sent} each"
        assert r.bytes == r.sent * VALUE_SIZE, f"{r.impl} summed {r.bytes} bytes, expected {r.sent * VALUE_SIZE}"
        assert r.latencies_ms, f"{r.impl}: no latency sample in the window"
        assert r.window.seconds > 0.5 * r.plan.window, f"{r.impl}: window of {r.window.seconds:.1f} s"


def record(benchmark: BenchmarkFixture, plan: RatePlan, impl: str, rounds: list[RateResult]) -> None:
    check_delivered(rounds)
    replay(benchmark, [r.window for r in rounds])
    row = rate_row(plan, impl, rounds)
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "round_values"})
    benchmark.extra_info.update(
        value_bytes=VALUE_SIZE,
        cpu_percent_rounds=[round(r.cpu_percent, 4) for r in rounds],
        latency_p99_ms_rounds=[round(r.latency_ms(0.99), 2) for r in rounds],
    )


def seed_rounds(request: pytest.FixtureRequest, settings: RateSettings) -> dict[str, list[RateResult]]:
    # Requested only inside the test, so that --benchmark-skip starts no broker.
    runner: RateRunner = request.getfixturevalue("rate_runner")
    plan = settings.plan(SEED_RATE)
    return runner.rounds(f"rate-{SEED_RATE}", [plan])[plan]


@pytest.mark.benchmark(group="seed-load", timer=CLOCK)
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_seed_load(
    benchmark: BenchmarkFixture, request: pytest.FixtureRequest, impl: str, rate_settings: RateSettings
) -> None:
    rounds = seed_rounds(request, rate_settings)[impl]
    assert len(rounds) == rate_settings.rounds
    record(benchmark, rate_settings.plan(SEED_RATE), impl, rounds)


@pytest.mark.timeout(1800)
def test_seed_load_gate(
    request: pytest.FixtureRequest, pytestconfig: pytest.Config, rate_settings: RateSettings
) -> None:
    """The CI gate at the seed load: fastconsume's median CPU is at most the loop's."""
    if pytestconfig.getoption("benchmark_skip"):
        pytest.skip("benchmarks skipped (--benchmark-skip)")
    rounds = seed_rounds(request, rate_settings)
    for impl_rounds in rounds.values():
        check_delivered(impl_rounds)
    fc = statistics.median(r.cpu_percent for r in rounds["fastconsume"])
    loop = statistics.median(r.cpu_percent for r in rounds["confluent"])
    assert fc <= GATE * loop, (
        f"at {SEED_RATE:,} msg/s fastconsume used {fc:.2f}% of a core, the confluent loop {loop:.2f}% "
        f"({fc / loop:.2f}x; medians of {len(rounds['fastconsume'])} alternating rounds; gate {GATE}x)"
    )


@pytest.mark.full
@pytest.mark.benchmark(group="rate-sweep", timer=CLOCK)
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("rate", SWEEP_RATES)
def test_rate_sweep(
    benchmark: BenchmarkFixture, request: pytest.FixtureRequest, rate: int, impl: str, rate_settings: RateSettings
) -> None:
    runner: RateRunner = request.getfixturevalue("rate_runner")
    # The drain is the sweep's last point: run here if not yet, so the rates document has it.
    request.getfixturevalue("drain_rounds")
    plan = rate_settings.plan(rate)
    rounds = runner.rounds(f"rate-{rate}", [plan])[plan][impl]
    record(benchmark, plan, impl, rounds)


@pytest.mark.full
@pytest.mark.benchmark(group="scale", timer=CLOCK)
@pytest.mark.timeout(3600)
@pytest.mark.parametrize(("partitions", "plugins"), SCALE)
def test_scale(
    benchmark: BenchmarkFixture,
    request: pytest.FixtureRequest,
    partitions: int,
    plugins: int,
    rate_settings: RateSettings,
) -> None:
    runner: RateRunner = request.getfixturevalue("rate_runner")
    plans = [rate_settings.plan(SEED_RATE, p, n) for p, n in SCALE]
    plan = rate_settings.plan(SEED_RATE, partitions, plugins)
    rounds = runner.rounds("scale", plans, impls=("fastconsume",))[plan]["fastconsume"]
    record(benchmark, plan, "fastconsume", rounds)


@pytest.mark.full
@pytest.mark.benchmark(group="idle", timer=CLOCK)
@pytest.mark.timeout(600)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_idle(benchmark: BenchmarkFixture, request: pytest.FixtureRequest, impl: str) -> None:
    runner: RateRunner = request.getfixturevalue("rate_runner")
    window = runner.idle_windows()[impl]
    replay(benchmark, [window])
    benchmark.extra_info.update(
        implementation=impl,
        cpu_percent=window.cpu_percent,
        ctx_switches_per_s=window.ctx_switches / window.seconds,
        window_seconds=window.seconds,
        thread_shares=window.thread_shares(),
    )
    if impl == "fastconsume":
        assert window.cpu_percent <= IDLE_LIMIT_PERCENT, (
            f"idle fastconsume used {window.cpu_percent:.3f}% of a core (limit {IDLE_LIMIT_PERCENT}%)"
        )
