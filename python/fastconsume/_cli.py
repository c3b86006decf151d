"""The ``fastconsume`` command. User mistakes exit with status 2 and one line naming them."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from ._app import App
from ._demo import DEFAULT_PARTITIONS, print_report, run_demo
from .errors import ConfigError, FastconsumeError, PluginError

USAGE_ERROR = 2
INTERRUPTED = 130  # the shell's code for a SIGINT exit


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastconsume", description="Consume Kafka through Python plugins.")
    parser.add_argument("--version", action="version", version=f"fastconsume {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="consume 200,000 messages from an in-process mock cluster")
    demo.add_argument("--messages", type=int, default=200_000)
    demo.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS)

    run = commands.add_parser("run", help="run an App: fastconsume run MODULE:APP")
    run.add_argument("target", metavar="MODULE:APP")
    run.add_argument("--idle-timeout", type=float, default=None, help="return after this many idle seconds")

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            print_report(run_demo(messages=args.messages, partitions=args.partitions))
        else:
            load_app(args.target).run(idle_timeout=args.idle_timeout)
    except PluginError:
        raise
    except (FastconsumeError, TypeError) as error:
        print(f"fastconsume: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt as interrupt:  # a second signal: stop at once, uncommitted work stays
        print(f"fastconsume: {interrupt or 'interrupted'}", file=sys.stderr)
        return INTERRUPTED
    return 0


def load_app(target: str) -> App:
    """Imports ``MODULE:ATTRIBUTE`` and checks that it is an :class:`App`."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"expected MODULE:APP, got {target!r}")
    sys.path.insert(0, ".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"cannot import {module_name!r}: {error}") from error
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise ConfigError(f"{target!r} is not a fastconsume.App (got {type(app).__name__})")
    return app
