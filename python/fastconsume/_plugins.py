"""Plugin registration: the record of a registered plugin, validation of its callable, and
the event loop of async plugins. Its options are checked by their schema (``_options``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import threading
import types
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._core import Batch
from ._options import OPTIONS, PluginOptions, check_rules, check_values, engine_values, failure_policy
from ._values import OnFailure
from .errors import ConfigError, PluginSignatureError

if TYPE_CHECKING:
    # What the native side reads of a plugin, as the stubs declare it: the type of the
    # attributes that Plugin serves from its options.
    from ._core import PluginSpec as _NativeView
else:
    _NativeView = object

SyncPlugin = Callable[[Batch], object]
AsyncPlugin = Callable[[Batch], Awaitable[object]]
PluginFunc = SyncPlugin | AsyncPlugin


class Plugin(_NativeView):
    """A registered plugin: its name, its callable and its options, checked. Each option is
    an attribute in the engine's units (``plugin.linger`` in seconds, ``plugin.rate_limit`` a
    :class:`~fastconsume.RateLimit` or ``None``), which is how the native side reads it;
    :attr:`given` keeps the options as written, so that :meth:`with_options` derives the
    options that default from others again (``rate_limit.burst`` from ``batch_size``,
    ``on_failure`` from ``dlq``). Immutable.

    >>> plugin = make_plugin(len, "count", {"linger": "5ms", "dlq": "events.dlq"})
    >>> plugin.linger, plugin.given, plugin.failure_policy
    (0.005, {'linger': '5ms', 'dlq': 'events.dlq'}, 'dead_letter')
    """

    __slots__ = ("_values", "given")

    given: PluginOptions
    _values: dict[str, Any]

    def __init__(self, name: str, func: PluginFunc, *, is_async: bool, given: PluginOptions) -> None:
        """Made by :func:`make_plugin`; ``given`` checked by ``check_values``."""
        object.__setattr__(self, "given", given)
        object.__setattr__(self, "_values", {"name": name, "func": func, "is_async": is_async, **engine_values(given)})
        check_rules([self])

    def __getattr__(self, attribute: str) -> Any:
        try:
            return self._values[attribute]
        except KeyError:
            raise AttributeError(f"a plugin has no {attribute!r}") from None

    def __setattr__(self, attribute: str, value: object) -> None:
        raise AttributeError(f"a plugin is immutable: make another with with_options({{{attribute!r}: ...}})")

    def __repr__(self) -> str:
        options = ", ".join(f"{option}={getattr(self, option)!r}" for option in OPTIONS)
        return f"Plugin(name={self.name!r}, {options})"

    @property
    def failure_policy(self) -> OnFailure:
        """What happens when retries run out: ``on_failure``, or its default."""
        return failure_policy(self.on_failure, self.dlq)

    def with_options(self, overrides: Mapping[str, object]) -> Plugin:
        """This plugin with some options changed, checked again.

        >>> plugin = make_plugin(len, "count", {})
        >>> plugin.with_options({"batch_size": 50, "dlq": "events.dlq"}).failure_policy
        'dead_letter'
        """
        return make_plugin(self.func, self.name, {**self.given, **overrides})

    def setup(self) -> Callable[[], object] | None:
        """The plugin object's ``setup`` hook, if it has one (functions have none)."""
        return _hook(self.func, "setup")

    def teardown(self) -> Callable[[], object] | None:
        """The plugin object's ``teardown`` hook, if it has one."""
        return _hook(self.func, "teardown")


def _hook(func: object, name: str) -> Callable[[], object] | None:
    if inspect.isfunction(func) or inspect.ismethod(func) or inspect.isbuiltin(func):
        return None
    hook = getattr(func, name, None)
    return hook if callable(hook) else None


def make_plugin(func: object, name: str | None, options: Mapping[str, object]) -> Plugin:
    """Validates a plugin at registration, so mistakes surface before ``run()``. A class is
    instantiated with no arguments: its instances are the plugin. A generator function is
    not a plugin (its body would never run), and an unknown option is a
    :class:`~fastconsume.errors.ConfigError` that suggests the closest known one.

    >>> make_plugin(len, "count", {"linger": "5ms"}).linger
    0.005
    >>> make_plugin(len, None, {"retires": 3})
    Traceback (most recent call last):
    ...
    fastconsume.errors.ConfigError: retires: unknown plugin option; did you mean 'retries'?
    """
    given = check_values(options)  # before a class is instantiated
    if isinstance(func, type):
        cls = func
        try:
            func = cls()
        except TypeError as error:
            raise PluginSignatureError(
                f"plugin class {cls.__name__!r} must take no constructor arguments: {error}"
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
    plugin_name = name if name is not None else _name_of(func)
    if not isinstance(plugin_name, str) or not plugin_name:
        raise ConfigError(f"a plugin name must be a non-empty string, got {plugin_name!r}")
    return Plugin(plugin_name, func, is_async=_is_async(func), given=given)


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
