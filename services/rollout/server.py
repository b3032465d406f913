"""`rpo serve rollout`: parse the config, build the replica's app, serve until SIGTERM / Ctrl-C.

On shutdown uvicorn finishes in-flight requests, then the lifespan stops the reward workers, removes the
weight spool directory and shuts the vLLM engine (and its engine-core process) down.

A replica that finds every GPU it could use held by other replicas (a compose box scaled past its GPUs)
says so in one line and exits with `SURPLUS_EXIT_CODE` (0), which compose does not restart.

A replica whose vLLM engine dies shuts down the same way and then exits with status `ENGINE_DIED_EXIT_CODE`
(after an error line naming the replica), so whatever supervises it (Docker's `restart` policy, `rpo run`)
replaces it. A GPU machine whose NVIDIA driver is too old for torch's CUDA ends start-up with one message
(`services.core.cuda_check`).

The replica never starts the CUDA driver before vLLM forks its engine core: `fork_safe_cuda_env` runs when
this module is imported, before anything imports torch (the command table imports it only to run it), so
the driver check asks NVML and GPUs are numbered as `nvidia-smi` and the GPU claims number them.
"""

from __future__ import annotations

import argparse
import logging
import signal

from services.core.cuda_check import (
    CudaDriverError,
    check_cuda_driver,
    check_replica_gpu,
    fork_safe_cuda_env,
)

fork_safe_cuda_env()  # before the imports below load torch: see the module docstring

from services.core.cli_args import UsageError, config_from_args  # noqa: E402
from services.core.gpu_claims import GpuPlacementError, NoFreeGpu, claim_gpus  # noqa: E402
from services.core.model_fit import check_fit  # noqa: E402
from services.core.server_kit import run_uvicorn  # noqa: E402
from services.rollout.app import create_app, replica_name, resolve_model_dir  # noqa: E402
from services.rollout.engine import check_sleep_mode  # noqa: E402

log = logging.getLogger("rpo.rollout")

ENGINE_DIED_EXIT_CODE = 3
"""Exit status of a replica whose vLLM engine died (1 stays a start-up failure)."""
SURPLUS_EXIT_CODE = 0
"""Exit status of a surplus replica (every GPU it could use is held by other replicas): nothing failed, and
compose's `restart: on-failure` leaves it stopped instead of restarting it forever."""


def serve_main(args: argparse.Namespace) -> int:
    fork_safe_cuda_env()  # again, should anything have changed them since the import
    config = config_from_args(args)
    r = config.rollout
    try:  # a wrong model.path is one message, not vLLM's start-up traceback
        model_dir = resolve_model_dir(config.model.path, config.model.revision)
        check_fit(config, model_dir)  # a context the model lacks: one line here, not vLLM's traceback
        # Before vLLM initialises CUDA: this replica's own GPUs on a compose box (gpus.claim_dir).
        claim = claim_gpus("rollout", config.gpus, r.gpu_memory_utilization)
        check_sleep_mode(config)  # vLLM's CPU platform has none: one line here
    except NoFreeGpu as exc:  # one line, once: the replica is not restarted (SURPLUS_EXIT_CODE)
        log.warning(
            "rollout replica %s is not needed and stops (status %d): %s",
            replica_name(config),
            SURPLUS_EXIT_CODE,
            exc,
        )
        return SURPLUS_EXIT_CODE
    except (ValueError, GpuPlacementError) as exc:
        raise UsageError(str(exc)) from None
    engine_died = False

    def exit_on_engine_death() -> None:
        # uvicorn takes SIGTERM as "shut down gracefully"; the status is set once it has (below)
        nonlocal engine_died
        engine_died = True
        signal.raise_signal(signal.SIGTERM)

    try:
        # lazy: heavy import (torch), paid only on this path
        import torch

        try:  # after the claim; through NVML (fork_safe_cuda_env), so vLLM can still fork
            check_replica_gpu(torch.version.cuda, torch.__version__)
            check_cuda_driver(torch.version.cuda, torch.cuda.is_available, torch.__version__)
        except CudaDriverError as exc:
            raise UsageError(str(exc)) from None
        log.info("rollout replica on http://%s:%d, model %s", r.host, r.port, model_dir)
        app = create_app(
            config,
            model_dir=model_dir,
            gpu_devices=None if claim is None else len(claim.plan.devices),
            on_engine_death=exit_on_engine_death,
        )
        run_uvicorn(app, r.host, r.port, graceful_shutdown_seconds=30.0)
    finally:
        if claim is not None:
            claim.release()
        if engine_died:  # replaces the SystemExit(0) of the SIGTERM this process sent itself
            log.error(
                "replica %s exits with status %d: its vLLM engine died",
                replica_name(config),
                ENGINE_DIED_EXIT_CODE,
            )
            raise SystemExit(ENGINE_DIED_EXIT_CODE)  # noqa: B012 - the status is the point
    return 0
