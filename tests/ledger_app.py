"""An app for the process tests (tests/test_processes.py), run as a subprocess with
``fastconsume run ledger_app:app`` from this folder and configured by environment variables.

Each plugin appends one line per message, ``generation partition offset``, to its own ledger
file, ``{LEDGER_DIR}/{plugin}.{LEDGER_PROCESS}.ledger``, with one ``os.write`` per batch made
before it returns. A committed message is therefore always in the ledger; a message in the
ledger may be uncommitted (the window a crash replays).

- ``LEDGER_BOOTSTRAP``, ``LEDGER_GROUP``, ``LEDGER_TOPIC``, ``LEDGER_DIR``: required.
- ``LEDGER_PROCESS``: names this process in the ledger files' names (default ``p``).
- ``LEDGER_GENERATION``: the first field of every line (default 0).
- ``LEDGER_PLUGINS``: how many of the plugins ``a``, ``b``, ``c`` to register (default 3).
- ``LEDGER_SLEEP_MS``: milliseconds each call sleeps per 100 messages (default 10).
- ``LEDGER_MAX_QUEUED``: each plugin's ``max_queued`` (default 1000: small, so that fetching
  pauses and resumes, and partitions take turns rather than one filling a lane).
- ``LEDGER_STALL``: seconds each plugin's first call sleeps after writing its ledger (default 0).
- ``LEDGER_SHUTDOWN_TIMEOUT``, ``LEDGER_REVOKE_TIMEOUT``: ``App`` arguments (default 30).
- ``LEDGER_KAFKA``: a JSON object of librdkafka properties passed through ``kafka=``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import fastconsume as fc

PLUGINS = (
    # name, batch_size, linger, concurrency: different shapes, so each message's offset is
    # committed only once lanes that batch it differently have all finished it.
    ("a", 100, "20ms", 1),
    ("b", 250, "20ms", 2),
    ("c", 64, "5ms", 1),
)


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None:
        raise SystemExit(f"ledger_app: set {name}")
    return value


def ledger_path(directory: Path, plugin: str, process: str) -> Path:
    return directory / f"{plugin}.{process}.ledger"


def _open_ledger(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # A kill -9 in the middle of a write could leave a torn last line; start on a new one.
    size = os.fstat(fd).st_size
    if size:
        with path.open("rb") as f:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                os.write(fd, b"\n")
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _ledger_plugin(fd: int, generation: int, sleep_per_100: float, stall: float) -> Callable[[fc.Batch], None]:
    first = threading.Event()

    def record(batch: fc.Batch) -> None:
        lines = "".join(f"{generation} {m.partition} {m.offset}\n" for m in batch)
        time.sleep(sleep_per_100 * len(batch) / 100)
        _write_all(fd, lines.encode())
        if stall and not first.is_set():
            first.set()
            print(f"ledger_app: stalling {stall} s on {batch.topic}[{batch.partition}]", file=sys.stderr, flush=True)
            time.sleep(stall)

    return record


def make_app() -> fc.App:
    directory = Path(_env("LEDGER_DIR"))
    process = _env("LEDGER_PROCESS", "p")
    generation = int(_env("LEDGER_GENERATION", "0"))
    sleep_per_100 = float(_env("LEDGER_SLEEP_MS", "10")) / 1000
    stall = float(_env("LEDGER_STALL", "0"))
    max_queued = int(_env("LEDGER_MAX_QUEUED", "1000"))
    kafka = json.loads(_env("LEDGER_KAFKA", "{}"))
    app = fc.App(
        _env("LEDGER_BOOTSTRAP"),
        _env("LEDGER_GROUP"),
        [_env("LEDGER_TOPIC")],
        kafka=kafka,
        shutdown_timeout=float(_env("LEDGER_SHUTDOWN_TIMEOUT", "30")),
        revoke_timeout=float(_env("LEDGER_REVOKE_TIMEOUT", "30")),
    )
    for name, batch_size, linger, concurrency in PLUGINS[: int(_env("LEDGER_PLUGINS", "3"))]:
        fd = _open_ledger(ledger_path(directory, name, process))
        register = app.plugin(
            name=name, batch_size=batch_size, linger=linger, concurrency=concurrency, max_queued=max_queued
        )
        register(_ledger_plugin(fd, generation, sleep_per_100, stall))
    print(f"ledger_app: pid {os.getpid()} generation {generation} process {process}", file=sys.stderr, flush=True)
    return app


app = make_app()
