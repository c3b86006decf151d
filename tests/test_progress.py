"""What a run shows without a terminal (start, assignment, progress, stopping and summary
lines at INFO) and on one (a progress line that log lines and prints never land on)."""

from __future__ import annotations

import io
import itertools
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import fastconsume as fc
from fastconsume import _logs
from fastconsume.testing import produce

from kafka import Cluster, MockKafka, committed, fill, new_group

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The README's example app, as the README shows it."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A plugin") :]
    return section[section.index("```python\n") + len("```python\n") : section.index("```\n", 10)]


def clean_environment(**settings: str) -> dict[str, str]:
    """This environment without its ``FASTCONSUME_*`` variables, plus ``settings``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("FASTCONSUME_")}
    return {**env, "PYTHONUNBUFFERED": "1", **settings}


class Lines:
    """A child process's stderr lines as they come, with the time each arrived."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        assert proc.stderr is not None
        stream = proc.stderr
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: io.TextIOBase) -> None:
        for line in stream:
            with self._changed:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for arrived, line in self.lines:
                    if re.search(pattern, line):
                        return arrived, line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r} in {timeout} s:\n{self.text()}")
                self._changed.wait(left)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def matching(self, pattern: str) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.lines if re.search(pattern, line)]

    def join(self) -> None:
        self._thread.join(timeout=10)


def test_python_app_py_with_the_readme_example_shows_its_progress_without_a_tty(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The README's example, run as ``python app.py`` with its settings from ``FASTCONSUME_*``
    (which ``app.run()`` applies) and stderr a pipe: a start line, the assignment, a progress
    line every ``progress_interval``, a stopping line at the first SIGINT, and a summary with
    the totals and committed offsets, which a separate client reads back."""
    topic = cluster.create_topic(2)
    fill(cluster, topic, 2, 300)
    group = new_group()
    (tmp_path / "app.py").write_text(readme_example())
    env = clean_environment(
        FASTCONSUME_BOOTSTRAP=cluster.bootstrap,
        FASTCONSUME_GROUP=group,
        FASTCONSUME_TOPICS=topic,
        FASTCONSUME_PROGRESS_INTERVAL="1s",
    )
    proc = subprocess.Popen(
        [sys.executable, "app.py"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        lines = Lines(proc)
        lines.wait_for(rf"starting: group '{group}', topics {topic}, plugins count, measure, 2 worker\(s\)", 30)
        lines.wait_for(r"assigned 2 partition\(s\)", 60)
        deadline = time.monotonic() + 60
        while committed(cluster.bootstrap, group, topic, 2) != [300, 300]:
            assert time.monotonic() < deadline, f"not all committed in 60 s:\n{lines.text()}"
            time.sleep(0.5)
        lines.wait_for(r"progress: .* lag 0 ", 10)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stopping, _ = lines.wait_for(r"stopping: ", 10)
        proc.wait(timeout=40)
        lines.join()
    finally:
        proc.kill()
        proc.communicate()
    output = lines.text()
    assert proc.returncode == 0, output
    assert stopping - signalled < 5, "the first Ctrl-C says at once that it is stopping"
    progress = lines.matching(r"progress: ")
    assert len(progress) >= 2, output
    assert re.search(r"progress: [\d,]+ msg/s  lag \d+  count [\d,]+ msg/s p99 [\d.]+ms 0 errors  measure ", output)
    # Arrival times, as read here: one line may come late, the next one on time.
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(progress)]
    mean = (progress[-1][0] - progress[0][0]) / len(gaps)
    assert all(gap < 5 for gap in gaps), f"progress_interval is 1 s, lines came {gaps} s apart"
    assert 0.5 < mean < 2, f"progress_interval is 1 s, lines came {gaps} s apart"
    summary = lines.matching(r"stopped after [\d.]+ s: 600 messages")
    assert summary, output
    line = summary[0][1]
    assert "count 600 messages in" in line, line
    assert "measure 600 messages in" in line, line
    assert "0 errors, 0 dead-lettered" in line, line
    assert f"committed {topic}[0]=300 {topic}[1]=300" in line, line
    assert committed(cluster.bootstrap, group, topic, 2) == [300, 300]


def test_fastconsume_run_without_a_tty_logs_a_stop_that_waits_for_running_calls(
    mock_cluster: MockKafka, tmp_path: Path
) -> None:
    """Without a terminal, ``fastconsume run`` logs (logfmt) the start line, the assignment
    and, at the first SIGINT during a long call, how long it waits for how many calls; the
    summary comes once the call returned."""
    topic = mock_cluster.create_topic(1)
    produce(mock_cluster.bootstrap, topic, [b"x"] * 10, partition=0)
    (tmp_path / "slow.py").write_text(
        textwrap.dedent(f"""
        import time

        import fastconsume as fc

        app = fc.App({mock_cluster.bootstrap!r}, {new_group()!r}, {topic!r}, shutdown_timeout=20)

        @app.plugin
        def slow(batch: fc.Batch) -> None:
            print("calling", flush=True)
            time.sleep(3)
        """)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastconsume", "run", "slow:app"],
        cwd=tmp_path,
        env=clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = Lines(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "calling"
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stopping, line = lines.wait_for(r"stopping: ", 10)
        proc.wait(timeout=40)
        ended = time.monotonic()
        lines.join()
    finally:
        proc.kill()
        proc.communicate()
    output = lines.text()
    assert proc.returncode == 0, output
    assert 'level=info logger=fastconsume msg="starting: group' in output, output
    assert re.search(r"msg=\"assigned 1 partition\(s\)\"", output), output
    assert "stopping: waiting up to 20 s for 1 running call, then committing" in line, line
    assert stopping - signalled < 2, "the stopping line comes at the signal, not after the wait"
    assert ended - stopping > 0.5, "the run then waited for the call"
    summary = lines.matching(r"stopped after [\d.]+ s: 10 messages; slow 10 messages in 1 calls, 0 errors")
    assert summary, output
    assert f"committed {topic}[0]=10" in summary[0][1]


def test_a_drain_ends_with_a_summary(mock_cluster: MockKafka, caplog: pytest.LogCaptureFixture) -> None:
    topic = mock_cluster.create_topic(2)
    for partition in range(2):
        produce(mock_cluster.bootstrap, topic, [b"v"] * 50, partition=partition)
    app = fc.App(mock_cluster.bootstrap, new_group(), topic, read_config=False)
    app.plugin(len)
    with caplog.at_level(logging.INFO, logger="fastconsume"):
        # Not shorter: on a loaded machine one partition's first fetch may lag the other's.
        app.run(idle_timeout=2.0)
    messages = [r.getMessage() for r in caplog.records if r.name == "fastconsume"]
    assert messages[0].startswith(f"starting: group '{app.describe()['group']}', topics {topic}, plugins len"), messages
    assert re.fullmatch(
        rf"drained after [\d.]+ s: 100 messages; len 100 messages in \d+ calls, 0 errors, 0 dead-lettered; "
        rf"committed {topic}\[0\]=50 {topic}\[1\]=50",
        messages[-1],
    ), messages[-1]
    assert not any(m.startswith("stopping:") for m in messages), "a drain is no stop"


def test_a_failed_run_says_so_in_its_summary(mock_cluster: MockKafka, caplog: pytest.LogCaptureFixture) -> None:
    topic = mock_cluster.create_topic(1)
    produce(mock_cluster.bootstrap, topic, [b"v"] * 5, partition=0)
    app = fc.App(mock_cluster.bootstrap, new_group(), topic, read_config=False)

    @app.plugin(retries=0)
    def broken(batch: fc.Batch) -> None:
        raise RuntimeError("no")

    with caplog.at_level(logging.INFO, logger="fastconsume"), pytest.raises(fc.PluginError):
        app.run(idle_timeout=5)
    summary = [r.getMessage() for r in caplog.records if r.name == "fastconsume"][-1]
    assert re.match(
        r"failed \(PluginError\) after [\d.]+ s: 5 messages; broken \d+ messages in 1 calls, 1 error,", summary
    ), summary


def test_progress_lines_come_every_progress_interval_and_default_to_30_s(
    mock_cluster: MockKafka, caplog: pytest.LogCaptureFixture
) -> None:
    assert fc.App("127.0.0.1:9092", "g", "t").describe()["progress_interval"] == 30.0
    with pytest.raises(fc.ConfigError, match="progress_interval"):
        fc.App("127.0.0.1:9092", "g", "t", progress_interval=0)
    topic = mock_cluster.create_topic(1)
    app = fc.App(mock_cluster.bootstrap, new_group(), topic, progress_interval="300ms", read_config=False)
    app.plugin(len)
    threading.Timer(2.5, app.stop).start()
    with caplog.at_level(logging.INFO, logger="fastconsume"):
        app.run()
    times = [r.created for r in caplog.records if r.getMessage().startswith("progress: ")]
    assert len(times) >= 4, [r.getMessage() for r in caplog.records]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.15 < gap < 1.5 for gap in gaps), gaps
    threads = {t.name for t in threading.enumerate()}
    assert "fastconsume-report" not in threads, "the reporting thread ends with the run"


def test_stop_before_a_run_and_outside_one_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    app = fc.App("127.0.0.1:9092", "g", "t", read_config=False)
    with caplog.at_level(logging.INFO, logger="fastconsume"):
        app.stop()
    assert not caplog.records


# --- The terminal's progress line. ---


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class StillApp:
    """An app whose counters do not move, as during a long call."""

    def stats(self) -> dict[str, Any]:
        return {
            "messages": 500,
            "partitions": {"t[0]": {"lag": 42}},
            "plugins": {"index": {"messages": 500, "latency_p99": 0.004, "errors": 0, "in_flight": 1}},
        }


def visible_lines(output: str) -> list[str]:
    """What a terminal shows of ``output``, line by line: ``\\r\\x1b[K`` erases the line."""
    return [line.rsplit(_logs.CLEAR, 1)[-1] for line in output.split("\n")]


def use_terminal(monkeypatch: pytest.MonkeyPatch) -> FakeTerminal:
    """A fake terminal as stdout and stderr; set in the test itself, since pytest's capture
    sets both again when the test starts, after its fixtures."""
    screen = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.delenv("FASTCONSUME_WORKER_INDEX", raising=False)
    monkeypatch.setattr(_logs, "PROGRESS_INTERVAL", 0.05)
    return screen


def wait_until(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_log_lines_and_prints_never_land_on_the_terminal_progress_line(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = use_terminal(monkeypatch)
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    logger = logging.getLogger("fastconsume")
    logger.addHandler(handler)
    try:
        with _logs.progress_line(StillApp()):  # type: ignore[arg-type]
            wait_until(lambda: "msg/s" in terminal.getvalue())
            logger.warning("plugin 'index' overran its timeout")
            print("a plugin prints")
            drawn = terminal.getvalue().count(_logs.CLEAR)
            wait_until(lambda: terminal.getvalue().count(_logs.CLEAR) > drawn + 2)
    finally:
        logger.removeHandler(handler)
    shown = visible_lines(terminal.getvalue())
    assert "LOG plugin 'index' overran its timeout" in shown, shown
    assert "a plugin prints" in shown, shown
    for line in shown:
        assert "msg/s" not in line or line.startswith("["), f"a line glued to the progress line: {line!r}"
    assert shown[-1] == "", "the progress line is erased at the end"
    assert handler.stream is terminal, "the handler writes to the terminal itself again"
    assert sys.stderr is terminal


def test_the_terminal_progress_line_keeps_moving_during_a_long_call(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = use_terminal(monkeypatch)
    with _logs.progress_line(StillApp()):  # type: ignore[arg-type]
        wait_until(lambda: terminal.getvalue().count("msg/s") >= 25)
    drawn = [part for part in terminal.getvalue().split(_logs.CLEAR) if "msg/s" in part]
    assert "1 running" in drawn[-1], drawn[-1]
    assert re.match(r"\[\d+s\] ", drawn[-1]), drawn[-1]
    assert "lag 42" in drawn[-1]
    assert drawn[0].split("]")[0] != drawn[-1].split("]")[0], "its clock moves while the counters stand still"


def test_no_terminal_line_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    monkeypatch.setattr(_logs, "PROGRESS_INTERVAL", 0.01)
    with _logs.progress_line(StillApp()):  # type: ignore[arg-type]
        time.sleep(0.1)
    assert pipe.getvalue() == ""


def test_a_drain_under_fastconsume_run_ends_with_the_totals_not_just_revoked(
    mock_cluster: MockKafka, tmp_path: Path
) -> None:
    """Case 7 of issue 9: a drain run ended with "revoked 4 partition(s)" and no totals."""
    topic = mock_cluster.create_topic(4)
    for partition in range(4):
        produce(mock_cluster.bootstrap, topic, [b"v"] * 25, partition=partition)
    (tmp_path / "drain.py").write_text(
        f"import fastconsume as fc\napp = fc.App({mock_cluster.bootstrap!r}, {new_group()!r}, {topic!r})\n"
        "app.plugin(len)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "fastconsume", "run", "drain:app", "--idle-timeout", "0.5"],
        cwd=tmp_path,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    own = [line for line in result.stderr.splitlines() if "logger=fastconsume " in line]
    assert 'msg="revoked 4 partition(s)"' in own[-2], own
    committed_offsets = " ".join(f"{topic}[{p}]=25" for p in range(4))
    assert re.search(
        rf'msg="drained after [\d.]+ s: 100 messages; len 100 messages in \d+ calls, 0 errors, 0 dead-lettered; '
        rf'committed {re.escape(committed_offsets)}"$',
        own[-1],
    ), own[-1]
