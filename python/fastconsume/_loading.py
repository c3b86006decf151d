"""Finding user code: an object named ``MODULE:ATTR`` or ``path/file.py:ATTR``, and plugins
installed by other packages under the entry-point group ``fastconsume.plugins``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType

from .errors import ConfigError

ENTRY_POINT_GROUP = "fastconsume.plugins"


def load_object(target: str) -> object:
    """Imports ``MODULE:ATTR`` or ``path/to/file.py:ATTR`` and returns the attribute.

    >>> load_object("fastconsume:nothing")
    Traceback (most recent call last):
    ...
    fastconsume.errors.ConfigError: module 'fastconsume' has no attribute 'nothing'
    """
    location, _, attribute = target.rpartition(":")
    if not location or not attribute:
        raise ConfigError(f"expected MODULE:APP or path/to/file.py:APP, got {target!r}")
    module = _import_file(Path(location)) if location.endswith(".py") else _import_module(location)
    if not hasattr(module, attribute):
        where = f"{location!r}" if location.endswith(".py") else f"module {module.__name__!r}"
        raise ConfigError(f"{where} has no attribute {attribute!r}")
    return getattr(module, attribute)


def _import_module(name: str) -> ModuleType:
    if "." not in sys.path and "" not in sys.path:
        sys.path.insert(0, ".")  # as `python -m` would: modules next to the user
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ConfigError(f"cannot import {name!r}: {error}") from error


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"no such file: {str(path)!r}")
    name = f"_fastconsume_app_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    sys.path.insert(0, str(path.resolve().parent))  # so the file's own imports resolve
    try:
        spec.loader.exec_module(module)
    except ImportError as error:
        raise ConfigError(f"cannot import {str(path)!r}: {error}") from error
    return module


def installed_plugins() -> dict[str, EntryPoint]:
    """Plugins other packages install, by name: ``[project.entry-points."fastconsume.plugins"]``."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_plugin(name: str) -> object:
    """The plugin object an installed entry point names."""
    installed = installed_plugins()
    if name not in installed:
        known = ", ".join(sorted(installed)) or "none"
        raise ConfigError(f"no installed plugin named {name!r} (installed: {known})")
    try:
        return installed[name].load()
    except Exception as error:
        raise ConfigError(f"cannot load plugin {name!r} ({installed[name].value}): {error}") from error
