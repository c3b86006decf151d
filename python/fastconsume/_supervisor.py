"""``fastconsume run --processes N``: N worker processes, each a whole consumer in the same group.

Kafka's group protocol shares the partitions among the workers, so the supervisor hands out no
work: it starts the workers, restarts those that crash, and stops them all on a signal.

- Each worker gets ``FASTCONSUME_WORKER_INDEX`` (``0`` to ``N - 1``, see :func:`worker_index`) in
  its environment; a restarted worker keeps its index. Output is inherited.
- A worker that exits non-zero or is killed by a signal on its own is restarted after a delay
  that doubles with each crash in a row, from ``restart_backoff[0]`` up to ``restart_backoff[1]``.
  A worker that had stayed up at least ``restart_backoff[1]`` seconds counts as healthy, so its
  next crash waits ``restart_backoff[0]`` again.
- A worker that exits 0 on its own (drain mode, ``--idle-timeout``) is not restarted; once every
  worker has, :func:`supervise` returns 0.
- SIGTERM, SIGINT or SIGHUP to the supervisor stops the workers: each gets one SIGTERM (their
  graceful stop, which commits), and those still running ``stop_timeout`` seconds later get
  SIGKILL. A second such signal SIGKILLs every worker at once.

Workers run in their own session (``setsid``), so a Ctrl-C in a terminal reaches only the
supervisor, and each worker sees the single SIGTERM it forwards: a worker treats a second signal
as "stop at once, uncommitted", which a terminal's SIGINT plus the forwarded SIGTERM would be.
A supervisor killed with SIGKILL cannot forward anything; ``fastconsume run --worker`` asks
Linux for a SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), so its workers still stop
gracefully.

Linux only: it relies on POSIX signals, ``setsid`` and :func:`signal.set_wakeup_fd`.
"""

from __future__ import annotations

import logging
import math
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

WORKER_INDEX_ENV = "FASTCONSUME_WORKER_INDEX"
"""Set in each worker's environment to its index, ``0`` to ``processes - 1``."""

INTERRUPTED = 130  # the shell's code for a SIGINT exit; returned after a second signal
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

logger = logging.getLogger("fastconsume")


def worker_index(environ: Mapping[str, str] | None = None) -> int | None:
    """This process's worker index if a supervisor started it, else ``None``.

    >>> worker_index({"FASTCONSUME_WORKER_INDEX": "2"}), worker_index({})
    (2, None)
    """
    value = (os.environ if environ is None else environ).get(WORKER_INDEX_ENV)
    return None if value is None else int(value)


def restart_delay(crashes_in_a_row: int, backoff: tuple[float, float]) -> float:
    """Seconds before restarting a worker that crashed, ``crashes_in_a_row`` counting the
    earlier ones only (0 for the first).

    >>> [restart_delay(n, (0.5, 30.0)) for n in range(8)]
    [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    """
    first, longest = backoff
    return min(first * 2.0 ** min(crashes_in_a_row, 64), longest)  # 2**64: any delay has capped by then


def supervise(
    worker_command: Sequence[str],
    processes: int,
    *,
    restart_backoff: tuple[float, float] = (0.5, 30.0),
    stop_timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> int:
    """Runs ``processes`` copies of ``worker_command`` until they finish or a signal stops them.

    ``env`` is the workers' environment (by default this process's), to which each worker's
    ``FASTCONSUME_WORKER_INDEX`` is added. Returns:

    - 0 when every worker exited 0, on its own or when stopped;
    - 1 when stopped and some worker's last exit was a failure: non-zero, killed by a signal
      (SIGKILLed after ``stop_timeout`` included), or a crash it was waiting to be restarted from;
    - 130 after a second stop signal, which SIGKILLs the workers.

    Crashes before a stop do not count once the restarted worker exits 0. Installs handlers
    for SIGTERM, SIGINT, SIGHUP and SIGCHLD for the duration, so it must run in the main
    thread (else :class:`RuntimeError`). Bad arguments raise :class:`ValueError`.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("supervise() installs signal handlers, so it must run in the main thread")
    command = list(worker_command)
    if not command:
        raise ValueError("worker_command is empty")
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
    first, longest = restart_backoff
    if not 0 <= first <= longest or not math.isfinite(longest):
        raise ValueError(
            f"restart_backoff must be (first, longest) with 0 <= first <= longest, got {restart_backoff!r}"
        )
    if not 0 <= stop_timeout < math.inf:
        raise ValueError(f"stop_timeout must be a finite number of seconds >= 0, got {stop_timeout!r}")

    base_env = dict(os.environ if env is None else env)
    supervisor = _Supervisor(command, processes, (first, longest), stop_timeout, base_env)
    # Handlers first: a worker's exit or a stop signal that comes while starting is not missed.
    with _signal_wakeups() as wait:
        try:
            return supervisor.run(wait)
        finally:
            supervisor.kill_all()  # only on an exception: every other way out has reaped them all


Wait = Callable[[float | None], list[int]]
"""Blocks until a handled signal arrives or the timeout (seconds; None: no limit) passes, and
returns the signals received since the last call."""


@contextmanager
def _signal_wakeups() -> Iterator[Wait]:
    """Turns SIGCHLD and the stop signals into bytes on a pipe (Python's wakeup fd writes each
    signal's number there), so the supervisor sleeps in ``poll`` until one comes or a restart
    is due. A signal that comes while it is busy stays in the pipe: none is missed."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    handled = (*sorted(STOP_SIGNALS), signal.SIGCHLD)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous = {s: signal.getsignal(s) for s in handled}
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)

    def wait(timeout: float | None) -> list[int]:
        # Rounded up: waking a fraction of a millisecond before a deadline would spin.
        poller.poll(None if timeout is None else math.ceil(max(timeout, 0.0) * 1000))
        received = b""
        while True:
            try:
                chunk = os.read(read_fd, 4096)
            except BlockingIOError:
                return list(received)
            if not chunk:
                return list(received)
            received += chunk

    try:
        for s in handled:
            signal.signal(s, _note_only)
        yield wait
    finally:
        for s, handler in previous.items():
            # None: set outside Python and not restorable; the default beats our no-op.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(read_fd)
        os.close(write_fd)


def _note_only(signum: int, frame: FrameType | None) -> None:
    """The work happens in the supervisor's loop, woken by the wakeup fd."""


@dataclass
class _Slot:
    """One worker position: its index survives restarts."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    crashes_in_a_row: int = 0  # crashes each within restart_backoff[1] seconds of its start
    restart_at: float | None = None  # monotonic time of a pending restart
    last_exit: int | None = None  # Popen.returncode of its latest exit: < 0 is a signal

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)  # does nothing if it has exited meanwhile (no pid reuse)


class _Supervisor:
    def __init__(
        self,
        command: list[str],
        processes: int,
        backoff: tuple[float, float],
        stop_timeout: float,
        env: dict[str, str],
    ) -> None:
        self.command = command
        self.backoff = backoff
        self.stop_timeout = stop_timeout
        self.env = env
        self.slots = [_Slot(i) for i in range(processes)]

    def run(self, wait: Wait) -> int:
        for slot in self.slots:
            self._start(slot)  # a command that cannot start is the caller's bug: raise
            logger.info("started worker %d (pid %d)", slot.index, slot.pid)
        stop_deadline: float | None = None
        killed = False
        while True:
            now = time.monotonic()
            self._reap(now, stopping=stop_deadline is not None)
            if stop_deadline is None:
                self._restart_due(now)
                pending = [s.restart_at for s in self.slots if s.restart_at is not None]
                if not pending and not self._live():
                    return 0  # only a worker that exited 0 is neither running nor pending
                timeout = max(min(pending) - now, 0.0) if pending else None
            else:
                if not self._live():
                    return 0 if all(s.last_exit == 0 for s in self.slots) else 1
                if not killed and now >= stop_deadline:
                    for slot in self._live():
                        logger.warning(
                            "worker %d (pid %d) still running %g s after SIGTERM; killing it (SIGKILL)",
                            slot.index,
                            slot.pid,
                            self.stop_timeout,
                        )
                        slot.signal(signal.SIGKILL)
                    killed = True
                timeout = None if killed else stop_deadline - now
            for signum in wait(timeout):
                if signum not in STOP_SIGNALS:
                    continue  # SIGCHLD: the next _reap looks
                if stop_deadline is None:
                    self._stop(signum)
                    stop_deadline = time.monotonic() + self.stop_timeout
                else:
                    logger.warning("second signal %s: killing the workers (SIGKILL)", _signal_name(signum))
                    self.kill_all()
                    return INTERRUPTED

    def _live(self) -> list[_Slot]:
        return [s for s in self.slots if s.process is not None]

    def _start(self, slot: _Slot) -> None:
        env = {**self.env, WORKER_INDEX_ENV: str(slot.index)}
        slot.restart_at = None
        # Own session: a terminal's Ctrl-C must not reach the workers besides our SIGTERM.
        slot.process = subprocess.Popen(self.command, env=env, start_new_session=True)
        slot.started = time.monotonic()

    def _restart_due(self, now: float) -> None:
        for slot in self.slots:
            if slot.restart_at is None or slot.restart_at > now:
                continue
            try:
                self._start(slot)
            except OSError as error:  # e.g. out of processes: try again later, as for a crash
                delay = self._next_delay(slot, uptime=0.0)
                slot.restart_at = now + delay
                logger.warning("worker %d could not restart (%s); retrying in %g s", slot.index, error, delay)
                continue
            logger.warning("worker %d restarted (pid %d)", slot.index, slot.pid)

    def _reap(self, now: float, *, stopping: bool) -> None:
        for slot in self._live():
            assert slot.process is not None
            code = slot.process.poll()  # waitpid on this pid only: other children stay unreaped
            if code is None:
                continue
            pid = slot.pid
            slot.process = None
            slot.last_exit = code
            if stopping:
                log = logger.info if code == 0 else logger.warning
                log("worker %d (pid %d) %s after the stop", slot.index, pid, _describe_exit(code))
            elif code == 0:
                logger.info("worker %d (pid %d) finished (exit code 0); not restarting it", slot.index, pid)
            else:
                delay = self._next_delay(slot, uptime=now - slot.started)
                slot.restart_at = now + delay
                logger.warning(
                    "worker %d (pid %d) %s; restarting it in %g s", slot.index, pid, _describe_exit(code), delay
                )

    def _next_delay(self, slot: _Slot, *, uptime: float) -> float:
        if uptime >= self.backoff[1]:
            slot.crashes_in_a_row = 0  # it ran well for a while: this crash is not part of a loop
        delay = restart_delay(slot.crashes_in_a_row, self.backoff)
        slot.crashes_in_a_row += 1
        return delay

    def _stop(self, signum: int) -> None:
        live = self._live()
        logger.info(
            "%s received: stopping %d worker(s) with SIGTERM (SIGKILL after %g s)",
            _signal_name(signum),
            len(live),
            self.stop_timeout,
        )
        for slot in self.slots:
            slot.restart_at = None  # a crashed worker stays down, its crash counting as its exit
        for slot in live:
            slot.signal(signal.SIGTERM)

    def kill_all(self) -> None:
        """SIGKILLs every live worker and reaps it."""
        for slot in self._live():
            slot.signal(signal.SIGKILL)
        for slot in self._live():
            assert slot.process is not None
            slot.last_exit = slot.process.wait()
            slot.process = None


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {_signal_name(-returncode)}"
    return f"exited with code {returncode}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
