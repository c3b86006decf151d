"""Configuration from files and the environment, for ``fastconsume run`` and ``App.run()``.

Settings come from ``fastconsume.toml`` in the working directory (else the
``[tool.fastconsume]`` table of ``pyproject.toml`` there, or a file given explicitly), then
from ``FASTCONSUME_*`` environment variables, which win. Every key is described once, in
:data:`TOP_LEVEL_KEYS` and, for a ``[plugins.NAME]`` table, in the plugin options' schema
(``fastconsume.PluginOptions``); the same description validates values and writes the
reference, so the docs cannot drift from the code. ``_reference`` writes the reference from them::

    python -m fastconsume._reference > docs/configuration.md

Mistakes raise :class:`~fastconsume.errors.ConfigError` with one line naming the file and key,
or the environment variable.

>>> load_config(environ={"FASTCONSUME_GROUP": "feeds"}, cwd=Path("/")).settings
{'group': 'feeds'}
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from ._options import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DLQ_TIMEOUT,
    DEFAULT_PROGRESS_INTERVAL,
    DEFAULT_REVOKE_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    OPTIONS,
    Option,
)
from ._supervisor import WORKER_INDEX_ENV
from ._values import (
    BOOLEAN,
    BOOTSTRAP,
    DURATION,
    KAFKA,
    POSITIVE_INTEGER,
    RATE_LIMIT,
    TARGET,
    TEXT,
    TOPICS,
    Key,
    Kind,
)
from ._values import child as _child
from ._values import expected as _expected
from ._values import keys as _keys
from ._values import table as _table
from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # mypy checks this branch (python_version 3.10) whether or not tomli is installed
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = [
    "PLUGIN_OPTION_KEYS",
    "TOP_LEVEL_KEYS",
    "Config",
    "env_var",
    "load_config",
]

CONFIG_FILE = "fastconsume.toml"
PYPROJECT_FILE = "pyproject.toml"
PYPROJECT_TABLE = ("tool", "fastconsume")
DEFAULT_PROCESSES = 1

ENV_PREFIX = "FASTCONSUME_"
KAFKA_ENV_PREFIX = "FASTCONSUME_KAFKA_"
# Variables that share the prefix but configure no run: the supervisor's mark on its
# workers, and those of the test suite and scripts/check.
FOREIGN_ENV_PREFIX = "FASTCONSUME_TEST_"
FOREIGN_ENV_VARS = (WORKER_INDEX_ENV, "FASTCONSUME_CACHE")


@dataclass(frozen=True)
class Config:
    """What the configuration says; keys it leaves out are absent, not defaulted, so an
    app's own settings can fill them."""

    app: str | None
    """``MODULE:ATTR`` or ``path/to/file.py:ATTR`` of an App whose plugins run."""
    settings: dict[str, object]
    """``App(...)`` keyword arguments given: bootstrap, group, topics, kafka, rate_limit,
    workers, connect_timeout, shutdown_timeout, revoke_timeout, dlq_timeout, progress_interval,
    wait_for_topics."""
    processes: int
    plugins: dict[str, dict[str, object]]
    """Plugin name -> ``App.plugin(...)`` options given (plus ``entry_point`` if given)."""
    source: str
    """Where the values came from, for messages: ``"fastconsume.toml + environment"``."""
    plugins_at: str = "plugins"
    """Where the ``plugins`` table is, for messages: ``"fastconsume.toml: plugins"``."""


def _plugins(value: object, where: str) -> dict[str, dict[str, object]]:
    plugins: dict[str, dict[str, object]] = {}
    for name, options in _table(value, where).items():
        at = _child(where, name)
        if not name.strip():
            raise ConfigError(f"{at}: a plugin name must not be empty")
        if not isinstance(options, Mapping):
            _expected(at, "a table of plugin options (an empty table enables the plugin with its defaults)", options)
        plugins[name] = _keys(options, at, _PLUGIN_OPTIONS)
    return plugins


PLUGINS = Kind("table of tables", _plugins)


def _toml(value: object) -> str:
    """A default as it would be written in TOML, in backticks, for the reference."""

    def literal(item: object) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, (list, tuple)):
            return "[" + ", ".join(map(literal, item)) + "]"
        return json.dumps(item) if isinstance(item, str) else repr(item)

    return f"`{literal(value)}`"


TOP_LEVEL_KEYS: tuple[Key, ...] = (
    Key(
        "app",
        TARGET,
        "none",
        'An App to run, as `"MODULE:ATTR"` or `"path/to/file.py:ATTR"`: its plugins run, and its own '
        "settings and plugin options apply where this configuration leaves them out.",
    ),
    Key(
        "bootstrap",
        BOOTSTRAP,
        "required",
        "`host:port[,host:port...]` of the Kafka brokers; IPv6 addresses in brackets (`[::1]:9092`). "
        "Checked when the App is made: every entry needs a host and a port from 1 to 65535.",
    ),
    Key("group", TEXT, "required", "The consumer group; processes sharing it share the partitions."),
    Key(
        "topics",
        TOPICS,
        "required",
        "The topics to consume. In the environment: comma-separated, `FASTCONSUME_TOPICS=events,audit`.",
    ),
    Key(
        "kafka",
        KAFKA,
        "`{}`",
        "librdkafka properties, passed through (values become strings). Quote dotted names "
        '(`"sasl.username" = "feeds"`) or nest them (`[kafka.sasl]` `username = "feeds"`): both are the '
        "same property. `auto.offset.reset` defaults to `earliest` and `fetch.queue.backoff.ms` to 100; "
        "fastconsume sets `bootstrap.servers`, `group.id`, `enable.auto.commit` and `enable.auto.offset.store` itself.",
    ),
    Key(
        "rate_limit",
        RATE_LIMIT,
        "none",
        "Messages per second for the whole app, charged once per fetched batch: a number, or "
        "`{ per_second = 5000, burst = 1000 }` (burst defaults to, and must be at least, the largest "
        "`batch_size`). In the environment: a number.",
    ),
    Key(
        "workers",
        POSITIVE_INTEGER,
        "the sync plugins' `concurrency` summed, plus 1 if any plugin is async",
        "Worker threads calling plugins.",
    ),
    Key(
        "processes",
        POSITIVE_INTEGER,
        _toml(DEFAULT_PROCESSES),
        "Consumer processes to run, each a member of the group, under a supervisor when more than one.",
    ),
    Key(
        "connect_timeout",
        DURATION,
        _toml(DEFAULT_CONNECT_TIMEOUT),
        "How long to wait for the brokers' first answer before failing.",
    ),
    Key(
        "wait_for_topics",
        BOOLEAN,
        "`false`",
        "Whether a topic missing at start is waited for (with a warning naming it every 10 s) "
        "instead of an error (`UnknownTopicError`, exit 2).",
    ),
    Key(
        "shutdown_timeout",
        DURATION,
        _toml(DEFAULT_SHUTDOWN_TIMEOUT),
        "How long a stop waits for running plugin calls; results that come later are not committed.",
    ),
    Key(
        "revoke_timeout",
        DURATION,
        _toml(DEFAULT_REVOKE_TIMEOUT),
        "How long a rebalance waits for running calls on the partitions it takes away before committing.",
    ),
    Key(
        "progress_interval",
        DURATION,
        _toml(DEFAULT_PROGRESS_INTERVAL),
        "How often a run logs a progress line (messages/s, lag, each plugin's p99 latency and errors) at INFO.",
    ),
    Key(
        "dlq_timeout",
        DURATION,
        _toml(DEFAULT_DLQ_TIMEOUT),
        "How long one dead-letter write may wait for the broker's acknowledgement (the dead-letter "
        "producer's `message.timeout.ms`, unless `kafka` sets it); then the run fails with the cause and "
        "the messages stay uncommitted.",
    ),
    Key(
        "plugins",
        PLUGINS,
        "none",
        "`[plugins.NAME]` enables the plugin NAME: an installed entry point of group "
        "`fastconsume.plugins`, or one of the app's plugins, whose options it overrides. An empty table "
        "enables it with its defaults. Its options are below.",
    ),
)
"""The top-level keys of ``fastconsume.toml`` (or ``[tool.fastconsume]``), in reference order."""


def _plugin_key(option: Option) -> Key:
    default = option.default_doc or ("none" if option.default is None else _toml(option.default))
    return Key(option.name, option.kind, default, option.meaning)


PLUGIN_OPTION_KEYS: tuple[Key, ...] = (
    *(_plugin_key(option) for option in OPTIONS.values()),
    Key(
        "entry_point",
        TEXT,
        "the table's NAME",
        "The entry point to load, when its name differs from the table's.",
    ),
)
"""The keys of a ``[plugins.NAME]`` table: the plugin options, and ``entry_point``."""

_TOP_LEVEL = {key.name: key for key in TOP_LEVEL_KEYS}
_PLUGIN_OPTIONS = {key.name: key for key in PLUGIN_OPTION_KEYS}
# Keys of the file that are not App(...) arguments.
_NOT_SETTINGS = ("app", "processes", "plugins")


def env_var(key: Key) -> str | None:
    """The environment variable that sets ``key``, if one does."""
    if key.kind is KAFKA:
        return f"{KAFKA_ENV_PREFIX}<NAME>"
    return None if key.kind.from_env is None else f"{ENV_PREFIX}{key.name.upper()}"


_ENV_KEYS = {var: key for key in TOP_LEVEL_KEYS if key.kind.from_env is not None and (var := env_var(key))}


# --- Loading. ---


def load_config(
    path: str | Path | None = None, *, environ: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Config:
    """Reads the configuration: the file (``path``, else ``fastconsume.toml`` or
    ``pyproject.toml``'s ``[tool.fastconsume]`` in ``cwd``), overridden by ``FASTCONSUME_*``
    variables of ``environ``. Neither is required: an empty configuration is returned, and
    the caller decides what is missing.

    Args:
        path: A ``fastconsume.toml``-shaped file, or a ``pyproject.toml`` whose
            ``[tool.fastconsume]`` is used; relative to ``cwd``.
        environ: The environment; defaults to ``os.environ``.
        cwd: Where to look for the files; defaults to the working directory.
    """
    environ = os.environ if environ is None else environ
    directory = Path.cwd() if cwd is None else Path(cwd)
    sources: list[str] = []
    values: dict[str, object] = {}
    plugins_at = "plugins"
    found = _config_file(path, directory)
    if found is not None:
        label, where, table = found
        values = _keys(table, where, _TOP_LEVEL)
        sources.append(label)
        plugins_at = _child(where, "plugins")
    from_env = _environment(environ)
    if from_env:
        sources.append("environment")
        kafka = {**cast(dict[str, str], values.get("kafka", {})), **cast(dict[str, str], from_env.get("kafka", {}))}
        values.update(from_env)
        if kafka:
            values["kafka"] = kafka
    return Config(
        app=cast("str | None", values.get("app")),
        settings={name: value for name, value in values.items() if name not in _NOT_SETTINGS},
        processes=cast(int, values.get("processes", DEFAULT_PROCESSES)),
        plugins=cast(dict[str, dict[str, object]], values.get("plugins", {})),
        source=" + ".join(sources) or "defaults",
        plugins_at=plugins_at,
    )


def _config_file(path: str | Path | None, directory: Path) -> tuple[str, str, object] | None:
    """The file to read as (label for messages, location of its root for errors, its table)."""
    if path is not None:
        file = directory / path
        if not file.is_file():
            raise ConfigError(f"{path}: no such config file")
        document = _read(file, str(path))
        if file.name != PYPROJECT_FILE:
            return str(path), f"{path}: ", document
        table = _pyproject_table(document)
        if table is None:
            raise ConfigError(f"{path}: has no [{'.'.join(PYPROJECT_TABLE)}] table")
        return str(path), f"{path}: {'.'.join(PYPROJECT_TABLE)}", table
    if (directory / CONFIG_FILE).is_file():
        return CONFIG_FILE, f"{CONFIG_FILE}: ", _read(directory / CONFIG_FILE, CONFIG_FILE)
    if (directory / PYPROJECT_FILE).is_file():
        table = _pyproject_table(_read(directory / PYPROJECT_FILE, PYPROJECT_FILE))
        if table is not None:  # a project's pyproject.toml need not configure fastconsume
            return PYPROJECT_FILE, f"{PYPROJECT_FILE}: {'.'.join(PYPROJECT_TABLE)}", table
    return None


def _read(file: Path, label: str) -> dict[str, object]:
    try:
        with file.open("rb") as stream:
            document: dict[str, object] = tomllib.load(stream)
    except OSError as error:
        raise ConfigError(f"{label}: cannot read: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{label}: invalid TOML: not UTF-8 (byte {error.start})") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{label}: invalid TOML: {error}") from error
    return document


def _pyproject_table(document: Mapping[str, object]) -> object | None:
    tool = document.get(PYPROJECT_TABLE[0])
    return tool.get(PYPROJECT_TABLE[1]) if isinstance(tool, Mapping) else None


def _environment(environ: Mapping[str, str]) -> dict[str, object]:
    """The values ``FASTCONSUME_*`` variables give, checked; ``kafka`` holds the properties."""
    values: dict[str, object] = {}
    kafka: dict[str, str] = {}
    for var, text in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var.startswith(FOREIGN_ENV_PREFIX) or var in FOREIGN_ENV_VARS:
            continue
        if var.startswith(KAFKA_ENV_PREFIX):
            kafka[_property_of(var)] = text
            continue
        key = _ENV_KEYS.get(var)
        if key is None or key.kind.from_env is None:
            close = difflib.get_close_matches(var, [*_ENV_KEYS, KAFKA_ENV_PREFIX + "<NAME>"], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{var}: unknown environment variable{hint}")
        values[key.name] = key.kind.from_env(text, var)
    if kafka:
        values["kafka"] = kafka
    return values


def _property_of(var: str) -> str:
    """``FASTCONSUME_KAFKA_SASL_PASSWORD`` -> ``sasl.password``; ``__`` stands for ``_``
    (``FASTCONSUME_KAFKA_LOG__LEVEL`` -> ``log_level``)."""
    words = var[len(KAFKA_ENV_PREFIX) :].lower().split("__")
    name = "_".join(word.replace("_", ".") for word in words)
    if not all(name.split(".")):
        raise ConfigError(
            f"{var}: not a librdkafka property name; write e.g. {KAFKA_ENV_PREFIX}SASL_PASSWORD for sasl.password"
        )
    return name
