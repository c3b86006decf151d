"""What a run shows: log lines through :mod:`logging` (the Rust core and librdkafka log into
the ``fastconsume`` logger; every run logs a start line, periodic progress and a summary at
INFO), the CLI's logfmt handler, and on a terminal a live one-line progress display."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TextIO

from ._stats import PluginStats, Stats


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class Reported(Protocol):
    """What a run's report reads of its app (``fastconsume.App``)."""

    @property
    def plugins(self) -> Sequence[_Named]: ...

    def describe(self) -> dict[str, Any]: ...

    def stats(self) -> Stats: ...


PROGRESS_INTERVAL = 1.0
"""Seconds between two refreshes of the terminal's progress line."""
SUMMARY_PARTITIONS = 20
"""Partitions whose committed offset the summary line names; it counts the others."""
CLEAR = "\r\x1b[K"
"""Moves to the start of the terminal's line and erases it."""


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


def describe_progress(stats: Stats, rate: float, previous: Stats | None = None, elapsed: float = 0.0) -> str:
    """One line: messages fetched per second, total lag, and for each plugin its messages
    handled per second (since ``previous``, the stats ``elapsed`` seconds ago), its p99
    latency and its errors.

    >>> before = {"plugins": {"index": {"messages": 0}}}
    >>> stats = {"partitions": {"t[0]": {"lag": 7}, "t[1]": {"lag": None}},
    ...          "plugins": {"index": {"messages": 1000, "latency_p99": 0.0123, "errors": 2}}}
    >>> describe_progress(stats, 1520.4, before, 2.0)
    '1,520 msg/s  lag 7  index 500 msg/s p99 12.3ms 2 errors'
    """
    lag = sum(p["lag"] or 0 for p in stats["partitions"].values())
    earlier: Mapping[str, PluginStats] = previous["plugins"] if previous is not None else {}

    def plugin_rate(name: str, plugin: PluginStats) -> str:
        if name not in earlier or elapsed <= 0:
            return ""
        # max: the first stats of a run may still be the last run's.
        return f" {max(plugin['messages'] - earlier[name]['messages'], 0) / elapsed:,.0f} msg/s"

    plugins = "  ".join(
        f"{name}{plugin_rate(name, p)} p99 {p['latency_p99'] * 1000:.1f}ms {_errors(p['errors'])}"
        for name, p in stats["plugins"].items()
    )
    return f"{rate:,.0f} msg/s  lag {lag}  {plugins}".rstrip()


def _errors(count: int) -> str:
    return f"{count} error{'' if count == 1 else 's'}"


def describe_start(app: Reported, workers: int) -> str:
    """The line a run starts with: where it consumes, with which plugins and threads.

    >>> import fastconsume as fc
    >>> app = fc.App("127.0.0.1:9092", "feeds", ["events", "audit"], read_config=False)
    >>> _ = app.plugin(len)
    >>> describe_start(app, 1)
    "starting: group 'feeds', topics events, audit, plugins len, 1 worker(s), bootstrap 127.0.0.1:9092"
    """
    settings = app.describe()
    return (
        f"starting: group {settings['group']!r}, topics {', '.join(settings['topics'])}, "
        f"plugins {', '.join(p.name for p in app.plugins)}, {workers} worker(s), bootstrap {settings['bootstrap']}"
    )


def describe_summary(stats: Stats, outcome: str, elapsed: float) -> str:
    """The line a run ends with: how it ended, its totals per plugin and the committed offsets.

    >>> stats = {"messages": 1000, "partitions": {"t[0]": {"committed": 600}, "t[1]": {"committed": None}},
    ...          "plugins": {"index": {"messages": 1000, "batches": 2, "errors": 1, "dead_lettered": 0}}}
    >>> for part in describe_summary(stats, "stopped", 12.34).split("; "):
    ...     print(part)
    stopped after 12.3 s: 1,000 messages
    index 1,000 messages in 2 calls, 1 error, 0 dead-lettered
    committed t[0]=600 t[1]=-
    """
    plugins = "; ".join(
        f"{name} {p['messages']:,} messages in {p['batches']:,} calls, {_errors(p['errors'])}, "
        f"{p['dead_lettered']} dead-lettered"
        for name, p in stats["plugins"].items()
    )
    partitions = list(stats["partitions"].items())
    committed = " ".join(
        f"{name}={'-' if p['committed'] is None else p['committed']}" for name, p in partitions[:SUMMARY_PARTITIONS]
    )
    if len(partitions) > SUMMARY_PARTITIONS:
        committed += f" (and {len(partitions) - SUMMARY_PARTITIONS} more partitions)"
    head = f"{outcome} after {elapsed:.1f} s: {stats['messages']:,} messages"
    return "; ".join(part for part in (head, plugins, f"committed {committed or '-'}") if part)


def _progress(
    app: Reported, interval: float, done: threading.Event, started: float
) -> Iterator[tuple[Stats, str, float]]:
    """Every ``interval`` seconds until ``done``: ``app.stats()``, the progress line made from
    it and the previous sample, and the time it was taken."""
    last, last_time = app.stats(), started
    while not done.wait(interval):
        stats = app.stats()
        now = time.monotonic()
        elapsed = max(now - last_time, 1e-9)
        rate = max(stats["messages"] - last["messages"], 0) / elapsed
        yield stats, describe_progress(stats, rate, last, elapsed), now
        last, last_time = stats, now


@contextmanager
def run_report(
    app: Reported, *, workers: int, interval: float, logger: logging.Logger, ended: Callable[[], str]
) -> Iterator[None]:
    """Logs at INFO the start line, then every ``interval`` seconds a progress line (from
    ``app.stats()``, on a thread of its own that sleeps in between: nothing per message),
    and at the end a summary. It names how the run ended: ``ended()`` if the body returned
    (``"stopped"``, ``"drained"``), the exception if it raised (``"failed (PluginError)"``),
    or ``"interrupted"`` for a second signal's ``KeyboardInterrupt``."""
    logger.info("%s", describe_start(app, workers))
    started = time.monotonic()
    done = threading.Event()

    def report() -> None:
        try:
            for _, line, _ in _progress(app, interval, done, started):
                logger.info("progress: %s", line)
        except Exception:  # the run goes on without progress lines, but not silently
            logger.exception("progress lines stopped")

    thread = threading.Thread(target=report, name="fastconsume-report", daemon=True)
    thread.start()
    outcome = "finished"
    try:
        yield
        outcome = ended()
    except KeyboardInterrupt:  # a second signal: the run was left at once
        outcome = "interrupted"
        raise
    except BaseException as error:
        outcome = f"failed ({type(error).__name__})"
        raise
    finally:
        done.set()
        thread.join()
        try:
            logger.info("%s", describe_summary(app.stats(), outcome, time.monotonic() - started))
        except Exception:  # never hides how the run ended
            logger.exception("%s; no summary", outcome)


class _Screen:
    """The terminal as the progress line shares it with everything else written there: a
    write to stdout or stderr first erases the progress line, and once it has ended a line,
    the progress line is drawn again below it. So a log line or a print never lands on the
    progress line, and the progress line stays the last one."""

    def __init__(self, stderr: TextIO) -> None:
        self.stderr = stderr
        self.lock = threading.RLock()
        self.line = ""
        """The progress line, as last drawn ("" before the first)."""
        self.shown = False

    def draw(self, line: str) -> None:
        with self.lock:
            self.line = line
            self.stderr.write(CLEAR + line)
            self.stderr.flush()
            self.shown = True

    def erase(self) -> None:
        with self.lock:
            if self.shown:
                self.stderr.write(CLEAR)
                self.stderr.flush()
                self.shown = False

    def write(self, stream: TextIO, text: str) -> int:
        with self.lock:
            self.erase()
            written = stream.write(text)
            stream.flush()  # out before the line is drawn again, whichever stream it was
            if text.endswith("\n") and self.line:
                self.draw(self.line)
            return written


class _SharedStream:
    """A stream whose writes go through :class:`_Screen`; everything else is the stream's."""

    def __init__(self, screen: _Screen, stream: TextIO) -> None:
        self._screen = screen
        self._stream = stream

    def write(self, text: str) -> int:
        return self._screen.write(self._stream, text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def progress_line(app: Reported) -> Iterator[None]:
    """While the body runs, rewrites one line on stderr every second, if stderr is a terminal.

    Log handlers writing to stderr, and ``sys.stdout``/``sys.stderr`` themselves when they
    are the terminal, write through the same screen for the duration, so their lines appear
    above the progress line instead of being glued onto it.
    """
    # Supervised workers share the supervisor's terminal: N progress lines would fight.
    if not sys.stderr.isatty() or os.environ.get("FASTCONSUME_WORKER_INDEX") is not None:
        yield
        return
    terminal = sys.stderr
    screen = _Screen(terminal)
    shared_err = _SharedStream(screen, terminal)
    replaced: list[tuple[logging.StreamHandler[Any], Any]] = []
    for logger in (logging.getLogger(), logging.getLogger("fastconsume")):
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is terminal:
                replaced.append((handler, handler.setStream(shared_err)))
    stdout = sys.stdout
    sys.stderr = shared_err
    if stdout.isatty():
        sys.stdout = _SharedStream(screen, stdout)
    done = threading.Event()
    started = time.monotonic()

    def show() -> None:
        for stats, line, now in _progress(app, PROGRESS_INTERVAL, done, started):
            running = sum(p["in_flight"] for p in stats["plugins"].values())
            # The clock and the running calls move even while a long call holds everything else still.
            screen.draw(f"[{now - started:,.0f}s] {line}  {running} running")

    thread = threading.Thread(target=show, name="fastconsume-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        screen.line = ""
        screen.erase()
        sys.stdout, sys.stderr = stdout, terminal
        for handler, previous in replaced:
            handler.setStream(previous)
