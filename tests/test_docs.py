"""Every example in the docs runs: the package's docstrings (doctest), and every code block
of README.md, docs/*.md and examples/**/*.md.

How a block is checked depends on its language:

- ```` ```python ````: executed as a module named ``docs_example`` (not ``__main__``, so an
  ``if __name__ == "__main__": app.run()`` at its end does not block), after these
  replacements: the string literal ``"127.0.0.1:9092"`` becomes the mock cluster's
  bootstrap, ``"events"`` a fresh topic of 2 partitions holding 50 keyed messages each with
  JSON object values, and ``group="..."`` a fresh group. If the block leaves an ``app``
  (an ``fc.App`` with plugins) that has not run yet, it is drained with
  ``app.run(idle_timeout=1.0)``; then every message must have been fetched, handled by every
  plugin and committed. A block whose first line is ``# test_<name>.py`` is a test module
  instead: it is written under that name to an empty directory and run with pytest there,
  which must pass. There are no fragments: every block is a runnable unit.
- ```` ```toml ````: a ``fastconsume.toml``, which ``load_config`` must accept; a block whose
  first line is ``# pyproject.toml`` is a ``pyproject.toml`` instead, which must parse and
  whose ``[tool.fastconsume]`` table, if any, ``load_config`` must accept.
- Other languages (``bash``, ``text``) are not run.

Relative links between the documents must lead to a file, and to a heading of it when they
name one (``semantics.md#dead-letters``).
"""

from __future__ import annotations

import doctest
import importlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import fastconsume as fc
from fastconsume._config import load_config
from fastconsume.testing import produce

from kafka import MockKafka, new_group

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

ROOT = Path(__file__).resolve().parents[1]
MODULES = [
    "fastconsume",
    "fastconsume._app",
    "fastconsume._config",
    "fastconsume._durations",
    "fastconsume._loading",
    "fastconsume._logs",
    "fastconsume._options",
    "fastconsume._plugins",
    "fastconsume._process",
    "fastconsume._reference",
    "fastconsume._stats",
    "fastconsume._supervisor",
    "fastconsume._values",
    "fastconsume.errors",
    "fastconsume.testing",
]
DOCUMENTS = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").rglob("*.md")],
    key=lambda path: path.relative_to(ROOT).as_posix(),
)
PARTITIONS, PER_PARTITION = 2, 50
BOOTSTRAP, TOPIC = '"127.0.0.1:9092"', '"events"'
GROUP = re.compile(r'\bgroup="[^"]*"')
TEST_MODULE = re.compile(r"# (test_\w+\.py)\n")
DRAIN_SECONDS = 1.0


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


@dataclass(frozen=True)
class Block:
    """A fenced code block of a Markdown document."""

    document: str  # relative to the repository
    line: int  # of the block's first line of code
    language: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def code_blocks(language: str) -> list[Block]:
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        for match in re.finditer(r"^```(\w*)\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE):
            if match.group(1) == language:
                line = text.count("\n", 0, match.start(2)) + 1
                found.append(Block(path.relative_to(ROOT).as_posix(), line, language, match.group(2)))
    return found


def params(language: str) -> list[object]:
    return [pytest.param(block, id=block.where) for block in code_blocks(language)]


def test_the_docs_have_examples() -> None:
    """The parametrized tests below would pass vacuously on a broken parser."""
    assert len(code_blocks("python")) >= 10
    assert len(code_blocks("toml")) >= 3
    assert any(block.document == "README.md" for block in code_blocks("python"))


def message_values(partition: int) -> list[bytes]:
    return [json.dumps({"partition": partition, "n": n}).encode() for n in range(PER_PARTITION)]


def fill_topic(cluster: MockKafka) -> str:
    topic = cluster.create_topic(PARTITIONS)
    for partition in range(PARTITIONS):
        keys = [f"customer-{n % 3}".encode() for n in range(PER_PARTITION)]
        produce(cluster.bootstrap, topic, message_values(partition), keys=keys, partition=partition)
    return topic


def run_example(block: Block, cluster: MockKafka) -> dict[str, object]:
    """Executes a Python block as the module docstring says and returns its namespace."""
    code = block.code
    if "fc.App(" in code:
        assert BOOTSTRAP in code, f"{block.where}: an App example must use bootstrap={BOOTSTRAP}"
        assert TOPIC in code, f"{block.where}: an App example must consume topics=[{TOPIC}]"
    code = code.replace(BOOTSTRAP, repr(cluster.bootstrap)).replace(TOPIC, repr(fill_topic(cluster)))
    code = GROUP.sub(lambda _: f"group={new_group()!r}", code)
    namespace: dict[str, object] = {"__name__": "docs_example"}
    # Blank lines first, so that a traceback's line numbers are the document's.
    exec(compile("\n" * (block.line - 1) + code, block.document, "exec"), namespace)
    app = namespace.get("app")
    if isinstance(app, fc.App) and app.plugins:
        if app.stats()["messages"] == 0:  # the block did not drain it itself
            app.run(idle_timeout=DRAIN_SECONDS)
        check_drained(block, app)
    return namespace


def check_drained(block: Block, app: fc.App) -> None:
    total = PARTITIONS * PER_PARTITION
    stats = app.stats()
    assert stats["messages"] == total, f"{block.where}: fetched {stats['messages']} of {total} messages"
    for name, plugin in stats["plugins"].items():
        assert plugin["messages"] >= total, f"{block.where}: plugin {name} handled {plugin['messages']} of {total}"
    lag = {partition: found["lag"] for partition, found in stats["partitions"].items()}
    assert set(lag.values()) == {0}, f"{block.where}: not all committed, lag per partition {lag}"


def check_readme_plugin(namespace: dict[str, object]) -> None:
    expected_bytes = sum(len(value) for p in range(PARTITIONS) for value in message_values(p))
    assert namespace["totals"] == {"messages": PARTITIONS * PER_PARTITION, "bytes": expected_bytes}


# Checks beyond "it ran and drained", by (document, n-th Python block of it, from 1).
MORE_CHECKS: dict[tuple[str, int], Callable[[dict[str, object]], None]] = {
    ("README.md", 1): check_readme_plugin,
}


def run_test_module(block: Block, directory: Path) -> None:
    match = TEST_MODULE.match(block.code)
    assert match is not None
    (directory / match.group(1)).write_text(block.code)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", match.group(1)],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, f"{block.where}: pytest failed\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("block", params("python"))
def test_python_example_runs(block: Block, mock_cluster: MockKafka, tmp_path: Path) -> None:
    if TEST_MODULE.match(block.code):
        run_test_module(block, tmp_path)
        return
    namespace = run_example(block, mock_cluster)
    same_document = [b for b in code_blocks("python") if b.document == block.document]
    check = MORE_CHECKS.get((block.document, same_document.index(block) + 1))
    if check is not None:
        check(namespace)


@pytest.mark.parametrize("block", params("toml"))
def test_toml_example_loads(block: Block, tmp_path: Path) -> None:
    if block.code.startswith("# pyproject.toml\n"):
        document = tomllib.loads(block.code)
        if "fastconsume" not in document.get("tool", {}):
            return
        path = tmp_path / "pyproject.toml"
    else:
        path = tmp_path / "fastconsume.toml"
    path.write_text(block.code)
    load_config(path, environ={}, cwd=tmp_path)


def test_more_checks_name_existing_blocks() -> None:
    for document, index in MORE_CHECKS:
        assert len([b for b in code_blocks("python") if b.document == document]) >= index, (document, index)


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file: lower case, punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    text = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: link to {target}: no such file"
        if anchor:
            assert anchor in heading_anchors(linked), f"{path.name}: link to {target}: no such heading"
