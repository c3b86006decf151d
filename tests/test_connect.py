"""How starting fails: a connect error names librdkafka's cause (once, its repeats collapsed),
a missing topic is an error unless the app waits for topics, and ``fastconsume check`` exits
non-zero on any problem it reports."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

import fastconsume as fc
from fastconsume.testing import MockCluster

from kafka import Cluster, committed, fill, new_group

UNIQUE = f"{os.getpid()}-{time.monotonic_ns()}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fastconsume(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastconsume", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


def _write_config(directory: Path, bootstrap: str, topics: list[str], extra: str = "") -> None:
    (directory / "app.py").write_text("import fastconsume as fc\napp = fc.App('x:1', 'g', 't')\napp.plugin(len)\n")
    listed = ", ".join(f'"{t}"' for t in topics)
    (directory / "fastconsume.toml").write_text(
        textwrap.dedent(f"""
        app = "app:app"
        bootstrap = "{bootstrap}"
        group = "{new_group()}"
        topics = [{listed}]
        connect_timeout = "2s"
        """)
        + extra
    )


# ------------------------------------------------------------------ connect causes


@pytest.mark.parametrize(
    ("bootstrap", "cause"),
    [
        ("nosuchhost.invalid:9092", "Failed to resolve 'nosuchhost.invalid:9092'"),
        (f"127.0.0.1:{_closed_port()}", "Connection refused"),
    ],
    ids=["resolve", "refused"],
)
def test_a_connect_error_names_librdkafkas_cause(bootstrap: str, cause: str, caplog: pytest.LogCaptureFixture) -> None:
    app = fc.App(bootstrap, new_group(), ["t"], connect_timeout="2s")
    app.plugin(lambda batch: None, name="noop")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fastconsume"), pytest.raises(fc.KafkaConnectionError) as raised:
        app.run(idle_timeout=1)
    elapsed = time.monotonic() - started
    message = str(raised.value)
    assert type(raised.value) is fc.KafkaConnectionError, "unreachable is neither authentication nor TLS"
    assert cause in message, message
    assert "brokers are down" not in message, "the cause, not the symptom"
    assert 1.5 < elapsed < 8, f"bounded by connect_timeout, took {elapsed:.1f} s"
    # Every reconnect repeats the failure; each distinct line is logged once, plus a count.
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("fastconsume")]
    cause_lines = [line for line in lines if cause in line]
    assert cause_lines, lines
    assert len(cause_lines) <= 3, "\n".join(lines)
    assert len(lines) <= 8, "\n".join(lines)


def test_a_long_failed_connect_logs_a_few_lines_not_one_per_retry(tmp_path: Path) -> None:
    _write_config(tmp_path, f"127.0.0.1:{_closed_port()}", ["t"])
    toml = (tmp_path / "fastconsume.toml").read_text().replace('connect_timeout = "2s"', 'connect_timeout = "8s"')
    (tmp_path / "fastconsume.toml").write_text(toml)
    result = fastconsume("run", cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.splitlines()
    (failure,) = [line for line in lines if line.startswith("fastconsume: ")]
    assert failure.startswith("fastconsume: could not reach Kafka"), result.stderr
    assert "Connection refused" in failure
    assert len(lines) <= 8, result.stderr
    assert any("repeated" in line for line in lines), result.stderr


def test_run_cli_exits_3_when_kafka_is_unreachable(tmp_path: Path) -> None:
    _write_config(tmp_path, "nosuchhost.invalid:9092", ["t"])
    result = fastconsume("run", "--log-level", "error", cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Failed to resolve" in result.stderr


def test_check_cli_exits_3_when_kafka_is_unreachable(tmp_path: Path) -> None:
    _write_config(tmp_path, f"127.0.0.1:{_closed_port()}", ["t"])
    result = fastconsume("check", cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert "Connection refused" in result.stderr


# ------------------------------------------------------------------ missing topics


def test_a_missing_topic_is_an_error_naming_it(real_cluster: Cluster) -> None:
    present = real_cluster.create_topic(1)
    missing = f"missing-{UNIQUE}"
    app = fc.App(real_cluster.bootstrap, new_group(), [present, missing], connect_timeout="10s")
    app.plugin(lambda batch: None, name="noop")
    started = time.monotonic()
    with pytest.raises(fc.UnknownTopicError, match=missing) as raised:
        app.run(idle_timeout=5)
    assert isinstance(raised.value, fc.ConfigError)
    assert present not in str(raised.value)
    assert time.monotonic() - started < 5, "found at start, not after a timeout"
    assert "wait_for_topics" in str(raised.value), "the message says how to wait instead"


def test_run_cli_exits_2_with_one_line_for_a_missing_topic(real_cluster: Cluster, tmp_path: Path) -> None:
    missing = f"missing-{UNIQUE}-cli"
    _write_config(tmp_path, real_cluster.bootstrap, [missing])
    started = time.monotonic()
    result = fastconsume("run", "--idle-timeout", "2", "--log-level", "error", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert missing in result.stderr
    assert time.monotonic() - started < 30


def test_check_cli_exits_2_for_a_missing_topic(real_cluster: Cluster, tmp_path: Path) -> None:
    present = real_cluster.create_topic(1)
    missing = f"missing-{UNIQUE}-check"
    _write_config(tmp_path, real_cluster.bootstrap, [present, missing])
    result = fastconsume("check", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"topic {missing}:" in result.stdout
    assert f"unknown topic(s): {missing}" in result.stderr
    assert f"topic {present}: 1 partition(s)" in result.stdout


def test_check_cli_exits_0_when_all_is_well(real_cluster: Cluster, tmp_path: Path) -> None:
    topic = real_cluster.create_topic(1)
    _write_config(tmp_path, real_cluster.bootstrap, [topic])
    result = fastconsume("check", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""


def test_check_cli_exits_1_when_the_group_cannot_be_described(tmp_path: Path) -> None:
    """librdkafka's mock cluster cannot describe groups: a problem check reports, so non-zero.
    (The mock lives in the process that checks, so the CLI's main() runs in a child here.)"""
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from fastconsume._cli import main
        from fastconsume.testing import MockCluster

        cluster = MockCluster()
        cluster.create_topic("t1", 1)
        Path("fastconsume.toml").write_text(f'bootstrap = "{cluster.bootstrap}"\\ngroup = "g"\\ntopics = ["t1"]\\n')
        Path("app.py").write_text("import fastconsume as fc\\napp = fc.App('x:1', 'g', 't')\\napp.plugin(len)\\n")
        sys.exit(main(["check", "app:app"]))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fastconsume check: group 'g': cannot describe the group" in result.stderr, result.stderr
    assert "topic t1: 1 partition(s)" in result.stdout, result.stdout


def test_wait_for_topics_waits_warns_and_consumes_once_created(
    real_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    topic = f"later-{UNIQUE}"
    group = new_group()
    app = fc.App(real_cluster.bootstrap, group, [topic], wait_for_topics=True, connect_timeout="5s")
    seen: list[int] = []
    app.plugin(lambda batch: seen.extend(m.offset for m in batch), name="collect")
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            app.run(idle_timeout=2)
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    with caplog.at_level(logging.WARNING, logger="fastconsume"):
        runner = threading.Thread(target=run)
        runner.start()
        time.sleep(12)  # past the first periodic warning
        assert runner.is_alive(), f"still waiting for the topic: {outcome}"
        admin = AdminClient({"bootstrap.servers": real_cluster.bootstrap})
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=30)
        fill(real_cluster, topic, 1, 50)
        runner.join(60)
    assert not runner.is_alive(), "drained once the topic existed"
    assert outcome == [None], outcome
    assert seen == list(range(50))
    assert committed(real_cluster.bootstrap, group, topic, 1) == [50]
    waiting = [r.getMessage() for r in caplog.records if "waiting for topic" in r.getMessage()]
    assert len(waiting) >= 2, "a warning at once and every 10 s"
    assert all(topic in line for line in waiting)


def test_stop_while_waiting_for_topics_ends_the_run() -> None:
    """On the mock cluster (consumers never auto-create topics there either)."""
    cluster = MockCluster()
    app = fc.App(cluster.bootstrap, new_group(), [f"never-{UNIQUE}"], wait_for_topics=True)
    app.plugin(lambda batch: None, name="noop")
    threading.Timer(1.5, app.stop).start()
    started = time.monotonic()
    app.run()
    assert time.monotonic() - started < 10


def test_stop_while_connecting_ends_the_run_at_once() -> None:
    """Not after connect_timeout: the connect asks for a stop between its short waits."""
    app = fc.App(f"127.0.0.1:{_closed_port()}", new_group(), ["t"], connect_timeout="30s")
    app.plugin(lambda batch: None, name="noop")
    threading.Timer(1.0, app.stop).start()
    started = time.monotonic()
    app.run()
    assert time.monotonic() - started < 5


def test_wait_for_topics_is_a_config_key(tmp_path: Path) -> None:
    (tmp_path / "fastconsume.toml").write_text('wait_for_topics = "yes"\n')
    result = fastconsume("check", cwd=tmp_path)
    assert result.returncode == 2
    assert "wait_for_topics" in result.stderr
    assert "true or false" in result.stderr


# ------------------------------------------------------------------ plugin failures under the CLI

FAILING_APP = """
import fastconsume as fc

app = fc.App("x:1", "g", "t")

def deep(value):
    raise ValueError(f"cannot take {value!r}")

@app.plugin(batch_size=10)
def fragile(batch: fc.Batch) -> None:
    for message in batch:
        if message.offset == 5:
            deep(message.value)
"""


def test_a_plugin_failure_prints_one_or_two_lines_and_exits_1(real_cluster: Cluster, tmp_path: Path) -> None:
    topic = real_cluster.create_topic(1)
    fill(real_cluster, topic, 1, 20)
    _write_config(tmp_path, real_cluster.bootstrap, [topic])
    (tmp_path / "app.py").write_text(FAILING_APP)
    result = fastconsume("run", "--idle-timeout", "2", "--log-level", "warning", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    failure = [line for line in lines if line.startswith("fastconsume: ")]
    assert len(failure) == 1, result.stderr
    at = lines.index(failure[0])
    # One or two lines: the second, if any, says what caused it (log lines have a level).
    text = "\n".join([lines[at], *(line for line in lines[at + 1 : at + 2] if "level=" not in line)])
    assert "Traceback" not in result.stderr
    for named in ('plugin "fragile"', f"{topic}[0] offsets 0..=9", "ValueError", "cannot take b'p0-5'"):
        assert named in text, text

    debug = fastconsume("run", "--idle-timeout", "2", "--log-level", "debug", cwd=tmp_path)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr or "\\nTraceback" in debug.stderr, debug.stderr
    assert "deep" in debug.stderr, "the full traceback, down to the plugin's own frames"
