"""An example app with the three kinds of plugin: a class with per-process resources, a
function, and an ``async def``.

Run it against a broker (the configuration and ``FASTCONSUME_*`` variables override the
settings given here)::

    FASTCONSUME_BOOTSTRAP=broker:9092 fastconsume run examples/app.py:app --processes 3

Each plugin appends one ``<topic> <partition> <offset>`` line per message it has handled to
``<out>/<plugin>-<pid>.log``, where ``<out>`` is ``$EXAMPLE_OUT`` (default
``example-out``): reading the files back shows that every plugin saw every message.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path
from typing import TextIO

import fastconsume as fc

app = fc.App(bootstrap="127.0.0.1:9092", group="examples", topics=["events"])


def log_path(plugin: str) -> Path:
    """Where ``plugin`` records what it handled in this process (one file per process, so
    workers never write to the same file)."""
    out = Path(os.environ.get("EXAMPLE_OUT", "example-out"))
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{plugin}-{os.getpid()}.log"


def handled(batch: fc.Batch) -> str:
    """One ``<topic> <partition> <offset>`` line per message of the batch."""
    return "".join(f"{batch.topic} {batch.partition} {message.offset}\n" for message in batch)


class Audit:
    """A class plugin: ``setup`` opens the file once per process, before the first batch, and
    ``teardown`` closes it after the last one."""

    def __init__(self) -> None:
        self.file: TextIO | None = None

    def setup(self) -> None:
        self.file = log_path("audit").open("a")

    def __call__(self, batch: fc.Batch) -> None:
        assert self.file is not None, "setup() runs before the first batch"
        self.file.write(handled(batch))  # one write and one flush per batch, not per message
        self.file.flush()

    def teardown(self) -> None:
        if self.file is not None:
            self.file.close()


app.add_plugin(Audit, name="audit", batch_size=500, timeout="5s")

words: Counter[bytes] = Counter()  # this process's word counts


@app.plugin(batch_size=1000, linger="50ms")
def word_count(batch: fc.Batch) -> None:
    """A function plugin: ``batch.values()`` gives the values without building messages."""
    for value in batch.values():
        words.update((value or b"").split())
    with log_path("word_count").open("a") as file:
        file.write(handled(batch))


@app.plugin(concurrency=4, timeout="2s", retries=5)
async def notify(batch: fc.Batch) -> None:
    """An async plugin: it runs on the app's event loop, so its calls wait without holding a
    thread, and one past its ``timeout`` is cancelled and retried."""
    await asyncio.sleep(0)  # stands for an HTTP call or a database write
    with log_path("notify").open("a") as file:
        file.write(handled(batch))


if __name__ == "__main__":
    app.run()
