"""Drain benchmark: fastconsume against the hand-written confluent-kafka loop it replaces.

Both drain the same pre-produced topic through the same three plugins, each round in a fresh
process (see ``drain.py``). The ``drain_rounds`` fixture runs the rounds of both
implementations alternately, so that drift on a shared machine hits both alike; each test
then replays its implementation's rounds through ``benchmark.pedantic``. The benchmark's
timer is :data:`CLOCK`, which advances by exactly each round's measured drain time (first
message to the last one through all plugins), so pytest-benchmark's statistics and saved
JSON hold the drain times rather than process start-up and group-join noise.

``extra_info`` holds the medians and the per-round values of consumer-process CPU
microseconds per message and messages per second; the session ends with a two-row table.
:func:`test_drain_gate` is the CI gate: the quick pass fails if fastconsume's median CPU per
message is above the loop's in the same run (a ratio, never an absolute time).
"""

from __future__ import annotations

import statistics

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from drain import IMPLEMENTATIONS, VALUE_SIZE, DrainPlan, DrainReport, ReplayClock, RoundResult

CLOCK = ReplayClock("drain wall seconds of each round, measured in its process")
GATE = 1.0
"""fastconsume's median CPU per message over the loop's, at most."""


@pytest.mark.benchmark(group="drain", timer=CLOCK)
@pytest.mark.timeout(600)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_drain(
    benchmark: BenchmarkFixture,
    request: pytest.FixtureRequest,
    impl: str,
    drain_plan: DrainPlan,
    drain_report: DrainReport,
) -> None:
    # Requested only now, so that --benchmark-skip (which skips in the benchmark fixture)
    # does not start a broker and drain first.
    drain_rounds: dict[str, list[RoundResult]] = request.getfixturevalue("drain_rounds")
    rounds = drain_rounds[impl]
    n = drain_plan.messages
    assert len(rounds) == drain_plan.rounds
    for r in rounds:
        assert r.counts == (n, n, n), f"{impl} plugins counted {r.counts}, expected {n} each"
        assert r.bytes == n * VALUE_SIZE, f"{impl} summed {r.bytes} bytes, expected {n * VALUE_SIZE}"

    replay = iter(rounds)

    def run_round() -> RoundResult:
        result = next(replay)
        CLOCK.advance(result.wall_seconds)
        return result

    benchmark.pedantic(run_round, rounds=len(rounds), iterations=1)  # type: ignore[no-untyped-call]

    cpu_us = [r.cpu_us_per_msg for r in rounds]
    rates = [r.msg_per_s for r in rounds]
    row = {"cpu_us_per_msg": statistics.median(cpu_us), "msg_per_s": statistics.median(rates)}
    benchmark.extra_info.update(
        implementation=impl,
        messages=n,
        value_bytes=VALUE_SIZE,
        rounds=len(rounds),
        **row,
        cpu_us_per_msg_rounds=cpu_us,
        msg_per_s_rounds=rates,
        cpu_seconds_rounds=[r.cpu_seconds for r in rounds],
        wall_seconds_rounds=[r.wall_seconds for r in rounds],
    )
    drain_report.rows[impl] = row


@pytest.mark.timeout(600)
def test_drain_gate(request: pytest.FixtureRequest, pytestconfig: pytest.Config, drain_plan: DrainPlan) -> None:
    """The CI gate in drain: fastconsume's median CPU per message is at most the loop's."""
    if pytestconfig.getoption("benchmark_skip"):
        pytest.skip("benchmarks skipped (--benchmark-skip)")
    drain_rounds: dict[str, list[RoundResult]] = request.getfixturevalue("drain_rounds")
    n = drain_plan.messages
    for impl, rounds in drain_rounds.items():
        assert all(r.counts == (n, n, n) for r in rounds), f"{impl}: {[r.counts for r in rounds]}, expected {n} each"
    fc = statistics.median(r.cpu_us_per_msg for r in drain_rounds["fastconsume"])
    loop = statistics.median(r.cpu_us_per_msg for r in drain_rounds["confluent"])
    assert fc <= GATE * loop, (
        f"in drain fastconsume used {fc:.2f} CPU us/msg, the confluent loop {loop:.2f} ({fc / loop:.2f}x; "
        f"medians of {len(drain_rounds['fastconsume'])} alternating rounds; gate {GATE}x)"
    )
