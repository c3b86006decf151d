"""Plugin registration: validation of the callable and its options, and the event loop of
async plugins."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import difflib
import inspect
import math
import threading
import types
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ._core import Batch
from ._durations import Duration, seconds
from .errors import ConfigError, PluginSignatureError

SyncPlugin = Callable[[Batch], object]
AsyncPlugin = Callable[[Batch], Awaitable[object]]
PluginFunc = SyncPlugin | AsyncPlugin

DEFAULT_BATCH_SIZE = 500
DEFAULT_LINGER = "20ms"
DEFAULT_CONCURRENCY = 1
DEFAULT_MAX_QUEUED = 10_000
DEFAULT_MAX_QUEUED_BYTES = 64 * 1024 * 1024
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = ("100ms", "30s")

OnFailure = Literal["dead_letter", "retry", "stop"]
_ON_FAILURE = ("dead_letter", "retry", "stop")


@dataclass(frozen=True)
class RateLimit:
    """A rate limit in messages per second, enforced as GCRA and charged once per batch.

    ``burst`` is how many messages may pass at once; it defaults to the batch size charged
    (a plugin's ``batch_size``, or the largest one for the app) and must be at least that.
    A plain number is shorthand for ``RateLimit(per_second=number)``.

    >>> import fastconsume as fc
    >>> fc.RateLimit(5000)
    RateLimit(per_second=5000, burst=None)
    """

    per_second: float
    burst: int | None = None

    def __post_init__(self) -> None:
        rate = self.per_second
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise ConfigError(f"rate_limit: per_second must be a positive number, got {rate!r}")
        burst = self.burst
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
            raise ConfigError(f"rate_limit: burst must be a positive integer, got {self.burst!r}")

    def checked(self, batch_size: int, what: str) -> RateLimit:
        """This limit, checked against the batch size it is charged; an unset burst is the
        batch size."""
        if self.burst is not None and self.burst < batch_size:
            raise ConfigError(
                f"{what}: rate_limit burst ({self.burst}) must be at least the batch size ({batch_size}), "
                "since a batch is charged at once"
            )
        return self


def rate_limit_of(value: float | RateLimit | None) -> RateLimit | None:
    """``rate_limit=`` as given: a number of messages per second, a :class:`RateLimit`, or
    ``None``."""
    if value is None or isinstance(value, RateLimit):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"rate_limit: expected messages per second or a RateLimit, got {type(value).__name__}")
    return RateLimit(value)


@dataclass(frozen=True)
class Plugin:
    """A registered plugin and its validated options (durations in seconds). Options that
    default from others stay as given: ``rate_limit.burst`` (from ``batch_size``) and
    ``on_failure`` (from ``dlq``), so :meth:`with_options` derives them again."""

    name: str
    func: PluginFunc
    batch_size: int
    linger: float
    concurrency: int
    max_queued: int
    max_queued_bytes: int
    timeout: float | None
    rate_limit: RateLimit | None
    retries: int
    backoff: tuple[float, float]
    dlq: str | None
    on_failure: OnFailure | None
    is_async: bool

    @property
    def failure_policy(self) -> OnFailure:
        """What happens when retries run out: ``on_failure``, or its default."""
        return _on_failure(self.on_failure, self.dlq)

    def with_options(self, **overrides: Any) -> Plugin:
        """This plugin with some options changed, validated again.

        >>> plugin = make_plugin(len, name="count")
        >>> plugin.with_options(batch_size=50, dlq="events.dlq").failure_policy
        'dead_letter'
        """
        options: dict[str, Any] = {option: getattr(self, option) for option in PLUGIN_OPTIONS}
        return make_plugin(self.func, name=self.name, **{**options, **overrides})

    def setup(self) -> Callable[[], object] | None:
        """The plugin object's ``setup`` hook, if it has one (functions have none)."""
        return _hook(self.func, "setup")

    def teardown(self) -> Callable[[], object] | None:
        """The plugin object's ``teardown`` hook, if it has one."""
        return _hook(self.func, "teardown")


PLUGIN_OPTIONS = (
    "batch_size",
    "linger",
    "concurrency",
    "max_queued",
    "max_queued_bytes",
    "timeout",
    "rate_limit",
    "retries",
    "backoff",
    "dlq",
    "on_failure",
)
"""The options of ``App.plugin``, ``App.add_plugin`` and a config file's ``[plugins.NAME]``."""


def _hook(func: object, name: str) -> Callable[[], object] | None:
    if inspect.isfunction(func) or inspect.ismethod(func) or inspect.isbuiltin(func):
        return None
    hook = getattr(func, name, None)
    return hook if callable(hook) else None


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def make_plugin(
    func: PluginFunc | type,
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
    **unknown: object,
) -> Plugin:
    """Validates a plugin at registration, so mistakes surface before ``run()``. A class is
    instantiated with no arguments: its instances are the plugin. A generator function is
    not a plugin (its body would never run), and an unknown option is a
    :class:`~fastconsume.errors.ConfigError` that suggests the closest known one.

    >>> make_plugin(len, name="count", linger="5ms").linger
    0.005
    >>> make_plugin(len, retires=3)
    Traceback (most recent call last):
    ...
    fastconsume.errors.ConfigError: retires: unknown plugin option; did you mean 'retries'?
    """
    check_options(unknown)
    if isinstance(func, type):
        try:
            func = func()
        except TypeError as error:
            raise PluginSignatureError(
                f"plugin class {func.__name__!r} must take no constructor arguments: {error}"
            ) from None
    if not callable(func):
        raise PluginSignatureError(f"a plugin must be callable, got {type(func).__name__}: {func!r}")
    try:
        inspect.signature(func).bind(object())
    except TypeError:
        raise PluginSignatureError(
            f"plugin {_name_of(func)!r} must accept one positional argument, the batch"
        ) from None
    except ValueError:
        pass  # no introspectable signature (some builtins): trust the caller
    _reject_generators(func)
    _positive_int(batch_size, "batch_size")
    _positive_int(concurrency, "concurrency")
    _positive_int(max_queued, "max_queued")
    _positive_int(max_queued_bytes, "max_queued_bytes")
    if max_queued < batch_size:
        raise ConfigError(f"max_queued ({max_queued}) must be at least batch_size ({batch_size})")
    plugin_name = name if name is not None else _name_of(func)
    if not isinstance(plugin_name, str) or not plugin_name:
        raise ConfigError(f"a plugin name must be a non-empty string, got {plugin_name!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"retries must be a non-negative integer, got {retries!r}")
    if dlq is not None and (not isinstance(dlq, str) or not dlq.strip()):
        raise ConfigError(f"dlq must be a topic name, got {dlq!r}")
    _on_failure(on_failure, dlq)
    call_timeout = None if timeout is None else seconds(timeout, "timeout")
    if call_timeout == 0:
        raise ConfigError("timeout must be positive; pass None for no deadline")
    limit = rate_limit_of(rate_limit)
    return Plugin(
        name=plugin_name,
        func=func,
        batch_size=batch_size,
        linger=seconds(linger, "linger"),
        concurrency=concurrency,
        max_queued=max_queued,
        max_queued_bytes=max_queued_bytes,
        timeout=call_timeout,
        rate_limit=limit if limit is None else limit.checked(batch_size, f"plugin {plugin_name!r}"),
        retries=retries,
        backoff=_backoff(backoff),
        dlq=dlq,
        on_failure=on_failure,
        is_async=_is_async(func),
    )


def check_options(options: Iterable[str]) -> None:
    """Raises :class:`ConfigError` for the first name that is not a plugin option, with the
    closest known one, as the config file's loader does.

    >>> check_options(["batch_size", "name"])
    >>> check_options(["batchsize"])
    Traceback (most recent call last):
    ...
    fastconsume.errors.ConfigError: batchsize: unknown plugin option; did you mean 'batch_size'?
    """
    known = ("name", *PLUGIN_OPTIONS)
    for option in options:
        if option not in known:
            close = difflib.get_close_matches(option, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(known)}"
            raise ConfigError(f"{option}: unknown plugin option; {hint}")


def _reject_generators(func: Callable[..., object]) -> None:
    """A generator function's body runs only when its result is iterated, which fastconsume
    never does: as a plugin it would do nothing and have every batch committed."""
    calls = (func, type(func).__call__)  # a function (or partial), or an object's __call__
    name = _name_of(func)
    if any(inspect.isasyncgenfunction(call) for call in calls):
        raise PluginSignatureError(
            f"plugin {name!r} is an async generator function (`async def` with `yield`): its body would "
            "never run; process the batch in the call and drop the `yield`"
        )
    if any(inspect.isgeneratorfunction(call) for call in calls):
        raise PluginSignatureError(
            f"plugin {name!r} is a generator function (it uses `yield`): its body would never run; "
            "process the batch in the call and drop the `yield`"
        )


def _on_failure(on_failure: OnFailure | None, dlq: str | None) -> OnFailure:
    if on_failure is None:
        return "dead_letter" if dlq is not None else "stop"
    if on_failure not in _ON_FAILURE:
        raise ConfigError(f"on_failure must be one of {', '.join(map(repr, _ON_FAILURE))}, got {on_failure!r}")
    if on_failure == "dead_letter" and dlq is None:
        raise ConfigError('on_failure="dead_letter" needs a dead-letter topic: pass dlq="topic"')
    return on_failure


def _backoff(backoff: tuple[Duration, Duration]) -> tuple[float, float]:
    if not isinstance(backoff, (tuple, list)) or len(backoff) != 2:
        raise ConfigError(f"backoff must be a (first, max) pair of durations, got {backoff!r}")
    first, largest = seconds(backoff[0], "backoff"), seconds(backoff[1], "backoff")
    if first > largest:
        raise ConfigError(f"backoff: the first wait ({backoff[0]!r}) exceeds the maximum ({backoff[1]!r})")
    return first, largest


def _is_async(func: Callable[..., object]) -> bool:
    """``async def`` functions, and instances of classes whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def _name_of(func: object) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    return str(name)


class AsyncLoop:
    """One asyncio loop on its own thread, for every async plugin of an app.

    A worker hands each call to the loop with :meth:`start` and moves on; the call reports
    its outcome through ``done`` when it finishes. So a lane's ``concurrency`` counts calls in
    flight on the loop, not threads.

    A plugin's ``SystemExit`` or ``KeyboardInterrupt`` is caught in its task, so it cannot
    stop the loop, and reported as a fatal outcome. Should the loop's thread end anyway (a
    plugin stopped the loop, or a callback raised through it), every call it held, and every
    call started later, ends as a fatal failure that says so: the run fails instead of
    waiting for them.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="fastconsume-asyncio", daemon=True)
        self._lock = threading.Lock()
        # Calls started and not yet reported, so that a dead loop can report them.
        self._pending: dict[int, Callable[[Outcome], object]] = {}
        self._next = 0
        self._closing = False
        self._died: BaseException | None = None
        # Waits of setup and teardown hooks, failed by a dying loop instead of hanging.
        self._waits: set[concurrent.futures.Future[object]] = set()

    def __enter__(self) -> AsyncLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._closing = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        if self._died is not None:
            self._cancel_left_over()
        self._loop.close()

    def _cancel_left_over(self) -> None:
        """The loop died with tasks in it (already reported as failed): cancel them, bounded,
        so that they end instead of being destroyed pending."""
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(BaseException):
                self._loop.run_until_complete(asyncio.wait(tasks, timeout=1.0))

    def _serve(self) -> None:
        try:
            self._loop.run_forever()
        except BaseException as error:  # whatever ended the loop is reported
            self._end(error)
        else:
            self._end(None)

    def _end(self, error: BaseException | None) -> None:
        with self._lock:
            if self._closing and error is None:
                return
            cause = "" if error is None else f": {error!r}"
            self._died = RuntimeError(f"the event loop of async plugins ended unexpectedly{cause}")
            pending, self._pending = list(self._pending.values()), {}
            waits, self._waits = list(self._waits), set()
        for wait in waits:
            if not wait.done():
                wait.set_exception(self._died)
        for done in pending:
            done(Outcome(self._died, fatal=True))

    def run(self, awaitable: Awaitable[object]) -> object:
        """Runs ``awaitable`` on the loop and waits for its result (for setup and teardown).
        Its ``SystemExit`` or ``KeyboardInterrupt`` is raised here, not on the loop."""
        with self._lock:
            if self._died is not None:
                if inspect.iscoroutine(awaitable):
                    awaitable.close()
                raise self._died
            wait = asyncio.run_coroutine_threadsafe(_awaiting(awaitable), self._loop)
            self._waits.add(wait)
        try:
            result = wait.result()
        finally:
            with self._lock:
                self._waits.discard(wait)
        if isinstance(result, _Exited):
            raise result.error
        return result

    def start(self, func: AsyncPlugin, batch: Batch, done: Callable[[Outcome], object]) -> AsyncCall:
        """Runs ``func(batch)`` as a task on the loop; ``done(outcome)`` is called, on the loop,
        once the task has really ended, a cancelled one included (or at once, on this
        thread, if the loop has died)."""
        call = AsyncCall(self._loop)
        with self._lock:
            died = self._died
            if died is None:
                key = self._next
                self._next += 1
                self._pending[key] = done
        if died is not None:
            done(Outcome(died, fatal=True))
            return call

        plugin = batch.plugin

        def report(task: asyncio.Task[object]) -> None:
            with self._lock:
                if self._pending.pop(key, None) is None:
                    return  # reported already, by a dying loop
            done(_outcome(task, plugin, call.deadline_passed))

        def begin() -> None:
            call.task = self._loop.create_task(_awaited(func, batch))
            call.task.add_done_callback(report)

        self._loop.call_soon_threadsafe(begin)
        return call


@dataclass(frozen=True)
class Outcome:
    """How an async call ended, for its ``done`` callback: ``exception()`` is what it raised
    (``None`` on success), ``fatal`` whether the run must end with it whatever the plugin's
    policy."""

    error: BaseException | None
    fatal: bool = False
    was_cancelled: bool = False

    def cancelled(self) -> bool:
        return self.was_cancelled

    def exception(self) -> BaseException | None:
        return self.error


@dataclass(frozen=True)
class _Exited:
    """An async plugin raised ``SystemExit`` or ``KeyboardInterrupt``: kept as a value, since
    raised out of a task they would stop the event loop."""

    error: BaseException


def _outcome(task: asyncio.Task[object], plugin: str, deadline_passed: bool) -> Outcome:
    if task.cancelled():
        if deadline_passed:
            return Outcome(None, was_cancelled=True)
        # Not by its deadline: the plugin cancelled itself, or let a CancelledError through.
        return Outcome(asyncio.CancelledError(f"plugin {plugin!r} was cancelled, not by its deadline"))
    error = task.exception()
    if error is not None:
        return Outcome(error)
    result = task.result()
    if isinstance(result, _Exited):
        return Outcome(result.error, fatal=True)
    mistake = _async_mistake(result, plugin)
    return Outcome(mistake)


def _async_mistake(result: object, plugin: str) -> TypeError | None:
    """An async plugin returned an awaitable it did not await: its work did not happen."""
    if result is None or not inspect.isawaitable(result):
        return None
    if isinstance(result, types.CoroutineType):
        result.close()  # never awaited: closed, so that Python does not warn about it
    return TypeError(
        f"plugin {plugin!r} returned {type(result).__name__} without awaiting it, so its work did not "
        "happen: write `await ...` (or `return await ...`)"
    )


class AsyncCall:
    """A call handed to the event loop. ``cancel()`` from any thread cancels its task on the
    loop. (A ``concurrent.futures.Future`` would report itself done at once on ``cancel()``,
    while the coroutine still runs its cleanup: the partition's next call could overlap it.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.task: asyncio.Task[object] | None = None
        self.deadline_passed = False

    def cancel(self) -> None:
        self.deadline_passed = True
        # Scheduled after the call's own start (the loop runs callbacks in order).
        self._loop.call_soon_threadsafe(lambda: self.task is not None and self.task.cancel())


async def _awaited(func: AsyncPlugin, batch: Batch) -> object:
    try:
        return await func(batch)
    except (SystemExit, KeyboardInterrupt) as error:
        return _Exited(error)


async def _awaiting(awaitable: Awaitable[object]) -> object:
    try:
        return await awaitable
    except (SystemExit, KeyboardInterrupt) as error:
        return _Exited(error)
