"""`rpo train [--config FILE] [--resume]`: the trainer process, against running cache and rollout services.

Runs as one plain process, or as every rank under DeepSpeed's launcher (`deepspeed --no_local_rank
--num_gpus N --module services.cli train --config FILE`, a hostfile for several nodes; CPU ranks with
DS_ACCELERATOR=cpu): rank 0 talks to the services, every rank trains. Ranks other than 0 log warnings
and errors only. Exit code 0 when the planned steps are done or a stop request was honoured (a checkpoint
was saved: `--resume` continues). On a GPU machine whose NVIDIA driver is too old for torch's CUDA, it
ends at start with one message saying so (`services.core.cuda_check`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from services.cli.args import UsageError, config_from_args
from services.core.cuda_check import CudaDriverError, check_cuda_driver
from services.core.gpu_claims import GpuPlacementError, claim_gpus
from trainer.loop import RunCollision, run_training
from trainer.preflight import check_before_training
from trainer.tracking import TrackingError

log = logging.getLogger("rpo.train")


def train_main(args: Any) -> int:

    cfg = config_from_args(args)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    check_before_training(cfg)  # settings and services first: seconds, before the model and DeepSpeed
    claim = None
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # under DeepSpeed's launcher, the launcher places ranks
        try:
            claim = claim_gpus("trainer", cfg.gpus, cfg.rollout.gpu_memory_utilization)
        except GpuPlacementError as exc:
            raise UsageError(str(exc)) from None
    try:  # after the claim: asking torch about CUDA fixes the visible GPUs for this process
        check_cuda_driver(torch.version.cuda, torch.cuda.is_available, torch.__version__)
    except CudaDriverError as exc:
        if claim is not None:
            claim.release()
        raise UsageError(str(exc)) from None
    if claim is not None and claim.plan.memory_fraction is not None and torch.cuda.is_available():
        # One GPU shared with a rollout replica: stay within the trainer's side of the split.
        torch.cuda.set_per_process_memory_fraction(claim.plan.memory_fraction)
    try:
        outcome = run_training(cfg, resume=bool(getattr(args, "resume", False)))
    except (RunCollision, TrackingError) as exc:
        raise UsageError(str(exc)) from None
    if outcome["stopped"]:
        log.info(
            "stopped at step %d of %d; `rpo train --resume` continues",
            outcome["steps"],
            outcome["total_steps"],
        )
    return 0
