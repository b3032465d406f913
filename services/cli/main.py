"""The `rpo` command line. The command table is services/cli/table.py; each handler lives in the package
that owns the feature, and heavy imports (torch, vLLM, DeepSpeed) happen inside it, so `--help` is instant.
A `ConfigError`, `UsageError`, `DatasetError` or `RewardSpecError` ends the command with its message and exit
code 2, never a traceback: a refusal. Under a supervisor that restarts whatever fails (Docker's `restart:
on-failure`), a refusal would repeat forever, since a restart cannot fix a setting; there,
`RPO_REFUSAL_EXIT_STATUS=0` (docker-compose.yml sets it) makes a refusal end the process for good, after the
same one-line message.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version

from services.cli.table import register
from services.core.cli_args import UsageError, add_logging_args
from services.core.config import ConfigError
from services.core.data import DatasetError
from services.core.logs import setup_logging
from services.core.rewards import RewardSpecError

log = logging.getLogger("rpo")

REFUSAL_STATUS_ENV = "RPO_REFUSAL_EXIT_STATUS"
"""The exit status of a refusal (bad input: a message, no traceback); 2 unless this variable says otherwise."""


def refusal_status() -> int:
    value = os.environ.get(REFUSAL_STATUS_ENV, "2").strip()
    return int(value) if value.isdigit() and int(value) < 256 else 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpo",
        description="RPO reinforcement fine-tuning: decode only the tails of reasoning paths.",
    )
    parser.add_argument("--version", action="version", version=f"rpo {installed_version()}")
    add_logging_args(parser, with_defaults=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    register(subparsers)
    return parser


def installed_version() -> str:
    try:
        return version("rpo-rl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, stray = parser.parse_known_args(argv)
    if stray:  # argparse would name them with the top-level usage; the command's own usage is the useful one
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(stray)}")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0 if args.command is None else 2
    setup_logging(args.log_level, json_lines=args.log_json)
    handler: Callable[[argparse.Namespace], int | None] = args.handler
    try:
        return int(handler(args) or 0)
    except (ConfigError, UsageError, DatasetError, RewardSpecError) as exc:  # bad input: its message
        print(f"rpo {args.command}: {exc}", file=sys.stderr)
        return refusal_status()
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"rpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
