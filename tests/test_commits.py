"""Commit what is finished (issue 9, case 3), on the real broker: a slow plugin with a small
``batch_size`` next to a fast one, a stop after 3.5 s of consuming, and the committed offsets
read back with a separate client. The app runs in a subprocess, as a user would run it, and
each plugin writes a ledger of the messages it finished (before returning), so the test
knows exactly what was finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from kafka import RealCluster, committed, fill, new_group

PARTITIONS = 2
PER_PARTITION = 1_000
NONE_COMMITTED = -1001

# `python app.py` or `fastconsume run app:app`; plugin `fast` has the default batch_size,
# `slow` batch_size=100 and sleeps SLOW_SECONDS per call (1 s, as in the issue).
APP = """
import os
import time

import fastconsume as fc

app = fc.App(os.environ["BOOTSTRAP"], os.environ["GROUP"], [os.environ["TOPIC"]])
SLOW = float(os.environ["SLOW_SECONDS"])


def ledger(name):
    fd = os.open(os.path.join(os.environ["LEDGER"], name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(batch):
        os.write(fd, "".join(f"{m.partition} {m.offset}\\n" for m in batch).encode())

    return write


fast_ledger, slow_ledger = ledger("fast"), ledger("slow")


@app.plugin
def fast(batch):
    fast_ledger(batch)


@app.plugin(batch_size=100)
def slow(batch):
    time.sleep(SLOW)
    slow_ledger(batch)


if __name__ == "__main__":
    idle = os.environ.get("IDLE")
    app.run(idle_timeout=float(idle) if idle else None)
"""


def read_ledger(path: Path) -> dict[int, list[int]]:
    by: dict[int, list[int]] = defaultdict(list)
    if path.exists():
        for line in path.read_text().splitlines():
            partition, offset = line.split()
            by[int(partition)].append(int(offset))
    return by


def finished_prefix(offsets: list[int], start: int) -> int:
    """The offset below which every message from ``start`` on is in ``offsets`` (the topic has
    no gaps)."""
    done = set(offsets)
    at = start
    while at in done:
        at += 1
    return at


def start_app(
    tmp_path: Path, how: str, env: dict[str, str], generation: str, *, idle: float | None = None
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    ledger = tmp_path / generation
    ledger.mkdir()
    log = tmp_path / f"{generation}.log"
    full_env = {**os.environ, **env, "LEDGER": str(ledger), "PYTHONUNBUFFERED": "1"}
    if how == "python":
        args = [sys.executable, "app.py"]
        if idle is not None:
            full_env["IDLE"] = str(idle)
    else:
        args = [sys.executable, "-m", "fastconsume", "run", "app:app"]
        if how == "cli-processes-2":
            args += ["--processes", "2"]
        if idle is not None:
            args += ["--idle-timeout", str(idle)]
    with log.open("wb") as out:
        popen = subprocess.Popen(args, cwd=tmp_path, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    return popen, ledger, log


def wait_for_first_entries(popen: subprocess.Popen[bytes], ledger: Path, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (ledger / "fast").exists() or not (ledger / "fast").stat().st_size:
        assert popen.poll() is None, f"ended before consuming:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"not consuming after {timeout} s:\n{log.read_text()}"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("how", "signum"),
    [("python", signal.SIGINT), ("cli", signal.SIGTERM), ("cli-processes-2", signal.SIGINT)],
    ids=["python-app-SIGINT", "fastconsume-run-SIGTERM", "fastconsume-run-processes-2-SIGINT"],
)
def test_a_stop_commits_everything_both_plugins_finished_and_a_rerun_redoes_none_of_it(
    real_cluster: RealCluster, tmp_path: Path, how: str, signum: signal.Signals
) -> None:
    topic = real_cluster.create_topic(PARTITIONS)
    fill(real_cluster, topic, PARTITIONS, PER_PARTITION)
    group = new_group()
    (tmp_path / "app.py").write_text(APP)
    env = {"BOOTSTRAP": real_cluster.bootstrap, "GROUP": group, "TOPIC": topic, "SLOW_SECONDS": "1"}

    popen, ledger, log = start_app(tmp_path, how, env, "first")
    try:
        wait_for_first_entries(popen, ledger, log)
        time.sleep(3.5)
        popen.send_signal(signum)
        stopped_at = time.monotonic()
        code = popen.wait(timeout=30)
    finally:
        if popen.poll() is None:
            popen.kill()
    took = time.monotonic() - stopped_at
    output = log.read_text()
    assert code == 0, f"exit {code}\n{output}"
    # The stop waits for the running slow call (1 s), not for the shutdown timeout (30 s).
    assert took < 10, f"took {took:.1f} s to stop\n{output}"

    fast, slow = read_ledger(ledger / "fast"), read_ledger(ledger / "slow")
    offsets = committed(real_cluster.bootstrap, group, topic, PARTITIONS)
    expected = [min(finished_prefix(fast[p], 0), finished_prefix(slow[p], 0)) for p in range(PARTITIONS)]
    print(f"finished by both: {expected}; committed: {offsets}")
    # The slow plugin had finished some calls on both partitions (1 s each, alternating), and
    # not all of the fetched batch: the case where nothing used to be committed.
    assert all(0 < e < PER_PARTITION for e in expected), f"{expected}\n{output}"
    assert all(finished_prefix(fast[p], 0) > expected[p] for p in range(PARTITIONS)), "fast was ahead"
    assert offsets == expected, f"committed {offsets}, finished by both plugins {expected}\n{output}"

    # The rerun (a fast slow plugin, drained) starts exactly there for both plugins.
    rerun, rerun_ledger, rerun_log = start_app(tmp_path, how, {**env, "SLOW_SECONDS": "0"}, "rerun", idle=2.0)
    try:
        assert rerun.wait(timeout=90) == 0, rerun_log.read_text()
    finally:
        if rerun.poll() is None:
            rerun.kill()
    for name in ("fast", "slow"):
        again = read_ledger(rerun_ledger / name)
        for p in range(PARTITIONS):
            redone = [o for o in again[p] if o < expected[p]]
            assert not redone, f"{name} redid finished offsets {redone[:5]}... of partition {p}"
            assert again[p][:1] == [expected[p]], f"{name} partition {p} restarted at {again[p][:1]}"
            assert finished_prefix(again[p], expected[p]) == PER_PARTITION
    assert committed(real_cluster.bootstrap, group, topic, PARTITIONS) == [PER_PARTITION] * PARTITIONS
