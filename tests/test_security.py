"""SASL (SCRAM-SHA-512) and TLS against a real broker started for this module by
``scripts/kafka_broker.py start_secure``: the right credentials consume everything; a wrong
password, a wrong CA, no CA and plaintext sent to the TLS listener each fail within about a
second with their own exception and exit code, naming librdkafka's reason; the password is
nowhere in what fastconsume shows."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

import fastconsume as fc
from fastconsume.testing import produce

from kafka import ROOT, committed, new_group

FAIL_WITHIN = 2.0
"""Seconds; generous next to the ~0.5 s librdkafka needs, and far below the connect_timeout
(10 s), so passing it proves the failure did not wait for the timeout."""
CONNECT_TIMEOUT = "10s"


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("kafka_broker", ROOT / "scripts" / "kafka_broker.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    broker = _script().start_secure(tmp_path_factory.mktemp("secure-kafka"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def topic(secure: Any) -> str:
    name = f"secure-{os.getpid()}-{time.monotonic_ns()}"
    admin = AdminClient({"bootstrap.servers": secure.plaintext})
    admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=1)])[name].result(timeout=30)
    for partition in range(2):
        produce(secure.plaintext, name, [f"p{partition}-{i}".encode() for i in range(100)], partition=partition)
    return name


def _cases(secure: Any) -> dict[str, tuple[str, dict[str, str], type[fc.KafkaConnectionError], str, int]]:
    """name -> (bootstrap, kafka properties, exception, reason in the message, exit code)."""
    return {
        "wrong password": (
            secure.sasl,
            secure.sasl_config(password="not-the-password"),
            fc.KafkaAuthenticationError,
            "SASL authentication error",
            4,
        ),
        "wrong CA": (
            secure.ssl,
            secure.ssl_config(ca_file=secure.other_ca_file),
            fc.KafkaTLSError,
            "certificate verify failed",
            5,
        ),
        "no CA": (secure.ssl, {"security.protocol": "SSL"}, fc.KafkaTLSError, "certificate verify failed", 5),
        "plaintext to TLS": (secure.ssl, {}, fc.KafkaTLSError, "TLS listener", 5),
    }


CASES = ["wrong password", "wrong CA", "no CA", "plaintext to TLS"]


@pytest.mark.parametrize("listener", ["sasl", "ssl"])
def test_the_right_credentials_consume_every_message(secure: Any, topic: str, listener: str) -> None:
    bootstrap, kafka = (secure.sasl, secure.sasl_config()) if listener == "sasl" else (secure.ssl, secure.ssl_config())
    group = new_group()
    app = fc.App(bootstrap, group, [topic], kafka=kafka, connect_timeout=CONNECT_TIMEOUT)
    seen: list[bytes] = []
    app.plugin(lambda batch: seen.extend(m.value or b"" for m in batch), name="collect")
    app.run(idle_timeout=1.5)
    assert sorted(seen) == sorted(f"p{p}-{i}".encode() for p in range(2) for i in range(100))
    assert committed(secure.plaintext, group, topic, 2) == [100, 100]


@pytest.mark.parametrize("case", CASES)
def test_a_refused_connection_fails_fast_with_its_own_error(secure: Any, topic: str, case: str) -> None:
    bootstrap, kafka, expected, reason, _ = _cases(secure)[case]
    app = fc.App(bootstrap, new_group(), [topic], kafka=kafka, connect_timeout=CONNECT_TIMEOUT)
    app.plugin(lambda batch: None, name="noop")
    started = time.monotonic()
    with pytest.raises(fc.KafkaConnectionError) as raised:
        app.run(idle_timeout=1)
    elapsed = time.monotonic() - started
    assert type(raised.value) is expected, f"{type(raised.value).__name__}: {raised.value}"
    assert reason in str(raised.value), str(raised.value)
    assert elapsed < FAIL_WITHIN, f"took {elapsed:.2f} s: waited for the connect timeout?"


def _app_dir(tmp_path: Path, bootstrap: str, topic: str, kafka: dict[str, str]) -> Path:
    (tmp_path / "app.py").write_text("import fastconsume as fc\napp = fc.App('x:1', 'g', 't')\napp.plugin(len)\n")
    properties = "".join(f'"{name}" = "{value}"\n' for name, value in kafka.items())
    (tmp_path / "fastconsume.toml").write_text(
        textwrap.dedent(f"""
        app = "app:app"
        bootstrap = "{bootstrap}"
        group = "{new_group()}"
        topics = ["{topic}"]
        connect_timeout = "{CONNECT_TIMEOUT}"
        [kafka]
        """)
        + properties
    )
    return tmp_path


@pytest.mark.parametrize("case", CASES)
def test_the_cli_exits_with_the_failures_code(secure: Any, topic: str, case: str, tmp_path: Path) -> None:
    bootstrap, kafka, _, reason, code = _cases(secure)[case]
    cwd = _app_dir(tmp_path, bootstrap, topic, kafka)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "fastconsume", "run", "--idle-timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == code, result.stderr
    (failure,) = [line for line in result.stderr.splitlines() if line.startswith("fastconsume: ")]
    assert reason in failure, result.stderr
    assert "Traceback" not in result.stderr
    # The interpreter's start-up and import come on top of the failure itself.
    assert elapsed < FAIL_WITHIN + 5, f"took {elapsed:.1f} s"


def test_the_password_is_nowhere(
    secure: Any, topic: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    password = secure.password
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        # A run with the right password, and one refused (librdkafka then has most to say).
        app = fc.App(secure.sasl, new_group(), [topic], kafka=secure.sasl_config(), connect_timeout=CONNECT_TIMEOUT)
        app.plugin(lambda batch: None, name="noop")
        app.run(idle_timeout=1)
        seen += [repr(app), str(app.stats()), str(app.describe())]
        wrong = password[::-1]
        refused = fc.App(secure.sasl, new_group(), [topic], kafka=secure.sasl_config(password=wrong))
        refused.plugin(lambda batch: None, name="noop")
        with pytest.raises(fc.KafkaAuthenticationError) as raised:
            refused.run()
        error = raised.value
        seen += [str(error), repr(error), repr(refused), str(refused.stats()), str(refused.describe())]
    records = [r.getMessage() for r in caplog.records] + [str(r.args) for r in caplog.records]
    assert any("SASL authentication error" in r for r in records), "librdkafka had its say"
    captured = capsys.readouterr()
    seen += [*records, captured.out, captured.err]

    cwd = _app_dir(tmp_path, secure.sasl, topic, {})
    env = {
        **os.environ,
        **{f"FASTCONSUME_KAFKA_{k.upper().replace('.', '_')}": v for k, v in secure.sasl_config().items()},
    }
    for command in (["run", "--idle-timeout", "1", "--log-level", "debug"], ["check", "--log-level", "debug"]):
        result = subprocess.run(
            [sys.executable, "-m", "fastconsume", *command],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=cwd,
            env=env,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        seen += [result.stdout, result.stderr]
    assert "sasl.password = ***" in seen[-2], "check shows the property, hidden"
    for text in seen:
        assert password not in text
        assert wrong not in text


@pytest.mark.parametrize(("case", "code"), [("wrong password", 4), ("wrong CA", 5)])
def test_check_classifies_the_same_way(secure: Any, topic: str, case: str, code: int, tmp_path: Path) -> None:
    bootstrap, kafka, _, reason, _ = _cases(secure)[case]
    cwd = _app_dir(tmp_path, bootstrap, topic, kafka)
    result = subprocess.run(
        [sys.executable, "-m", "fastconsume", "check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )
    assert result.returncode == code, result.stdout + result.stderr
    (failure,) = [line for line in result.stderr.splitlines() if line.startswith("fastconsume: ")]
    assert reason in failure, result.stderr
