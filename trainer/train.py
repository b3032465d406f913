"""`rpo train [--config FILE] [--resume]`: the trainer process, against running cache and rollout services.

Runs as one plain process, or as every rank under DeepSpeed's launcher (`deepspeed --no_local_rank
--num_gpus N --module services.cli train --config FILE`, a hostfile for several nodes; CPU ranks with
DS_ACCELERATOR=cpu): rank 0 talks to the services, every rank trains. With `train.num_processes` N > 1 and
no launcher around it, it starts that launcher itself for N local ranks, on the GPUs it claimed
(`trainer.launch_env.run_local_ranks`): a compose trainer with `RPO_TRAINER_GPUS=N`. Ranks other than 0 log warnings
and errors only. Exit code 0 when the planned steps are done or a stop request was honoured (a checkpoint
was saved: `--resume` continues). On a GPU machine whose NVIDIA driver is too old for torch's CUDA, it
ends at start with one message saying so (`services.core.cuda_check`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import httpx
import torch

from services.core.cli_args import UsageError, config_from_args
from services.core.clients.replica_set import ReplicaSet, RolloutFailed
from services.core.config import RunConfig
from services.core.cuda_check import CudaDriverError, check_cuda_driver
from services.core.gpu_claims import GpuPlacementError, claim_gpus
from trainer.launch_env import run_local_ranks
from trainer.loop import RunCollision, run_training
from trainer.preflight import check_before_training
from trainer.telemetry.tracking import TrackingError

log = logging.getLogger("rpo.train")

WAIT_NOTICE_SECONDS = 30.0
"""While it waits for a first replica, the trainer says so at this interval."""


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for_a_replica(cfg: RunConfig) -> None:
    """With `services.rollout_discovery` (compose: replicas start with the trainer, some may be surplus and
    stop): wait until one replica found is ready, at most `services.startup_timeout_seconds`, then train on
    the ones ready (the others join when they are). Returns either way: the checks before training then name
    what is missing. Static `services.rollout_urls` are not waited for (they were started beforehand)."""
    if not cfg.services.rollout_discovery:
        return
    replica_set = ReplicaSet(cfg)
    started = time.monotonic()
    noticed = started
    while True:
        try:
            found = replica_set.replicas()
        except RolloutFailed:
            found = []  # the name resolves to nothing yet
        except ValueError:
            return  # a malformed setting: the checks say so
        ready = [url for url in found if _ready(url)]
        now = time.monotonic()
        if ready:
            log.info("%d of %d rollout replica(s) ready; training starts on them", len(ready), len(found))
            return
        if now - started > cfg.services.startup_timeout_seconds:
            return
        if now - noticed >= WAIT_NOTICE_SECONDS:
            log.info(
                "waiting for a rollout replica to be ready (%d found at %s, none ready yet; %.0f s)",
                len(found),
                cfg.services.rollout_discovery,
                now - started,
            )
            noticed = now
        time.sleep(2.0)


def train_main(args: Any) -> int:

    cfg = config_from_args(args)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    wait_for_a_replica(cfg)  # compose: the replicas start with the trainer
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
    if cfg.train.num_processes > 1 and "WORLD_SIZE" not in os.environ:  # N ranks, on the claimed GPUs
        try:
            return run_local_ranks(cfg.train.num_processes, sys.argv[1:])
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        finally:
            if claim is not None:
                claim.release()
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
