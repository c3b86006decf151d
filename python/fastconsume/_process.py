"""This process's threads, CPU time and memory, for ``App.stats()``."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

from ._stats import ProcessStats


def process_stats() -> ProcessStats:
    """``threads``, ``cpu_seconds`` (user + system, every thread) and ``rss_bytes``.

    >>> sorted(process_stats())
    ['cpu_seconds', 'rss_bytes', 'threads']
    """
    return {"threads": _threads(), "cpu_seconds": time.process_time(), "rss_bytes": _rss_bytes()}


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux: Python's own count misses native threads, so say so
        return -1


def _rss_bytes() -> int:
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):  # peak, not current, where /proc is missing
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
