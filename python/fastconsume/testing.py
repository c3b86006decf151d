"""Kafka without a broker, for tests, demos and benchmarks.

>>> from fastconsume.testing import MockCluster, produce
>>> cluster = MockCluster()
>>> cluster.create_topic("events", partitions=2)
>>> produce(cluster.bootstrap, "events", [b"a", b"b", b"c"])
3
"""

from __future__ import annotations

from ._core import MockCluster, produce

__all__ = ["MockCluster", "produce"]
