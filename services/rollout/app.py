"""The rollout replica's FastAPI application: `create_app(config)`.

The lifespan owns every resource: the vLLM engine (loaded before the first request is accepted; a model that
fails to load ends start-up with an error), the weight updater and its spool directory, the reward worker
processes, the weight data plane (its own port), and the cache server client. Routes (`services.rollout.routes`) stay thin: they decode, call one
of the plain classes built here, count, encode.

A watch task polls the engine every `ENGINE_WATCH_SECONDS`: when vLLM's engine has died (its engine-core
process exited or failed), it logs an error naming the replica and calls `on_engine_death` once; `rpo serve
rollout` passes a callback that ends the process with a non-zero status (`services.rollout.server`), so a
supervisor (Docker's restart policy, `rpo run`) replaces the replica instead of leaving it up, unhealthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from services.core.adapter_wire import AdapterManifest
from services.core.clients.cache import CacheClient
from services.core.config import RunConfig
from services.core.errors import Unavailable
from services.core.server_kit import install_common
from services.core.weight_wire import WeightManifest, checkpoint_files
from services.models.model_path import resolve_model_path
from services.rollout.engine import RolloutEngine
from services.rollout.generation import Generation
from services.rollout.metrics import RolloutMetrics
from services.rollout.rollouts import GroupRollouts
from services.rollout.routes import router
from services.rollout.scoring import RewardScorer
from services.rollout.state import RolloutService
from services.rollout.weight_plane import WeightPlane
from services.rollout.weight_updater import AdapterTarget, WeightUpdater

log = logging.getLogger("rpo.rollout")

ENGINE_WATCH_SECONDS = 1.0
"""How often the lifespan's watch task checks that vLLM's engine is alive."""


def replica_name(config: RunConfig) -> str:
    """`rollout.replica_name`, else host:port (the machine's name when bound to every interface)."""
    r = config.rollout
    if r.replica_name:
        return r.replica_name
    host = socket.gethostname() if r.host in ("0.0.0.0", "::", "") else r.host
    return f"{host}:{r.port}"


def resolve_model_dir(spec: str, revision: str | None = None) -> Path:
    """`model.path` as a directory (the built-in tiny models are built on first use)."""

    return Path(resolve_model_path(spec, revision)).resolve()


async def watch_engine(engine: RolloutEngine, name: str, on_death: Callable[[], None] | None) -> None:
    """Return once the engine has died, after logging it and calling `on_death` (None: log only)."""
    while not engine.dead:
        await asyncio.sleep(ENGINE_WATCH_SECONDS)
    log.error(
        "replica %s: the vLLM engine died (its engine-core process exited or failed); %s",
        name,
        "the replica exits so that it is restarted" if on_death is not None else "it serves no more requests",
        extra={"replica": name},
    )
    if on_death is not None:
        on_death()


def create_app(
    config: RunConfig,
    *,
    model_dir: str | Path | None = None,
    gpu_devices: int | None = None,
    on_engine_death: Callable[[], None] | None = None,
) -> FastAPI:
    """The replica's app; `model_dir` overrides `model.path` (tests, benchmarks); `gpu_devices`: how many
    GPUs the replica claimed (None: no claim; sets the engine's tensor parallelism on GPU);
    `on_engine_death`: called once, in the event loop, if vLLM's engine dies (None: the replica stays up,
    unready)."""
    registry = CollectorRegistry()
    metrics = RolloutMetrics(registry)
    name = replica_name(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:

        directory = (
            Path(model_dir).resolve()
            if model_dir is not None
            else resolve_model_dir(config.model.path, config.model.revision)
        )
        log.info("loading %s into vLLM", directory, extra={"replica": name})
        engine = RolloutEngine.start(config, directory, gpu_devices)
        r = config.rollout
        updater = plane = scorer = cache = watch = None
        try:
            watch = asyncio.create_task(watch_engine(engine, name, on_engine_death), name="engine-watch")
            lora = config.train.lora
            if lora.enabled:  # the base stays; each push is an adapter
                manifest = AdapterManifest.for_base(directory, lora, engine.safetensors_dtype)
                adapter = AdapterTarget(lora, str(directory))
            else:
                manifest, adapter = WeightManifest.from_model_dir(directory, engine.safetensors_dtype), None
            updater = WeightUpdater(
                engine,
                manifest,
                checkpoint_files(directory),
                r.spool_dir,
                metrics.policy_version.set,
                adapter=adapter,
            )
            plane = WeightPlane(
                updater,
                metrics,
                name,
                loop=asyncio.get_running_loop(),
                host=r.host,
                port=r.weight_port,
                api_token=config.services.api_token,
                max_body_bytes=r.max_body_bytes,
            ).start()
            scorer = RewardScorer(r.reward_workers, r.reward_timeout_seconds)
            await asyncio.to_thread(scorer.start)
            if config.services.cache_url:
                cache = CacheClient.from_config(config)
            metrics.policy_version.set(0)
            app.state.rollout = RolloutService(
                config=config,
                replica=name,
                engine=engine,
                updater=updater,
                weight_plane=plane,
                generation=Generation(engine, updater, metrics, name),
                rollouts=GroupRollouts(engine, updater, scorer, cache, metrics, name),
                scorer=scorer,
                cache=cache,
                metrics=metrics,
            )
            log.info(
                "replica %s ready: %s (%d tensors, %.1f MB as %s), context %d, cache %s, weight port %d",
                name,
                directory.name,
                len(manifest.expected),
                manifest.total_bytes / 2**20,
                engine.dtype,
                engine.max_model_len,
                config.services.cache_url or "none",
                plane.port,
                extra={"replica": name, "policy_version": 0},
            )
            yield
        finally:
            if watch is not None:
                watch.cancel()
            if cache is not None:
                await cache.aclose()
            if scorer is not None:
                scorer.close()
            if plane is not None:
                plane.close()
            if updater is not None:
                updater.close()
            engine.shutdown()

    app = FastAPI(
        title="rpo rollout replica",
        version="1",
        description="vLLM behind FastAPI: token-id generation, cache-aware group rollouts, versioned weight "
        "updates (see docs/api.md and docs/rollout.md).",
        lifespan=lifespan,
    )

    async def readiness() -> None:
        service: RolloutService | None = getattr(app.state, "rollout", None)
        if service is None:
            raise Unavailable("the model is still loading", retry_after_seconds=5)
        if service.updater.broken:
            raise Unavailable(f"out of service: {service.updater.broken}", retry_after_seconds=30)
        await service.engine.check_health()
        if service.cache is not None and not await service.cache.ready():
            raise Unavailable(f"the cache server {config.services.cache_url} does not answer /readyz")

    install_common(
        app,
        registry=registry,
        readiness=readiness,
        api_token=config.services.api_token,
        max_body_bytes=config.rollout.max_request_bytes,
    )

    app.include_router(router)
    return app
