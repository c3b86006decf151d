"""Plugin registration: validation of the callable and its options, and async adaptation."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ._core import Batch
from ._durations import Duration, seconds
from .errors import ConfigError

SyncPlugin = Callable[[Batch], object]
AsyncPlugin = Callable[[Batch], Awaitable[object]]
PluginFunc = SyncPlugin | AsyncPlugin

DEFAULT_BATCH_SIZE = 500
DEFAULT_LINGER = "20ms"
DEFAULT_CONCURRENCY = 1
DEFAULT_MAX_QUEUED = 10_000
DEFAULT_MAX_QUEUED_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Plugin:
    """A registered plugin and its validated options."""

    name: str
    func: PluginFunc
    batch_size: int
    linger: float
    concurrency: int
    max_queued: int
    max_queued_bytes: int
    is_async: bool


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def make_plugin(
    func: PluginFunc,
    *,
    name: str | None,
    batch_size: int,
    linger: Duration,
    concurrency: int,
    max_queued: int,
    max_queued_bytes: int,
) -> Plugin:
    """Validates a plugin at registration, so mistakes surface before ``run()``."""
    if not callable(func):
        raise TypeError(f"a plugin must be callable, got {type(func).__name__}: {func!r}")
    try:
        inspect.signature(func).bind(object())
    except TypeError:
        raise TypeError(f"plugin {_name_of(func)!r} must accept one positional argument, the batch") from None
    except ValueError:
        pass  # no introspectable signature (some builtins): trust the caller
    _positive_int(batch_size, "batch_size")
    _positive_int(concurrency, "concurrency")
    _positive_int(max_queued, "max_queued")
    _positive_int(max_queued_bytes, "max_queued_bytes")
    if max_queued < batch_size:
        raise ConfigError(f"max_queued ({max_queued}) must be at least batch_size ({batch_size})")
    plugin_name = name if name is not None else _name_of(func)
    if not isinstance(plugin_name, str) or not plugin_name:
        raise ConfigError(f"a plugin name must be a non-empty string, got {plugin_name!r}")
    return Plugin(
        name=plugin_name,
        func=func,
        batch_size=batch_size,
        linger=seconds(linger, "linger"),
        concurrency=concurrency,
        max_queued=max_queued,
        max_queued_bytes=max_queued_bytes,
        is_async=_is_async(func),
    )


def _is_async(func: Callable[..., object]) -> bool:
    """``async def`` functions, and instances of classes whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def _name_of(func: object) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    return str(name)


class AsyncLoop:
    """One asyncio loop on its own thread, for every async plugin of an app.

    A batch is submitted to the loop and the calling worker waits for its result; the GIL is
    free while it waits.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fastconsume-asyncio", daemon=True)

    def __enter__(self) -> AsyncLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def wrap(self, func: AsyncPlugin) -> SyncPlugin:
        loop = self._loop

        def call(batch: Batch) -> Any:
            return asyncio.run_coroutine_threadsafe(_awaited(func, batch), loop).result()

        return call


async def _awaited(func: AsyncPlugin, batch: Batch) -> object:
    return await func(batch)
