"""The ``fastconsume`` command. Every failure ends with one line naming it, never a traceback
(that is logged at DEBUG, shown with ``--log-level debug``), and an exit status that says what
kind it was (see ``docs/operations.md``):

0 success, 1 a run failed (a plugin, Kafka during the run), 2 a user mistake (configuration,
plugin, unknown topic), 3 Kafka unreachable, 4 authentication failed, 5 TLS failed,
130 interrupted (a second signal)."""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from . import __version__, _core
from ._app import App, _signals_call
from ._config import Config, load_config
from ._demo import DEFAULT_PARTITIONS, print_report, run_demo
from ._loading import installed_plugins
from ._logs import configure_logging, progress_line
from ._supervisor import SUPERVISOR_PID_ENV, report_assigned, report_error, supervise
from .errors import FastconsumeError, PluginError

USAGE_ERROR = 2
INTERRUPTED = 130  # the shell's code for a SIGINT exit
RUN_FAILED = 1  # as FastconsumeError.exit_code: each error class carries its own status
LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger("fastconsume")
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
PARENT_DEATH_SIGNAL = signal.SIGRTMIN  # a signal of its own: see _stop_with_supervisor
ASSIGNMENT_POLL = 0.2
"""Seconds between a supervised worker's looks for its first partitions."""
STOP_MARGIN = 30.0
"""Seconds a supervised worker has past its ``shutdown_timeout`` before it is killed."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = getattr(args, "log_level", None)
    if level is not None:
        configure_logging()
        logging.getLogger().setLevel(level.upper())
    try:
        if args.command == "demo":
            print_report(run_demo(messages=args.messages, partitions=args.partitions))
            return 0
        if args.command == "plugins":
            return _list_plugins()
        config = _config(args)
        if args.command == "check":
            app = App.from_config(config)
            app.validate()  # what run() would refuse, check refuses too
            return _check(app)
        return _run(args, config)
    except FastconsumeError as error:
        return _failed(error)
    except KeyboardInterrupt as interrupt:  # a second signal: stop at once, uncommitted work stays
        print(f"fastconsume: {interrupt or 'interrupted'}", file=sys.stderr)
        return INTERRUPTED


def _failed(error: FastconsumeError) -> int:
    """Prints the error as one line (a plugin failure: plus its exception's type and message),
    logs its traceback at DEBUG, and returns its exit status."""
    line = f"fastconsume: {error}"
    cause = error.__cause__
    if isinstance(error, PluginError) and cause is not None and f"{type(cause).__name__}(" not in line:
        line += f"\n  caused by {type(cause).__name__}: {cause}"
    sys.stderr.write(line + "\n")  # one write: a log line from another thread cannot split it
    log.debug("%s", error, exc_info=error)
    return error.exit_code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastconsume", description="Consume Kafka through Python plugins.")
    parser.add_argument("--version", action="version", version=f"fastconsume {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="consume 200,000 messages from an in-process mock cluster")
    demo.add_argument("--messages", type=int, default=200_000)
    demo.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS)

    target_help = "MODULE:APP or path/to/file.py:APP; defaults to the config's `app`"
    config_help = "a fastconsume.toml-shaped file (default: ./fastconsume.toml or ./pyproject.toml)"
    run = commands.add_parser("run", help="consume with an app until SIGINT or SIGTERM")
    run.add_argument("target", nargs="?", metavar="TARGET", help=target_help)
    run.add_argument("--config", metavar="FILE", help=config_help)
    run.add_argument("--processes", type=int, default=None, help="worker processes in the same group (default 1)")
    run.add_argument("--idle-timeout", type=float, default=None, help="return after this many idle seconds")
    run.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by the supervisor
    _log_level_option(run)

    check = commands.add_parser("check", help="validate the config, connect, and show partitions and lag")
    check.add_argument("target", nargs="?", metavar="TARGET", help=target_help)
    check.add_argument("--config", metavar="FILE", help=config_help)
    _log_level_option(check)

    commands.add_parser("plugins", help="list the plugins installed through entry points")
    return parser


def _log_level_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=None,
        help="log at this level to stderr (default info for run); debug also shows a failure's traceback",
    )


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config, environ=os.environ)
    if args.target:
        config = dataclasses.replace(config, app=args.target)
    return config


def _run(args: argparse.Namespace, config: Config) -> int:
    processes = args.processes if args.processes is not None else config.processes
    if processes < 1:
        print(f"fastconsume: --processes must be at least 1, got {processes}", file=sys.stderr)
        return USAGE_ERROR
    if processes > 1 and not args.worker:
        return _run_supervised(args, config, processes)
    # The signals are the run's from the start: one while the app loads stops the run before
    # it fetches anything (exit 0), a second one exits 130, never the signal's own death.
    with _signals_call(lambda: None):
        return _run_one(args, config)


def _run_one(args: argparse.Namespace, config: Config) -> int:
    if args.worker:
        _stop_with_supervisor()
        try:
            return _run_worker(args, config)
        except FastconsumeError as error:
            if not isinstance(error, PluginError):  # main() prints this line; the supervisor may relay it
                report_error(f"fastconsume: {error}")
            raise
    app = App.from_config(config)
    app.validate(idle_timeout=args.idle_timeout)
    configure_logging()
    with progress_line(app):
        app.run(idle_timeout=args.idle_timeout)
    return 0


def _run_supervised(args: argparse.Namespace, config: Config, processes: int) -> int:
    app = App.from_config(config)  # every mistake surfaces here, before any worker starts
    app.validate(idle_timeout=args.idle_timeout)
    configure_logging()
    command = [sys.executable, "-m", "fastconsume", "run", "--worker"]
    if args.target:
        command.append(args.target)
    if args.config:
        command += ["--config", args.config]
    if args.idle_timeout is not None:
        command += ["--idle-timeout", str(args.idle_timeout)]
    if args.log_level is not None:
        command += ["--log-level", args.log_level]
    # Workers get their own shutdown_timeout to finish, and some to commit and leave.
    return supervise(command, processes, stop_timeout=app.shutdown_timeout + STOP_MARGIN)


def _run_worker(args: argparse.Namespace, config: Config) -> int:
    """A supervised worker's run: as a single process's, and it tells the supervisor once it
    got partitions (until then, a failure may be a permanent start-up error)."""
    app = App.from_config(config)
    app.validate(idle_timeout=args.idle_timeout)
    configure_logging()
    done = threading.Event()

    def watch() -> None:
        # Polls only until the first assignment (or the run's end), then the thread ends.
        while not done.wait(ASSIGNMENT_POLL):
            if any(p["assigned"] for p in app.stats()["partitions"].values()):
                report_assigned()
                return

    watcher = threading.Thread(target=watch, name="fastconsume-report", daemon=True)
    watcher.start()
    try:
        with progress_line(app):
            app.run(idle_timeout=args.idle_timeout)
    finally:
        done.set()
    return 0


def _stop_with_supervisor() -> None:
    """Asks Linux to signal this worker if its supervisor dies: workers run in their own
    session (so a terminal's Ctrl-C reaches only the supervisor), and must not outlive it.

    The parent-death signal comes once per exiting thread of the supervisor that was this
    worker's parent (the supervisor has several), so it is not SIGTERM itself: its first
    arrival becomes one SIGTERM, the graceful stop, and the repeats are ignored. A real second
    SIGTERM still stops at once."""
    stopping = False

    def parent_died(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(PARENT_DEATH_SIGNAL, parent_died)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL)
    except (OSError, AttributeError):
        return  # not Linux: the supervisor's stop still reaches the workers
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if supervisor is not None and str(os.getppid()) != supervisor:
        parent_died(PARENT_DEATH_SIGNAL, None)  # the supervisor died before the request took effect


def _check(app: App) -> int:
    """Prints the settings (secrets hidden), then what the brokers say of the topics and the
    group. Returns 0 if nothing is wrong, 2 if a topic does not exist (a user mistake, as for
    ``run``), 1 for any other problem it reports (a topic's or partition's error, a group that
    cannot be described); failing to connect raises, as ``run`` does."""
    settings = app.describe()
    print(f"bootstrap: {settings['bootstrap']}\ngroup: {settings['group']}")
    for name, value in settings["kafka"].items():
        print(f"kafka.{name} = {value}")
    for name, options in settings["plugins"].items():
        print(f"plugin {name}: " + ", ".join(f"{k}={v!r}" for k, v in options.items()))
    report = _core.inspect(**app.connection())
    print(f"brokers: {', '.join(report['brokers'])}")
    state = report["group_state"] or "unknown"
    print(f"group {report['group']!r}: {state}, {len(report['members'])} member(s)")
    problems: list[str] = []
    unknown: list[str] = []
    if report["group_error"]:
        problems.append(f"group {report['group']!r}: {report['group_error']}")
    for topic, found in report["topics"].items():
        if found["unknown"]:
            unknown.append(topic)
        elif found["error"]:
            problems.append(f"topic {topic}: {found['error']}")
        if found["error"] and not found["partitions"]:
            print(f"topic {topic}: {found['error']}")
            continue
        partitions = found["partitions"]
        lag = sum(p["lag"] or 0 for p in partitions)
        print(f"topic {topic}: {len(partitions)} partition(s), lag {lag}")
        for p in partitions:
            committed = "-" if p["committed"] is None else p["committed"]
            owner = p["owner"] or "unassigned"
            print(
                f"  [{p['partition']}] offsets {p['low']}..{p['high']}  committed {committed}  "
                f"lag {p['lag']}  owner {owner}"
            )
        if found["error"]:
            print(f"  error: {found['error']}")
    if unknown:
        problems.insert(0, f"unknown topic(s): {', '.join(unknown)}")
    for problem in problems:
        print(f"fastconsume check: {problem}", file=sys.stderr)
    if unknown:
        return USAGE_ERROR
    return RUN_FAILED if problems else 0


def _list_plugins() -> int:
    installed = installed_plugins()
    if not installed:
        print('no plugins installed (packages declare them under [project.entry-points."fastconsume.plugins"])')
    for name, entry_point in sorted(installed.items()):
        dist = entry_point.dist
        origin = f"  ({dist.name} {dist.version})" if dist is not None else ""
        print(f"{name}  {entry_point.value}{origin}")
    return 0
