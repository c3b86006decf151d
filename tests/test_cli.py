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
