"""``App``: the consumer, its plugins, and how a run starts and stops."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from . import _core
from ._durations import Duration, seconds
from ._loading import load_object, load_plugin
from ._plugins import (
    DEFAULT_BACKOFF,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_LINGER,
    DEFAULT_MAX_QUEUED,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_RETRIES,
    PLUGIN_OPTIONS,
    AsyncLoop,
    OnFailure,
    Plugin,
    PluginFunc,
    RateLimit,
    check_options,
    make_plugin,
    rate_limit_of,
)
from ._process import process_stats
from .errors import ConfigError, PluginError

if TYPE_CHECKING:
    from ._config import Config

log = logging.getLogger("fastconsume")

F = TypeVar("F", bound=PluginFunc)

DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds to wait for the brokers' first answer before raising ``KafkaConnectionError``."""
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
"""Seconds a stop waits for running plugin calls before leaving without their results."""
DEFAULT_REVOKE_TIMEOUT = 30.0
"""Seconds a rebalance waits for running calls on revoked partitions before committing."""


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
        bootstrap: ``host:port[,host:port...]`` of the Kafka brokers.
        group: The consumer group. Processes sharing it share the partitions.
        topics: The topics to consume.
        kafka: librdkafka properties, passed through (values are turned into strings).
            ``auto.offset.reset`` defaults to ``earliest`` and ``fetch.queue.backoff.ms``
            to 100 (librdkafka's 1000 can stall a busy plugin while its queue runs dry). fastconsume sets
            ``bootstrap.servers``, ``group.id``, ``enable.auto.commit`` and
            ``enable.auto.offset.store`` itself.
        connect_timeout: How long ``run()`` waits for the brokers before raising
            :class:`~fastconsume.errors.KafkaConnectionError`.
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
    """

    def __init__(
        self,
        bootstrap: str,
        group: str,
        topics: str | Sequence[str],
        *,
        kafka: Mapping[str, object] | None = None,
        connect_timeout: Duration = DEFAULT_CONNECT_TIMEOUT,
        rate_limit: float | RateLimit | None = None,
        workers: int | None = None,
        shutdown_timeout: Duration = DEFAULT_SHUTDOWN_TIMEOUT,
        revoke_timeout: Duration = DEFAULT_REVOKE_TIMEOUT,
    ) -> None:
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
            "rate_limit": rate_limit,
            "workers": workers,
            "shutdown_timeout": shutdown_timeout,
            "revoke_timeout": revoke_timeout,
        }
        self._core = _core.Consumer(**self.connection())
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ConfigError(f"workers must be a positive integer, got {workers!r}")
        self._workers = workers
        self._rate_limit = rate_limit_of(rate_limit)
        self._shutdown_timeout = seconds(shutdown_timeout, "shutdown_timeout")
        self._revoke_timeout = seconds(revoke_timeout, "revoke_timeout")
        self._plugins: list[Plugin] = []

    @property
    def shutdown_timeout(self) -> float:
        """Seconds a stop waits for running plugin calls."""
        return self._shutdown_timeout

    @property
    def plugins(self) -> tuple[Plugin, ...]:
        """The registered plugins, in the order they run."""
        return tuple(self._plugins)

    @overload
    def plugin(self, func: F, /) -> F: ...

    @overload
    def plugin(
        self,
        *,
        name: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        linger: Duration = DEFAULT_LINGER,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        timeout: Duration | None = None,
        rate_limit: float | RateLimit | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff: tuple[Duration, Duration] = DEFAULT_BACKOFF,
        dlq: str | None = None,
        on_failure: OnFailure | None = None,
    ) -> Callable[[F], F]: ...

    def plugin(
        self,
        func: F | None = None,
        *,
        name: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        linger: Duration = DEFAULT_LINGER,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        timeout: Duration | None = None,
        rate_limit: float | RateLimit | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff: tuple[Duration, Duration] = DEFAULT_BACKOFF,
        dlq: str | None = None,
        on_failure: OnFailure | None = None,
        **unknown: Any,
    ) -> F | Callable[[F], F]:
        """Registers a plugin: a callable, sync or ``async``, that takes a :class:`Batch`.

        Usable bare (``@app.plugin``) or with options (``@app.plugin(batch_size=100)``).
        Each plugin has its own lane, so a slow or failing plugin holds back only itself
        until its lane is full; then fetching holds back until it has drained to half.

        Args:
            name: Names the plugin in stats and errors; defaults to the function's name.
            batch_size: The most messages one call receives. A call holds messages of one
                partition, in offset order.
            linger: How long a batch may wait to fill once it holds a message. Batches are
                formed once for all plugins, so the smallest linger of all plugins applies.
            concurrency: Calls in flight at once, each on a different partition.
            max_queued: Messages waiting or running in the lane before fetching pauses; it
                resumes once half have been handled.
            max_queued_bytes: The same bound in payload bytes.
            timeout: Each call's deadline, which the plugin reads as ``batch.deadline`` and
                ``batch.remaining()``. An async call is cancelled at it, which counts as a
                failure; a sync call that overruns is counted (``overruns``) and logged, and
                its result still counts.
            rate_limit: Messages per second handed to this plugin (a number or a
                :class:`RateLimit`), charged once per call.
            retries: How many times a failed call is retried, after a backoff, for this
                plugin alone; the others go on. The partition's later messages wait for it.
            backoff: The first and the largest wait between attempts; it doubles each time,
                with jitter.
            dlq: A dead-letter topic. Messages whose retries run out are written there with
                headers naming the plugin, the error and the original position; they count as
                done once the write is acknowledged.
            on_failure: What happens when retries run out: ``"dead_letter"`` (the default
                with ``dlq``), ``"retry"`` (retry forever), or ``"stop"`` (the default
                without ``dlq``: the run ends with :class:`~fastconsume.errors.PluginError`).
        """

        check_options(unknown)  # at the decorator's call, before it is applied

        def register(f: F) -> F:
            self._register(
                make_plugin(
                    f,
                    name=name,
                    batch_size=batch_size,
                    linger=linger,
                    concurrency=concurrency,
                    max_queued=max_queued,
                    max_queued_bytes=max_queued_bytes,
                    timeout=timeout,
                    rate_limit=rate_limit,
                    retries=retries,
                    backoff=backoff,
                    dlq=dlq,
                    on_failure=on_failure,
                    **unknown,
                )
            )
            return f

        return register if func is None else register(func)

    def add_plugin(self, plugin: object, /, **options: Any) -> Plugin:
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
        record = make_plugin(plugin, **options)  # type: ignore[arg-type]
        self._register(record)
        return record

    def _register(self, plugin: Plugin) -> None:
        if any(p.name == plugin.name for p in self._plugins):
            raise ConfigError(f"a plugin named {plugin.name!r} is already registered; pass name=...")
        self._plugins.append(plugin)

    @classmethod
    def from_config(cls, config: Config) -> App:
        """The app a configuration describes: the app it names (``app = "MODULE:ATTR"``) with
        its settings and plugin options overridden by the configuration, plus the installed
        plugins it enables by name (see ``docs/configuration.md``)."""
        base = load_app(config.app) if config.app else None
        settings = dict(base._settings) if base is not None else {}
        # Property by property: FASTCONSUME_KAFKA_SASL_PASSWORD must not drop the app's others.
        kafka: dict[str, object] = {
            **settings.get("kafka", {}),
            **cast(Mapping[str, object], config.settings.get("kafka", {})),
        }
        settings.update(config.settings)
        settings["kafka"] = kafka
        missing = [key for key in ("bootstrap", "group", "topics") if key not in settings]
        if missing:
            raise ConfigError(
                f"{config.source}: missing {', '.join(missing)}: set them in the config file, "
                f"as FASTCONSUME_{missing[0].upper()}, or in the app"
            )
        app = cls(**settings)
        overrides = dict(config.plugins)
        for plugin in base.plugins if base is not None else ():
            options = overrides.pop(plugin.name, {})
            if "entry_point" in options:
                raise ConfigError(
                    f"{config.source}: plugins.{plugin.name}: names a plugin of the app; "
                    "entry_point is only for installed plugins"
                )
            app._register(plugin.with_options(**options))
        for name, options in overrides.items():
            given = dict(options)
            entry_point = str(given.pop("entry_point", name))
            app.add_plugin(load_plugin(entry_point), name=name, **given)
        return app

    def connection(self) -> dict[str, Any]:
        """How this app reaches Kafka, as the native module's functions take it."""
        settings = self._settings
        return {
            "bootstrap": settings["bootstrap"],
            "group": settings["group"],
            "topics": list(settings["topics"]),
            "kafka": [(str(k), _property_value(v)) for k, v in settings["kafka"].items()],
            "connect_timeout": seconds(settings["connect_timeout"], "connect_timeout"),
        }

    def describe(self) -> dict[str, Any]:
        """The settings and plugins, with secret librdkafka properties hidden, for display.

        >>> import fastconsume as fc
        >>> app = fc.App("127.0.0.1:9092", "feeds", "events", kafka={"sasl.password": "hunter2"})
        >>> app.describe()["kafka"]
        {'sasl.password': '***'}
        """
        from ._config import redact  # noqa: PLC0415 -- _config builds on this module

        settings = dict(self._settings)
        settings["kafka"] = redact(settings["kafka"])
        settings["plugins"] = {p.name: {option: getattr(p, option) for option in PLUGIN_OPTIONS} for p in self._plugins}
        return settings

    def run(self, *, idle_timeout: Duration | None = None) -> None:
        """Consumes until :meth:`stop`, SIGINT or SIGTERM, then commits and leaves the group.

        With ``idle_timeout``, returns once nothing new has arrived for that long (counted
        from partition assignment, so a slow group join is not idle) and all is committed.

        A second SIGINT or SIGTERM raises ``KeyboardInterrupt`` at once; only completed
        work is committed. A plugin that raises stops the run with
        :class:`~fastconsume.errors.PluginError`.
        """
        idle = self.validate(idle_timeout=idle_timeout)
        linger = min(p.linger for p in self._plugins)
        rate_limit = self._rate_limit
        with ExitStack() as stack:
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
                )

            if threading.current_thread() is threading.main_thread():
                with _signals_call(self.stop):
                    _run_interruptibly(run)
            else:
                run()

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
        # Batches are fetched as large as the largest batch_size, and a lane takes whole ones.
        largest = max(p.batch_size for p in self._plugins)
        for p in self._plugins:
            if p.max_queued < largest:
                raise ConfigError(
                    f"plugin {p.name!r}: max_queued ({p.max_queued}) must be at least the largest "
                    f"batch_size of the app ({largest})"
                )
        if self._rate_limit is not None:
            self._rate_limit.checked(largest, "App")
        return None if idle_timeout is None else seconds(idle_timeout, "idle_timeout")

    def _worker_count(self) -> int:
        if self._workers is not None:
            return self._workers
        sync = sum(p.concurrency for p in self._plugins if not p.is_async)
        return sync + (1 if any(p.is_async for p in self._plugins) else 0)

    def stop(self) -> None:
        """Ends the current run gracefully; callable from any thread, a plugin or a signal
        handler. Called before ``run()``, it makes the next run return at once."""
        self._core.stop()

    def stats(self) -> dict[str, Any]:
        """Counters of the current or last run.

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
        """
        stats = self._core.stats()
        stats["process"] = process_stats()
        return stats


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


def _property_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@contextmanager
def _signals_call(stop: Callable[[], None]) -> Iterator[None]:
    """Routes SIGINT and SIGTERM to ``stop`` for the duration; a second one interrupts."""
    received: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}: stopping at once")
        stop()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _run_interruptibly(run: Callable[[], None]) -> None:
    """Runs on a helper thread while the main thread waits in ``join``, which Python
    interrupts to run signal handlers. The run's exception is re-raised here."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as error:  # re-raised on the calling thread below
            failure.append(error)

    # Daemon, so a second signal can end the process without waiting for the run.
    thread = threading.Thread(target=target, name="fastconsume-run", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
