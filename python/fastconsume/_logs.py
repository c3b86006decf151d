"""What the CLI shows while it runs: structured log lines through :mod:`logging` (the Rust
core and librdkafka log into the ``fastconsume`` logger), and on a terminal a live one-line
progress display."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._app import App

PROGRESS_INTERVAL = 1.0
"""Seconds between two refreshes of the progress line."""


class LogfmtFormatter(logging.Formatter):
    """``key=value`` lines that log collectors parse without configuration.

    >>> record = logging.LogRecord("fastconsume", logging.WARNING, __file__, 1, 'retrying "x"', None, None)
    >>> LogfmtFormatter(worker="2").format(record).split(" ", 1)[1]
    'level=warning logger=fastconsume worker=2 msg="retrying \\\\"x\\\\""'
    """

    def __init__(self, worker: str | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = [f"ts={stamp}", f"level={record.levelname.lower()}", f"logger={record.name}"]
        if self._worker is not None:
            fields.append(f"worker={self._worker}")
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        fields.append("msg=" + _quoted(message))
        return " ".join(fields)


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def configure_logging() -> None:
    """Logs at INFO to stderr as ``key=value`` lines, naming the worker when supervised;
    does nothing if the application configured logging itself."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(os.environ.get("FASTCONSUME_WORKER_INDEX")))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def describe_progress(stats: dict[str, Any], rate: float) -> str:
    """One line: messages per second, total lag, and each plugin's p99 latency.

    >>> stats = {"partitions": {"t[0]": {"lag": 7}, "t[1]": {"lag": None}},
    ...          "plugins": {"index": {"latency_p99": 0.0123}}}
    >>> describe_progress(stats, 1520.4)
    '1,520 msg/s  lag 7  p99 index 12.3ms'
    """
    lag = sum(p["lag"] or 0 for p in stats["partitions"].values())
    plugins = "  ".join(f"p99 {name} {p['latency_p99'] * 1000:.1f}ms" for name, p in stats["plugins"].items())
    return f"{rate:,.0f} msg/s  lag {lag}  {plugins}".rstrip()


@contextmanager
def progress_line(app: App) -> Iterator[None]:
    """While the body runs, rewrites one line on stderr every second, if stderr is a terminal."""
    # Supervised workers share the supervisor's terminal: N progress lines would fight.
    if not sys.stderr.isatty() or os.environ.get("FASTCONSUME_WORKER_INDEX") is not None:
        yield
        return
    done = threading.Event()

    def show() -> None:
        last_count, last_time = 0, time.monotonic()
        while not done.wait(PROGRESS_INTERVAL):
            stats = app.stats()
            now = time.monotonic()
            rate = (stats["messages"] - last_count) / (now - last_time)
            last_count, last_time = stats["messages"], now
            sys.stderr.write("\r\x1b[K" + describe_progress(stats, rate))
            sys.stderr.flush()

    thread = threading.Thread(target=show, name="fastconsume-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        sys.stderr.write("\n")
