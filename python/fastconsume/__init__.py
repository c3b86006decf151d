"""fastconsume: consume Kafka and fan every batch out to Python plugins, from a Rust core.

>>> import fastconsume as fc
>>> app = fc.App(bootstrap="127.0.0.1:9092", group="feeds", topics=["events"])
>>> @app.plugin
... def index(batch: fc.Batch) -> None:
...     for message in batch:
...         pass
>>> app.plugins[0].name
'index'
"""

from __future__ import annotations

import logging

from ._app import App
from ._core import ArrowColumn, Batch, Message, __version__
from ._options import PluginOptions
from ._stats import PartitionStats, PluginStats, Stats
from ._values import RateLimit
from .errors import (
    ConfigError,
    FastconsumeError,
    KafkaAuthenticationError,
    KafkaConnectionError,
    KafkaError,
    KafkaTLSError,
    PartialFailure,
    PluginError,
    PluginSignatureError,
    UnknownTopicError,
)

# A library logs; the application decides where to (the CLI does, in logfmt). Without this,
# Python's last-resort handler would print librdkafka's warnings to stderr.
logging.getLogger("fastconsume").addHandler(logging.NullHandler())

__all__ = [
    "App",
    "ArrowColumn",
    "Batch",
    "ConfigError",
    "FastconsumeError",
    "KafkaAuthenticationError",
    "KafkaConnectionError",
    "KafkaError",
    "KafkaTLSError",
    "Message",
    "PartialFailure",
    "PartitionStats",
    "PluginError",
    "PluginOptions",
    "PluginSignatureError",
    "PluginStats",
    "RateLimit",
    "Stats",
    "UnknownTopicError",
    "__version__",
]
