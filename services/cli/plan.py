"""`rpo plan`: the memory plan of a run (services/models/fit_plan.py) as tables, per process and per GPU,
for this machine's GPUs or for `--gpus N --gpu-memory SIZE`; exit 2 with the settings that would make it fit
when it does not.
"""

from __future__ import annotations

import argparse

from services.core.cli_args import UsageError, config_from_args
from services.core.gpu_box import detect_box, parse_size
from services.core.memory_plan import Box
from services.models.fit_plan import make_plan, refusal, render_plan


def box_from_args(args: argparse.Namespace) -> Box | None:
    """--gpus/--gpu-memory when given (both, or neither), else this machine's GPUs (None: none)."""
    gpus, memory = getattr(args, "gpus", None), getattr(args, "gpu_memory", None)
    if gpus is None and memory is None:
        return detect_box()
    if gpus is None or memory is None:
        raise UsageError("give both --gpus N and --gpu-memory SIZE (e.g. --gpus 1 --gpu-memory 24GiB)")
    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: at least 1")
    try:
        return Box(gpus, parse_size(memory))
    except ValueError as exc:
        raise UsageError(f"--gpu-memory: {exc}") from None


def plan_main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    box = box_from_args(args)
    if box is None:
        raise UsageError(
            "no GPU on this machine (nvidia-smi finds none): plan for the box you will run on with "
            "--gpus N --gpu-memory SIZE, e.g. --gpus 1 --gpu-memory 24GiB"
        )
    plan = make_plan(cfg, box, args.replicas, args.prompt_tokens)
    print(render_plan(plan, cfg), end="")
    if not plan.fits:
        raise UsageError(refusal(plan))
    print("the plan fits")
    return 0
