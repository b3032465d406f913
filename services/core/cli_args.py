"""What every `rpo` command handler shares: the config from `--config`/`--set`/shortcut flags, and the
error that ends a command with a message instead of a traceback. The command table (`services.cli.table`)
builds the parsers; handlers import only this module, so the table can name them without a cycle.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.core.config import RunConfig, load_config


@dataclass(frozen=True)
class Flag:
    """A shortcut flag that sets one config key (`key`), or a plain command option (`key=None`)."""

    name: str
    help: str
    key: str | None = None
    kwargs: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    """Other spellings the flag also answers to (an older name kept working)."""


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]
    help: str
    handler: str
    flags: tuple[Flag, ...] = ()


class UsageError(Exception):
    """A mistake on the command line or in the inputs it names; the message says what to fix."""


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_logging_args(parser: argparse.ArgumentParser, *, with_defaults: bool) -> None:
    """`--log-level` and `--log-json`: on the top-level parser (`with_defaults`) and again on every command,
    where their defaults are suppressed so that `rpo --log-level DEBUG run` is not undone by the command's
    own default; either place works."""
    level = {"default": "INFO"} if with_defaults else {"default": argparse.SUPPRESS}
    json_lines = {} if with_defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="log verbosity (default INFO)", **level)
    parser.add_argument("--log-json", action="store_true", help="structured JSON log lines", **json_lines)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The two options every command shares."""
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML run configuration")
    parser.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set algorithm.group_size=4 (repeatable)",
    )


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> RunConfig:
    """The run config from --config, the environment, the shortcut flags and --set (later wins)."""
    shortcuts = shortcut_overrides(args) if hasattr(args, "command_spec") else []
    return load_config(getattr(args, "config", None), [*extra, *shortcuts, *getattr(args, "overrides", [])])


def shortcut_overrides(args: argparse.Namespace) -> list[str]:
    """The `--set` items implied by the shortcut flags that were given."""
    command: Command = args.command_spec
    items = []
    for flag in command.flags:
        if flag.key is None:
            continue
        value = getattr(args, _dest(flag), None)
        if value is not None:
            items.append(f"{flag.key}={value}")
    return items


def _dest(flag: Flag) -> str:
    return flag.kwargs.get("dest", flag.name.lstrip("-").replace("-", "_"))


def named_run_id(cfg: RunConfig) -> str:
    """The run a cache command acts on; `auto` names no run, so it is a usage error here."""
    if cfg.services.run_id == "auto":
        raise UsageError(
            "this command acts on one run's cache: name it with --set services.run_id=ID "
            "(`rpo run` and `rpo train` log the id they use)"
        )
    return cfg.services.run_id
