"""pytest fixtures for testing fastconsume plugins against a Kafka that needs no broker.

Installed with fastconsume as the ``pytest11`` entry point ``fastconsume``, so pytest loads it
by itself (``-p no:fastconsume`` turns it off; do not also pass ``-p fastconsume.pytest_plugin``,
which would register it twice). It adds two fixtures:

- ``fastconsume_mock`` (session scope): a :class:`~fastconsume.testing.MockCluster`,
  librdkafka's in-process Kafka cluster, started on first use.
- ``fastconsume_topic`` (function scope): a factory ``fastconsume_topic(messages=(), *,
  partitions=1, topic=None) -> str`` that creates a new topic on ``fastconsume_mock``,
  produces ``messages`` to it (values, ``(key, value)`` pairs or mappings, as
  :func:`~fastconsume.testing.run_plugin` takes them) and returns its name.

For most plugin tests :func:`~fastconsume.testing.run_plugin` is enough; the fixtures are
for tests that build their own :class:`~fastconsume.App`::

    import fastconsume as fc

    def test_my_plugin_counts(fastconsume_mock, fastconsume_topic):
        topic = fastconsume_topic([b"a", b"b", b"c"], partitions=2)
        app = fc.App(fastconsume_mock.bootstrap, "test-group", topic)
        seen = []
        app.add_plugin(lambda batch: seen.extend(batch.values()), name="collect")
        app.run(idle_timeout=1.0)
        assert sorted(seen) == [b"a", b"b", b"c"]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import pytest

from .testing import MessageSpec, MockCluster, make_topic

__all__ = ["TopicFactory", "fastconsume_mock", "fastconsume_topic"]


class TopicFactory(Protocol):
    """The ``fastconsume_topic`` fixture: makes a topic and returns its name."""

    def __call__(
        self, messages: Iterable[MessageSpec] = (), *, partitions: int = 1, topic: str | None = None
    ) -> str: ...


@pytest.fixture(scope="session")
def fastconsume_mock() -> MockCluster:
    """librdkafka's in-process mock Kafka cluster, shared by the test session."""
    return MockCluster()


@pytest.fixture
def fastconsume_topic(fastconsume_mock: MockCluster) -> TopicFactory:
    """Makes new topics on ``fastconsume_mock``: ``fastconsume_topic(messages, partitions=2)``."""

    def make(messages: Iterable[MessageSpec] = (), *, partitions: int = 1, topic: str | None = None) -> str:
        return make_topic(fastconsume_mock, messages, partitions=partitions, topic=topic)

    return make
