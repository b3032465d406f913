"""HTTP routes of the cache service: thin wrappers that decode, call `CacheStore`, count, encode.

Mutating routes (put, update, delete) require the bearer token when one is configured. Bodies and replies
are JSON, or msgpack when Content-Type / Accept say so (what `services.core.clients.cache` sends).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import StreamingResponse

from cache_server.metrics import CacheMetrics
from cache_server.store import CacheStore
from services.core.schemas.cache import (
    RUN_ID_PATTERN,
    CacheEntry,
    DeleteRunResponse,
    ExportHeader,
    ExportTrailer,
    PrefixRequest,
    PrefixResponse,
    PutEntriesRequest,
    PutEntriesResponse,
    ReadEntriesRequest,
    ReadEntriesResponse,
    RunStats,
    UpdateRequest,
    UpdateResponse,
)
from services.core.server_kit import ERROR_RESPONSES, RequireToken, body_openapi, typed_body, typed_response

RunId = Annotated[str, Path(pattern=RUN_ID_PATTERN, description="The run's key namespace.")]
NDJSON_MEDIA_TYPE = "application/x-ndjson"

router = APIRouter(prefix="/v1/runs/{run_id}", tags=["cache"], responses=ERROR_RESPONSES)


def _store(request: Request) -> CacheStore:
    return request.app.state.store


def _metrics(request: Request) -> CacheMetrics:
    return request.app.state.cache_metrics


@router.put(
    "/entries",
    response_model=PutEntriesResponse,
    dependencies=[RequireToken],
    openapi_extra=body_openapi(PutEntriesRequest),
)
async def put_entries(
    request: Request, run_id: RunId, body: PutEntriesRequest = typed_body(PutEntriesRequest)
) -> Response:
    """Bulk put (cache initialisation, import): all entries of the request are applied atomically."""
    return typed_response(request, await _store(request).put_entries(run_id, body))


@router.post(
    "/entries/read", response_model=ReadEntriesResponse, openapi_extra=body_openapi(ReadEntriesRequest)
)
async def read_entries(
    request: Request, run_id: RunId, body: ReadEntriesRequest = typed_body(ReadEntriesRequest)
) -> Response:
    """Entries as stored, aligned with `question_ids` (null where a question has none)."""
    entries = await _store(request).read_entries(run_id, body.question_ids)
    return typed_response(request, ReadEntriesResponse(entries=entries))


@router.post("/prefixes", response_model=PrefixResponse, openapi_extra=body_openapi(PrefixRequest))
async def prefixes(
    request: Request, run_id: RunId, body: PrefixRequest = typed_body(PrefixRequest)
) -> Response:
    """Batched prefix retrieval: the server draws m ~ U{0..L} per question and truncates the cached answer."""
    response = await _store(request).prefixes(run_id, body)
    _metrics(request).record_prefixes(response)
    return typed_response(request, response)


@router.post(
    "/updates",
    response_model=UpdateResponse,
    dependencies=[RequireToken],
    openapi_extra=body_openapi(UpdateRequest),
)
async def updates(
    request: Request, run_id: RunId, body: UpdateRequest = typed_body(UpdateRequest)
) -> Response:
    """Epsilon-greedy update of a step's groups; idempotent per (run, step, question)."""
    response = await _store(request).update(run_id, body)
    _metrics(request).record_update(response)
    return typed_response(request, response)


@router.get("/stats", response_model=RunStats)
async def stats(request: Request, run_id: RunId) -> RunStats:
    """How many entries the run holds."""
    store = _store(request)
    return RunStats(
        run_id=run_id, entries=await store.count(run_id), trained_steps=await store.trained_steps(run_id)
    )


@router.delete("", response_model=DeleteRunResponse, dependencies=[RequireToken])
async def delete_run(request: Request, run_id: RunId) -> DeleteRunResponse:
    """Remove every key of the run: entries, index and update markers."""
    return DeleteRunResponse(run_id=run_id, deleted_keys=await _store(request).delete_run(run_id))


@router.get(
    "/export",
    dependencies=[RequireToken],  # a run's whole cache: its answers are the experience the run paid for
    response_class=StreamingResponse,
    responses={200: {"content": {NDJSON_MEDIA_TYPE: {}}, "description": "header, entries, trailer"}},
)
async def export(request: Request, run_id: RunId) -> StreamingResponse:
    """Stream the run's entries as NDJSON: an ExportHeader line, one CacheEntry per line, an ExportTrailer.

    A stream cut short (Redis lost mid-way) has no trailer, so an importer can tell."""
    store = _store(request)
    await store.ping()  # fail with 503 before the 200 is sent when Redis is down
    header = ExportHeader(run_id=run_id, exported_at=time.time())

    async def lines() -> AsyncIterator[bytes]:
        yield header.model_dump_json().encode() + b"\n"
        count = 0
        async for chunk in store.iter_entries(run_id):
            count += len(chunk)
            yield await anyio.to_thread.run_sync(_ndjson, chunk)
        yield ExportTrailer(count=count).model_dump_json().encode() + b"\n"

    return StreamingResponse(lines(), media_type=NDJSON_MEDIA_TYPE)


def _ndjson(entries: list[CacheEntry]) -> bytes:
    return b"".join(e.model_dump_json().encode() + b"\n" for e in entries)
