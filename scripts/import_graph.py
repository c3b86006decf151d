"""Fails if a module of ``python/fastconsume/`` or of ``rust/`` depends on itself through
others: prints every import circle found, else a one-line summary per language.

Python: a node per module of the package (a ``.py`` file, or a ``.pyi`` stub without one,
such as the native ``_core``); an edge for every import of another module of the package,
wherever it is written (inside a function, under ``if TYPE_CHECKING:``), found with
:mod:`ast`. ``from . import name`` is an edge to the module ``name`` if there is one, else to
the package's ``__init__``.

Rust: a node per file (``mod.rs`` is its folder's module, ``lib.rs`` the crate's root); an
edge for every path that names another module: ``crate::...``, ``super::...`` and
``self::...`` paths in ``use`` lines and in expressions, and paths that start with a child
module the file declares (``mod batch;`` then ``batch::init(...)``). A path leads to the
deepest module it names (``crate::core::lane::Lane`` to ``core/lane.rs``, ``super::Thing`` to
the parent module). Inline modules count as part of their file, with their own ``super``:
``use super::*;`` in a file's ``mod tests`` is the file itself, not an edge; a test block's
other paths are edges like any, since a test that needs a module is a dependency too. A
``mod x;`` declaration is not an edge, and neither is any path from a module into its own
descendants (``pub use self::dispatch::Job;`` in ``sched/mod.rs``): in Rust a module and the
children it declares are one namespace, the children extending the parent's types with
``impl`` blocks and the parent re-exporting their items, so only the child's use of its
parent counts (it would otherwise always be a circle). Circles between siblings, and across
folders, are what this finds. Comments and string literals are skipped. The Rust graph is checked
twice: between files, and between top-level parts (each folder under ``rust/`` is one part,
each file directly under it another).

    python scripts/import_graph.py            # the repository this script is in
    python scripts/import_graph.py --root DIR # DIR/python/fastconsume and DIR/rust
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGE = "fastconsume"

Graph = dict[str, set[str]]


# --- cycles ---------------------------------------------------------------------------------


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The circles of ``graph``, as ``[a, b, ..., a]``: in each group of nodes that reach each
    other (a strongly connected component of two or more), the shortest circle through each
    member, each circle once. So every module caught in a circle is named in one. Self-edges
    are ignored.

    >>> cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"b"}, "d": {"d"}})
    [['a', 'b', 'a'], ['b', 'c', 'b']]
    """
    found: dict[tuple[str, ...], list[str]] = {}
    for component in _components(graph):
        if len(component) < 2:
            continue
        for member in sorted(component):
            circle = _circle_through(graph, component, member)
            turn = circle.index(min(circle[:-1]))
            found.setdefault(tuple(circle[turn:-1] + circle[:turn]), circle)
    return [[*key, key[0]] for key in sorted(found)]


def _components(graph: Mapping[str, Iterable[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            if targets:
                target = targets.pop(0)
                if target not in index:
                    index[target] = low[target] = counter
                    counter += 1
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, sorted(graph.get(target, ()))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _circle_through(graph: Mapping[str, Iterable[str]], component: set[str], start: str) -> list[str]:
    """The shortest circle from ``start`` back to it, inside its component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for target in sorted(graph.get(node, ())):
                if target not in component:
                    continue
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no circle in the component {sorted(component)}")


def edge_count(graph: Mapping[str, Iterable[str]]) -> int:
    return sum(len(set(targets) - {node}) for node, targets in graph.items())


# --- Python ---------------------------------------------------------------------------------


def python_graph(package_dir: Path, package: str = PACKAGE) -> Graph:
    """The package's modules and the imports between them."""
    files = {path.stem: path for path in sorted(package_dir.glob("*.pyi"))}
    files.update({path.stem: path for path in sorted(package_dir.glob("*.py"))})  # a .py wins over its stub
    modules = {package if stem == "__init__" else f"{package}.{stem}": path for stem, path in files.items()}
    graph: Graph = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            graph[name].update(_imported(node, package, modules) - {name})
    return graph


def _imported(node: ast.AST, package: str, modules: Mapping[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        return {_within(alias.name, modules) for alias in node.names if _in_package(alias.name, package)} - {""}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level > 1:
        return set()  # the package is flat: two dots lead out of it
    relative = f"{package}.{node.module}" if node.module else package
    base = relative if node.level == 1 else node.module or ""
    if not _in_package(base, package):
        return set()
    found: set[str] = set()
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        found.add(submodule if submodule in modules else _within(base, modules))
    return found - {""}


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _within(name: str, modules: Mapping[str, Path]) -> str:
    """The deepest known module that ``name`` is or is inside of."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


# --- Rust -----------------------------------------------------------------------------------

_SKIPPED = re.compile(
    r"""//[^\n]*                     # line comments, doc comments included
      | /\*(?:[^*]|\*(?!/))*\*/      # block comments (not nested)
      | b?r(\#*)"(?:.|\n)*?"\1       # raw strings
      | b?"(?:[^"\\]|\\.)*"          # strings
      | b?'(?:[^'\\\n]|\\[^\n][^'\n]*)'  # character literals (not lifetimes: those have no closing quote)
    """,
    re.VERBOSE | re.DOTALL,
)
_TOKEN = re.compile(r"::|[A-Za-z_][A-Za-z0-9_]*|\$[A-Za-z_]+|[{}(),;*]|\S")
_MOD_DECLARATION = re.compile(r"\bmod\s+([A-Za-z_][A-Za-z0-9_]*)\s*;")


def rust_modules(rust_dir: Path) -> dict[tuple[str, ...], Path]:
    """Module path (``()`` for the crate root, ``("py", "batch")``) to its file."""
    modules: dict[tuple[str, ...], Path] = {}
    for path in sorted(rust_dir.rglob("*.rs")):
        parts = path.relative_to(rust_dir).with_suffix("").parts
        if parts == ("lib",):
            modules[()] = path
        elif parts[-1] == "mod":
            modules[parts[:-1]] = path
        else:
            modules[parts] = path
    return modules


def _blank(match: re.Match[str]) -> str:
    """Keeps a skipped span's line breaks, so that braces and lines stay where they were."""
    return re.sub(r"[^\n]", " ", match.group(0))


def rust_graph(rust_dir: Path) -> Graph:
    """Each file's module, as ``rust/``-relative paths, and the modules its paths name."""
    modules = rust_modules(rust_dir)
    names = {module: modules[module].relative_to(rust_dir).as_posix() for module in modules}
    graph: Graph = {name: set() for name in names.values()}
    for module, path in modules.items():
        text = _SKIPPED.sub(_blank, path.read_text())
        children = set(_MOD_DECLARATION.findall(text))
        for target in _named_modules(_TOKEN.findall(text), module, children, modules):
            if target[: len(module)] != module:  # itself, or one of its own descendants
                graph[names[module]].add(names[target])
    return graph


def _named_modules(
    tokens: list[str], module: tuple[str, ...], children: set[str], modules: Mapping[tuple[str, ...], Path]
) -> set[tuple[str, ...]]:
    """The modules that the paths among ``tokens`` lead to, with ``module`` the file's own
    (inline ``mod NAME { ... }`` blocks nest below it)."""
    found: set[tuple[str, ...]] = set()
    inline: list[tuple[str, int]] = []  # (name, brace depth inside it)
    depth = 0
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if inline and depth < inline[-1][1]:
                inline.pop()
        elif token == "mod" and i + 2 < len(tokens) and tokens[i + 2] == "{":
            inline.append((tokens[i + 1], depth + 1))
        here = module + tuple(name for name, _ in inline)
        starts_path = i + 1 < len(tokens) and tokens[i + 1] == "::" and (i == 0 or tokens[i - 1] != "::")
        if starts_path and (token in ("crate", "super", "self") or (token in children and not inline)):
            paths, i = _path_tree(tokens, i)
            for path in paths:
                target = _resolve(path, here, modules)
                file = None if target is None else _file_module(target, modules)
                if file is not None:
                    found.add(file)
            continue
        i += 1
    return found


def _path_tree(tokens: list[str], i: int) -> tuple[list[list[str]], int]:
    """The paths written from ``tokens[i]`` on (``a::b::{c, d::{self, e}}`` is four), and the
    index after them."""
    prefix: list[str] = []
    while i < len(tokens):
        token = tokens[i]
        if token == "{":
            paths: list[list[str]] = []
            i += 1
            while i < len(tokens) and tokens[i] != "}":
                if tokens[i] == ",":
                    i += 1
                    continue
                if tokens[i] == "as":  # `name as alias`: the alias names nothing new
                    i += 2
                    continue
                inner, i = _path_tree(tokens, i)
                paths += [[*prefix, *path] for path in inner]
            return paths, i + 1
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token):
            break
        prefix.append(token)
        if i + 1 < len(tokens) and tokens[i + 1] == "::":
            i += 2
            continue
        i += 1
        break
    return [prefix], i


def _resolve(path: list[str], here: tuple[str, ...], modules: Mapping[tuple[str, ...], Path]) -> tuple[str, ...] | None:
    """The deepest module ``path`` names, from module ``here``."""
    segments = list(path)
    if segments[0] == "crate":
        current: tuple[str, ...] = ()
        segments.pop(0)
    else:
        current = here
        if segments[0] == "self":
            segments.pop(0)
        while segments and segments[0] == "super":
            if not current:
                return None  # beyond the crate root: not a path of this crate
            current = current[:-1]
            segments.pop(0)
    for segment in segments:
        if segment == "self":
            continue
        # Only into files: a path into another file's inline module stops at that file.
        if (*current, segment) not in modules:
            break
        current = (*current, segment)
    return current


def _file_module(module: tuple[str, ...], modules: Mapping[tuple[str, ...], Path]) -> tuple[str, ...] | None:
    """The module of the file that holds ``module`` (itself, or the file it is inline in);
    ``None`` for the crate root of a tree without ``lib.rs``."""
    while module not in modules:
        if not module:
            return None
        module = module[:-1]
    return module


def top_level(graph: Mapping[str, Iterable[str]]) -> Graph:
    """The graph between the parts of ``rust/``: each folder, and each file directly in it."""

    def part(name: str) -> str:
        return name.split("/", 1)[0] if "/" in name else name

    parts: Graph = {}
    for node, targets in graph.items():
        parts.setdefault(part(node), set()).update(part(t) for t in targets)
    for node, targets in parts.items():
        targets.discard(node)
    return parts


# --- the command ----------------------------------------------------------------------------


def check(root: Path) -> list[str]:
    """The lines to print: a summary per language, and each circle; a circle's line starts
    with ``circle``."""
    lines: list[str] = []
    python = python_graph(root / "python" / PACKAGE)
    found = cycles(python)
    lines += [f"circle in python/{PACKAGE}: {' -> '.join(circle)}" for circle in found]
    lines.append(f"python/{PACKAGE}: {len(python)} modules, {edge_count(python)} imports, {len(found)} circle(s)")
    rust = rust_graph(root / "rust")
    files = cycles(rust)
    lines += [f"circle in rust/ between files: {' -> '.join(circle)}" for circle in files]
    parts = top_level(rust)
    folders = cycles(parts)
    lines += [f"circle in rust/ between top-level parts: {' -> '.join(circle)}" for circle in folders]
    lines.append(
        f"rust/: {len(rust)} modules, {edge_count(rust)} module paths, {len(files)} circle(s) between files; "
        f"{len(parts)} top-level parts, {edge_count(parts)} edges, {len(folders)} circle(s) between them"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="the repository")
    args = parser.parse_args(argv)
    lines = check(args.root)
    for line in lines:
        print(line)
    return 1 if any(line.startswith("circle") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
