"""Stubs for the native module. Checked against the module by ``mypy.stubtest``."""

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypedDict, final

from ._stats import ConsumerStats

__all__ = [
    "ArrowColumn",
    "Batch",
    "Consumer",
    "Message",
    "MockCluster",
    "__version__",
    "_close_interpreter_gate",
    "_count_signals",
    "_exit_at_once_on",
    "_live_arrow_exports",
    "_signal_deliveries",
    "inspect",
    "produce",
]
__version__: str

@final
class Message:
    """A Kafka message. Immutable; shared by every plugin that sees it."""

    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> tuple[tuple[str, bytes | None], ...]:
        """``(name, value)`` pairs, in the order the producer wrote them."""
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int | None:
        """Milliseconds since the epoch, or ``None`` if the broker gave none."""

@final
class Batch:
    """The messages one plugin call receives, in offset order per partition."""

    @property
    def plugin(self) -> str:
        """The name of the plugin this batch was made for."""
    @property
    def topic(self) -> str:
        """The topic every message of the batch comes from."""
    @property
    def partition(self) -> int:
        """The partition every message of the batch comes from."""
    @property
    def attempt(self) -> int:
        """1 on the first call with these messages, 2 on the first retry, and so on."""
    @property
    def deadline(self) -> float | None:
        """When this call should be done, on ``time.monotonic()``'s clock; ``None`` without
        a ``timeout``."""
    def remaining(self) -> float | None:
        """Seconds left until the deadline (0.0 once passed); ``None`` without a
        ``timeout``."""
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Message]: ...
    def __getitem__(self, index: int, /) -> Message: ...
    def values(self) -> list[bytes | None]:
        """The message values in order, without building ``Message`` objects."""
    def arrow_values(self) -> ArrowColumn:
        """The message values in order as an Arrow array (nullable large binary), without a
        Python object per message and without copying."""
    def arrow_keys(self) -> ArrowColumn:
        """The message keys in order as an Arrow array, like ``arrow_values()``."""

@final
class ArrowColumn:
    """The keys or values of a call's batch, for Arrow: ``pyarrow.array(column)``,
    ``polars.Series(column)`` and other readers of the Arrow PyCapsule protocol read it
    without copying. A nullable large binary array (``pyarrow.large_binary()``), one entry
    per message of the batch, in order (``len(column) == len(batch)``): the message's
    bytes, or null for a null key or value. Immutable; each export holds the batch's memory
    until the array read from it is dropped, however long after the call."""

    @property
    def name(self) -> str:
        """``"keys"`` or ``"values"``: the field's name in the export."""
    def __len__(self) -> int: ...
    def __arrow_c_schema__(self) -> object:
        """The Arrow field (nullable large binary), as an ``arrow_schema`` capsule."""
    def __arrow_c_array__(self, requested_schema: object | None = None) -> tuple[object, object]:
        """The field and the entries, as ``arrow_schema`` and ``arrow_array`` capsules. Each
        call exports anew, over the same memory."""

class PluginSpec(Protocol):
    """What ``Consumer.run`` reads of each plugin (``fastconsume._plugins.Plugin``)."""

    @property
    def name(self) -> str: ...
    @property
    def func(self) -> Callable[[Batch], object]: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def max_queued(self) -> int: ...
    @property
    def max_queued_bytes(self) -> int: ...
    @property
    def is_async(self) -> bool: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def rate_limit(self) -> RateLimitSpec | None: ...
    @property
    def retries(self) -> int: ...
    @property
    def backoff(self) -> tuple[float, float]: ...
    @property
    def dlq(self) -> str | None: ...
    @property
    def failure_policy(self) -> str: ...

class RateLimitSpec(Protocol):
    """What ``Consumer.run`` reads of a rate limit (``fastconsume.RateLimit``, burst set)."""

    @property
    def per_second(self) -> float: ...
    @property
    def burst(self) -> int | None: ...

class EventLoop(Protocol):
    """What ``Consumer.run`` needs of the event loop of async plugins
    (``fastconsume._plugins.AsyncLoop``)."""

    def start(self, func: Any, batch: Batch, done: Callable[[Any], object], /) -> Any: ...

@final
class Consumer:
    def __new__(
        cls,
        *,
        bootstrap: str,
        group: str,
        topics: list[str],
        kafka: list[tuple[str, str]],
        connect_timeout: float,
        wait_for_topics: bool = False,
    ) -> Consumer: ...
    def run(
        self,
        plugins: Sequence[PluginSpec],
        *,
        linger: float,
        workers: int,
        shutdown_timeout: float,
        revoke_timeout: float,
        idle_timeout: float | None = None,
        rate_limit: RateLimitSpec | None = None,
        event_loop: EventLoop | None = None,
        dlq_timeout: float = 30.0,
    ) -> None: ...
    def stop(self) -> None: ...
    def stats(self) -> ConsumerStats: ...

@final
class MockCluster:
    """librdkafka's in-process Kafka cluster. It lives until this object is collected."""

    def __new__(cls, brokers: int = 1) -> MockCluster: ...
    @property
    def bootstrap(self) -> str:
        """``host:port,...`` for ``App(bootstrap=...)``."""
    def create_topic(self, topic: str, partitions: int = 1) -> None: ...

def produce(
    bootstrap: str,
    topic: str,
    values: list[bytes],
    *,
    keys: list[bytes] | None = None,
    partition: int | None = None,
) -> int:
    """Produces ``values`` to ``topic`` and waits for every acknowledgement."""

class _InspectMember(TypedDict):
    member_id: str
    client_id: str
    host: str
    assignment: dict[str, list[int]]

class _InspectPartition(TypedDict):
    partition: int
    low: int
    high: int
    committed: int | None
    lag: int | None
    owner: str | None

class _InspectTopic(TypedDict):
    error: str | None
    unknown: bool
    partitions: list[_InspectPartition]

class _InspectReport(TypedDict):
    brokers: list[str]
    group: str
    group_state: str | None
    group_error: str | None
    members: list[_InspectMember]
    topics: dict[str, _InspectTopic]

def inspect(
    *,
    bootstrap: str,
    group: str,
    topics: list[str],
    kafka: list[tuple[str, str]],
    connect_timeout: float,
) -> _InspectReport:
    """Connects (each broker call bounded by ``connect_timeout`` seconds) and reports the
    brokers, the group's state, members and assignment, and per topic its partitions'
    watermarks, committed offsets, lag and owners, without joining the group. A topic's
    problems (unknown topic, unreadable watermarks) are in its ``"error"``; ``low``/``high``
    are -1 when unknown."""

def _close_interpreter_gate() -> tuple[int, int]:
    """Stops native threads from attaching to the interpreter from now on (run by an
    ``atexit`` hook); returns how many worker threads are still inside a plugin call, and
    how many runs have not returned."""

def _count_signals(signals: Sequence[int]) -> None:
    """Counts every delivery of ``signals`` atomically in a native handler, then passes it on
    to the Python handler installed now (until the signal's handler is set again)."""

def _signal_deliveries() -> int:
    """Deliveries of the signals ``_count_signals`` counts, since the process began."""

def _live_arrow_exports() -> int:
    """Arrays exported and not released yet (a test hook: each one holds its batch)."""

def _exit_at_once_on(signals: Sequence[int], code: int) -> None:
    """Makes each of ``signals`` end the process at once with ``code`` (native handler)."""
