"""The options of a plugin, each written once, in :class:`PluginOptions`: its type, default,
meaning and check. Everything else is derived from it: the keyword arguments of
``App.plugin`` and ``App.add_plugin`` (``**options: Unpack[PluginOptions]``, so a type checker
refuses a misspelled or mistyped option where it is written), the ``[plugins.NAME]`` keys of
a configuration file, their reference in ``docs/configuration.md``, and the values the native
engine reads of a registered plugin (:func:`engine_values`). The rules that span several
options are here too, once (:func:`check_rules`).

Also here: the defaults of the App's own settings, which ``App`` and the configuration's
reference share.

>>> OPTIONS["linger"].default, OPTIONS["linger"].kind.label
('20ms', 'duration')
>>> engine_values({"batch_size": 100, "backoff": ("1s", "1m")})["backoff"]
(1.0, 60.0)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, TypedDict, get_type_hints

from ._durations import Duration
from ._values import (
    BACKOFF,
    DURATION,
    NON_NEGATIVE_INTEGER,
    ON_FAILURE,
    POSITIVE_DURATION,
    POSITIVE_INTEGER,
    RATE_LIMIT,
    TEXT,
    Kind,
    OnFailure,
    RateLimit,
)
from .errors import ConfigError

if TYPE_CHECKING:
    from ._core import PluginSpec, RateLimitSpec

DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds to wait for the brokers' first answer before raising ``KafkaConnectionError``."""
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
"""Seconds a stop waits for running plugin calls before leaving without their results."""
DEFAULT_REVOKE_TIMEOUT = 30.0
"""Seconds a rebalance waits for running calls on revoked partitions before committing."""
DEFAULT_PROGRESS_INTERVAL = 30.0
"""Seconds between two progress lines a run logs at INFO."""
DEFAULT_DLQ_TIMEOUT = 30.0
"""Seconds one dead-letter write may wait for the broker's acknowledgement before it fails."""


@dataclass(frozen=True)
class Option:
    """One plugin option: the kind of its values (their check, and what the engine takes),
    its default as a user would write it (``None``: unset), and its meaning, in Markdown,
    for the reference."""

    kind: Kind
    default: object
    meaning: str
    default_doc: str | None = None
    """Markdown for the reference when the default depends on other options."""
    name: str = ""
    """Filled in from :class:`PluginOptions`."""


class PluginOptions(TypedDict, total=False):
    """The options of ``App.plugin``, ``App.add_plugin`` and a config file's ``[plugins.NAME]``
    table (besides ``name``), each with its type, default, meaning and check. Durations are
    seconds as a number, or a string such as ``"20ms"``, ``"5s"``, ``"2m"``.

    Annotate a function that passes options on with it, and its callers are checked too::

        def add_indexer(app: fc.App, **options: Unpack[fc.PluginOptions]) -> None:
            app.add_plugin(Indexer, name="indexer", **options)
    """

    batch_size: Annotated[
        int,
        Option(
            POSITIVE_INTEGER,
            500,
            "The most messages one call receives. A call holds messages of one partition, in offset order.",
        ),
    ]
    linger: Annotated[
        Duration,
        Option(
            DURATION,
            "20ms",
            "How long a batch may wait to fill once it holds a message. Batches are formed once for all "
            "plugins, so the smallest linger of the app applies.",
        ),
    ]
    concurrency: Annotated[int, Option(POSITIVE_INTEGER, 1, "Calls in flight at once, each on a different partition.")]
    max_queued: Annotated[
        int,
        Option(
            POSITIVE_INTEGER,
            10_000,
            "Messages waiting or running in the plugin's lane before fetching holds back; it resumes once "
            "the lane has drained to half. At least the largest `batch_size` of the app, since a lane takes "
            "whole fetched batches.",
        ),
    ]
    max_queued_bytes: Annotated[int, Option(POSITIVE_INTEGER, 64 * 1024 * 1024, "The same bound in payload bytes.")]
    timeout: Annotated[
        Duration | None,
        Option(
            POSITIVE_DURATION,
            None,
            "Each call's deadline, which the plugin reads as `batch.deadline` and `batch.remaining()`. An "
            "async call is cancelled at it, which counts as a failure; a sync call that overruns is counted "
            "(`overruns`) and logged, and its result still counts.",
        ),
    ]
    rate_limit: Annotated[
        float | RateLimit | None,
        Option(
            RATE_LIMIT,
            None,
            "Messages per second handed to this plugin, charged once per call: a number, or "
            "`fc.RateLimit(per_second, burst=...)` (in a file `{ per_second = ..., burst = ... }`). The burst "
            "defaults to, and must be at least, `batch_size`.",
        ),
    ]
    retries: Annotated[
        int,
        Option(
            NON_NEGATIVE_INTEGER,
            3,
            "How many times a failed call is retried, after a backoff, for this plugin alone: the others go "
            "on, and the partition's later messages wait for it.",
        ),
    ]
    backoff: Annotated[
        tuple[Duration, Duration],
        Option(
            BACKOFF,
            ("100ms", "30s"),
            "The first and the largest wait between attempts; it doubles each time, with jitter.",
        ),
    ]
    dlq: Annotated[
        str | None,
        Option(
            TEXT,
            None,
            "A dead-letter topic. Messages whose retries run out are written there, with headers naming the "
            "plugin, the error and the original position; they count as done once the write is acknowledged.",
        ),
    ]
    on_failure: Annotated[
        OnFailure | None,
        Option(
            ON_FAILURE,
            None,
            'What happens when retries run out: `"dead_letter"` writes the messages to `dlq`, `"retry"` '
            'retries forever, `"stop"` ends the run with `fc.PluginError`.',
            default_doc='`"dead_letter"` with `dlq`, else `"stop"`',
        ),
    ]


def _schema() -> dict[str, Option]:
    hints = get_type_hints(PluginOptions, include_extras=True)
    return {name: replace(hint.__metadata__[0], name=name) for name, hint in hints.items()}


OPTIONS: Mapping[str, Option] = _schema()
"""Every plugin option by name, in the order of :class:`PluginOptions`."""


def check_names(names: Iterable[str]) -> None:
    """Raises :class:`~fastconsume.errors.ConfigError` for the first name that is neither
    ``name`` nor an option, with the closest known one, as the config file's loader does.

    >>> check_names(["batch_size", "name"])
    >>> check_names(["batchsize"])
    Traceback (most recent call last):
    ...
    fastconsume.errors.ConfigError: batchsize: unknown plugin option; did you mean 'batch_size'?
    """
    known = ("name", *OPTIONS)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(known)}"
            raise ConfigError(f"{name}: unknown plugin option; {hint}")


def check_values(given: Mapping[str, object], where: str = "") -> PluginOptions:
    """``given`` with each value checked by its option's kind and kept as written; an unset
    optional one (``None``) is left alone. ``where`` prefixes each option's name in errors.

    >>> check_values({"retries": -1})
    Traceback (most recent call last):
    ...
    fastconsume.errors.ConfigError: retries: must be at least 0, got -1
    """
    check_names(given)
    checked: dict[str, object] = {}
    for name, value in given.items():
        option = OPTIONS[name]
        unset = value is None and option.default is None
        checked[name] = value if unset else option.kind.check(value, f"{where}{name}")
    return checked  # type: ignore[return-value]  # every key is an option, each value of its kind


def engine_values(checked: Mapping[str, object]) -> dict[str, object]:
    """Every option as the engine reads it (durations in seconds, a rate limit a
    :class:`RateLimit`): its value in ``checked`` (by :func:`check_values`), else its default."""
    values: dict[str, object] = {}
    for name, option in OPTIONS.items():
        value = checked.get(name, option.default)
        values[name] = None if value is None else option.kind.engine(value)
    return values


def failure_policy(on_failure: OnFailure | None, dlq: str | None) -> OnFailure:
    """What happens when retries run out: ``on_failure``, or its default, which ``dlq`` decides."""
    if on_failure is not None:
        return on_failure
    return "dead_letter" if dlq is not None else "stop"


def check_rules(plugins: Sequence[PluginSpec], rate_limit: RateLimitSpec | None = None) -> None:
    """Every rule that spans options, for ``plugins`` of one app (with its ``rate_limit``):
    at registration for the plugin alone, before a run for the whole app. Batches are fetched
    as large as the largest ``batch_size``, and a lane takes whole ones; a rate limit charges
    a whole batch at once.

    >>> import fastconsume as fc
    >>> check_rules([fc.App("127.0.0.1:9092", "g", "t").add_plugin(len, backoff=("1s", "1m"))])
    """
    largest = max((p.batch_size for p in plugins), default=1)
    for p in plugins:
        first, most = p.backoff
        if first > most:
            raise ConfigError(f"backoff: the first wait ({first:g} s) exceeds the maximum ({most:g} s)")
        if p.failure_policy == "dead_letter" and p.dlq is None:
            raise ConfigError('on_failure="dead_letter" needs a dead-letter topic: pass dlq="topic"')
        if p.rate_limit is not None:
            _check_burst(p.rate_limit, p.batch_size, f"plugin {p.name!r}")
        if p.max_queued < largest:
            raise ConfigError(
                f"plugin {p.name!r}: max_queued ({p.max_queued}) must be at least the largest "
                f"batch_size of the app ({largest})"
            )
    if rate_limit is not None:
        _check_burst(rate_limit, largest, "App")


def _check_burst(limit: RateLimitSpec, batch_size: int, what: str) -> None:
    if limit.burst is not None and limit.burst < batch_size:
        raise ConfigError(
            f"{what}: rate_limit burst ({limit.burst}) must be at least the batch size ({batch_size}), "
            "since a batch is charged at once"
        )
