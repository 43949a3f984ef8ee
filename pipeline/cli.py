"""The ``metasep`` command line.

Each subcommand lives in ``pipeline/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``handler`` (a function of the parsed arguments returning the exit
code). Errors meant for the user are raised as :class:`pipeline.commands.UsageError` and printed
without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.commands import UsageError
from pipeline.settings import SettingsError

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]  # UsageError: for older imports

COMMANDS = (
    "bench",
    "benchmark",
    "convert",
    "demo",
    "deploy",
    "evaluate",
    "separate",
    "serve",
    "synth",
    "train",
    "weights",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metasep",
        description="Separate music into drums, bass, other and vocals with Meta-TasNet.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pipeline.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.runtime import keep_freed_memory

    keep_freed_memory()  # process-wide allocator tuning, once, at the entry point
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        with logging_redirect_tqdm():  # a log line mid-bar gets a line of its own
            return int(args.handler(args) or 0)
    except (UsageError, SettingsError) as error:
        print(f"metasep {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
