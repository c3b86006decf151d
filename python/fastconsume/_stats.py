"""What ``App.stats()`` returns, typed: the native consumer's counters (``_core.Consumer.stats()``,
whose stub returns :class:`ConsumerStats`) and this process's own. A type checker knows every
key, so ``app.stats()["plugins"]["index"]["messages"]`` is an ``int`` without a cast.

>>> sorted(Stats.__annotations__)
['messages', 'partitions', 'plugins', 'process', 'running', 'timers']
"""

from __future__ import annotations

from typing import TypedDict


class PluginStats(TypedDict):
    """One plugin's counters in a run: calls and messages handled (retries included), what its
    lane holds, its call latency, retries, dead letters, deadlines and throttling."""

    batches: int
    """Calls made, retries included."""
    messages: int
    """Messages handed to the plugin, retries included."""
    errors: int
    """Calls that failed."""
    in_flight: int
    """Calls running now (a dead-letter write that waits counts as its call's)."""
    queued: int
    """Messages waiting or running in the plugin's lane now."""
    queued_peak: int
    """The most messages the lane held at once this run."""
    max_queued: int
    """The lane's bound, from the plugin's options."""
    latency_p50: float
    """Median call latency, in seconds."""
    latency_p99: float
    """99th percentile call latency, in seconds."""
    retries: int
    """Retries scheduled."""
    retry_wait: float
    """The backoff of all retries scheduled, in seconds."""
    dead_lettered: int
    """Messages written to the dead-letter topic, and acknowledged."""
    dead_letters_pending: int
    """Messages whose dead-letter write waits for the broker's acknowledgement now."""
    dead_letters_oldest: float
    """Seconds the oldest such write has waited (0.0 if none)."""
    overruns: int
    """Sync calls that ran past their timeout (their results count)."""
    timeouts: int
    """Async calls cancelled at their timeout."""
    throttled: int
    """Times the plugin's rate limit held a call back."""


class PartitionStats(TypedDict):
    """One partition consumed this run; offsets are ``None`` until known."""

    topic: str
    partition: int
    assigned: bool
    """Whether this consumer holds the partition now."""
    position: int | None
    """The next offset to fetch."""
    committed: int | None
    """The offset committed for the group."""
    lag: int | None
    """The high watermark minus the committed offset."""


class TimerStats(TypedDict):
    """The timer wheel (linger, deadlines, backoff, wake-ups): entries now and at most this run."""

    entries: int
    peak: int


class ProcessStats(TypedDict):
    """This process: its threads (-1 where not known), CPU seconds (user + system, every
    thread) and resident memory."""

    threads: int
    cpu_seconds: float
    rss_bytes: int


class ConsumerStats(TypedDict):
    """The native consumer's counters of the current or last run."""

    running: bool
    """Whether a run is going on."""
    messages: int
    """Messages fetched and handed to the plugins."""
    timers: TimerStats
    plugins: dict[str, PluginStats]
    """By plugin name."""
    partitions: dict[str, PartitionStats]
    """By ``"topic[partition]"``."""


class Stats(ConsumerStats):
    """What ``App.stats()`` returns: the consumer's counters and this process's."""

    process: ProcessStats
