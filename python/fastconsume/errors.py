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

from collections.abc import Iterable
from typing import ClassVar

__all__ = [
    "ConfigError",
    "FastconsumeError",
    "KafkaAuthenticationError",
    "KafkaConnectionError",
    "KafkaError",
    "KafkaTLSError",
    "PartialFailure",
    "PluginError",
    "PluginSignatureError",
    "UnknownTopicError",
]


class FastconsumeError(Exception):
    """Base class of every error fastconsume raises.

    ``exit_code`` is the ``fastconsume`` command's exit status when the error ends it: 1 (a
    run failed) unless a subclass says otherwise.

    >>> import fastconsume as fc
    >>> fc.PluginError("x").exit_code, fc.UnknownTopicError("t").exit_code, fc.KafkaTLSError("y").exit_code
    (1, 2, 5)
    """

    exit_code: ClassVar[int] = 1


class ConfigError(FastconsumeError, ValueError):
    """A setting is invalid: an argument, a plugin option or a librdkafka property."""

    exit_code: ClassVar[int] = 2


class PluginSignatureError(ConfigError, TypeError):
    """A plugin cannot be called with a batch: not callable, no parameter for the batch, or a
    class that needs constructor arguments. Also a :class:`TypeError`, which is what Python
    itself raises for a call that does not fit."""


class UnknownTopicError(ConfigError):
    """A topic to consume does not exist in the cluster (checked once, at start, within
    ``connect_timeout``). The message names the missing topics. ``App(wait_for_topics=True)``
    waits for them instead. A :class:`ConfigError`: the CLI exits with status 2."""


class KafkaConnectionError(FastconsumeError, ConnectionError):
    """The brokers could not be reached within ``connect_timeout``. The message carries
    librdkafka's last meaningful error (a failed resolve, a refused connection). The CLI
    exits with status 3."""

    exit_code: ClassVar[int] = 3


class KafkaAuthenticationError(KafkaConnectionError):
    """The brokers refused the credentials (SASL). Raised as soon as librdkafka reports it,
    not after ``connect_timeout``; the message carries librdkafka's reason, never the
    password. The CLI exits with status 4."""

    exit_code: ClassVar[int] = 4


class KafkaTLSError(KafkaConnectionError):
    """The TLS connection failed: the broker's certificate did not verify (wrong or no CA),
    or a plaintext client reached a TLS listener. Raised as soon as librdkafka reports it;
    the CLI exits with status 5."""

    exit_code: ClassVar[int] = 5


class KafkaError(FastconsumeError):
    """Kafka failed in a way the consumer cannot continue from."""


class PluginError(FastconsumeError):
    """A plugin failed and its retries ran out (``on_failure="stop"``). The plugin's own
    exception is the ``__cause__``; the message names the plugin and the partition and
    offsets of the batch it failed on, which stay uncommitted."""


class PartialFailure(FastconsumeError):
    """Raised by a plugin to say that only some messages of its batch failed: the messages at
    ``indexes`` (positions in the batch it was given) are retried, and dead-lettered if their
    retries run out; the others count as done.

    The error behind it, for logs and dead-letter headers, is ``error`` or else the
    exception it was raised ``from``.

    >>> import fastconsume as fc
    >>> def plugin(batch: fc.Batch) -> None:
    ...     bad = [i for i, value in enumerate(batch.values()) if value == b"poison"]
    ...     if bad:
    ...         raise fc.PartialFailure(bad, ValueError("poisoned value"))
    >>> error = fc.PartialFailure([3, 1])
    >>> error.indexes
    (3, 1)
    """

    def __init__(self, indexes: Iterable[int], error: BaseException | None = None) -> None:
        self.indexes = tuple(indexes)
        self.error = error
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.indexes):
            raise TypeError(f"PartialFailure indexes must be non-negative integers, got {self.indexes!r}")
        super().__init__(f"{len(self.indexes)} message(s) failed" + (f": {error!r}" if error is not None else ""))
