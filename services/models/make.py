"""`rpo model tiny` and `rpo data synth`: make the demo's model and data (no running service needed)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from services.core.cli_args import UsageError, config_from_args
from services.core.config import DataSection
from services.core.synthetic import SyntheticTaskConfig, make_dataset_files
from services.models.tiny_model import build_tiny_model, warm_start

log = logging.getLogger(__name__)


def task_config(data: DataSection):

    return SyntheticTaskConfig(
        num_terms=data.synthetic_num_terms,
        max_digits=data.synthetic_max_digits,
        train_size=data.synthetic_train_size,
        eval_size=data.synthetic_eval_size,
        seed=data.synthetic_seed,
    )


def tiny_model_main(args: argparse.Namespace) -> int:
    """`rpo model tiny --out DIR [--warm-start]`: the embedded tiny Qwen2 model as an HF directory."""

    cfg = config_from_args(args)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out}: directory exists and is not empty")
    task = task_config(cfg.data)
    if not args.warm_start:
        build_tiny_model(out, seed=cfg.train.seed, task=task)
        print(f"tiny model written to {out}")
        return 0
    scratch = out.with_name(out.name + ".random")
    build_tiny_model(scratch, seed=cfg.train.seed, task=task, num_layers=4)
    metrics = warm_start(scratch, out, task_cfg=task, seed=cfg.train.seed)
    print(f"warm-started tiny model written to {out}: {json.dumps(metrics)}")
    return 0


def synth_data_main(args: argparse.Namespace) -> int:
    """`rpo data synth --out DIR`: the synthetic task as train.jsonl and eval.jsonl."""

    cfg = config_from_args(args)
    try:
        files = make_dataset_files(task_config(cfg.data), args.out)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for split, path in files.items():
        print(f"{split}: {path}")
    return 0
