"""Values as users write them, in code, in a configuration file and in the environment: each
kind of value with its one check, which every way in shares, so a value means the same and is
refused in the same words wherever it is written.

A check takes the value and ``where``, what names it in errors (``"batch_size"`` in code,
``"fastconsume.toml: plugins.index.batch_size"`` in a file, ``"FASTCONSUME_WORKERS"``), and
returns the value kept as written, or raises a :class:`~fastconsume.errors.ConfigError` of
one line, ``"<where>: <problem>"``.

>>> POSITIVE_INTEGER.check(0, "fastconsume.toml: workers")
Traceback (most recent call last):
...
fastconsume.errors.ConfigError: fastconsume.toml: workers: must be at least 1, got 0
>>> DURATION.check("20ms", "linger"), DURATION.engine("20ms")
('20ms', 0.02)
>>> redact({"sasl.username": "feeds", "sasl.password": "hunter2", "fetch.wait.max.ms": 100})
{'sasl.username': 'feeds', 'sasl.password': '***', 'fetch.wait.max.ms': '100'}
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, NoReturn, cast, get_args

from ._durations import Duration, seconds
from .errors import ConfigError

Check = Callable[[object, str], object]
"""Validates a value; ``where`` names it in errors. Returns the value kept."""
EnvParse = Callable[[str, str], object]
"""Turns an environment variable's text into a value, then validates it like a file value;
``where`` is the variable's name."""


def _unchanged(value: object) -> object:
    return value


@dataclass(frozen=True)
class Kind:
    """A type of value: how the reference names it, how a value is checked, how an
    environment value is read (``None``: not settable as one variable), and what the engine
    takes for a checked value (durations in seconds, say)."""

    label: str
    check: Check
    from_env: EnvParse | None = None
    engine: Callable[[object], object] = _unchanged


@dataclass(frozen=True)
class Key:
    """One key of a table (of a file, or a ``{ per_second = ..., burst = ... }``), as the
    reference documents it and validation checks it."""

    name: str
    kind: Kind
    default: str
    """Markdown for the reference: a TOML value, or a few words when the default is computed."""
    meaning: str


def expected(where: str, what: str, value: object) -> NoReturn:
    raise ConfigError(f"{where}: expected {what}, got {value!r}")


def child(where: str, name: str) -> str:
    """The location of ``name`` inside the table at ``where`` (``"file: "`` for a file's root)."""
    return f"{where}{name}" if where.endswith(": ") else f"{where}.{name}"


def unknown_key(where: str, name: str, known: Iterable[str]) -> NoReturn:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(known)}"
    raise ConfigError(f"{child(where, name)}: unknown key; {hint}")


def table(value: object, where: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        expected(where, "a table", value)
    return cast(Mapping[str, object], value)


def keys(value: object, where: str, known: Mapping[str, Key]) -> dict[str, object]:
    """A table whose keys are all in ``known``, each value checked by its key's kind."""
    checked: dict[str, object] = {}
    for name, item in table(value, where).items():
        key = known.get(name)
        if key is None:
            unknown_key(where, name, known)
        checked[name] = key.kind.check(item, child(where, name))
    return checked


# --- Checks. ---


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        expected(where, "a non-empty string", value)
    return value


def _target(value: object, where: str) -> str:
    text = _text(value, where)
    module, _, attribute = text.rpartition(":")
    if not module or not attribute:
        expected(where, '"MODULE:ATTR" or "path/to/file.py:ATTR"', value)
    return text


_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?\]")
_PROTOCOLS = ("plaintext://", "ssl://", "sasl_plaintext://", "sasl_ssl://")


def check_bootstrap(value: object, where: str) -> str:
    """``value`` if it is a ``host:port[,host:port...]`` list, else a
    :class:`~fastconsume.errors.ConfigError` naming the bad entry. IPv6 addresses go in
    brackets; a librdkafka protocol prefix is allowed.

    >>> check_bootstrap("broker-1:9092,[::1]:9093", "bootstrap")
    'broker-1:9092,[::1]:9093'
    >>> check_bootstrap("garbage", "bootstrap")
    Traceback (most recent call last):
    ...
    fastconsume.errors.ConfigError: bootstrap: 'garbage' has no port; expected host:port, like 'garbage:9092'
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected host:port[,host:port...], got {value!r}")
    for entry in value.split(","):
        address = entry.strip()
        if not address:
            raise ConfigError(f"{where}: an empty entry in {value!r}")
        for protocol in _PROTOCOLS:
            if address.lower().startswith(protocol):
                address = address[len(protocol) :]
                break
        host, colon, port = address.rpartition(":")
        if not colon:
            raise ConfigError(f"{where}: {entry.strip()!r} has no port; expected host:port, like '{address}:9092'")
        if ":" in host and not host.startswith("["):
            raise ConfigError(f"{where}: {entry.strip()!r}: write an IPv6 address in brackets, like '[::1]:9092'")
        if not (_IPV6.fullmatch(host) or _HOST.fullmatch(host)):
            raise ConfigError(f"{where}: {entry.strip()!r}: {host!r} is not a host name or address")
        if not port.isdigit() or not 1 <= int(port) <= 65535:  # the TCP port range
            raise ConfigError(f"{where}: {entry.strip()!r}: the port must be a number from 1 to 65535, got {port!r}")
    return value


def _topics(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(topic, str) and topic.strip() for topic in value):
        expected(where, "a non-empty list of topic names", value)
    return cast(list[str], value)


def _topics_from_env(text: str, where: str) -> list[str]:
    return _topics([topic.strip() for topic in text.split(",")], where)


def _integer(value: object, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        expected(where, "an integer", value)
    if value < minimum:
        raise ConfigError(f"{where}: must be at least {minimum}, got {value!r}")
    return value


def _positive_integer(value: object, where: str) -> int:
    return _integer(value, where, 1)


def _non_negative_integer(value: object, where: str) -> int:
    return _integer(value, where, 0)


def _boolean(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        expected(where, "true or false", value)
    return value


_ENV_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _boolean_from_env(text: str, where: str) -> object:
    value = _ENV_BOOLEANS.get(text.strip().lower())
    if value is None:
        expected(where, "true or false", text)
    return value


def _integer_from_env(check: Check) -> EnvParse:
    def parse(text: str, where: str) -> object:
        try:
            number = int(text.strip())
        except ValueError:
            expected(where, "an integer", text)
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
        expected(where, "a positive number", value)
    return value


def _duration(value: object, where: str) -> object:
    """Checked, but kept as written (``"20ms"`` or seconds)."""
    seconds(cast(Duration, value), where)  # reports non-durations of any type itself
    return value


def _positive_duration(value: object, where: str) -> object:
    if seconds(cast(Duration, value), where) == 0:
        raise ConfigError(f"{where}: must be positive (leave it out for no deadline), got {value!r}")
    return value


def _duration_from_env(text: str, where: str) -> object:
    number = _number_from_text(text)
    return _duration(text.strip() if number is None else number, where)


def _in_seconds(value: object) -> float:
    return seconds(cast(Duration, value), "a checked duration")


def _backoff(value: object, where: str) -> tuple[object, object]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        what = 'a list of two durations (a pair in code), the first and the largest wait, like ["100ms", "30s"]'
        expected(where, what, value)
    return _duration(value[0], f"{where}[0]"), _duration(value[1], f"{where}[1]")


def _backoff_in_seconds(value: object) -> tuple[float, float]:
    first, largest = cast(tuple[object, object], value)
    return _in_seconds(first), _in_seconds(largest)


OnFailure = Literal["dead_letter", "retry", "stop"]
_ON_FAILURE_CHOICES: tuple[str, ...] = get_args(OnFailure)


def _on_failure(value: object, where: str) -> str:
    if value not in _ON_FAILURE_CHOICES:
        expected(where, " or ".join(map(repr, _ON_FAILURE_CHOICES)), value)
    return value


# --- Rate limits. ---


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
        _RATE_LIMIT_KEYS["per_second"].kind.check(self.per_second, "rate_limit.per_second")
        if self.burst is not None:
            _RATE_LIMIT_KEYS["burst"].kind.check(self.burst, "rate_limit.burst")


def _rate_limit(value: object, where: str) -> int | float | RateLimit:
    if isinstance(value, RateLimit):
        return value  # checked when made
    if not isinstance(value, Mapping):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            expected(
                where, "messages per second or a table { per_second = ..., burst = ... } (in code: fc.RateLimit)", value
            )
        return _positive_number(value, where)
    fields = keys(value, where, _RATE_LIMIT_KEYS)
    if "per_second" not in fields:
        raise ConfigError(f"{where}: a rate_limit table needs per_second")
    return RateLimit(cast(float, fields["per_second"]), cast("int | None", fields.get("burst")))


def _rate_limit_from_env(text: str, where: str) -> int | float:
    number = _number_from_text(text)
    if number is None:
        expected(where, "messages per second", text)
    return _positive_number(number, where)


def _as_rate_limit(value: object) -> RateLimit:
    return value if isinstance(value, RateLimit) else RateLimit(cast(float, value))


def rate_limit_of(value: object, where: str) -> RateLimit:
    """A rate limit as written (messages per second, a :class:`RateLimit`, or a table), checked,
    as the engine takes it.

    >>> rate_limit_of(250.5, "rate_limit")
    RateLimit(per_second=250.5, burst=None)
    """
    return _as_rate_limit(_rate_limit(value, where))


# --- librdkafka properties. ---

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


def property_value(value: object) -> str:
    """A librdkafka property's value as the string librdkafka takes (``true``, not ``True``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def redact(kafka: Mapping[str, object]) -> dict[str, str]:
    """librdkafka properties as strings, with the values of secret ones (names containing one
    of :data:`SECRET_WORDS`) replaced by ``***``."""
    return {str(name): REDACTED if _is_secret(str(name)) else property_value(value) for name, value in kafka.items()}


def _kafka(value: object, where: str) -> dict[str, str]:
    """librdkafka properties as strings. A dotted key written bare (``sasl.password = ...``)
    is a nested table in TOML, so nested tables are joined back into dotted names."""
    properties: dict[str, str] = {}
    if not isinstance(value, Mapping):
        # The type only: a string here may well be "sasl.password=...".
        raise ConfigError(f"{where}: expected a table, got a {type(value).__name__}")

    def add(nested: object, prefix: str, at: str) -> None:
        for name, item in table(nested, at).items():
            prop = f"{prefix}{name}"
            if isinstance(item, Mapping):
                add(item, f"{prop}.", child(at, name))
                continue
            if not isinstance(item, (str, int, float)):  # bool is an int
                # The type only: the value may be a secret.
                raise ConfigError(
                    f"{child(where, prop)}: expected a string, number or boolean, got a {type(item).__name__}"
                )
            if prop in properties:
                raise ConfigError(f"{child(where, prop)}: given twice")
            properties[prop] = property_value(item)

    add(value, "", where)
    return properties


# --- The kinds. ---

TEXT = Kind("string", _text, _text)
BOOTSTRAP = Kind('string, `"host:port,..."`', check_bootstrap, check_bootstrap)
TARGET = Kind('string, `"MODULE:ATTR"`', _target, _target)
TOPICS = Kind("list of strings", _topics, _topics_from_env)
KAFKA = Kind("table", _kafka)  # from the environment one property at a time: FASTCONSUME_KAFKA_<NAME>
RATE_LIMIT = Kind("number or table", _rate_limit, _rate_limit_from_env, _as_rate_limit)
POSITIVE_INTEGER = Kind("integer ≥ 1", _positive_integer, _integer_from_env(_positive_integer))
NON_NEGATIVE_INTEGER = Kind("integer ≥ 0", _non_negative_integer, _integer_from_env(_non_negative_integer))
POSITIVE_NUMBER = Kind("number > 0", _positive_number)
DURATION = Kind("duration", _duration, _duration_from_env, _in_seconds)
POSITIVE_DURATION = Kind("duration > 0", _positive_duration, engine=_in_seconds)
BOOLEAN = Kind("boolean", _boolean, _boolean_from_env)
BACKOFF = Kind("list of 2 durations", _backoff, engine=_backoff_in_seconds)
ON_FAILURE = Kind(" or ".join(f'`"{choice}"`' for choice in _ON_FAILURE_CHOICES), _on_failure)

_RATE_LIMIT_KEYS = {
    key.name: key
    for key in (
        Key("per_second", POSITIVE_NUMBER, "required", "Messages per second."),
        Key("burst", POSITIVE_INTEGER, "the batch size", "Messages that may pass at once."),
    )
}
