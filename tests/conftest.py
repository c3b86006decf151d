from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kafka import Cluster, MockKafka, RealCluster, real_broker


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Apache Kafka broker for the session."""
    with real_broker(tmp_path_factory.mktemp("kafka")) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def real_cluster(kafka_bootstrap: str) -> RealCluster:
    return RealCluster(kafka_bootstrap)


@pytest.fixture(scope="session")
def mock_cluster() -> MockKafka:
    """librdkafka's in-process mock cluster, shared by the session."""
    return MockKafka()


@pytest.fixture(params=["kafka", "mock"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """Runs a test once against the real broker and once against the mock cluster."""
    name = "real_cluster" if request.param == "kafka" else "mock_cluster"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]
