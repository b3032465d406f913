"""The run config, shown: `rpo config show` prints the resolved settings (secrets masked), and `render`
writes docs/configuration.md from the config model itself, so the docs cannot drift from the code.

`python -m services.cli.config_docs > docs/configuration.md` regenerates it; a test checks it is current.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing

import yaml
from pydantic import BaseModel

from services.core.cli_args import config_from_args
from services.core.config import RunConfig
from services.supervisor.main_job import run_config

# The paper's (or its release code's) value for settings it fixes (arXiv 2601.19404; docs/algorithm.md).
PAPER_VALUES: dict[str, str] = {
    "algorithm.algorithm": "grpo, dapo",
    "algorithm.group_size": "6",
    "algorithm.truncation_limit": "300, 500, 800, 0.5l, 0.1l, l",
    "algorithm.suffix_budget": "m (release code)",
    "algorithm.max_response_tokens": "4096",
    "algorithm.alpha": "0.01 (sweep 0, 0.01, 0.1, 1)",
    "algorithm.shaping_low": "0.5",
    "algorithm.shaping_high": "1.0",
    "algorithm.epsilon": "not recoverable; release code 0.5",
    "algorithm.replace_only_correct": "false",
    "algorithm.loss_on_suffix_only": "false",
    "algorithm.clip_eps": "0.2",
    "algorithm.clip_eps_low": "0.2",
    "algorithm.clip_eps_high": "0.28",
    "algorithm.beta": "0.04 (release code)",
    "algorithm.advantage_eps": "1e-4",
    "sampling.temperature": "0.7",
    "sampling.init_temperature": "0.9 (release code)",
    "sampling.init_top_p": "0.9 (release code)",
    "sampling.init_max_tokens": "2048 (release code)",
    "sampling.eval_temperature": "0.6",
    "sampling.eval_top_p": "0.95",
    "train.questions_per_step": "96 (576 responses / G 6)",
    "train.lr": "1e-6",
    "train.lr_scheduler": "cosine",
    "train.warmup_ratio": "0.1",
    "train.epochs": "4",
    "train.zero_stage": "2",
    "train.precision": "bf16",
    "train.gradient_checkpointing": "true",
}


def _type_name(annotation) -> str:
    """A reader's name for a field's type: `int`, `one of ['grpo', 'dapo']`, `int | one of ['0.5l', 'l']`."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arm) for arm in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Literal:
        return f"one of {list(typing.get_args(annotation))}"
    if annotation is type(None):
        return "None"
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return f"list[{_type_name(item)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):  # a mapping of its fields
        return "{" + ", ".join(annotation.model_fields) + "}"
    text = str(annotation).replace("typing.", "").replace("Literal", "one of ")
    return text.replace("<class '", "").replace("'>", "").replace("pydantic.types.", "")


def render() -> str:
    lines = [
        "# Configuration",
        "",
        "Generated from `services/core/config.py` by `python -m services.cli.config_docs`; do not edit by hand.",
        "",
        "One typed model configures a whole run. Sources, lowest precedence first: defaults, the YAML file",
        "(`--config FILE`), environment variables `RPO_<SECTION>__<FIELD>` (and `RPO_API_TOKEN`), then CLI",
        "overrides `--set section.field=value` and shortcut flags such as `--model`. Unknown keys and bad values",
        "are rejected with the key and where the value came from: the `--set` item, the environment variable, or",
        "the YAML file and line; so is a variable `RPO_<SECTION>__...` whose section does not exist. Values read",
        "the same way on the command line and in the environment (YAML): a list takes one value, a",
        "comma-separated list (`--set services.rollout_urls=http://a:8200,http://b:8200`) or a YAML/JSON list.",
        "`rpo config show` prints what the commands resolve (`--run`: what `rpo run` uses, its built-in preset",
        "unless `--config`).",
        "",
    ]
    for section_name, section_field in RunConfig.model_fields.items():
        section: type[BaseModel] = section_field.annotation
        lines += [f"## `{section_name}`", "", (section.__doc__ or "").strip().splitlines()[0], ""]
        lines += ["| key | type | default | paper | meaning |", "|---|---|---|---|---|"]
        lines += _rows(section_name, section)
        lines.append("")
    return "\n".join(lines)


def _rows(prefix: str, section: type[BaseModel]) -> list[str]:
    """One table row per field; a nested section (`train.lora`) gives a row per field of its own."""
    rows = []
    for name, field in section.model_fields.items():
        key = f"{prefix}.{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(key, annotation)
            continue
        default = field.get_default(call_default_factory=True)
        shown = json.dumps(default)
        desc = (field.description or "").replace("\n", " ").replace("|", "\\|")
        typ = _type_name(annotation).replace("|", "\\|")
        rows.append(f"| `{key}` | {typ} | `{shown}` | {PAPER_VALUES.get(key, '')} | {desc} |")
    return rows


def config_show_main(args: argparse.Namespace) -> int:
    """`rpo config show [--run]`: the resolved configuration (secrets masked), as YAML, after a comment line
    saying which: `rpo run`'s (--run: its built-in preset unless --config) or every other command's (the
    library defaults unless --config)."""
    if args.run:
        cfg = run_config(args)
        what = "what `rpo run` uses" + ("" if args.config else " (its built-in preset: no --config)")
    else:
        cfg = config_from_args(args)
        what = "what `rpo train`, `rpo serve` and the other commands use" + (
            ""
            if args.config
            else " (the library defaults: no --config); `rpo run` starts from its preset: --run"
        )
    print(f"# {what}")
    yaml.safe_dump(cfg.public_dict(), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    print(render(), end="")
