"""The types users see: mypy checks the plugin options where they are written (their names and
value types come from ``fc.PluginOptions``) and knows every key of ``stats()``; and the
native side's view of a plugin, as the stubs declare it, is what a registered plugin serves.
No broker."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import fastconsume as fc
from fastconsume._options import OPTIONS
from fastconsume._plugins import make_plugin

STUBS = Path(fc.__file__).with_name("_core.pyi")

HEADER = """\
import fastconsume as fc
from fastconsume.testing import run_plugin

app = fc.App("127.0.0.1:9092", "feeds", "events")


def index(batch: fc.Batch) -> None: ...
"""

CORRECT = (
    HEADER
    + """
from typing_extensions import Unpack


@app.plugin(batch_size=100, linger="20ms", backoff=("1s", 2), rate_limit=fc.RateLimit(10), on_failure="retry")
def count(batch: fc.Batch) -> int:
    return len(batch)


@app.plugin
async def notify(batch: fc.Batch) -> None: ...


app.plugin(len, name="length", timeout=None, max_queued=1000)
record = app.add_plugin(index, name="again", dlq="events.dlq", retries=0)


def add_indexer(app: fc.App, **options: Unpack[fc.PluginOptions]) -> fc.App:
    app.add_plugin(index, name="third", **options)
    return app


add_indexer(app, concurrency=2)
stats: fc.Stats = app.stats()
messages: int = stats["plugins"]["count"]["messages"] + 1
latency: float = stats["plugins"]["count"]["latency_p99"]
lag: int | None = stats["partitions"]["events[0]"]["lag"]
cpu: float = stats["process"]["cpu_seconds"]
plugin: fc.PluginStats = stats["plugins"]["count"]
partition: fc.PartitionStats = stats["partitions"]["events[0]"]
dead: int = run_plugin(len, [b"a"], batch_size=10, name="n").stats["dead_lettered"]
"""
)

# Each line is a mistake mypy must report, with the words of its message.
MISTAKES = {
    "app.plugin(retires=3)": 'Unexpected keyword argument "retires"',
    "app.plugin(index, batchsize=3)": 'Unexpected keyword argument "batchsize"',
    "app.add_plugin(index, linger=[20])": 'Argument "linger"',
    'app.plugin(batch_size="100")': 'No overload variant of "plugin" of "App" matches argument type "str"',
    'app.add_plugin(index, on_failure="explode")': 'Argument "on_failure"',
    'run_plugin(index, [b"a"], lingr="1s")': 'Unexpected keyword argument "lingr"',
    'app.stats()["plugins"]["count"]["mesages"]': 'has no key "mesages"',
    'x: str = app.stats()["partitions"]["events[0]"]["lag"]': "Incompatible types in assignment",
}


def test_mypy_checks_plugin_options_and_stats_where_they_are_written(tmp_path: Path) -> None:
    (tmp_path / "correct.py").write_text(CORRECT)
    mistakes = list(MISTAKES)
    (tmp_path / "mistakes.py").write_text(HEADER + "\n" + "\n".join(mistakes) + "\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--python-version",
            "3.10",
            "--no-error-summary",
            "--hide-error-context",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            "correct.py",
            "mistakes.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert result.stderr == ""
    assert [line for line in errors if line.startswith("correct.py")] == [], result.stdout
    first = HEADER.count("\n") + 2  # the header, a blank line, then one mistake per line
    for number, mistake in enumerate(mistakes, start=first):
        found = [line for line in errors if line.startswith(f"mistakes.py:{number}:")]
        assert found, f"mypy accepted {mistake!r}:\n{result.stdout}"
        assert any(MISTAKES[mistake] in line for line in found), f"{mistake!r}: {found}"


def _protocol_members(name: str) -> set[str]:
    tree = ast.parse(STUBS.read_text())
    (spec,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name]
    return {node.name for node in spec.body if isinstance(node, ast.FunctionDef)}


def test_what_the_native_side_reads_of_a_plugin_is_an_option_or_the_plugin_itself() -> None:
    """The stubs' ``PluginSpec`` (what ``Consumer.run`` reads) names options of the schema, or
    what is not an option: the name, the callable, whether it is async, and the failure policy
    derived from ``on_failure`` and ``dlq``. A registered plugin serves every one of them."""
    members = _protocol_members("PluginSpec")
    assert members - set(OPTIONS) == {"name", "func", "is_async", "failure_policy"}
    plugin = make_plugin(len, "count", {"rate_limit": 5.0, "timeout": "1s"})
    served = {member: getattr(plugin, member) for member in members}
    assert served["rate_limit"] == fc.RateLimit(5.0)
    assert served["timeout"] == 1.0
    assert re.fullmatch(r"Plugin\(name='count', batch_size=500, .*\)", repr(plugin))
