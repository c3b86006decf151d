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
- A worker that fails at start-up with a permanent error (exit code 2, 3, 4 or 5: a config
  mistake, Kafka unreachable, authentication or TLS failed) before it ever got partitions,
  ``give_up_after`` times in a row with the same code, ends the supervisor: the other workers
  are stopped as on a signal and :func:`supervise` returns that code, after logging the
  worker's one-line error. A crash after the worker got partitions restarts it as above.
- "Got partitions" and the error line come through a pipe each worker inherits: its write end's
  number is in the worker's ``_FASTCONSUME_REPORT_FD`` (see :func:`report_assigned` and
  :func:`report_error`, which ``fastconsume run --worker`` calls). A worker that reports
  nothing counts as never having got partitions.
- SIGTERM, SIGINT or SIGHUP to the supervisor stops the workers: each gets one SIGTERM (their
  graceful stop, which commits), and those still running ``stop_timeout`` seconds later get
  SIGKILL. A second such signal SIGKILLs every worker at once.

Workers run in their own session (``setsid``), so a Ctrl-C in a terminal reaches only the
supervisor, and each worker sees the single SIGTERM it forwards: a worker treats a second signal
as "stop at once, uncommitted", which a terminal's SIGINT plus the forwarded SIGTERM would be.
A supervisor killed with SIGKILL cannot forward anything; ``fastconsume run --worker`` asks
Linux for a signal when its parent dies (``PR_SET_PDEATHSIG``) and turns it into one SIGTERM
to itself, so its workers still stop gracefully, once. (Linux sends the parent-death signal
each time a thread of the parent that is the child's parent exits: the supervisor has more
than one thread, so it comes more than once; it is a signal of its own, not SIGTERM, so that
the repeats are recognised and ignored rather than taken for a second stop signal.) Each
worker has the supervisor's pid in ``_FASTCONSUME_SUPERVISOR_PID``, to notice a supervisor that
died before the request took effect.

Linux only: it relies on POSIX signals, ``setsid`` and :func:`signal.set_wakeup_fd`.
"""

from __future__ import annotations

import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import FrameType

WORKER_INDEX_ENV = "FASTCONSUME_WORKER_INDEX"
"""Set in each worker's environment to its index, ``0`` to ``processes - 1``."""

REPORT_FD_ENV = "_FASTCONSUME_REPORT_FD"
"""Set in each worker's environment to the fd of its report pipe (write end)."""
SUPERVISOR_PID_ENV = "_FASTCONSUME_SUPERVISOR_PID"
"""Set in each worker's environment to the supervisor's pid."""

INTERRUPTED = 130  # the shell's code for a SIGINT exit; returned after a second signal
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
PERMANENT_EXIT_CODES = frozenset({2, 3, 4, 5})
"""A config mistake, Kafka unreachable, authentication failed, TLS failed (``fastconsume run``'s
exit codes): what restarting the same command does not fix."""
GIVE_UP_AFTER = 3
"""Start-up failures in a row, with the same permanent exit code, that end the supervisor."""

_ASSIGNED = b"A"  # on the report pipe: the worker got partitions
_ERROR = b"E"  # on the report pipe: the worker's one-line error follows, up to a newline
_MAX_ERROR = 4000  # bytes of an error line: one write, well inside a pipe's buffer

logger = logging.getLogger("fastconsume")


def worker_index(environ: Mapping[str, str] | None = None) -> int | None:
    """This process's worker index if a supervisor started it, else ``None``.

    >>> worker_index({"FASTCONSUME_WORKER_INDEX": "2"}), worker_index({})
    (2, None)
    """
    value = (os.environ if environ is None else environ).get(WORKER_INDEX_ENV)
    return None if value is None else int(value)


def report_assigned(environ: Mapping[str, str] | None = None) -> None:
    """Tells the supervisor, if any, that this worker got partitions: from now on its failures
    are crashes to restart, not start-up failures. Harmless without a supervisor and when
    repeated."""
    _report(_ASSIGNED, environ)


def report_error(line: str, environ: Mapping[str, str] | None = None) -> None:
    """Hands the supervisor, if any, the one-line error this worker is about to exit with, for
    the supervisor to relay if it gives up."""
    first = line.splitlines()[0] if line else ""
    _report(_ERROR + first.encode(errors="replace")[:_MAX_ERROR] + b"\n", environ)


def _report(data: bytes, environ: Mapping[str, str] | None) -> None:
    value = (os.environ if environ is None else environ).get(REPORT_FD_ENV)
    if value is None:
        return
    with suppress(OSError, ValueError):  # the supervisor is gone, or the variable is not ours
        os.write(int(value), data)  # at most a few KiB: one write, never partial on a pipe


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
    give_up_after: int = GIVE_UP_AFTER,
) -> int:
    """Runs ``processes`` copies of ``worker_command`` until they finish or a signal stops them.

    ``env`` is the workers' environment (by default this process's), to which each worker's
    ``FASTCONSUME_WORKER_INDEX`` is added. Returns:

    - 0 when every worker exited 0, on its own or when stopped;
    - 1 when stopped and some worker's last exit was a failure: non-zero, killed by a signal
      (SIGKILLed after ``stop_timeout`` included), or a crash it was waiting to be restarted from;
    - 130 after a second stop signal, which SIGKILLs the workers;
    - 2, 3, 4 or 5 when a worker failed at start-up with that exit code ``give_up_after``
      times in a row, before it ever got partitions (the other workers are stopped first).

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
    if isinstance(give_up_after, bool) or not isinstance(give_up_after, int) or give_up_after < 1:
        raise ValueError(f"give_up_after must be an integer >= 1, got {give_up_after!r}")

    base_env = dict(os.environ if env is None else env)
    supervisor = _Supervisor(command, processes, (first, longest), stop_timeout, base_env, give_up_after=give_up_after)
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
    report: int | None = None  # read end of the current process's report pipe
    assigned: bool = False  # the current process reported partitions
    error: str | None = None  # the current process's one-line error, if it sent one
    startup_failures: int = 0  # permanent start-up failures in a row, all with startup_code
    startup_code: int | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)  # does nothing if it has exited meanwhile (no pid reuse)

    def read_report(self) -> None:
        """Takes what the process wrote on its report pipe so far."""
        if self.report is None:
            return
        data = b""
        while True:
            try:
                chunk = os.read(self.report, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        if _ASSIGNED in data.split(_ERROR, 1)[0]:
            self.assigned = True
        if _ERROR in data:
            line = data.split(_ERROR, 1)[1].split(b"\n", 1)[0]
            self.error = line.decode(errors="replace")

    def close_report(self) -> None:
        if self.report is not None:
            os.close(self.report)
            self.report = None


class _Supervisor:
    def __init__(
        self,
        command: list[str],
        processes: int,
        backoff: tuple[float, float],
        stop_timeout: float,
        env: dict[str, str],
        *,
        give_up_after: int = GIVE_UP_AFTER,
    ) -> None:
        self.command = command
        self.backoff = backoff
        self.stop_timeout = stop_timeout
        self.env = env
        self.give_up_after = give_up_after
        self.slots = [_Slot(i) for i in range(processes)]
        self.gave_up: tuple[int, str | None] | None = None  # the exit code and error line

    def run(self, wait: Wait) -> int:
        for slot in self.slots:
            self._start(slot)  # a command that cannot start is the caller's bug: raise
            logger.info("started worker %d (pid %d)", slot.index, slot.pid)
        stop_deadline: float | None = None
        killed = False
        signals = 0  # stop signals received
        while True:
            now = time.monotonic()
            self._reap(now, stopping=stop_deadline is not None)
            if self.gave_up is not None and stop_deadline is None:
                self._give_up()
                stop_deadline = now + self.stop_timeout
            if stop_deadline is None:
                self._restart_due(now)
                pending = [s.restart_at for s in self.slots if s.restart_at is not None]
                if not pending and not self._live():
                    return 0  # only a worker that exited 0 is neither running nor pending
                timeout = max(min(pending) - now, 0.0) if pending else None
            elif not self._live():
                return self._stopped_code()
            else:
                if not killed and now >= stop_deadline:
                    self._kill_late()
                    killed = True
                timeout = None if killed else stop_deadline - now
            for signum in (s for s in wait(timeout) if s in STOP_SIGNALS):  # SIGCHLD: _reap looks
                signals += 1
                if stop_deadline is None:
                    self._stop(signum)
                    stop_deadline = time.monotonic() + self.stop_timeout
                elif signals > 1 or self.gave_up is None:  # a first one while giving up: that stop is on
                    logger.warning("second signal %s: killing the workers (SIGKILL)", _signal_name(signum))
                    self.kill_all()
                    return INTERRUPTED

    def _stopped_code(self) -> int:
        """The exit code once every worker has stopped."""
        if self.gave_up is not None:
            code, error = self.gave_up
            if error:
                print(error, file=sys.stderr, flush=True)  # the line the worker ended with, last
            return code
        return 0 if all(s.last_exit == 0 for s in self.slots) else 1

    def _kill_late(self) -> None:
        for slot in self._live():
            logger.warning(
                "worker %d (pid %d) still running %g s after SIGTERM; killing it (SIGKILL)",
                slot.index,
                slot.pid,
                self.stop_timeout,
            )
            slot.signal(signal.SIGKILL)

    def _live(self) -> list[_Slot]:
        return [s for s in self.slots if s.process is not None]

    def _start(self, slot: _Slot) -> None:
        env = {**self.env, WORKER_INDEX_ENV: str(slot.index)}
        slot.restart_at = None
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        env[REPORT_FD_ENV] = str(write_fd)
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        try:
            # Own session: a terminal's Ctrl-C must not reach the workers besides our SIGTERM.
            slot.process = subprocess.Popen(self.command, env=env, start_new_session=True, pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the worker's copy is the only one: no report after its exit
        slot.close_report()
        slot.report, slot.assigned, slot.error = read_fd, False, None
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
            slot.read_report()
            if stopping:
                log = logger.info if code == 0 else logger.warning
                log("worker %d (pid %d) %s after the stop", slot.index, pid, _describe_exit(code))
            elif code == 0:
                logger.info("worker %d (pid %d) finished (exit code 0); not restarting it", slot.index, pid)
            elif self._failed_at_start_up(slot, code):
                logger.error(
                    "worker %d (pid %d) %s at start-up, %d times in a row: giving up%s",
                    slot.index,
                    pid,
                    _describe_exit(code),
                    slot.startup_failures,
                    f": {slot.error}" if slot.error else "",
                )
                self.gave_up = (code, slot.error)
            else:
                delay = self._next_delay(slot, uptime=now - slot.started)
                slot.restart_at = now + delay
                logger.warning(
                    "worker %d (pid %d) %s; restarting it in %g s", slot.index, pid, _describe_exit(code), delay
                )

    def _failed_at_start_up(self, slot: _Slot, code: int) -> bool:
        """Counts a permanent start-up failure; True once there were enough in a row."""
        if slot.assigned or code not in PERMANENT_EXIT_CODES:
            slot.startup_failures, slot.startup_code = 0, None
            return False
        if code != slot.startup_code:
            slot.startup_failures, slot.startup_code = 0, code
        slot.startup_failures += 1
        return slot.startup_failures >= self.give_up_after and self.gave_up is None

    def _give_up(self) -> None:
        """Stops the other workers as a signal would, to end with the start-up failure."""
        live = self._live()
        if live:
            logger.info("stopping %d other worker(s) with SIGTERM (SIGKILL after %g s)", len(live), self.stop_timeout)
        for slot in self.slots:
            slot.restart_at = None
        for slot in live:
            slot.signal(signal.SIGTERM)

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
        """SIGKILLs every live worker and reaps it; closes the report pipes."""
        for slot in self._live():
            slot.signal(signal.SIGKILL)
        for slot in self._live():
            assert slot.process is not None
            slot.last_exit = slot.process.wait()
            slot.process = None
        for slot in self.slots:
            slot.close_report()


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {_signal_name(-returncode)}"
    return f"exited with code {returncode}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
