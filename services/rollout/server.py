"""`rpo serve rollout`: parse the config, build the replica's app, serve until SIGTERM / Ctrl-C.

On shutdown uvicorn finishes in-flight requests, then the lifespan stops the reward workers, removes the
weight spool directory and shuts the vLLM engine (and its engine-core process) down.
"""

from __future__ import annotations

import argparse
import logging

from services.cli.args import UsageError, config_from_args
from services.core.gpu_claims import GpuPlacementError, claim_gpus
from services.core.server_kit import run_uvicorn
from services.rollout.app import create_app, resolve_model_dir

log = logging.getLogger("rpo.rollout")


def serve_main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    r = config.rollout
    try:  # a wrong model.path is one message, not vLLM's start-up traceback
        model_dir = resolve_model_dir(config.model.path)
        # Before vLLM initialises CUDA: this replica's own GPUs on a compose box (gpus.claim_dir).
        claim = claim_gpus("rollout", config.gpus, r.gpu_memory_utilization)
    except (ValueError, GpuPlacementError) as exc:
        raise UsageError(str(exc)) from None
    log.info("rollout replica on http://%s:%d, model %s", r.host, r.port, model_dir)
    try:
        run_uvicorn(create_app(config, model_dir=model_dir), r.host, r.port, graceful_shutdown_seconds=30.0)
    finally:
        if claim is not None:
            claim.release()
    return 0
