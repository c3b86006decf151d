"""``fastconsume run examples/app.py:app --processes 3`` against the real broker: three worker
processes share the group's partitions; a worker killed with SIGKILL is restarted and no
message is lost; SIGTERM to the supervisor stops every worker gracefully with every offset
committed. The example app's plugins write ``topic partition offset`` lines to files named
after the plugin and the worker's pid, which these tests read back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kafka import RealCluster, committed, fill, new_group

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ("audit", "word_count", "notify")
PARTITIONS, PER_PARTITION = 6, 10_000


def children(pid: int) -> set[int]:
    """Live child processes of ``pid``, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces; the fields after its closing parenthesis do not.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def seen(out: Path, plugin: str, topic: str) -> set[tuple[int, int]]:
    """Every (partition, offset) a plugin wrote, over all workers; torn last lines skipped."""
    result = set()
    for path in out.glob(f"{plugin}-*.log"):
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0] == topic and fields[1].isdigit() and fields[2].isdigit():
                result.add((int(fields[1]), int(fields[2])))
    return result


def wait_for(condition: Callable[[], bool], what: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout} s\n--- supervisor output:\n{log.read_text()}")
        time.sleep(0.1)


@contextmanager
def supervisor(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    args = [sys.executable, "-m", "fastconsume", "run", "examples/app.py:app", "--processes", "3"]
    with log.open("wb") as output:
        popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield popen
    finally:
        if popen.poll() is None:
            for child in children(popen.pid):
                os.kill(child, signal.SIGKILL)
            popen.kill()
            popen.wait(timeout=30)


def test_processes_share_the_group_survive_a_kill_and_stop_gracefully(
    real_cluster: RealCluster, tmp_path: Path
) -> None:
    topic = real_cluster.create_topic(PARTITIONS)
    fill(real_cluster, topic, PARTITIONS, PER_PARTITION)
    group, out, log = new_group(), tmp_path / "out", tmp_path / "supervisor.log"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "FASTCONSUME_BOOTSTRAP": real_cluster.bootstrap,
        "FASTCONSUME_GROUP": group,
        "FASTCONSUME_TOPICS": topic,
        "EXAMPLE_OUT": str(out),
        # Slow enough that the kill lands mid-stream: each worker drains at most 4,000 msg/s.
        "FASTCONSUME_RATE_LIMIT": "4000",
        # A killed member holds its partitions until its session expires (6 s is the minimum).
        "FASTCONSUME_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "FASTCONSUME_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    }
    everything = {(p, o) for p in range(PARTITIONS) for o in range(PER_PARTITION)}
    with supervisor(env, log) as popen:
        wait_for(lambda: len(children(popen.pid)) == 3, "3 workers not started", 60, log)
        workers = children(popen.pid)
        wait_for(lambda: len(seen(out, "audit", topic)) > 5_000, "nothing consumed", 60, log)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: len(children(popen.pid)) == 3 and victim not in children(popen.pid),
            "the killed worker was not restarted",
            60,
            log,
        )
        every_plugin_saw_everything = lambda: all(seen(out, p, topic) >= everything for p in PLUGINS)  # noqa: E731
        wait_for(every_plugin_saw_everything, "a plugin missed messages", 120, log)
        before_stop = children(popen.pid)
        popen.send_signal(signal.SIGTERM)
        assert popen.wait(timeout=60) == 0, f"the supervisor failed\n{log.read_text()}"
        assert not any(Path(f"/proc/{pid}").exists() for pid in before_stop), "a worker outlived the supervisor"
    assert committed(real_cluster.bootstrap, group, topic, PARTITIONS) == [PER_PARTITION] * PARTITIONS
    text = log.read_text()
    assert str(victim) in text, f"the restart is not logged\n{text}"


# --- permanent start-up errors --------------------------------------------------------------

FAILING_APP = """\
import os

import fastconsume as fc

app = fc.App("127.0.0.1:1", "g", "t", connect_timeout="1s")


@app.plugin
def noop(batch: fc.Batch) -> None:
    pass


if os.environ.get("FASTCONSUME_WORKER_INDEX") is not None and os.environ.get("BREAK_WORKERS"):
    # A mistake only the workers meet (the supervisor checks the app before starting them).
    raise fc.ConfigError("no credentials for this worker")
"""


@pytest.mark.parametrize("case", ["unreachable", "config error"])
def test_permanent_start_up_errors_end_the_supervisor_with_their_code_and_line(tmp_path: Path, case: str) -> None:
    (tmp_path / "failing.py").write_text(FAILING_APP)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FASTCONSUME_SHUTDOWN_TIMEOUT": "5"}
    if case == "config error":
        env["BREAK_WORKERS"] = "1"
    args = [sys.executable, "-m", "fastconsume", "run", "failing.py:app", "--processes", "2"]
    started = time.monotonic()
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    took = time.monotonic() - started
    output = f"exit {result.returncode} after {took:.1f} s\n--- stderr:\n{result.stderr}"
    print(output)

    lines = result.stderr.strip().splitlines()
    if case == "config error":
        assert result.returncode == 2, output
        assert lines[-1] == "fastconsume: no credentials for this worker", output
    else:  # 2 before the connect branch's exit codes, 3 with them
        assert result.returncode in (2, 3), output
        assert lines[-1].startswith("fastconsume: "), output
        assert "127.0.0.1:1" in lines[-1] or "Kafka" in lines[-1], output
    assert "3 times in a row: giving up" in result.stderr, output
    assert took < 60, output  # three start-ups of at most ~2 s, with backoff 0.5 s and 1 s
    assert not any("fastconsume run --worker" in _cmdline(p) for p in Path("/proc").iterdir() if p.name.isdigit())


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
