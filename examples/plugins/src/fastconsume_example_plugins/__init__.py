"""Example plugins other packages can ship: a function and a class with setup and teardown.

Both record what they handle as ``<topic> <partition> <offset>`` lines in
``$EXAMPLE_OUT/<plugin>-<pid>.log`` (default ``example-out``), so a test can
check that every message reached them; ``sink`` also writes the values, one a line, to
``sink-<pid>.values`` there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import fastconsume as fc

__all__ = ["Sink", "uppercase_count"]

uppercase_total = 0
"""Upper-case letters in the values handled by this process."""


def _log_path(plugin: str, suffix: str = ".log") -> Path:
    out = Path(os.environ.get("EXAMPLE_OUT", "example-out"))
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{plugin}-{os.getpid()}{suffix}"


def _handled(batch: fc.Batch) -> str:
    return "".join(f"{batch.topic} {batch.partition} {message.offset}\n" for message in batch)


def uppercase_count(batch: fc.Batch) -> None:
    """Counts the upper-case ASCII letters of the values: a plugin can be a plain function."""
    global uppercase_total  # noqa: PLW0603 -- one counter per process, on purpose
    uppercase_total += sum(sum(65 <= byte <= 90 for byte in value or b"") for value in batch.values())
    with _log_path("uppercase_count").open("a") as file:
        file.write(_handled(batch))


class Sink:
    """Writes every value to a file: a class plugin holding a per-process resource.

    fastconsume instantiates the class with no arguments, calls ``setup()`` in the process
    that consumes, before the first batch, and ``teardown()`` after the last one (also when
    the run fails).
    """

    def __init__(self) -> None:
        self._values: BinaryIO | None = None

    def setup(self) -> None:
        self._values = _log_path("sink", ".values").open("ab")

    def __call__(self, batch: fc.Batch) -> None:
        assert self._values is not None, "setup() runs before the first batch"
        self._values.write(b"".join((value or b"") + b"\n" for value in batch.values()))
        self._values.flush()
        with _log_path("sink").open("a") as file:
            file.write(_handled(batch))

    def teardown(self) -> None:
        if self._values is not None:
            self._values.close()
            self._values = None
