"""Typed clients of the cache service, for the rollout service, the trainer and `rpo cache ...`.

`CacheClient` (async) and `SyncCacheClient` have the same methods. Both speak msgpack (token ids as packed
bytes: no per-token JSON on the hot path), go through the one retry policy (services.core.http_client), and raise
`ServiceHTTPError` on a 4xx (the server's message and field included) or `ServiceCallError` when retries run
out. Token ids in the returned models are packed bytes: `unpack_token_ids(result.prefix_ids)` gives a list.

Export files (NDJSON: header, entries, trailer) are written and checked here too, so a checkpoint can save
and restore a run's cache with `export_run` / `import_file`. An import reads the whole file and checks it
before writing anything; then it writes in chunks, each applied atomically. Re-running a failed import is
safe (it writes the same entries again).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ValidationError

from services.core.config import RunConfig
from services.core.http_client import AsyncServiceClient, RetryPolicy, ServiceClient
from services.core.schemas.cache import (
    CacheEntry,
    DeleteRunResponse,
    ExportHeader,
    ExportTrailer,
    GroupUpdate,
    PrefixRequest,
    PrefixResponse,
    PrefixResult,
    PutEntriesRequest,
    PutEntriesResponse,
    PutEntry,
    ReadEntriesRequest,
    ReadEntriesResponse,
    RunStats,
    TruncationLimit,
    UpdateRequest,
    UpdateResponse,
    UpdateResult,
)
from services.core.schemas.common import MSGPACK_MEDIA_TYPE, decode_model, encode_model, unpack_token_ids

__all__ = ["CacheClient", "ExportFileError", "SyncCacheClient", "read_export_file", "unpack_token_ids"]

_MSGPACK_HEADERS = {"Content-Type": MSGPACK_MEDIA_TYPE, "Accept": MSGPACK_MEDIA_TYPE}
PUT_CHUNK_BYTES = 16 * 2**20
"""A bulk put is split into requests of about this many token bytes (each applied atomically)."""
PUT_CHUNK_ENTRIES = 1024


class ExportFileError(ValueError):
    """An export file that is not one: names the file and line."""


@dataclass(frozen=True)
class _Call:
    """One request of the cache API: what to send and what model the reply is."""

    method: str
    path: str
    phase: str
    body: BaseModel | None
    reply: type[BaseModel]

    def kwargs(self) -> dict[str, Any]:
        if self.body is None:
            return {"headers": {"Accept": MSGPACK_MEDIA_TYPE}}
        return {"content": encode_model(self.body, True), "headers": _MSGPACK_HEADERS}

    def parse(self, response: httpx.Response) -> Any:
        msgpack_reply = "msgpack" in response.headers.get("content-type", "")
        return decode_model(self.reply, response.content, msgpack_reply)


def _runs(run_id: str) -> str:
    return f"/v1/runs/{run_id}"


def _put_chunks(entries: Iterable[PutEntry]) -> Iterator[list[PutEntry]]:
    chunk: list[PutEntry] = []
    size = 0
    for entry in entries:
        if chunk and (size + len(entry.token_ids) > PUT_CHUNK_BYTES or len(chunk) >= PUT_CHUNK_ENTRIES):
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += len(entry.token_ids)
    if chunk:
        yield chunk


class _Api:
    """The calls, independent of sync or async transport."""

    @staticmethod
    def put(run_id: str, entries: list[PutEntry], overwrite: bool) -> _Call:
        body = PutEntriesRequest(entries=entries, overwrite=overwrite)
        return _Call("PUT", f"{_runs(run_id)}/entries", "cache.put_entries", body, PutEntriesResponse)

    @staticmethod
    def read(run_id: str, question_ids: Sequence[str]) -> _Call:
        body = ReadEntriesRequest(question_ids=list(question_ids))
        return _Call("POST", f"{_runs(run_id)}/entries/read", "cache.read_entries", body, ReadEntriesResponse)

    @staticmethod
    def prefixes(run_id: str, question_ids: Sequence[str], limit: TruncationLimit, seed: int | None) -> _Call:
        body = PrefixRequest(question_ids=list(question_ids), truncation_limit=limit, seed=seed)
        return _Call("POST", f"{_runs(run_id)}/prefixes", "cache.prefixes", body, PrefixResponse)

    @staticmethod
    def update(
        run_id: str,
        step: int,
        groups: Sequence[GroupUpdate],
        epsilon: float,
        only_correct: bool,
        seed: int | None,
    ) -> _Call:
        body = UpdateRequest(
            step=step, epsilon=epsilon, only_correct=only_correct, seed=seed, groups=list(groups)
        )
        return _Call("POST", f"{_runs(run_id)}/updates", "cache.update", body, UpdateResponse)

    @staticmethod
    def stats(run_id: str) -> _Call:
        return _Call("GET", f"{_runs(run_id)}/stats", "cache.stats", None, RunStats)

    @staticmethod
    def delete(run_id: str) -> _Call:
        return _Call("DELETE", _runs(run_id), "cache.delete_run", None, DeleteRunResponse)


def _merge_puts(replies: list[PutEntriesResponse]) -> PutEntriesResponse:
    return PutEntriesResponse(
        written=sum(r.written for r in replies),
        skipped_question_ids=[q for r in replies for q in r.skipped_question_ids],
    )


def _base_url(config: RunConfig) -> str:
    if config.services.cache_url:
        return config.services.cache_url
    host = config.cache_server.host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{config.cache_server.port}"


def _token(config: RunConfig) -> str | None:
    token = config.services.api_token
    return token.get_secret_value() if token is not None else None


class CacheClient:
    """Async client of the cache service. Use `async with CacheClient.from_config(cfg) as cache: ...`."""

    def __init__(self, base_url: str, *, token: str | None = None, policy: RetryPolicy | None = None):
        self.http = AsyncServiceClient(base_url, policy, token=token)

    @classmethod
    def from_config(cls, config: RunConfig) -> CacheClient:
        """`services.cache_url` (else the configured cache_server host:port), token and retry policy."""
        return cls(_base_url(config), token=_token(config), policy=RetryPolicy.from_config(config.services))

    async def _call(self, call: _Call) -> Any:
        return call.parse(await self.http.request(call.method, call.path, phase=call.phase, **call.kwargs()))

    async def put_entries(
        self, run_id: str, entries: Sequence[PutEntry], *, overwrite: bool = True
    ) -> PutEntriesResponse:
        """Write entries (chunked; each chunk atomic). overwrite=False keeps existing ones (resumable init)."""
        replies = [await self._call(_Api.put(run_id, c, overwrite)) for c in _put_chunks(entries)]
        return _merge_puts(replies)

    async def read_entries(self, run_id: str, question_ids: Sequence[str]) -> list[CacheEntry | None]:
        return (await self._call(_Api.read(run_id, question_ids))).entries

    async def prefixes(
        self,
        run_id: str,
        question_ids: Sequence[str],
        truncation_limit: TruncationLimit,
        *,
        seed: int | None = None,
    ) -> list[PrefixResult]:
        """The truncated cached answer of each question (results[i] for question_ids[i])."""
        return (await self._call(_Api.prefixes(run_id, question_ids, truncation_limit, seed))).results

    async def update(
        self,
        run_id: str,
        step: int,
        groups: Sequence[GroupUpdate],
        *,
        epsilon: float,
        only_correct: bool = False,
        seed: int | None = None,
    ) -> list[UpdateResult]:
        """The step's epsilon-greedy cache update; safe to retry (idempotent per step and question)."""
        call = _Api.update(run_id, step, groups, epsilon, only_correct, seed)
        return (await self._call(call)).results

    async def stats(self, run_id: str) -> RunStats:
        return await self._call(_Api.stats(run_id))

    async def delete_run(self, run_id: str) -> int:
        """Remove every key of the run; returns how many."""
        return (await self._call(_Api.delete(run_id))).deleted_keys

    async def ready(self) -> bool:
        """True when the service and its Redis answer (one attempt, no retries)."""
        try:
            response = await self.http._http.get(self.http.base_urls[0] + "/readyz", timeout=5.0)
        except httpx.TransportError:
            return False
        return response.status_code == 200

    async def export_run(self, run_id: str, path: str | os.PathLike[str]) -> int:
        """Stream the run's entries into an export file (written beside, then renamed). Returns the count."""
        target = Path(path)
        partial = target.with_name(target.name + ".partial")
        async with self.http.stream("GET", f"{_runs(run_id)}/export", phase="cache.export") as response:
            with partial.open("wb") as out:
                async for chunk in response.aiter_bytes():
                    out.write(chunk)
        return _finish_export(partial, target)

    async def import_file(self, run_id: str, path: str | os.PathLike[str]) -> int:
        """Check the whole export file, then write its entries into `run_id` (overwriting). Returns the count."""
        count = read_export_file(path, check_only=True)
        total = 0
        for chunk in _file_chunks(path):
            total += (await self._call(_Api.put(run_id, chunk, True))).written
        assert total == count, f"wrote {total} of {count} entries"
        return total

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> CacheClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class SyncCacheClient:
    """Blocking twin of CacheClient (same methods), for command-line tools and synchronous callers."""

    def __init__(self, base_url: str, *, token: str | None = None, policy: RetryPolicy | None = None):
        self.http = ServiceClient(base_url, policy, token=token)

    @classmethod
    def from_config(cls, config: RunConfig) -> SyncCacheClient:
        return cls(_base_url(config), token=_token(config), policy=RetryPolicy.from_config(config.services))

    def _call(self, call: _Call) -> Any:
        return call.parse(self.http.request(call.method, call.path, phase=call.phase, **call.kwargs()))

    def put_entries(
        self, run_id: str, entries: Sequence[PutEntry], *, overwrite: bool = True
    ) -> PutEntriesResponse:
        return _merge_puts([self._call(_Api.put(run_id, c, overwrite)) for c in _put_chunks(entries)])

    def read_entries(self, run_id: str, question_ids: Sequence[str]) -> list[CacheEntry | None]:
        return self._call(_Api.read(run_id, question_ids)).entries

    def prefixes(
        self,
        run_id: str,
        question_ids: Sequence[str],
        truncation_limit: TruncationLimit,
        *,
        seed: int | None = None,
    ) -> list[PrefixResult]:
        return self._call(_Api.prefixes(run_id, question_ids, truncation_limit, seed)).results

    def update(
        self,
        run_id: str,
        step: int,
        groups: Sequence[GroupUpdate],
        *,
        epsilon: float,
        only_correct: bool = False,
        seed: int | None = None,
    ) -> list[UpdateResult]:
        return self._call(_Api.update(run_id, step, groups, epsilon, only_correct, seed)).results

    def stats(self, run_id: str) -> RunStats:
        return self._call(_Api.stats(run_id))

    def delete_run(self, run_id: str) -> int:
        return self._call(_Api.delete(run_id)).deleted_keys

    def ready(self) -> bool:
        try:
            response = self.http._http.get(self.http.base_urls[0] + "/readyz", timeout=5.0)
        except httpx.TransportError:
            return False
        return response.status_code == 200

    def export_run(self, run_id: str, path: str | os.PathLike[str]) -> int:
        target = Path(path)
        partial = target.with_name(target.name + ".partial")
        with self.http.stream("GET", f"{_runs(run_id)}/export", phase="cache.export") as response:
            with partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        return _finish_export(partial, target)

    def import_file(self, run_id: str, path: str | os.PathLike[str]) -> int:
        count = read_export_file(path, check_only=True)
        total = sum(self._call(_Api.put(run_id, chunk, True)).written for chunk in _file_chunks(path))
        assert total == count, f"wrote {total} of {count} entries"
        return total

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SyncCacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -------------------------------------------------------------------------------------------------------------
# Export files


def _finish_export(partial: Path, target: Path) -> int:
    try:
        count = read_export_file(partial, check_only=True)
    except ExportFileError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    return count


def _iter_export_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, BaseModel]]:
    """(line number, model) for every line; the first is the header, the last the trailer."""
    name = str(path)
    entries = 0
    trailer: ExportTrailer | None = None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if trailer is not None:
                raise ExportFileError(f"{name}, line {number}: content after the trailer line")
            try:
                if number == 1:
                    yield number, ExportHeader.model_validate_json(raw)
                    continue
                data = json.loads(raw)
                if isinstance(data, dict) and "end" in data:
                    trailer = ExportTrailer.model_validate(data)
                    if trailer.count != entries:
                        raise ExportFileError(
                            f"{name}, line {number}: trailer says {trailer.count} entries, file has {entries}"
                        )
                    yield number, trailer
                    continue
                entry = CacheEntry.model_validate(data)
            except (ValidationError, ValueError) as exc:
                if isinstance(exc, ExportFileError):
                    raise
                what = "header" if number == 1 else "entry"
                raise ExportFileError(f"{name}, line {number}: not a valid export {what}: {exc}") from None
            entries += 1
            yield number, entry
    if trailer is None:
        raise ExportFileError(f"{name}: no trailer line; the export was cut short")


def read_export_file(path: str | os.PathLike[str], check_only: bool = False) -> Any:
    """Check an export file from end to end (header, every entry, unique question ids, trailer count).

    Returns the number of entries (check_only) or (header, entries)."""
    header: ExportHeader | None = None
    entries: list[CacheEntry] = []
    seen: set[str] = set()
    count = 0
    for number, item in _iter_export_lines(path):
        if isinstance(item, ExportHeader):
            header = item
        elif isinstance(item, CacheEntry):
            if item.question_id in seen:
                raise ExportFileError(f"{path}, line {number}: question {item.question_id!r} appears twice")
            seen.add(item.question_id)
            count += 1
            if not check_only:
                entries.append(item)
    if header is None:
        raise ExportFileError(f"{path}: empty file")
    return count if check_only else (header, entries)


def _file_chunks(path: str | os.PathLike[str]) -> Iterator[list[PutEntry]]:
    entries = (item.to_put() for _, item in _iter_export_lines(path) if isinstance(item, CacheEntry))
    yield from _put_chunks(entries)
