"""`rpo run` on a GPU machine: the run's config fitted to the box by the memory plan (services/core/memory_plan.py)
before any process starts.

Guarantees:
- a run that does not fit is refused before anything starts, with the plan's tables and the settings that
  would fit (exit 2); on a machine without a GPU nothing changes (a debug line says the plan was skipped);
- each process gets its own GPUs by the rule of services/core/gpu_claims.py (the trainer's first, a replica
  the next), through a claim directory in the run directory; the trainer keeps `train.num_processes` GPUs;
- on one GPU shared by the trainer and the replica, the split is the plan's: vLLM gets
  `rollout.gpu_memory_utilization` as planned, the trainer caps itself at what the headroom leaves. With
  `rollout.sleep_mode` the trainer is not capped (the engine gives its memory back while the learner steps).
"""

from __future__ import annotations

import logging
from pathlib import Path

from services.core.config import RunConfig
from services.core.gpu_box import detect_box
from services.core.memory_plan import Box
from services.models.fit_plan import plan_or_refuse

log = logging.getLogger("rpo.run")

CLAIM_DIR = "gpu-claims"
"""Sub-directory of the run directory holding the GPU locks of `rpo run`'s processes."""


def fit_to_gpus(cfg: RunConfig, box: Box | None = None) -> RunConfig:
    """`cfg` fitted to `box` (default: this machine's GPUs); the same config when there is no GPU. Raises
    UsageError (the plan and the settings that would fit) when the run does not fit."""
    plan = plan_or_refuse(cfg, detect_box() if box is None else box)
    if plan is None:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.gpus.trainer = cfg.train.num_processes
    sleeping = plan.shared and cfg.rollout.sleep_mode
    if cfg.gpus.claim_dir is None and not sleeping:
        cfg.gpus.claim_dir = str(Path(cfg.train.run_dir) / CLAIM_DIR)
    if plan.shared and plan.rollout_memory_utilization is not None:
        util = plan.rollout_memory_utilization
        cfg.rollout.gpu_memory_utilization = util
        cfg.gpus.shared_rollout_fraction = max(cfg.gpus.shared_rollout_fraction, util)
        log.info(
            "one GPU for the trainer and the replica: vLLM gets %.3f of it (rollout.gpu_memory_utilization), %s",
            util,
            "and sleeps while the learner steps (rollout.sleep_mode)"
            if sleeping
            else f"the trainer at most {plan.trainer_memory_fraction:.3f}, "
            f"{cfg.gpus.shared_headroom_fraction} left to neither (gpus.shared_headroom_fraction)",
        )
    return cfg
