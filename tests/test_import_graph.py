"""``scripts/import_graph.py`` on small synthetic trees: it fails naming each import circle, of
Python modules and of Rust files and top-level parts, and passes on a tree without one. (Its
verdict on this repository is a step of ``scripts/check``.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"

PYTHON_CLEAN = {
    "__init__.py": "from ._app import App\n",
    "_app.py": "from . import _values\nfrom .errors import ConfigError\n\ndef run():\n    from ._config import load\n",
    "_config.py": "from typing import TYPE_CHECKING\nfrom ._values import check\n"
    "if TYPE_CHECKING:\n    from .errors import ConfigError\n",
    "_values.py": "import fastconsume.errors\nimport json\n",
    "errors.py": "import os\n",
    "_core.pyi": "from ._values import check\n",
}
# Two circles: _values imports _config inside a function, and errors imports _app for typing.
PYTHON_CIRCLE = {
    **PYTHON_CLEAN,
    "_values.py": "import fastconsume.errors\n\ndef check():\n    from fastconsume import _config\n",
    "errors.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._app import App\n",
}

RUST_CLEAN = {
    "lib.rs": "pub mod core;\npub mod kafka;\nmod py;\n// crate::py::Consumer in a comment is no path\n",
    "core/mod.rs": "pub mod lane;\npub mod timer;\npub use self::lane::Lane;\n",
    "core/lane.rs": "use super::timer::{self, Wheel as W};\npub struct Lane;\n"
    'fn name() -> &\'static str { "crate::kafka::poll" }\n'
    "#[cfg(test)]\nmod tests {\n    use super::*;\n    use crate::core::timer::Wheel;\n}\n",
    "core/timer.rs": "pub struct Wheel;\n",
    "kafka/mod.rs": "mod fetch;\nuse crate::core::{Lane, timer::Wheel};\npub fn poll() { fetch::run() }\n",
    "kafka/fetch.rs": "pub fn run() { let _ = crate::core::lane::Lane; }\n",
    "py/mod.rs": "use crate::{core, kafka::poll};\n",
}
# A test block in core/timer.rs reaches into kafka/: a circle of files, and of core and kafka.
RUST_CIRCLE = {
    **RUST_CLEAN,
    "core/timer.rs": "pub struct Wheel;\n#[cfg(test)]\nmod tests {\n    fn t() { crate::kafka::poll(); }\n}\n",
}


def write_tree(root: Path, python: dict[str, str], rust: dict[str, str]) -> Path:
    for base, files in ((root / "python" / "fastconsume", python), (root / "rust", rust)):
        for name, text in files.items():
            path = base / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return root


def run_script(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root)], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_tree_without_circles_passes_with_a_summary(tmp_path: Path) -> None:
    result = run_script(write_tree(tmp_path, PYTHON_CLEAN, RUST_CLEAN))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "python/fastconsume: 6 modules, 8 imports, 0 circle(s)",
        "rust/: 7 modules, 6 module paths, 0 circle(s) between files; "
        "4 top-level parts, 3 edges, 0 circle(s) between them",
    ]


def test_a_python_circle_through_lazy_and_type_checking_imports_fails_naming_it(tmp_path: Path) -> None:
    result = run_script(write_tree(tmp_path, PYTHON_CIRCLE, RUST_CLEAN))
    assert result.returncode == 1
    circles = [line for line in result.stdout.splitlines() if line.startswith("circle")]
    assert circles == [
        "circle in python/fastconsume: fastconsume._app -> fastconsume.errors -> fastconsume._app",
        "circle in python/fastconsume: fastconsume._config -> fastconsume._values -> fastconsume._config",
    ]


def test_a_rust_circle_through_a_test_block_fails_naming_the_files_and_the_parts(tmp_path: Path) -> None:
    result = run_script(write_tree(tmp_path, PYTHON_CLEAN, RUST_CIRCLE))
    assert result.returncode == 1
    circles = [line for line in result.stdout.splitlines() if line.startswith("circle")]
    assert circles == [
        "circle in rust/ between files: core/timer.rs -> kafka/mod.rs -> core/timer.rs",
        "circle in rust/ between top-level parts: core -> kafka -> core",
    ]


def test_a_parent_and_its_children_are_one_namespace_but_siblings_are_not(tmp_path: Path) -> None:
    # The scheduler's shape: the children extend the parent's type and use its items; the
    # parent re-exports theirs. That is no circle; two children using each other are.
    parent = {
        **RUST_CLEAN,
        "core/sched/mod.rs": "mod calls;\nmod dispatch;\npub use self::dispatch::Job;\nuse self::calls::Call;\n"
        "pub struct Scheduler { calls: Vec<Call> }\n",
        "core/sched/calls.rs": "use super::Scheduler;\npub(super) struct Call;\n",
        "core/sched/dispatch.rs": "use super::{Scheduler, calls::Call};\npub enum Job {}\n",
        "core/mod.rs": "pub mod lane;\npub mod sched;\npub mod timer;\npub use self::lane::Lane;\n",
    }
    assert run_script(write_tree(tmp_path / "parent", PYTHON_CLEAN, parent)).returncode == 0
    siblings = {**parent, "core/sched/calls.rs": "use super::dispatch::Job;\npub(super) struct Call;\n"}
    result = run_script(write_tree(tmp_path / "siblings", PYTHON_CLEAN, siblings))
    assert result.returncode == 1
    cycle = "circle in rust/ between files: core/sched/calls.rs -> core/sched/dispatch.rs -> core/sched/calls.rs"
    assert cycle in result.stdout, result.stdout
