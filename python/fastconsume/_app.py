"""``App``: the consumer, its plugins, and how a run starts and stops."""

from __future__ import annotations

import asyncio
import atexit
import difflib
import inspect
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from . import _core
from ._config import Config, load_config
from ._durations import Duration, seconds
from ._loading import installed_plugins, load_object, load_plugin
from ._logs import run_report
from ._options import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DLQ_TIMEOUT,
    DEFAULT_PROGRESS_INTERVAL,
    DEFAULT_REVOKE_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    OPTIONS,
    PluginOptions,
    check_rules,
    check_values,
)
from ._plugins import AsyncLoop, Plugin, PluginFunc, make_plugin
from ._process import process_stats
from ._stats import Stats
from ._values import RateLimit, check_bootstrap, property_value, rate_limit_of, redact
from .errors import ConfigError, PluginError

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger("fastconsume")

F = TypeVar("F", bound=PluginFunc)

MAX_DLQ_TIMEOUT = 24 * 86_400.0
"""librdkafka's ``message.timeout.ms`` is at most 2**31 - 1 ms, a little over 24 days."""


class App:
    """A Kafka consumer that hands every batch to each of its plugins.

    Offsets are committed only once every plugin has returned for a message, so delivery is
    at least once: after a crash or a plugin error, uncommitted messages come again.

    >>> import fastconsume as fc
    >>> app = fc.App(bootstrap="127.0.0.1:9092", group="feeds", topics=["events"],
    ...              kafka={"fetch.wait.max.ms": 100})
    >>> @app.plugin(batch_size=100, linger="20ms")
    ... def count(batch: fc.Batch) -> None:
    ...     print(len(batch))
    >>> [plugin.name for plugin in app.plugins]
    ['count']

    Args:
        bootstrap: ``host:port[,host:port...]`` of the Kafka brokers, IPv6 addresses in
            brackets (``[::1]:9092``); checked here, so a typo fails before any connection.
        group: The consumer group. Processes sharing it share the partitions.
        topics: The topics to consume.
        kafka: librdkafka properties, passed through (values are turned into strings).
            ``auto.offset.reset`` defaults to ``earliest`` and ``fetch.queue.backoff.ms``
            to 100 (librdkafka's 1000 can stall a busy plugin while its queue runs dry). fastconsume sets
            ``bootstrap.servers``, ``group.id``, ``enable.auto.commit`` and
            ``enable.auto.offset.store`` itself.
        connect_timeout: How long ``run()`` waits for the brokers before raising
            :class:`~fastconsume.errors.KafkaConnectionError`. An authentication or TLS
            failure raises at once (:class:`~fastconsume.errors.KafkaAuthenticationError`,
            :class:`~fastconsume.errors.KafkaTLSError`).
        wait_for_topics: Whether ``run()`` waits for topics that do not exist yet (logging a
            warning naming them every 10 s) instead of raising
            :class:`~fastconsume.errors.UnknownTopicError` at start.
        rate_limit: Messages per second for the whole app, or a :class:`RateLimit` with a
            burst. Charged once per fetched batch; while over budget, fetching pauses until
            the budget is back.
        workers: Worker threads calling plugins. The default is the sum of the sync plugins'
            ``concurrency``, plus one if any plugin is async (async calls run on one event
            loop and hold no worker while they wait), so a slow plugin never waits for a
            thread another one holds; idle workers sleep, so they cost nothing.
        shutdown_timeout: How long a stop waits for running plugin calls; their results are
            not committed if they do not return in time.
        revoke_timeout: How long a rebalance waits for running calls on the partitions it
            takes away before committing and letting them go.
        progress_interval: How often a run logs a progress line (messages/s, lag, each
            plugin's p99 latency and errors) to the ``fastconsume`` logger at INFO.
        read_config: Whether the first ``run()`` applies the configuration file
            (``./fastconsume.toml`` or ``[tool.fastconsume]``) and the ``FASTCONSUME_*``
            variables over these arguments, as ``fastconsume run`` does (see
            ``docs/configuration.md``). Pass ``False`` for an app whose settings only the code
            decides, such as one in a test.
        dlq_timeout: How long one dead-letter write may wait for the broker's acknowledgement
            (librdkafka's ``message.timeout.ms`` of the dead-letter producer, unless ``kafka``
            sets it or ``delivery.timeout.ms``). While it waits, the failed call keeps its
            concurrency slot and its messages stay uncommitted; a warning is logged every
            5 s (or every third of ``dlq_timeout``, if shorter). Past it, the run ends with
            :class:`~fastconsume.errors.KafkaError` naming the cause.
    """

    def __init__(
        self,
        bootstrap: str,
        group: str,
        topics: str | Sequence[str],
        *,
        kafka: Mapping[str, object] | None = None,
        connect_timeout: Duration = DEFAULT_CONNECT_TIMEOUT,
        wait_for_topics: bool = False,
        rate_limit: float | RateLimit | None = None,
        workers: int | None = None,
        shutdown_timeout: Duration = DEFAULT_SHUTDOWN_TIMEOUT,
        revoke_timeout: Duration = DEFAULT_REVOKE_TIMEOUT,
        dlq_timeout: Duration = DEFAULT_DLQ_TIMEOUT,
        progress_interval: Duration = DEFAULT_PROGRESS_INTERVAL,
        read_config: bool = True,
    ) -> None:
        check_bootstrap(bootstrap, "bootstrap")
        topic_list = [topics] if isinstance(topics, str) else list(topics)
        if not all(isinstance(t, str) for t in topic_list):
            raise ConfigError(f"topics must be strings, got {topic_list!r}")
        # As given, so that a config file or the environment can override some of them.
        self._settings: dict[str, Any] = {
            "bootstrap": bootstrap,
            "group": group,
            "topics": topic_list,
            "kafka": dict(kafka or {}),
            "connect_timeout": connect_timeout,
            "wait_for_topics": wait_for_topics,
            "rate_limit": rate_limit,
            "workers": workers,
            "shutdown_timeout": shutdown_timeout,
            "revoke_timeout": revoke_timeout,
            "progress_interval": progress_interval,
            "dlq_timeout": dlq_timeout,
        }
        if not isinstance(wait_for_topics, bool):
            raise ConfigError(f"wait_for_topics must be True or False, got {wait_for_topics!r}")
        self._core = _core.Consumer(**self.connection(), wait_for_topics=wait_for_topics)
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ConfigError(f"workers must be a positive integer, got {workers!r}")
        self._workers = workers
        self._rate_limit = None if rate_limit is None else rate_limit_of(rate_limit, "rate_limit")
        self._shutdown_timeout = seconds(shutdown_timeout, "shutdown_timeout")
        self._revoke_timeout = seconds(revoke_timeout, "revoke_timeout")
        self._progress_interval = seconds(progress_interval, "progress_interval")
        if self._progress_interval <= 0:
            raise ConfigError(f"progress_interval must be positive, got {progress_interval!r}")
        self._dlq_timeout = seconds(dlq_timeout, "dlq_timeout")
        if not 0.01 <= self._dlq_timeout <= MAX_DLQ_TIMEOUT:
            raise ConfigError(f"dlq_timeout must be between 10 ms and 24 days, got {dlq_timeout!r}")
        self._plugins: list[Plugin] = []
        self._read_config = read_config
        self._configured = False
        # The code's own settings and plugins, which a configuration is applied over.
        self._own: tuple[dict[str, Any], list[Plugin]] | None = None
        self._stop_requested = False  # so a stop() before run() survives the core's rebuild
        self._stop_logged = True  # no "stopping" line outside a run

    @property
    def shutdown_timeout(self) -> float:
        """Seconds a stop waits for running plugin calls."""
        return self._shutdown_timeout

    @property
    def plugins(self) -> tuple[Plugin, ...]:
        """The registered plugins, in the order they run."""
        return tuple(self._plugins)

    @overload
    def plugin(self, func: F, /, *, name: str | None = None, **options: Unpack[PluginOptions]) -> F: ...

    @overload
    def plugin(self, *, name: str | None = None, **options: Unpack[PluginOptions]) -> Callable[[F], F]: ...

    def plugin(
        self, func: F | None = None, *, name: str | None = None, **options: Unpack[PluginOptions]
    ) -> F | Callable[[F], F]:
        """Registers a plugin: a callable, sync or ``async``, that takes a :class:`Batch`.

        Usable bare (``@app.plugin``) or with options (``@app.plugin(batch_size=100)``).
        Each plugin has its own lane, so a slow or failing plugin holds back only itself
        until its lane is full; then fetching holds back until it has drained to half.

        ``name`` names the plugin in stats, logs, errors and dead-letter headers; it defaults
        to the function's name. The options are the keys of
        :class:`~fastconsume.PluginOptions`, each described there and in
        ``docs/configuration.md``. They are checked here, at the call: a bad value, or an
        unknown option (with the closest one named), is a
        :class:`~fastconsume.errors.ConfigError`.
        """
        check_values(options)  # at the decorator's call, before it is applied

        def register(f: F) -> F:
            self._register(make_plugin(f, name, options))
            return f

        return register if func is None else register(func)

    def add_plugin(self, plugin: object, /, *, name: str | None = None, **options: Unpack[PluginOptions]) -> Plugin:
        """Registers a plugin object with the options of :meth:`plugin`, and returns its record.

        ``plugin`` is a callable taking a :class:`Batch` (sync or ``async``), an instance of a
        class with such a ``__call__``, or such a class, instantiated with no arguments. An
        instance may define ``setup()`` and ``teardown()`` (sync or ``async``): ``run()`` calls
        ``setup`` once before the first batch, in the process that consumes, and ``teardown``
        once after the last, also when the run fails. That is where per-process resources such
        as clients and connections belong.

        >>> import fastconsume as fc
        >>> app = fc.App(bootstrap="127.0.0.1:9092", group="feeds", topics=["events"])
        >>> class Index:
        ...     def setup(self) -> None:
        ...         self.client = {}  # a real plugin opens its connection here
        ...     def __call__(self, batch: fc.Batch) -> None:
        ...         for message in batch:
        ...             self.client[message.offset] = message.value
        ...     def teardown(self) -> None:
        ...         self.client.clear()
        >>> app.add_plugin(Index, batch_size=100, timeout="5s").name
        'Index'
        """
        record = make_plugin(plugin, name, options)
        self._register(record)
        return record

    def _register(self, plugin: Plugin) -> None:
        if any(p.name == plugin.name for p in self._plugins):
            raise ConfigError(f"a plugin named {plugin.name!r} is already registered; pass name=...")
        self._plugins.append(plugin)

    @classmethod
    def from_config(cls, config: Config) -> App:
        """The app a configuration describes: the app it names (``app = "MODULE:ATTR"``),
        itself, with the configuration applied over its settings and plugin options, plus the
        installed plugins the configuration enables by name (see ``docs/configuration.md``).
        Without ``app``, a new App of the configuration's settings and installed plugins."""
        if config.app:
            app = load_app(config.app)
        else:
            missing = [key for key in ("bootstrap", "group", "topics") if key not in config.settings]
            if missing:
                raise ConfigError(
                    f"{config.source}: missing {', '.join(missing)}: set them in the config file, "
                    f"as FASTCONSUME_{missing[0].upper()}, or in the app"
                )
            app = cls(**cast(dict[str, Any], config.settings), read_config=False)
        app._configure(config)
        return app

    def _configure(self, config: Config) -> None:
        """Applies ``config`` over the code's own settings and plugin options, in place, so
        that this object is the one that runs (and its ``stats()`` and ``stop()`` act on the
        run). Applying a configuration again starts from the code's settings again."""
        settings, own_plugins = self._own if self._own is not None else (self._settings, self._plugins)
        if not config.settings and not config.plugins and self._own is None:
            self._configured = True
            return  # nothing to apply: the app stays as the code made it
        merged = dict(settings)
        # Property by property: FASTCONSUME_KAFKA_SASL_PASSWORD must not drop the app's others.
        merged["kafka"] = {
            **settings.get("kafka", {}),
            **cast(Mapping[str, object], config.settings.get("kafka", {})),
        }
        merged.update({key: value for key, value in config.settings.items() if key != "kafka"})
        plugins = self._configured_plugins(config, own_plugins)  # before any change: all or nothing
        fresh = App(**merged, read_config=False)
        stop_requested = self._stop_requested
        vars(self).update(vars(fresh))  # every setting the constructor derives, and a core for them
        self._plugins = plugins
        self._configured = True
        self._own = (settings, own_plugins)
        if stop_requested:
            self._stop_requested = True
            self._core.stop()

    def _configured_plugins(self, config: Config, own: Sequence[Plugin]) -> list[Plugin]:
        """The app's plugins with the configuration's options, then the installed plugins the
        configuration enables."""
        overrides = dict(config.plugins)
        plugins: list[Plugin] = []
        for plugin in own:
            options = overrides.pop(plugin.name, {})
            if "entry_point" in options:
                raise ConfigError(
                    f"{config.plugins_at}.{plugin.name}: names a plugin of the app; "
                    "entry_point is only for installed plugins"
                )
            plugins.append(plugin.with_options(options))
        for name, options in overrides.items():
            given = dict(options)
            where = f"{config.plugins_at}.{name}"
            entry_point = str(given.pop("entry_point", name))
            installed = installed_plugins()
            if entry_point not in installed:
                raise ConfigError(_unknown_plugin(where, entry_point, [p.name for p in own], sorted(installed)))
            record = make_plugin(load_plugin(entry_point), name, given)
            if any(p.name == record.name for p in plugins):
                raise ConfigError(f"{where}: a plugin named {name!r} is already registered")
            plugins.append(record)
        return plugins

    def connection(self) -> dict[str, Any]:
        """How this app reaches Kafka, as the native module's functions take it."""
        settings = self._settings
        return {
            "bootstrap": settings["bootstrap"],
            "group": settings["group"],
            "topics": list(settings["topics"]),
            "kafka": [(str(k), property_value(v)) for k, v in settings["kafka"].items()],
            "connect_timeout": seconds(settings["connect_timeout"], "connect_timeout"),
        }

    def describe(self) -> dict[str, Any]:
        """The settings and plugins, with secret librdkafka properties hidden, for display.

        >>> import fastconsume as fc
        >>> app = fc.App("127.0.0.1:9092", "feeds", "events", kafka={"sasl.password": "hunter2"})
        >>> app.describe()["kafka"]
        {'sasl.password': '***'}
        """
        settings = dict(self._settings)
        settings["kafka"] = redact(settings["kafka"])
        settings["plugins"] = {p.name: {option: getattr(p, option) for option in OPTIONS} for p in self._plugins}
        return settings

    def run(self, *, idle_timeout: Duration | None = None) -> None:
        """Consumes until :meth:`stop`, SIGINT or SIGTERM, then commits and leaves the group.

        With ``idle_timeout``, returns once nothing new has arrived for that long (counted
        from partition assignment, so a slow group join is not idle), every assigned
        partition has been fetched from at least once (a message, or its end), and all is
        committed. A partition that cannot be fetched at all (its leader is down) keeps the
        run going, with a ``drain: waiting for a first fetch from ...`` line; stop it as
        any run.

        A second SIGINT or SIGTERM raises ``KeyboardInterrupt`` at once; only completed
        work is committed. A plugin that raises stops the run with
        :class:`~fastconsume.errors.PluginError`.

        The first run applies the configuration file and ``FASTCONSUME_*`` variables over
        the code's settings, as ``fastconsume run`` does (unless ``read_config=False``); a
        misspelled variable is a :class:`~fastconsume.errors.ConfigError`. A run logs to the
        ``fastconsume`` logger at INFO: a start line, a progress line every
        ``progress_interval``, a line when a stop begins and a summary at the end. Like any
        library, fastconsume leaves configuring :mod:`logging` to the application.
        """
        if self._read_config and not self._configured:
            self._configure_from_files()
        idle = self.validate(idle_timeout=idle_timeout)
        linger = min(float(p.linger) for p in self._plugins)
        rate_limit = self._rate_limit
        with ExitStack() as stack:
            stack.enter_context(_exit_code_if_left_running())
            # Signals are ours from before setup() to after teardown(): a second one there
            # interrupts too, rather than killing the process with the signal's default.
            if threading.current_thread() is threading.main_thread():
                stack.enter_context(_signals_call(self.stop))
            self._stop_logged = False
            stack.callback(self._run_ended)
            stack.enter_context(
                run_report(
                    self,
                    workers=self._worker_count(),
                    interval=self._progress_interval,
                    logger=log,
                    ended=lambda: "stopped" if self._stop_requested or idle is None else "drained",
                )
            )
            # The event loop lives as long as the run, started only if a plugin is async.
            event_loop = stack.enter_context(AsyncLoop()) if any(p.is_async for p in self._plugins) else None
            stack.enter_context(_plugins_set_up(self._plugins, event_loop))

            def run() -> None:
                self._core.run(
                    self._plugins,
                    linger=linger,
                    workers=self._worker_count(),
                    shutdown_timeout=self._shutdown_timeout,
                    revoke_timeout=self._revoke_timeout,
                    idle_timeout=idle,
                    rate_limit=rate_limit,
                    event_loop=event_loop,
                    dlq_timeout=self._dlq_timeout,
                )

            if threading.current_thread() is threading.main_thread():
                _run_interruptibly(run)
            else:
                run()

    def _configure_from_files(self) -> None:
        """What ``fastconsume run`` applies, applied by ``run()`` itself: ``./fastconsume.toml``
        (or ``[tool.fastconsume]``), then ``FASTCONSUME_*``. ``app`` names the app
        ``fastconsume run`` runs and ``processes`` is the supervisor's: neither applies here."""
        config = load_config()
        if config.processes > 1:
            log.warning(
                "processes = %d (%s) is not applied: app.run() runs in this process only; "
                "`fastconsume run` starts several",
                config.processes,
                config.source,
            )
        self._configure(config)

    def _run_ended(self) -> None:
        self._stop_requested = False
        self._stop_logged = True

    def validate(self, *, idle_timeout: Duration | None = None) -> float | None:
        """Checks what only the whole app can check (``run()`` does it first): a plugin at
        least, every lane able to hold a whole fetched batch, the app's rate limit against
        it. Returns ``idle_timeout`` in seconds.

        >>> import fastconsume as fc
        >>> app = fc.App("127.0.0.1:9092", "feeds", "events")
        >>> app.validate()
        Traceback (most recent call last):
        ...
        fastconsume.errors.ConfigError: register at least one plugin before run()
        """
        if not self._plugins:
            raise ConfigError("register at least one plugin before run()")
        check_rules(self._plugins, self._rate_limit)
        return None if idle_timeout is None else seconds(idle_timeout, "idle_timeout")

    def _worker_count(self) -> int:
        if self._workers is not None:
            return self._workers
        sync = sum(p.concurrency for p in self._plugins if not p.is_async)
        return sync + (1 if any(p.is_async for p in self._plugins) else 0)

    def stop(self) -> None:
        """Ends the current run gracefully; callable from any thread, a plugin or a signal
        handler. Called before ``run()``, it makes the next run return at once. The first
        stop of a run logs, at INFO, how long it waits for how many running calls."""
        self._stop_requested = True
        self._core.stop()
        if self._stop_logged:
            return
        self._stop_logged = True  # a second stop() (or signal) says nothing new
        stats = self._core.stats()
        if not stats["running"]:
            return
        running = sum(p["in_flight"] for p in stats["plugins"].values())
        if running:
            log.info(
                "stopping: waiting up to %g s for %d running call%s, then committing",
                self._shutdown_timeout,
                running,
                "" if running == 1 else "s",
            )
        else:
            log.info("stopping: no call running; committing and leaving the group")

    def stats(self) -> Stats:
        """Counters of the current or last run, typed (:class:`~fastconsume.Stats`):

        - ``running``: whether a run is going on;
        - ``messages``: fetched and handed to the plugins;
        - ``plugins``: per plugin, ``batches``, ``messages`` and ``errors`` handled (calls,
          retries included), ``in_flight`` calls, ``queued`` messages (waiting or running),
          ``queued_peak``, ``max_queued``, call latency ``latency_p50`` and ``latency_p99`` in
          seconds, ``retries`` scheduled and ``retry_wait`` (their backoff, in seconds, in
          all), ``dead_lettered`` messages, ``overruns`` (sync calls past their timeout),
          ``timeouts`` (async calls cancelled at it) and ``throttled`` (times the plugin's
          rate limit held a call back);
        - ``timers``: the timer wheel's ``entries`` now and their ``peak`` this run;
        - ``partitions``: per partition consumed this run, whether it is ``assigned`` now,
          ``position`` (next offset fetched), ``committed`` and ``lag`` (high watermark
          minus committed);
        - ``process``: ``threads``, ``cpu_seconds`` and ``rss_bytes``.

        >>> import fastconsume as fc
        >>> stats = fc.App("127.0.0.1:9092", "feeds", "events").stats()
        >>> stats["running"], stats["messages"], stats["plugins"], sorted(stats["process"])
        (False, 0, {}, ['cpu_seconds', 'rss_bytes', 'threads'])
        """
        return Stats(**self._core.stats(), process=process_stats())


def _unknown_plugin(where: str, name: str, own: Sequence[str], installed: Sequence[str]) -> str:
    """The message for a ``[plugins.NAME]`` table that names no plugin: where it is, what
    exists, and the closest names among both."""
    close = difflib.get_close_matches(name, [*own, *installed], n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return (
        f"{where}: no plugin named {name!r}: the app's plugins are {', '.join(own) or 'none'}, "
        f"installed plugins {', '.join(installed) or 'none'}{hint}"
    )


def load_app(target: str) -> App:
    """The :class:`App` named ``MODULE:ATTR`` or ``path/to/file.py:ATTR``."""
    app = load_object(target)
    if not isinstance(app, App):
        raise ConfigError(f"{target!r} is not a fastconsume.App (got {type(app).__name__})")
    return app


@contextmanager
def _plugins_set_up(plugins: Sequence[Plugin], event_loop: AsyncLoop | None) -> Iterator[None]:
    """Calls every plugin's ``setup`` hook, then, however the run ends, the ``teardown`` of
    each one set up, in reverse order. A failing setup or teardown is a
    :class:`~fastconsume.errors.PluginError`; a failing teardown is logged and does not hide
    the run's own error."""
    done: list[Plugin] = []
    try:
        for plugin in plugins:
            setup = plugin.setup()
            if setup is not None:
                try:
                    _call_hook(setup, event_loop)
                except Exception as error:
                    raise PluginError(f"plugin {plugin.name!r}: setup() failed: {error!r}") from error
            done.append(plugin)
        yield
    except KeyboardInterrupt:
        # A second signal: calls may still be running, and the exit must be immediate.
        log.warning("stopping at once: teardown() skipped, plugin calls may still be running")
        raise
    except BaseException:
        _tear_down(done, event_loop)
        raise
    failures = _tear_down(done, event_loop)
    if failures:
        name, failure = failures[0]
        raise PluginError(f"plugin {name!r}: teardown() failed: {failure!r}") from failure


def _tear_down(plugins: Sequence[Plugin], event_loop: AsyncLoop | None) -> list[tuple[str, Exception]]:
    """Calls the ``teardown`` hooks in reverse order; every failure is logged and returned."""
    failures: list[tuple[str, Exception]] = []
    for plugin in reversed(plugins):
        teardown = plugin.teardown()
        if teardown is None:
            continue
        try:
            _call_hook(teardown, event_loop)
        except Exception as error:
            log.error("plugin %r: teardown() failed: %r", plugin.name, error)
            failures.append((plugin.name, error))
    return failures


def _call_hook(hook: Callable[[], object], event_loop: AsyncLoop | None) -> None:
    """Calls a hook; one that returns an awaitable is run to completion, on the app's event
    loop if there is one (where the plugin's own calls will run)."""
    result = hook()
    if inspect.isawaitable(result):
        if event_loop is not None:
            event_loop.run(result)
        else:
            asyncio.run(_awaiting(result))


async def _awaiting(awaitable: Any) -> object:
    return await awaitable


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
INTERRUPTED = 130
"""The exit code after a second signal (the shell's code for a SIGINT exit)."""


class _SignalRoute:
    """SIGINT and SIGTERM while a :func:`_signals_call` is active: deliveries counted, and the
    innermost ``stop`` to call on the first."""

    def __init__(self, read_fd: int) -> None:
        self.read_fd = read_fd
        self.base = _core._signal_deliveries()
        self.interrupted = False
        self.stops: list[Callable[[], None]] = []

    def received(self) -> int:
        """SIGINT and SIGTERM deliveries since the route began."""
        return _core._signal_deliveries() - self.base

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.interrupted:
            return  # the other signal's handler, after this one raised: one interrupt is enough
        # One read of a count kept by the native handler, nothing written back: a handler
        # that nests into this one (Python runs one at any bytecode boundary, in stop()'s
        # logging too) reads a count with its own delivery in it, so neither can take the
        # other for the first. A delivery between signal.signal() and the counting's start
        # is not counted: this handler running is one delivery.
        if self.received() > 1:
            self.interrupted = True
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}: stopping at once")
        self.stops[-1]()


_route: _SignalRoute | None = None


@contextmanager
def _signals_call(stop: Callable[[], None]) -> Iterator[None]:
    """Routes SIGINT and SIGTERM to ``stop`` for the duration; a second one interrupts
    (``KeyboardInterrupt``), and one after the duration, once a first came, ends the process
    at once with exit code 130.

    Nested (``fastconsume run`` holds the signals from its start, ``App.run`` inside it), the
    inner ``stop`` is the one called, the count goes on, and a signal that came before the
    inner one began calls its ``stop`` at once.

    Deliveries are counted atomically by a native handler that then passes each on to
    Python's (:func:`fastconsume._core._count_signals`). Python runs a handler once for
    however many of its signal came before the main thread got to it (it may wait for the GIL
    behind busy plugins), and the count a Python handler kept itself would lose a delivery
    whose handler nested into it; the native count is taken before Python's flag is set, so
    every handler that runs sees its own delivery and all before it."""
    global _route  # noqa: PLW0603 -- signal handlers are process-wide
    if _route is not None:
        route = _route
        route.stops.append(stop)
        try:
            if route.received():
                stop()
            yield
        finally:
            route.stops.pop()
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    route = _SignalRoute(read_fd)
    route.stops.append(stop)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous = {s: signal.signal(s, route.handle) for s in STOP_SIGNALS}
    _route = route
    try:
        _core._count_signals(list(STOP_SIGNALS))  # until signal.signal() below sets them again
        yield
    finally:
        _route = None
        for s, handler in previous.items():
            # None: set outside Python and not restorable; the default beats our handler.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(read_fd)
        os.close(write_fd)
        # A first signal stopped this run: whatever comes after (plugin teardown, the
        # interpreter's exit) is still "stopping", so a second signal exits 130 at once, even
        # where Python can no longer run a handler. Handlers the application set stay.
        defaults = [s for s, h in previous.items() if h in (None, signal.SIG_DFL, signal.default_int_handler)]
        if route.received() and not route.interrupted and defaults:
            _core._exit_at_once_on(defaults, INTERRUPTED)


def _drain(read_fd: int) -> None:
    """Empties the signals' wakeup fd (deliveries are counted natively, not from it)."""
    while True:
        try:
            if not os.read(read_fd, 512):
                return
        except BlockingIOError:
            return


_exit_code_after_exit: int | None = None
"""The exit code for ``os._exit`` should the interpreter end while plugin calls still run."""


@contextmanager
def _exit_code_if_left_running() -> Iterator[None]:
    """Notes how the process should end if it ends while this run's plugin calls still run
    (after a second signal, or calls left past ``shutdown_timeout``): 130 for a
    ``KeyboardInterrupt``, 1 for another exception, else 0, as ``fastconsume run`` exits."""
    global _exit_code_after_exit  # noqa: PLW0603 -- one process, one interpreter exit
    _exit_code_after_exit = None  # while it runs: the program decides
    try:
        yield
    except KeyboardInterrupt:
        _exit_code_after_exit = INTERRUPTED
        raise
    except BaseException:
        _exit_code_after_exit = 1
        raise
    _exit_code_after_exit = 0


@atexit.register
def _close_interpreter() -> None:
    """Run by ``atexit``, before the interpreter finalizes: from now on no native thread
    attaches to it (they park; attaching during finalization aborts the process on CPython
    before 3.13). A worker still inside a plugin call would re-take the GIL inside CPython,
    beyond our reach, and a run still stopping (after a second signal) would close its
    consumer while the process tears down: then the process leaves with ``os._exit`` (logs
    and output flushed), with the code :func:`_exit_code_if_left_running` noted."""
    calls, runs = _core._close_interpreter_gate()
    code = _exit_code_after_exit
    if not calls and not (runs and code is not None):
        return  # nothing can attach any more; a run on another thread of a program ending stays parked
    if calls:
        log.warning("exiting with %d plugin call(s) still running; their results are not committed", calls)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # closed or broken: nothing more to save
            stream.flush()
    os._exit(0 if code is None else code)


def _run_interruptibly(run: Callable[[], None]) -> None:
    """Runs on a helper thread while the main thread sleeps in ``poll`` on the signals'
    wakeup fd and on a pipe the helper writes when done; the run's exception is re-raised
    here.

    Not in ``join``: Python runs its signal handlers on the main thread only, and a lock wait
    there is cut short only by a signal the kernel delivered to that very thread. One that
    lands on another thread (the main thread had a signal pending, or was on a CPU) would
    leave the handlers waiting until the run ends, which it then never does. The wakeup fd
    gets a byte whichever thread the signal hit."""
    failure: list[BaseException] = []
    done_read, done_write = os.pipe()

    def target() -> None:
        try:
            run()
        except BaseException as error:  # re-raised on the calling thread below
            failure.append(error)
        finally:
            with suppress(OSError):  # the main thread left already (a second signal)
                os.write(done_write, b"\0")
            os.close(done_write)

    poller = select.poll()
    poller.register(done_read, select.POLLIN)
    route = _route
    if route is not None:
        poller.register(route.read_fd, select.POLLIN)
    # Daemon, so a second signal can end the process without waiting for the run.
    thread = threading.Thread(target=target, name="fastconsume-run", daemon=True)
    try:
        thread.start()
        while True:
            ready = {fd for fd, _ in poller.poll()}  # handlers run here, or just after
            if done_read in ready:
                break
            if route is not None:
                _drain(route.read_fd)  # the handlers run here, or just after
    finally:
        os.close(done_read)
    thread.join()
    if failure:
        raise failure[0]
