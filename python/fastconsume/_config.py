"""Configuration from files and the environment, for ``fastconsume run`` and ``App.run()``.

Settings come from ``fastconsume.toml`` in the working directory (else the
``[tool.fastconsume]`` table of ``pyproject.toml`` there, or a file given explicitly), then
from ``FASTCONSUME_*`` environment variables, which win. Every key is described once, in
:data:`TOP_LEVEL_KEYS` and :data:`PLUGIN_OPTION_KEYS`; the same description validates values
and writes the reference, so the docs cannot drift from the code. Regenerate the reference
with::

    python -m fastconsume._config > docs/configuration.md

Mistakes raise :class:`~fastconsume.errors.ConfigError` with one line naming the file and key,
or the environment variable.

>>> redact({"sasl.username": "feeds", "sasl.password": "hunter2", "fetch.wait.max.ms": 100})
{'sasl.username': 'feeds', 'sasl.password': '***', 'fetch.wait.max.ms': '100'}
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, cast, get_args

from ._app import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DLQ_TIMEOUT,
    DEFAULT_PROGRESS_INTERVAL,
    DEFAULT_REVOKE_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    _property_value,
    check_bootstrap,
)
from ._durations import _UNITS, Duration, seconds
from ._plugins import (
    DEFAULT_BACKOFF,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_LINGER,
    DEFAULT_MAX_QUEUED,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_RETRIES,
    OnFailure,
    RateLimit,
)
from ._supervisor import WORKER_INDEX_ENV
from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # mypy checks this branch (python_version 3.10) whether or not tomli is installed
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = [
    "PLUGIN_OPTION_KEYS",
    "SECRET_WORDS",
    "TOP_LEVEL_KEYS",
    "Config",
    "Key",
    "Kind",
    "load_config",
    "main",
    "redact",
    "reference",
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

SECRET_WORDS = (
    "password",  # sasl.password, ssl.key.password, ssl.keystore.password
    "passphrase",  # sasl.oauthbearer.assertion.private.key.passphrase
    "secret",  # sasl.oauthbearer.client.secret and its alias ...client.credentials.client.secret
    "key.pem",  # ssl.key.pem, sasl.oauthbearer.assertion.private.key.pem: private keys inline
    "ssl_key",  # the private key as set through librdkafka's ssl_cert API
    "sasl.oauthbearer.config",  # may carry credentials for the unsecured JWT or metadata logins
    "sasl.jaas.config",  # the Java clients' form, holding a password, if one is copied over
    "token",  # any token a future property carries
)
"""Substrings of librdkafka property names whose values are secrets (see librdkafka's
CONFIGURATION.md). Substrings rather than exact names, so aliases and properties added by
later librdkafka versions (``*.password``, ``*.secret``) are hidden too: showing a harmless
value as ``***`` costs little, printing a password costs a lot."""

REDACTED = "***"

Check = Callable[[object, str], object]
"""Validates a value from a file; ``where`` names the file and key in errors. Returns the
value kept."""
EnvParse = Callable[[str, str], object]
"""Turns an environment variable's text into a value, then validates it like a file value;
``where`` is the variable's name."""


@dataclass(frozen=True)
class Kind:
    """A type of value: how the reference names it, how a file value is checked and how an
    environment value is read (``None``: not settable as one variable)."""

    label: str
    check: Check
    from_env: EnvParse | None = None


@dataclass(frozen=True)
class Key:
    """One configuration key, as the reference documents it and validation checks it."""

    name: str
    kind: Kind
    default: str
    """Markdown for the reference: a TOML value, or a few words when the default is computed."""
    meaning: str


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


# --- Value checks. Each raises one line, "<where>: <problem>". ---


def _expected(where: str, what: str, value: object) -> NoReturn:
    raise ConfigError(f"{where}: expected {what}, got {value!r}")


def _child(where: str, name: str) -> str:
    """The location of ``name`` inside the table at ``where`` (``"file: "`` for a file's root)."""
    return f"{where}{name}" if where.endswith(": ") else f"{where}.{name}"


def _unknown_key(where: str, name: str, known: Iterable[str]) -> NoReturn:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(known)}"
    raise ConfigError(f"{_child(where, name)}: unknown key; {hint}")


def _table(value: object, where: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        _expected(where, "a table", value)
    return cast(Mapping[str, object], value)


def _keys(value: object, where: str, keys: Mapping[str, Key]) -> dict[str, object]:
    """A table whose keys are all in ``keys``, each value checked by its key's kind."""
    checked: dict[str, object] = {}
    for name, item in _table(value, where).items():
        key = keys.get(name)
        if key is None:
            _unknown_key(where, name, keys)
        checked[name] = key.kind.check(item, _child(where, name))
    return checked


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        _expected(where, "a non-empty string", value)
    return value


def _target(value: object, where: str) -> str:
    text = _text(value, where)
    module, _, attribute = text.rpartition(":")
    if not module or not attribute:
        _expected(where, '"MODULE:ATTR" or "path/to/file.py:ATTR"', value)
    return text


def _bootstrap(value: object, where: str) -> str:
    return check_bootstrap(value, where)


def _topics(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(topic, str) and topic.strip() for topic in value):
        _expected(where, "a non-empty list of topic names", value)
    return cast(list[str], value)


def _topics_from_env(text: str, where: str) -> list[str]:
    return _topics([topic.strip() for topic in text.split(",")], where)


def _integer(value: object, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _expected(where, "an integer", value)
    if value < minimum:
        raise ConfigError(f"{where}: must be at least {minimum}, got {value!r}")
    return value


def _positive_integer(value: object, where: str) -> int:
    return _integer(value, where, 1)


def _non_negative_integer(value: object, where: str) -> int:
    return _integer(value, where, 0)


def _boolean(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        _expected(where, "true or false", value)
    return value


_ENV_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _boolean_from_env(text: str, where: str) -> object:
    value = _ENV_BOOLEANS.get(text.strip().lower())
    if value is None:
        _expected(where, "true or false", text)
    return value


def _integer_from_env(check: Check) -> EnvParse:
    def parse(text: str, where: str) -> object:
        try:
            number = int(text.strip())
        except ValueError:
            _expected(where, "an integer", text)
        return check(number, where)

    return parse


def _number_from_text(text: str) -> int | float | None:
    """``text`` as an int or a float, or ``None`` if it is neither."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def _positive_number(value: object, where: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        _expected(where, "a positive number", value)
    return value


def _duration(value: object, where: str) -> object:
    """Checked, but kept as written (``"20ms"`` or seconds), as ``App`` accepts both."""
    seconds(cast(Duration, value), where)  # reports non-durations of any type itself
    return value


def _duration_from_env(text: str, where: str) -> object:
    number = _number_from_text(text)
    return _duration(text.strip() if number is None else number, where)


def _rate_limit(value: object, where: str) -> int | float | RateLimit:
    if not isinstance(value, Mapping):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _expected(where, "messages per second or a table { per_second = ..., burst = ... }", value)
        return _positive_number(value, where)
    fields = _keys(value, where, _RATE_LIMIT_KEYS)
    if "per_second" not in fields:
        raise ConfigError(f"{where}: a rate_limit table needs per_second")
    return RateLimit(cast(float, fields["per_second"]), cast("int | None", fields.get("burst")))


def _rate_limit_from_env(text: str, where: str) -> int | float:
    number = _number_from_text(text)
    if number is None:
        _expected(where, "messages per second", text)
    return _positive_number(number, where)


def _kafka(value: object, where: str) -> dict[str, str]:
    """librdkafka properties as strings. A dotted key written bare (``sasl.password = ...``)
    is a nested table in TOML, so nested tables are joined back into dotted names."""
    properties: dict[str, str] = {}
    if not isinstance(value, Mapping):
        # The type only: a string here may well be "sasl.password=...".
        raise ConfigError(f"{where}: expected a table, got a {type(value).__name__}")

    def add(table: object, prefix: str, at: str) -> None:
        for name, item in _table(table, at).items():
            prop = f"{prefix}{name}"
            if isinstance(item, Mapping):
                add(item, f"{prop}.", _child(at, name))
                continue
            if not isinstance(item, (str, int, float)):  # bool is an int
                # The type only: the value may be a secret.
                raise ConfigError(
                    f"{_child(where, prop)}: expected a string, number or boolean, got a {type(item).__name__}"
                )
            if prop in properties:
                raise ConfigError(f"{_child(where, prop)}: given twice")
            properties[prop] = _property_value(item)

    add(value, "", where)
    return properties


def _backoff(value: object, where: str) -> tuple[object, object]:
    if not isinstance(value, list) or len(value) != 2:
        _expected(where, 'a list of two durations, the first and the largest wait, like ["100ms", "30s"]', value)
    return _duration(value[0], f"{where}[0]"), _duration(value[1], f"{where}[1]")


_ON_FAILURE_CHOICES: tuple[str, ...] = get_args(OnFailure)


def _on_failure(value: object, where: str) -> str:
    if value not in _ON_FAILURE_CHOICES:
        _expected(where, " or ".join(map(repr, _ON_FAILURE_CHOICES)), value)
    return value


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


TEXT = Kind("string", _text, _text)
BOOTSTRAP = Kind('string, `"host:port,..."`', _bootstrap, _bootstrap)
TARGET = Kind('string, `"MODULE:ATTR"`', _target, _target)
TOPICS = Kind("list of strings", _topics, _topics_from_env)
KAFKA = Kind("table", _kafka)  # from the environment one property at a time: FASTCONSUME_KAFKA_<NAME>
RATE_LIMIT = Kind("number or table", _rate_limit, _rate_limit_from_env)
POSITIVE_INTEGER = Kind("integer ≥ 1", _positive_integer, _integer_from_env(_positive_integer))
NON_NEGATIVE_INTEGER = Kind("integer ≥ 0", _non_negative_integer, _integer_from_env(_non_negative_integer))
POSITIVE_NUMBER = Kind("number > 0", _positive_number)
DURATION = Kind("duration", _duration, _duration_from_env)
BOOLEAN = Kind("boolean", _boolean, _boolean_from_env)
BACKOFF = Kind("list of 2 durations", _backoff)
ON_FAILURE = Kind(" or ".join(f'`"{choice}"`' for choice in _ON_FAILURE_CHOICES), _on_failure)
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

PLUGIN_OPTION_KEYS: tuple[Key, ...] = (
    Key("batch_size", POSITIVE_INTEGER, _toml(DEFAULT_BATCH_SIZE), "The most messages one call receives."),
    Key(
        "linger",
        DURATION,
        _toml(DEFAULT_LINGER),
        "How long a batch may wait to fill; the smallest linger of all plugins applies.",
    ),
    Key(
        "concurrency",
        POSITIVE_INTEGER,
        _toml(DEFAULT_CONCURRENCY),
        "Calls in flight at once, each on its own partition.",
    ),
    Key(
        "max_queued",
        POSITIVE_INTEGER,
        _toml(DEFAULT_MAX_QUEUED),
        "Messages waiting or running in the plugin's lane before fetching pauses; at least `batch_size`.",
    ),
    Key("max_queued_bytes", POSITIVE_INTEGER, _toml(DEFAULT_MAX_QUEUED_BYTES), "The same bound in payload bytes."),
    Key(
        "timeout",
        DURATION,
        "none",
        "Each call's deadline (`batch.deadline`); an async call is cancelled at it, a sync call that "
        "overruns is counted.",
    ),
    Key(
        "rate_limit",
        RATE_LIMIT,
        "none",
        "Messages per second handed to this plugin: a number, or `{ per_second = ..., burst = ... }`.",
    ),
    Key("retries", NON_NEGATIVE_INTEGER, _toml(DEFAULT_RETRIES), "How many times a failed call is retried."),
    Key(
        "backoff",
        BACKOFF,
        _toml(DEFAULT_BACKOFF),
        "The first and the largest wait between attempts; it doubles each time, with jitter.",
    ),
    Key(
        "dlq",
        TEXT,
        "none",
        "A dead-letter topic for messages whose retries run out; they count as done once written.",
    ),
    Key(
        "on_failure",
        ON_FAILURE,
        '`"dead_letter"` with `dlq`, else `"stop"`',
        "What happens when retries run out: dead-letter the messages, retry forever, or end the run.",
    ),
    Key(
        "entry_point",
        TEXT,
        "the table's NAME",
        "The entry point to load, when its name differs from the table's.",
    ),
)
"""The keys of a ``[plugins.NAME]`` table: ``App.plugin(...)`` options, and ``entry_point``."""

_TOP_LEVEL = {key.name: key for key in TOP_LEVEL_KEYS}
_PLUGIN_OPTIONS = {key.name: key for key in PLUGIN_OPTION_KEYS}
_RATE_LIMIT_KEYS = {
    key.name: key
    for key in (
        Key("per_second", POSITIVE_NUMBER, "required", "Messages per second."),
        Key("burst", POSITIVE_INTEGER, "the batch size", "Messages that may pass at once."),
    )
}
# Keys of the file that are not App(...) arguments.
_NOT_SETTINGS = ("app", "processes", "plugins")


def _env_var(key: Key) -> str | None:
    if key.kind is KAFKA:
        return f"{KAFKA_ENV_PREFIX}<NAME>"
    return None if key.kind.from_env is None else f"{ENV_PREFIX}{key.name.upper()}"


_ENV_KEYS = {var: key for key in TOP_LEVEL_KEYS if key.kind.from_env is not None and (var := _env_var(key))}


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


# --- Secrets. ---


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def redact(kafka: Mapping[str, object]) -> dict[str, str]:
    """librdkafka properties as strings, with the values of secret ones (names containing one
    of :data:`SECRET_WORDS`) replaced by ``***``."""
    return {str(name): REDACTED if _is_secret(str(name)) else _property_value(value) for name, value in kafka.items()}


# --- The reference. ---

_EXAMPLE = """\
app = "feeds.app:app"  # optional: an App whose plugins run
bootstrap = "broker-1:9092,broker-2:9092"
group = "feeds"
topics = ["events", "audit"]
processes = 2
shutdown_timeout = "45s"

[kafka]
"security.protocol" = "sasl_ssl"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "feeds"
# and the password from the environment: FASTCONSUME_KAFKA_SASL_PASSWORD=...

[plugins.index]  # options override the app's, or the entry point's defaults
batch_size = 1000
linger = "50ms"
retries = 5
backoff = ["200ms", "1m"]
dlq = "events.dlq"

[plugins.audit]  # enabled with its defaults
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table_rows(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def reference() -> str:
    """The configuration reference as Markdown (``docs/configuration.md``), from the schema."""
    units = ", ".join(f"`{unit}`" for unit in _UNITS)
    env_var = {key.name: _env_var(key) for key in TOP_LEVEL_KEYS}
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by `python -m fastconsume._config > docs/configuration.md`; "
        "edit python/fastconsume/_config.py instead. -->",
        "",
        "`python app.py` (`app.run()`) and `fastconsume run` take their settings from the same sources, "
        "in the same order, each overriding the one before:",
        "",
        "1. the code: the arguments of `fc.App(...)` and of each `@app.plugin(...)`;",
        f"2. a file: `{CONFIG_FILE}` in the working directory, else the `[tool.fastconsume]` table of "
        f"`{PYPROJECT_FILE}` there (`{CONFIG_FILE}` wins if both exist); or the file given with "
        f"`--config FILE`: `{CONFIG_FILE}`-shaped, or a file named `{PYPROJECT_FILE}`, whose "
        "`[tool.fastconsume]` is used;",
        f"3. environment variables: `{ENV_PREFIX}<KEY>` for a top-level key (`{ENV_PREFIX}GROUP=feeds`), "
        f"and `{KAFKA_ENV_PREFIX}<NAME>` for a librdkafka property, its name upper-cased with `_` for `.` "
        f"(`{KAFKA_ENV_PREFIX}SASL_PASSWORD` sets `sasl.password`; `__` stands for a literal `_`, "
        f"`{KAFKA_ENV_PREFIX}LOG__LEVEL` sets `log_level`).",
        "",
        "There is one code path: the first `app.run()` applies the file and the environment to the app "
        "itself, over its code; `fastconsume run MODULE:APP` applies them (with its `--config`) to the "
        "module's `app` object before calling its `run()`. So the object in the module is the one that "
        "runs: its `stats()` and `stop()` act on the run either way. Where the two ways differ, it is "
        "because a source only makes sense for one of them:",
        "",
        *_table_rows(
            ("source", "`python app.py` (`app.run()`)", "`fastconsume run [MODULE:APP]`"),
            (
                ("the code", "applies", "applies (the app named, or the config's `app`)"),
                (
                    f"`{CONFIG_FILE}` / `[tool.fastconsume]`",
                    "applies, from the working directory",
                    "applies, from the working directory or `--config FILE`",
                ),
                (
                    f"`{ENV_PREFIX}*` variables",
                    "applies; a misspelled one is a `ConfigError`",
                    "applies; a misspelled one exits 2",
                ),
                (
                    "`app` key",
                    "ignored: the app that runs is the one whose `run()` is called",
                    "the app to run, unless given",
                ),
                (
                    "`processes` key",
                    "not applied (one process), with a warning",
                    "that many worker processes under a supervisor",
                ),
                (
                    "`App(..., read_config=False)`",
                    "nothing but the code applies",
                    "the file and environment still apply",
                ),
            ),
        ),
        "",
        "The environment overrides the file key by key; a property from the environment replaces only "
        "that property of `[kafka]`. Keys set nowhere keep the app's own settings and plugin options, "
        "then the defaults below; without an app, `bootstrap`, `group` and `topics` must come from the "
        "configuration. A `[plugins.NAME]` table that names neither a plugin of the app nor an installed "
        "one is an error naming the file and suggesting the closest names.",
        "",
        "An app built in a test should pass `read_config=False`, so that a configuration meant for a "
        "deployment (a `[tool.fastconsume]` in the project's `pyproject.toml`, an exported "
        f"`{ENV_PREFIX}BOOTSTRAP`) cannot point it at other brokers; `fastconsume.testing` does so.",
        "",
        "Durations are seconds as a number, or a string with a unit: "
        f'{units} (`"20ms"`, `"5s"`, `"2m"`). Unknown keys, values of the wrong type and unknown '
        f"`{ENV_PREFIX}*` variables are errors naming the file and key, or the variable "
        f"(`{WORKER_INDEX_ENV}`, set by `--processes` on each worker, `{FOREIGN_ENV_PREFIX}*` and "
        f"{', '.join(f'`{var}`' for var in FOREIGN_ENV_VARS[1:])}, used by the test suite, are ignored).",
        "",
        "## Keys",
        "",
        *_table_rows(
            ("key", "type", "default", "environment variable", "meaning"),
            (
                (
                    f"`{key.name}`",
                    key.kind.label,
                    key.default,
                    f"`{env_var[key.name]}`" if env_var[key.name] else "—",
                    key.meaning,
                )
                for key in TOP_LEVEL_KEYS
            ),
        ),
        "",
        "## Plugin options",
        "",
        "The keys of a `[plugins.NAME]` table, with the meaning and checks of `App.plugin(...)`; "
        "not settable from the environment.",
        "",
        *_table_rows(
            ("key", "type", "default", "meaning"),
            ((f"`{key.name}`", key.kind.label, key.default, key.meaning) for key in PLUGIN_OPTION_KEYS),
        ),
        "",
        "## Example",
        "",
        f"`{CONFIG_FILE}`:",
        "",
        "```toml",
        _EXAMPLE.rstrip("\n"),
        "```",
        "",
        f"The same in `{PYPROJECT_FILE}` goes under `[tool.fastconsume]`, with "
        "`[tool.fastconsume.kafka]` and `[tool.fastconsume.plugins.index]` for the tables.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Prints the reference: ``python -m fastconsume._config > docs/configuration.md``."""
    sys.stdout.write(reference())


if __name__ == "__main__":
    main()
