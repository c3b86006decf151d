"""The exceptions fastconsume raises.

Each subclasses :class:`FastconsumeError` and, where one fits, the builtin a caller would
already catch: a bad setting is a :class:`ValueError`, an unreachable broker a
:class:`ConnectionError`.

>>> import fastconsume as fc
>>> try:
...     fc.App(bootstrap="127.0.0.1:9092", group="g", topics=[])
... except ValueError as error:
...     print(type(error).__name__, error)
ConfigError topics must name at least one topic
"""

from __future__ import annotations

__all__ = ["ConfigError", "FastconsumeError", "KafkaConnectionError", "KafkaError", "PluginError"]


class FastconsumeError(Exception):
    """Base class of every error fastconsume raises."""


class ConfigError(FastconsumeError, ValueError):
    """A setting is invalid: an argument, a plugin option or a librdkafka property."""


class KafkaConnectionError(FastconsumeError, ConnectionError):
    """The brokers could not be reached within ``connect_timeout``."""


class KafkaError(FastconsumeError):
    """Kafka failed in a way the consumer cannot continue from."""


class PluginError(FastconsumeError):
    """A plugin raised. The plugin's own exception is the ``__cause__``; the message names the
    plugin and the partitions and offsets of the batch it failed on, which stay uncommitted."""
