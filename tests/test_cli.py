"""The ``fastconsume`` command: the demo, ``run``, signals and exit codes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import fastconsume as fc

from kafka import Cluster, committed, fill, new_group


def fastconsume(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastconsume", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


def test_version() -> None:
    result = fastconsume("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"fastconsume {fc.__version__}"


def test_demo_consumes_every_message_without_a_broker() -> None:
    result = fastconsume("demo", "--messages", "20000")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^messages\s+20,000$", result.stdout, flags=re.MULTILINE), result.stdout
    for plugin in ("count", "measure", "offsets"):
        assert re.search(rf"^{plugin}\s+\d+\s+20,000\s", result.stdout, flags=re.MULTILINE), result.stdout
    assert "CPU us/msg" in result.stdout


def test_run_with_a_missing_module_exits_2_with_one_line(tmp_path: Path) -> None:
    result = fastconsume("run", "no_such_module:app", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "no_such_module" in result.stderr


def test_run_with_an_object_that_is_not_an_app_exits_2(tmp_path: Path) -> None:
    (tmp_path / "notapp.py").write_text("app = 42\n")
    result = fastconsume("run", "notapp:app", cwd=tmp_path)
    assert result.returncode == 2
    assert "not a fastconsume.App" in result.stderr


APP = """
import pytest

import fastconsume as fc

app = fc.App({bootstrap!r}, {group!r}, [{topic!r}])
seen = []

@app.plugin(batch_size=50)
def record(batch: fc.Batch) -> None:
    seen.extend(m.offset for m in batch)
    if len(seen) == 50:
        print("consuming", flush=True)
"""


def test_sigint_stops_gracefully_and_commits(tmp_path: Path, cluster: Cluster) -> None:
    topic = cluster.create_topic(1)
    fill(cluster, topic, 1, 200)
    group = new_group()
    (tmp_path / "sigapp.py").write_text(
        textwrap.dedent(APP.format(bootstrap=cluster.bootstrap, group=group, topic=topic))
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastconsume", "run", "sigapp:app"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "consuming"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert committed(cluster.bootstrap, group, topic, 1) == [200]


BAD_CONFIGS = {
    "unknown key": ('bootstrap = "127.0.0.1:9092"\ngrup = "g"\n', "grup"),
    "wrong type": ('bootstrap = "127.0.0.1:9092"\nworkers = "four"\n', "workers"),
    "bad duration": ('bootstrap = "127.0.0.1:9092"\nshutdown_timeout = "soon"\n', "shutdown_timeout"),
    "missing module": ('app = "no_such_module:app"\n', "no_such_module"),
    "missing attribute": ('app = "json:no_such_app"\n', "no_such_app"),
    "plugin without a batch parameter": ('app = "takes_nothing:app"\n', "must accept one positional argument"),
}

TAKES_NOTHING = """
import pytest

import fastconsume as fc

app = fc.App(bootstrap="127.0.0.1:9092", group="g", topics=["t"])

@app.plugin
def nothing() -> None: ...
"""


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_exits_2_with_one_line_naming_the_problem(case: str, tmp_path: Path) -> None:
    toml, named = BAD_CONFIGS[case]
    (tmp_path / "settings.toml").write_text(toml)
    (tmp_path / "takes_nothing.py").write_text(TAKES_NOTHING)
    result = fastconsume("run", "--config", "settings.toml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, f"expected one line, got:\n{result.stderr}"
    assert result.stderr.startswith("fastconsume: "), result.stderr
    assert named in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_check_shows_partitions_and_lag_and_never_the_password(real_cluster: Cluster, tmp_path: Path) -> None:
    topic = real_cluster.create_topic(2)
    fill(real_cluster, topic, 2, 30)
    secret = "hunter2-do-not-print"
    (tmp_path / "fastconsume.toml").write_text(
        textwrap.dedent(f"""
        bootstrap = "{real_cluster.bootstrap}"
        group = "{new_group()}"
        topics = ["{topic}"]
        [kafka]
        "sasl.username" = "someone"
        "sasl.password" = "{secret}"
        [plugins.anything]
        entry_point = "no-such-plugin"
        """)
    )
    result = fastconsume("check", cwd=tmp_path)
    assert result.returncode == 2, "an unknown plugin is a config error"
    assert secret not in result.stdout + result.stderr

    (tmp_path / "fastconsume.toml").write_text(
        'app = "app:app"\n' + (tmp_path / "fastconsume.toml").read_text().split("[plugins.anything]")[0]
    )
    (tmp_path / "app.py").write_text("import fastconsume as fc\napp = fc.App('x:1', 'g', 't')\napp.plugin(len)\n")
    result = fastconsume("check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    assert "sasl.password = ***" in result.stdout
    assert f"topic {topic}: 2 partition(s), lag 60" in result.stdout, result.stdout
    assert re.search(r"\[1\] offsets 0\.\.30 +committed - +lag 30", result.stdout), result.stdout


def test_logs_never_show_the_password(real_cluster: Cluster, tmp_path: Path) -> None:
    """A SASL login against a plaintext listener fails and librdkafka logs about it: the
    password appears nowhere in the output."""
    secret = "hunter2-do-not-log"
    topic = real_cluster.create_topic(1)
    (tmp_path / "app.py").write_text("import fastconsume as fc\napp = fc.App('x:1', 'g', 't')\napp.plugin(len)\n")
    env = {
        **os.environ,
        "FASTCONSUME_BOOTSTRAP": real_cluster.bootstrap,
        "FASTCONSUME_GROUP": new_group(),
        "FASTCONSUME_TOPICS": topic,
        "FASTCONSUME_CONNECT_TIMEOUT": "3s",
        "FASTCONSUME_KAFKA_SECURITY_PROTOCOL": "sasl_plaintext",
        "FASTCONSUME_KAFKA_SASL_MECHANISM": "PLAIN",
        "FASTCONSUME_KAFKA_SASL_USERNAME": "someone",
        "FASTCONSUME_KAFKA_SASL_PASSWORD": secret,
    }
    result = subprocess.run(
        [sys.executable, "-m", "fastconsume", "run", "app:app", "--idle-timeout", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 4, output  # the broker refused the SASL handshake: authentication failed
    assert "level=" in output, f"expected librdkafka's complaints in the logs:\n{output}"
    assert secret not in output


STOPPING_APP = """
import fastconsume as fc

app = fc.App("127.0.0.1:1", "from-code", "no-such-topic")

@app.plugin(batch_size=10)
def stop_after_one(batch: fc.Batch) -> None:
    stats = app.stats()
    print("running", stats["running"], "partitions", len(stats["partitions"]), flush=True)
    app.stop()
"""


def test_the_modules_app_is_the_one_that_runs(cluster: Cluster, tmp_path: Path) -> None:
    """Case 3 of issue 10: under ``fastconsume run mod:app`` the module's ``app`` was rebuilt,
    so its ``stats()`` stayed at zero and ``app.stop()`` from a plugin was ignored (the run
    went on until killed). Now the module's object runs, with the environment applied to it."""
    topic = cluster.create_topic(1)
    fill(cluster, topic, 1, 100)
    group = new_group()
    (tmp_path / "stopping.py").write_text(STOPPING_APP)
    env = {**os.environ, "FASTCONSUME_BOOTSTRAP": cluster.bootstrap, "FASTCONSUME_GROUP": group}
    env["FASTCONSUME_TOPICS"] = topic
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "fastconsume", "run", "stopping:app"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30, "app.stop() from the plugin ended the run"
    assert result.stdout.splitlines()[0] == "running True partitions 1", result.stdout
    assert re.search(r'msg="stopped after [\d.]+ s: ', result.stderr), result.stderr
    assert committed(cluster.bootstrap, group, topic, 1)[0] >= 10, "the finished call was committed"


def test_an_unknown_plugin_table_exits_2_naming_the_file_and_a_close_name(tmp_path: Path) -> None:
    (tmp_path / "users.py").write_text(
        "import fastconsume as fc\napp = fc.App('127.0.0.1:9092', 'g', 't')\n"
        "@app.plugin\ndef count_users(batch: fc.Batch) -> None: ...\n"
    )
    (tmp_path / "fastconsume.toml").write_text('app = "users:app"\n[plugins.count_userz]\n')
    result = fastconsume("run", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "fastconsume: fastconsume.toml: plugins.count_userz: no plugin named 'count_userz': the app's plugins are "
        "count_users, installed plugins none; did you mean 'count_users'?\n"
    )


@pytest.mark.parametrize("bootstrap", ["garbage", "127.0.0.1:99999"])
def test_a_bad_bootstrap_exits_2_at_once(bootstrap: str, tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(
        f"import fastconsume as fc\napp = fc.App({bootstrap!r}, 'g', 't')\napp.plugin(len)\n"
    )
    started = time.monotonic()
    result = fastconsume("run", "bad:app", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"fastconsume: bootstrap: '{bootstrap}'"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert time.monotonic() - started < 10, "no connection attempt"
