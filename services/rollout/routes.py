"""HTTP routes of a rollout replica: thin wrappers that decode, call the service's plain classes, count,
encode. Bodies are JSON, or msgpack when Content-Type / Accept say so. `/v1/rollouts` (it may seed the
cache), every weight route and the engine's sleep and wake require the bearer token when one is configured.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse

from services.core.errors import Conflict, Unavailable
from services.core.schemas.common import ErrorResponse
from services.core.schemas.rollout import (
    CHECKSUM_HEADER,
    EngineState,
    GenerateRequest,
    GenerateResponse,
    NcclFinishRequest,
    NcclInitRequest,
    NcclStartRequest,
    NcclUpdateRequest,
    RolloutRequest,
    RolloutResponse,
    SleepRequest,
    WeightVersion,
)
from services.core.server_kit import ERROR_RESPONSES, RequireToken, body_openapi, typed_body, typed_response
from services.rollout.state import RolloutService

log = logging.getLogger("rpo.rollout")
router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)
_CONFLICT = {
    409: ERROR_RESPONSES[422] | {"description": "the replica serves an older policy, or is updating"}
}


def _service(request: Request) -> RolloutService:
    service = getattr(request.app.state, "rollout", None)
    if service is None:  # pragma: no cover - the lifespan sets it before any request is accepted
        raise Unavailable("the model is still loading", retry_after_seconds=5)
    return service


async def _counted(service: RolloutService, mode: str, call: Callable[[], Awaitable[Any]]) -> Any:
    try:
        result = await call()
    except BaseException:
        service.metrics.rollout_requests.labels(mode, "error").inc()
        raise
    service.metrics.rollout_requests.labels(mode, "ok").inc()
    return result


@router.post(
    "/generate",
    tags=["rollout"],
    response_model=GenerateResponse,
    responses=_CONFLICT,
    openapi_extra=body_openapi(GenerateRequest),
)
async def generate(request: Request, body: GenerateRequest = typed_body(GenerateRequest)) -> Response:
    """n samples per token-id prompt: token ids, sampling log-probs, finish reasons, the policy version."""
    service = _service(request)
    reply = await _counted(service, "generate", lambda: service.generation.run(body))
    return await asyncio.to_thread(typed_response, request, reply)  # a large reply is not encoded on the loop


@router.post(
    "/rollouts",
    tags=["rollout"],
    response_model=RolloutResponse,
    responses=_CONFLICT,
    dependencies=[RequireToken],
    openapi_extra=body_openapi(RolloutRequest),
)
async def rollouts(request: Request, body: RolloutRequest = typed_body(RolloutRequest)) -> Response:
    """G responses per question (RPO: cached prefix + decoded suffix; full mode: full paths), scored and
    shaped within each group."""
    service = _service(request)
    reply = await _counted(service, body.mode, lambda: service.rollouts.run(body))
    return await asyncio.to_thread(typed_response, request, reply)


@router.get("/weights/version", tags=["weights"], response_model=WeightVersion)
async def weight_version(request: Request) -> WeightVersion:
    """The policy version this replica serves, whether an update is under way, and the dtype a push sends."""
    service = _service(request)
    return WeightVersion(
        policy_version=service.updater.version,
        replica=service.replica,
        updating=service.updater.updating,
        dtype=service.engine.safetensors_dtype,
        weight_transfer=service.config.rollout.weight_transfer,
        weight_port=service.weight_plane.port,
    )


@router.put(
    "/weights/{version}",
    tags=["weights"],
    status_code=307,
    response_model=ErrorResponse,
    responses={307: {"description": "Pushes go to the weight port: see `Location`."}},
)
async def push_weights_here(
    request: Request, version: Annotated[int, Path(ge=1, description="The version these weights become.")]
) -> JSONResponse:
    """Weights are pushed to the replica's weight data plane, a port of its own (`weight_port` of
    `GET /v1/weights/version`): this answers 307 with its address, so `curl -L -T model.safetensors` works."""
    service = _service(request)
    host = request.url.hostname or "127.0.0.1"
    location = (
        f"http://{f'[{host}]' if ':' in host else host}:{service.weight_plane.port}/v1/weights/{version}"
    )
    body = ErrorResponse.model_validate(
        {
            "error": {
                "type": "moved",
                "message": f"weight pushes go to the weight port: PUT {location} "
                f"(safetensors body, {CHECKSUM_HEADER} header)",
                "field": None,
            }
        }
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=307, headers={"Location": location})


# -- NCCL data plane (vLLM's weight transfer engine; GPU replicas started with rollout.weight_transfer=nccl) ---


def _nccl(request: Request) -> RolloutService:
    service = _service(request)
    if service.config.rollout.weight_transfer != "nccl":
        raise Conflict(
            f"replica {service.replica} was started with rollout.weight_transfer={service.config.rollout.weight_transfer}; "
            "NCCL weight transfer needs rollout.weight_transfer=nccl",
            field="rollout.weight_transfer",
        )
    return service


@router.post(
    "/weights/nccl/init",
    tags=["weights"],
    dependencies=[RequireToken],
    openapi_extra=body_openapi(NcclInitRequest),
)
async def nccl_init(request: Request, body: NcclInitRequest = typed_body(NcclInitRequest)) -> WeightVersion:
    """Join the trainer's NCCL group (blocks until the trainer joins too)."""
    service = _nccl(request)
    await service.engine.nccl_init(body.init_info)
    return await weight_version(request)


@router.post(
    "/weights/nccl/start",
    tags=["weights"],
    dependencies=[RequireToken],
    openapi_extra=body_openapi(NcclStartRequest),
)
async def nccl_start(
    request: Request, body: NcclStartRequest = typed_body(NcclStartRequest)
) -> WeightVersion:
    """Hold new generation (in-flight requests finish first) and open the update of `version`."""
    service = _nccl(request)
    await service.updater.nccl_start(body.version, service.config.services.request_timeout_seconds)
    return await weight_version(request)


@router.post(
    "/weights/nccl/update",
    tags=["weights"],
    dependencies=[RequireToken],
    openapi_extra=body_openapi(NcclUpdateRequest),
)
async def nccl_update(
    request: Request, body: NcclUpdateRequest = typed_body(NcclUpdateRequest)
) -> WeightVersion:
    """Receive one broadcast from the trainer (returns when it has arrived)."""
    service = _nccl(request)
    await service.updater.nccl_update(body.version, body.update_info)
    return await weight_version(request)


@router.post(
    "/weights/nccl/finish",
    tags=["weights"],
    dependencies=[RequireToken],
    openapi_extra=body_openapi(NcclFinishRequest),
)
async def nccl_finish(
    request: Request, body: NcclFinishRequest = typed_body(NcclFinishRequest)
) -> WeightVersion:
    """Close the update: reset the prefix cache and serve `version`."""
    service = _nccl(request)
    started = time.perf_counter()
    await service.updater.nccl_finish(body.version)
    service.metrics.weight_apply_seconds.observe(time.perf_counter() - started)
    return await weight_version(request)


# -- Engine sleep (rollout.sleep_mode: vLLM's sleep mode, GPU replicas) --------------------------------------


def _sleep_mode(request: Request) -> RolloutService:
    service = _service(request)
    if not service.config.rollout.sleep_mode:
        raise Conflict(
            f"replica {service.replica} was started without rollout.sleep_mode, so its engine cannot sleep",
            field="rollout.sleep_mode",
        )
    return service


@router.post(
    "/engine/sleep",
    tags=["engine"],
    response_model=EngineState,
    responses=_CONFLICT,
    dependencies=[RequireToken],
    openapi_extra=body_openapi(SleepRequest),
)
async def engine_sleep(request: Request, body: SleepRequest = typed_body(SleepRequest)) -> EngineState:
    """Free the engine's GPU memory while the learner steps; generation and weight loads answer 409 until
    `POST /v1/engine/wake`. Level 2 drops the weights too, so it is refused with LoRA (the base would be lost)."""
    service = _sleep_mode(request)
    if body.level == 2 and service.config.train.lora.enabled:
        raise Conflict(
            "sleep level 2 drops the base weights, which LoRA pushes never bring back", field="level"
        )
    seconds = await service.engine.sleep(body.level)
    return EngineState(
        replica=service.replica, sleeping=True, level=service.engine.sleep_level, seconds=seconds
    )


@router.post(
    "/engine/wake",
    tags=["engine"],
    response_model=EngineState,
    responses=_CONFLICT,
    dependencies=[RequireToken],
)
async def engine_wake(request: Request) -> EngineState:
    """Take the GPU memory back and serve again (the weights it slept with, until the next push)."""
    service = _sleep_mode(request)
    seconds = await service.engine.wake()
    return EngineState(replica=service.replica, sleeping=False, level=0, seconds=seconds)
