"""Every example in the docs runs: the package's docstrings and the README's plugin."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

from kafka import Cluster, fill, new_group

ROOT = Path(__file__).resolve().parents[1]
MODULES = [
    "fastconsume",
    "fastconsume._app",
    "fastconsume._durations",
    "fastconsume._process",
    "fastconsume.errors",
    "fastconsume.testing",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)


def test_readme_plugin_example_consumes(mock_cluster: Cluster) -> None:
    (example,) = readme_python_blocks()
    topic = mock_cluster.create_topic(2)
    fill(mock_cluster, topic, 2, 250)
    code = (
        example.replace('"127.0.0.1:9092"', repr(mock_cluster.bootstrap))
        .replace('["events"]', repr([topic]))
        .replace('"feeds"', repr(new_group()))
    )
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)
    namespace["app"].run(idle_timeout=1.0)  # type: ignore[attr-defined]
    assert namespace["totals"] == {
        "messages": 500,
        "bytes": sum(len(f"p{p}-{i}") for p in range(2) for i in range(250)),
    }
