"""Plugin benchmark through ``fastconsume.testing.bench_plugin``, as a plugin author's CI would
run it: a JSON-decoding plugin drains a topic on the in-process mock cluster, each round with a
new consumer group; the timed part of a round runs from the first call to the last message.

``extra_info`` holds the medians of messages per second and of process CPU microseconds per
message (the mock broker's share included, so compare only with runs of this benchmark).
"""

from __future__ import annotations

import json

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

import fastconsume as fc
from fastconsume.testing import bench_plugin

FULL = (100_000, 5)  # messages, rounds
QUICK = (10_000, 3)


def sum_amounts(batch: fc.Batch) -> int:
    """A typical small plugin: decode each JSON value and aggregate a field."""
    return sum(json.loads(value)["amount"] for value in batch.values() if value is not None)


@pytest.mark.benchmark(group="plugins")
@pytest.mark.timeout(600)
def test_json_plugin(benchmark: BenchmarkFixture, pytestconfig: pytest.Config) -> None:
    messages, rounds = QUICK if pytestconfig.getoption("quick") else FULL
    values = [json.dumps({"id": i, "amount": i % 100, "note": "x" * 40}).encode() for i in range(messages)]

    result = bench_plugin(benchmark, sum_amounts, values, partitions=4, rounds=rounds, batch_size=500)

    assert result["msg_per_s"] > 0
    assert result["cpu_us_per_msg"] > 0
    assert benchmark.extra_info["messages"] == messages
