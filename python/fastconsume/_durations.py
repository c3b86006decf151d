"""Durations as users write them: seconds as a number, or a string such as ``"20ms"``."""

from __future__ import annotations

import math
import re

from .errors import ConfigError

Duration = int | float | str
"""Seconds as a number, or a string with a unit: ``us``, ``ms``, ``s``, ``m`` or ``h``."""

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|ms|s|m|h)\s*$")


def seconds(value: Duration, what: str) -> float:
    """Parses a duration into seconds; ``what`` names the setting in errors.

    >>> seconds("20ms", "linger"), seconds(1.5, "timeout"), seconds("2m", "idle")
    (0.02, 1.5, 120.0)
    >>> seconds("soon", "linger")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fastconsume.errors.ConfigError: linger: 'soon' is not a duration; ...
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{what}: expected seconds or a string like '20ms', got {type(value).__name__}")
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None:
            raise ConfigError(
                f"{what}: {value!r} is not a duration; write seconds as a number or a string like '20ms', '5s', '2m'"
            )
        result = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        result = float(value)
    if not math.isfinite(result) or result < 0:
        raise ConfigError(f"{what}: must be a finite, non-negative duration, got {value!r}")
    return result
