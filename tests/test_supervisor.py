"""The process supervisor behind ``fastconsume run --processes N``, with no broker: its workers
are tiny scripts that note their starts and stops in a shared file. Tests that signal the
supervisor run it in a subprocess (``driver.py``), as it must own its main thread."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastconsume._supervisor import WORKER_INDEX_ENV, restart_delay, supervise, worker_index

# The worker: notes "EVENT INDEX PID MARK" lines. Modes: "wait" for SIGTERM, then exit 0, or 3
# for the indexes listed in FAILING; "ignore" SIGTERM; "finish" at once with 0; "plan": the
# k-th start of an index follows PLAN[k], "SECONDS[/CODE[/a]]": it reports partitions ("a"),
# stays up SECONDS, reports the error line "fastconsume: boom CODE" and exits CODE (default 1);
# later starts exit 0. With FAILING given, only those indexes follow the plan; the others wait.
WORKER = """\
import os, signal, sys, time

log, mode, failing, plan = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(",")
index = os.environ["FASTCONSUME_WORKER_INDEX"]

def note(event):
    with open(log, "a") as f:
        f.write(f"{event} {index} {os.getpid()} {os.environ.get('WORKER_MARK', '-')}\\n")

def on_term(signum, frame):
    note("stop")
    sys.exit(3 if index in failing else 0)

signal.signal(signal.SIGINT, lambda signum, frame: note("sigint"))
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore" else on_term)
with open(log) as f:
    earlier = sum(1 for line in f if line.split()[:2] == ["start", index])
note("start")
if mode == "finish":
    sys.exit(0)
if mode == "plan" and (index in failing or failing == [""]):
    if earlier < len(plan):
        from fastconsume._supervisor import report_assigned, report_error
        seconds, code, *flags = (plan[earlier] + "/1").split("/")[:3]
        if flags == ["a"]:
            report_assigned()
        time.sleep(float(seconds))
        report_error(f"fastconsume: boom {code}")
        sys.exit(int(code))
    sys.exit(0)
while True:
    signal.pause()
"""

DRIVER = """\
import json, logging, sys
from fastconsume._supervisor import supervise

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
options = json.loads(sys.argv[1])
options["restart_backoff"] = tuple(options["restart_backoff"])
sys.exit(supervise(**options))
"""

DEADLINE = 60.0  # generous: only a broken supervisor takes this long


@dataclass(frozen=True)
class Event:
    what: str  # start, stop or sigint
    index: int
    pid: int
    mark: str


class Workers:
    """The worker script and its shared log file."""

    def __init__(self, directory: Path) -> None:
        self.script = directory / "worker.py"
        self.script.write_text(WORKER)
        self.log = directory / "workers.log"
        self.log.touch()

    def command(self, mode: str, *, failing: Sequence[int] = (), plan: Sequence[float | str] = ()) -> list[str]:
        return [
            sys.executable,
            str(self.script),
            str(self.log),
            mode,
            ",".join(map(str, failing)),
            ",".join(map(str, plan)),
        ]

    def events(self) -> list[Event]:
        found = []
        for line in self.log.read_text().splitlines():
            what, index, pid, mark = line.split()
            found.append(Event(what, int(index), int(pid), mark))
        return found

    def starts(self) -> dict[int, list[int]]:
        """Pids by worker index, in start order."""
        by_index: dict[int, list[int]] = defaultdict(list)
        for e in self.events():
            if e.what == "start":
                by_index[e.index].append(e.pid)
        return dict(by_index)

    def latest(self) -> dict[int, int]:
        return {index: pids[-1] for index, pids in self.starts().items()}

    def noted(self, what: str) -> set[int]:
        return {e.pid for e in self.events() if e.what == what}

    def running(self, pid: int) -> bool:
        """Whether ``pid`` is one of these workers and has not exited (zombies have)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return str(self.script).encode() in cmdline and state != "Z"

    def kill_leftovers(self) -> None:
        for pid in {e.pid for e in self.events()}:
            if self.running(pid):
                os.kill(pid, signal.SIGKILL)


def wait_for(condition: Callable[[], bool], what: str, describe: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {DEADLINE} s\n{describe()}"
        time.sleep(0.01)


class Supervisor:
    """``supervise(...)`` in a subprocess, its log in a file."""

    def __init__(
        self, directory: Path, workers: Workers, command: list[str], processes: int, **options: object
    ) -> None:
        self.workers = workers
        self.processes = processes
        driver = directory / "driver.py"
        driver.write_text(DRIVER)
        self.output = directory / "supervisor.log"
        settings = {"restart_backoff": (0.05, 30.0), "stop_timeout": DEADLINE, **options}
        arguments = json.dumps({"worker_command": command, "processes": processes, **settings})
        with self.output.open("wb") as output:
            # Its own session, like a shell's job: a test may signal its process group.
            self.popen = subprocess.Popen(
                [sys.executable, str(driver), arguments], stderr=output, start_new_session=True
            )

    def log(self) -> str:
        return self.output.read_text()

    def describe(self) -> str:
        return f"--- supervisor log:\n{self.log()}--- worker events:\n{self.workers.log.read_text()}"

    def wait_until_started(self, counts: dict[int, int] | None = None) -> dict[int, int]:
        """Waits until each index has started ``counts[index]`` times (by default once);
        returns each index's latest pid."""
        wanted = counts or dict.fromkeys(range(self.processes), 1)
        wait_for(
            lambda: {i: len(p) for i, p in self.workers.starts().items()} == wanted,
            f"starts {wanted}",
            self.describe,
        )
        return self.workers.latest()

    def wait_for_log(self, text: str) -> None:
        wait_for(lambda: text in self.log(), repr(text), self.describe)

    def wait(self) -> int:
        try:
            return self.popen.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"supervisor still running after {DEADLINE} s\n{self.describe()}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    found = Workers(tmp_path)
    yield found
    found.kill_leftovers()  # their own session: a failed test must not leave them running


@pytest.fixture
def start_supervisor(tmp_path: Path, workers: Workers) -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def start(command: list[str], processes: int, **options: object) -> Supervisor:
        started.append(Supervisor(tmp_path, workers, command, processes, **options))
        return started[-1]

    yield start
    for supervisor in started:
        supervisor.kill()


def test_each_worker_gets_its_own_index(workers: Workers, start_supervisor: Callable[..., Supervisor]) -> None:
    supervisor = start_supervisor(workers.command("wait"), 4)
    pids = supervisor.wait_until_started()
    assert sorted(pids) == [0, 1, 2, 3]
    assert len(set(pids.values())) == 4
    assert all(workers.running(pid) for pid in pids.values())
    supervisor.popen.send_signal(signal.SIGTERM)
    assert supervisor.wait() == 0, supervisor.describe()


def test_a_killed_worker_is_restarted_with_its_index(
    workers: Workers, start_supervisor: Callable[..., Supervisor]
) -> None:
    supervisor = start_supervisor(workers.command("wait"), 3)
    first = supervisor.wait_until_started()
    os.kill(first[1], signal.SIGKILL)

    now = supervisor.wait_until_started({0: 1, 1: 2, 2: 1})
    assert now[1] != first[1]
    assert now[0] == first[0]
    assert now[2] == first[2]
    assert all(workers.running(pid) for pid in now.values())
    supervisor.wait_for_log(f"WARNING worker 1 restarted (pid {now[1]})")
    log = supervisor.log()
    assert f"WARNING worker 1 (pid {first[1]}) was killed by SIGKILL; restarting it in 0.05 s" in log

    supervisor.popen.send_signal(signal.SIGTERM)
    assert supervisor.wait() == 0, supervisor.describe()  # the restarted worker stopped cleanly
    assert workers.noted("stop") == set(now.values())


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "terminal Ctrl-C"])
def test_a_stop_signal_stops_every_worker_with_one_sigterm(
    workers: Workers, start_supervisor: Callable[..., Supervisor], how: str
) -> None:
    supervisor = start_supervisor(workers.command("wait"), 3)
    pids = supervisor.wait_until_started()
    if how == "terminal Ctrl-C":  # the terminal signals the whole foreground process group
        os.killpg(supervisor.popen.pid, signal.SIGINT)
    else:
        supervisor.popen.send_signal(signal.Signals[how])

    assert supervisor.wait() == 0, supervisor.describe()
    assert workers.noted("stop") == set(pids.values())
    assert workers.noted("sigint") == set()  # a SIGINT besides the SIGTERM would be a second signal
    assert not any(workers.running(pid) for pid in pids.values())


def test_a_worker_failing_at_the_stop_fails_the_run(
    workers: Workers, start_supervisor: Callable[..., Supervisor]
) -> None:
    supervisor = start_supervisor(workers.command("wait", failing=[1]), 3)
    pids = supervisor.wait_until_started()
    supervisor.popen.send_signal(signal.SIGTERM)

    assert supervisor.wait() == 1, supervisor.describe()
    assert workers.noted("stop") == set(pids.values())
    assert f"WARNING worker 1 (pid {pids[1]}) exited with code 3 after the stop" in supervisor.log()


def test_workers_that_finish_on_their_own_are_not_restarted(workers: Workers, caplog: pytest.LogCaptureFixture) -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)}
    with caplog.at_level(logging.INFO, logger="fastconsume"):
        code = supervise(workers.command("finish"), 3, env={**os.environ, "WORKER_MARK": "given"})

    assert code == 0
    events = workers.events()
    assert sorted(e.index for e in events) == [0, 1, 2]
    assert {e.mark for e in events} == {"given"}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert _wakeup_fd() == -1


def test_restarts_back_off_and_reset_after_a_long_run(workers: Workers, caplog: pytest.LogCaptureFixture) -> None:
    # Three quick crashes, one after staying up longer than the longest delay, then exit 0.
    with caplog.at_level(logging.WARNING, logger="fastconsume"):
        code = supervise(workers.command("plan", plan=[0, 0, 0, 1.6]), 1, restart_backoff=(0.05, 1.5))

    assert code == 0
    assert len(workers.starts()[0]) == 5
    delays = [float(m) for r in caplog.records for m in re.findall(r"restarting it in (\S+) s", r.getMessage())]
    assert delays == [0.05, 0.1, 0.2, 0.05]
    assert all("exited with code 1" in r.getMessage() for r in caplog.records if "restarting it" in r.getMessage())


# --- permanent start-up failures ---------------------------------------------------------


@pytest.mark.parametrize("code", [2, 3, 4, 5])
def test_permanent_start_up_failures_end_the_supervisor_with_their_code(
    workers: Workers, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str], code: int
) -> None:
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="fastconsume"):
        result = supervise(workers.command("plan", plan=[f"0/{code}"] * 10), 1, restart_backoff=(0.05, 30.0))
    took = time.monotonic() - started

    assert result == code
    assert len(workers.starts()[0]) == 3  # GIVE_UP_AFTER, then no restart
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert f"exited with code {code} at start-up, 3 times in a row: giving up: fastconsume: boom {code}" in errors[0]
    assert capsys.readouterr().err.splitlines()[-1] == f"fastconsume: boom {code}"  # relayed, last
    assert took < DEADLINE


def test_giving_up_stops_the_other_workers_gracefully(
    workers: Workers, start_supervisor: Callable[..., Supervisor]
) -> None:
    supervisor = start_supervisor(workers.command("plan", failing=[0], plan=["0/3"] * 10), 3)
    supervisor.wait_until_started({0: 3, 1: 1, 2: 1})

    assert supervisor.wait() == 3, supervisor.describe()
    healthy = {pids[0] for index, pids in workers.starts().items() if index != 0}
    assert workers.noted("stop") == healthy  # one SIGTERM each, their graceful stop
    assert len(workers.starts()[0]) == 3
    assert not any(workers.running(pid) for pid in healthy)
    assert "fastconsume: boom 3" in supervisor.log()


@pytest.mark.parametrize(
    "plan",
    [
        pytest.param(["0/3/a"] * 5, id="after partitions"),
        pytest.param(["0/3", "0/3", "0/1", "0/3", "0/3"], id="a crash between"),
        pytest.param(["0/3", "0/3", "0/2", "0/2", "0/3/a", "0/3"], id="another code between"),
    ],
)
def test_failures_that_are_not_permanent_start_up_errors_still_restart(
    workers: Workers, caplog: pytest.LogCaptureFixture, plan: list[str]
) -> None:
    with caplog.at_level(logging.WARNING, logger="fastconsume"):
        result = supervise(workers.command("plan", plan=plan), 1, restart_backoff=(0.01, 0.05))

    assert result == 0  # every planned failure was restarted, and the start after them exited 0
    assert len(workers.starts()[0]) == len(plan) + 1
    assert not [r for r in caplog.records if r.levelno == logging.ERROR]


def test_a_worker_ignoring_sigterm_is_killed_after_the_stop_timeout(
    workers: Workers, start_supervisor: Callable[..., Supervisor]
) -> None:
    supervisor = start_supervisor(workers.command("ignore"), 2, stop_timeout=0.5)
    pids = supervisor.wait_until_started()
    supervisor.popen.send_signal(signal.SIGTERM)

    assert supervisor.wait() == 1, supervisor.describe()
    log = supervisor.log()
    for index, pid in pids.items():
        assert f"worker {index} (pid {pid}) still running 0.5 s after SIGTERM; killing it (SIGKILL)" in log
        assert f"worker {index} (pid {pid}) was killed by SIGKILL after the stop" in log
        assert not workers.running(pid)


def test_a_second_signal_kills_every_worker_at_once(
    workers: Workers, start_supervisor: Callable[..., Supervisor]
) -> None:
    supervisor = start_supervisor(workers.command("ignore"), 3)  # stop_timeout: a minute
    pids = supervisor.wait_until_started()
    supervisor.popen.send_signal(signal.SIGTERM)
    supervisor.wait_for_log("SIGTERM received: stopping 3 worker(s)")
    supervisor.popen.send_signal(signal.SIGINT)

    assert supervisor.wait() == 130, supervisor.describe()
    assert "second signal SIGINT: killing the workers" in supervisor.log()
    assert not any(workers.running(pid) for pid in pids.values())


def test_a_command_that_cannot_start_raises_and_restores_the_handlers(tmp_path: Path) -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)}
    with pytest.raises(FileNotFoundError):
        supervise([str(tmp_path / "missing")], 2)
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert _wakeup_fd() == -1


def test_it_must_run_in_the_main_thread(workers: Workers) -> None:
    failures: list[BaseException] = []

    def run() -> None:
        try:
            supervise(workers.command("finish"), 1)
        except BaseException as error:  # checked below, on the test's thread
            failures.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(failures) == 1
    assert isinstance(failures[0], RuntimeError)
    assert "main thread" in str(failures[0])
    assert workers.events() == []


@pytest.mark.parametrize(
    ("arguments", "options"),
    [
        (([], 1), {}),
        ((["true"], 0), {}),
        ((["true"], True), {}),
        ((["true"], 1), {"restart_backoff": (2.0, 1.0)}),
        ((["true"], 1), {"restart_backoff": (-1.0, 1.0)}),
        ((["true"], 1), {"stop_timeout": -1.0}),
        ((["true"], 1), {"stop_timeout": float("nan")}),
        ((["true"], 1), {"give_up_after": 0}),
    ],
)
def test_bad_arguments_raise_value_error(arguments: tuple[list[str], int], options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"worker_command|processes|restart_backoff|stop_timeout|give_up_after"):
        supervise(*arguments, **options)  # type: ignore[arg-type]


def test_restart_delay_doubles_up_to_the_longest() -> None:
    assert [restart_delay(n, (0.5, 30.0)) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert restart_delay(10_000, (0.5, 30.0)) == 30
    assert restart_delay(3, (0.0, 1.0)) == 0


def test_worker_index_reads_the_environment() -> None:
    assert worker_index({WORKER_INDEX_ENV: "3"}) == 3
    assert worker_index({}) is None


def _wakeup_fd() -> int:
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    return fd
