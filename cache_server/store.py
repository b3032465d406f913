"""The experience cache's Redis logic, as a plain class that knows nothing of HTTP.

Guarantees:
- a bulk put is applied atomically (one Lua script): every entry written or skipped, or none;
- an epsilon-greedy update is applied at most once per (run, step, question): the outcome is recorded in the
  step's marker hash inside the same script, and a replay returns the recorded outcome and changes nothing;
- every key of a run lives under `<prefix>:{<run_id>}:` (one Redis Cluster slot), so runs share one Redis;
- token ids stay packed (uint32 LE) from the wire to Redis and back; the truncation draw uses
  services.core.algorithm; a request with a seed gets the same draws whatever its batch order;
- Redis unreachable, loading or read-only raises `Unavailable` (503 with Retry-After), nothing else is hidden.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import redis.asyncio as aredis
from redis import exceptions as rexc

from services.core.algorithm import draw_truncation, prefix_length, select_for_cache, truncation_limit
from services.core.errors import InvalidInput, Unavailable
from services.core.schemas.cache import (
    CacheEntry,
    PrefixRequest,
    PrefixResponse,
    PrefixResult,
    PutEntriesRequest,
    PutEntriesResponse,
    UpdateRequest,
    UpdateResponse,
    UpdateResult,
)
from services.core.schemas.common import TOKEN_ID_BYTES

_LUA_DIR = Path(__file__).resolve().parent / "lua"
_UNAVAILABLE_REPLIES = ("LOADING", "MASTERDOWN", "READONLY", "CLUSTERDOWN", "TRYAGAIN")


def load_script(name: str) -> str:
    """The text of `cache_server/lua/<name>.lua`."""
    return (_LUA_DIR / f"{name}.lua").read_text()


class Keys:
    """Key layout of one run (docs/cache.md). The `{run_id}` hash tag keeps a run in one cluster slot."""

    def __init__(self, prefix: str, run_id: str):
        self.base = f"{prefix}:{{{run_id}}}"
        self.index = f"{self.base}:ids"
        """Set of the run's question ids that have an entry."""
        self.pattern = f"{self.base}:*"
        """Matches every key of the run (for deletion)."""

    def entry(self, question_id: str) -> str:
        return f"{self.base}:e:{question_id}"

    def marker(self, step: int) -> str:
        return f"{self.base}:u:{step}"

    @property
    def marker_pattern(self) -> str:
        """Matches the markers of every step whose updates were applied."""
        return f"{self.base}:u:*"


def _opt_int(value: bytes | None) -> int | None:
    return None if value is None else int(value)


class CacheStore:
    """Cache operations of every run over one Redis connection pool."""

    def __init__(
        self,
        redis: aredis.Redis,
        *,
        key_prefix: str = "rpo",
        marker_ttl_seconds: int = 7 * 86400,
        max_batch_questions: int = 4096,
        max_tokens_per_entry: int = 65536,
        retry_after_seconds: float = 2.0,
    ):
        self.redis = redis
        self.key_prefix = key_prefix
        self.marker_ttl_seconds = marker_ttl_seconds
        self.max_batch_questions = max_batch_questions
        self.max_tokens_per_entry = max_tokens_per_entry
        self.retry_after_seconds = retry_after_seconds
        self._put_script = redis.register_script(load_script("put_entries"))
        self._update_script = redis.register_script(load_script("update"))
        self._read_prefixes_script = redis.register_script(load_script("read_prefixes"))
        self._rng = random.Random()
        self.runs_seen: set[str] = set()
        """Runs this process has served (the entries gauge sums their sizes)."""

    def keys(self, run_id: str) -> Keys:
        self.runs_seen.add(run_id)
        return Keys(self.key_prefix, run_id)

    @contextlib.contextmanager
    def _redis_errors(self) -> Iterator[None]:
        """Redis down (or not serving yet) -> Unavailable; other Redis errors propagate as they are."""
        try:
            yield
        except (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError) as exc:
            raise Unavailable(
                f"Redis unreachable: {type(exc).__name__}", retry_after_seconds=self.retry_after_seconds
            ) from exc
        except rexc.ResponseError as exc:
            if str(exc).startswith(_UNAVAILABLE_REPLIES):
                raise Unavailable(
                    f"Redis not serving: {str(exc).split(' ', 1)[0]}",
                    retry_after_seconds=self.retry_after_seconds,
                ) from exc
            raise

    def _check_batch(self, n: int, field: str) -> None:
        if n > self.max_batch_questions:
            raise InvalidInput(
                f"{n} questions in one request; this server takes at most {self.max_batch_questions}",
                field=field,
            )

    def _check_tokens(self, n_tokens: int, field: str) -> None:
        if n_tokens > self.max_tokens_per_entry:
            raise InvalidInput(
                f"{n_tokens} token ids; an entry holds at most {self.max_tokens_per_entry}", field=field
            )

    # ------------------------------------------------------------------------------------------------
    # Health

    async def ping(self) -> None:
        with self._redis_errors():
            await self.redis.ping()

    # ------------------------------------------------------------------------------------------------
    # Bulk put and read-back

    async def put_entries(self, run_id: str, request: PutEntriesRequest) -> PutEntriesResponse:
        self._check_batch(len(request.entries), "entries")
        for i, entry in enumerate(request.entries):
            self._check_tokens(len(entry.token_ids) // TOKEN_ID_BYTES, f"entries.{i}.token_ids")
        keys = self.keys(run_id)
        args: list[bytes | str | int | float] = ["1" if request.overwrite else "0", repr(time.time())]
        for e in request.entries:
            args += [
                e.question_id,
                e.token_ids,
                len(e.token_ids) // TOKEN_ID_BYTES,
                repr(e.reward),
                int(e.correct),
                e.policy_version,
                "" if e.last_group_min_len is None else e.last_group_min_len,
                "" if e.created_at is None else repr(e.created_at),
                "" if e.updated_at is None else repr(e.updated_at),
                e.update_count,
                "" if e.last_step is None else e.last_step,
            ]
        with self._redis_errors():
            written = await self._put_script(
                keys=[keys.index, *(keys.entry(e.question_id) for e in request.entries)], args=args
            )
        skipped = [e.question_id for e, w in zip(request.entries, written, strict=True) if not w]
        return PutEntriesResponse(written=len(request.entries) - len(skipped), skipped_question_ids=skipped)

    async def read_entries(self, run_id: str, question_ids: list[str]) -> list[CacheEntry | None]:
        self._check_batch(len(question_ids), "question_ids")
        keys = self.keys(run_id)
        with self._redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            for q in question_ids:
                pipe.hgetall(keys.entry(q))
            rows = await pipe.execute()
        return [_entry(q, row) if row else None for q, row in zip(question_ids, rows, strict=True)]

    # ------------------------------------------------------------------------------------------------
    # Prefix retrieval

    async def prefixes(self, run_id: str, request: PrefixRequest) -> PrefixResponse:
        """Draw m per question (services.core.algorithm) and cut it from the end of the cached answer."""
        self._check_batch(len(request.question_ids), "question_ids")
        keys = self.keys(run_id)
        with self._redis_errors():
            rows = await self._read_prefixes_script(keys=[keys.entry(q) for q in request.question_ids])
        results = []
        spec, seed = request.truncation_limit, request.seed
        for q, (packed, version, lgml) in zip(request.question_ids, rows, strict=True):
            if packed is None:
                results.append(
                    PrefixResult.model_construct(
                        question_id=q,
                        hit=False,
                        prefix_ids=b"",
                        m=0,
                        limit=0,
                        answer_len=0,
                        policy_version=None,
                    )
                )
                continue
            n = len(packed) // TOKEN_ID_BYTES
            rng = random.Random(f"rpo-prefix:{seed}:{q}") if seed is not None else self._rng
            limit = truncation_limit(spec, _opt_int(lgml), n)
            m = draw_truncation(limit, rng)
            results.append(
                PrefixResult.model_construct(
                    question_id=q,
                    hit=True,
                    prefix_ids=packed[: prefix_length(n, m) * TOKEN_ID_BYTES],
                    m=m,
                    limit=limit,
                    answer_len=n,
                    policy_version=int(version),
                )
            )
        return PrefixResponse.model_construct(results=results)

    # ------------------------------------------------------------------------------------------------
    # Epsilon-greedy update

    async def update(self, run_id: str, request: UpdateRequest) -> UpdateResponse:
        """Choose per group with services.core.algorithm.select_for_cache, apply all groups in one script."""
        self._check_batch(len(request.groups), "groups")
        keys = self.keys(run_id)
        args: list[bytes | str | int] = [repr(time.time()), self.marker_ttl_seconds, request.step]
        for gi, group in enumerate(request.groups):
            longest = max(len(c.suffix_ids) for c in group.candidates)
            if (len(group.prefix_ids) + longest) // TOKEN_ID_BYTES > self.max_tokens_per_entry:
                ci = next(i for i, c in enumerate(group.candidates) if len(c.suffix_ids) == longest)
                self._check_tokens(group.response_len(ci), f"groups.{gi}.candidates.{ci}.suffix_ids")
            if request.seed is not None:
                rng = random.Random(f"rpo-update:{request.seed}:{request.step}:{group.question_id}")
            else:
                rng = self._rng
            chosen = select_for_cache(
                [c.reward for c in group.candidates],
                [c.correct for c in group.candidates],
                request.epsilon,
                rng,
                only_correct=request.only_correct,
            )
            if chosen is None:
                args += [group.question_id, "none", "", "", 0, "0", 0, group.policy_version]
            else:
                c = group.candidates[chosen.index]
                ids = group.prefix_ids + c.suffix_ids
                args += [
                    group.question_id,
                    chosen.choice,
                    chosen.index,
                    ids,
                    len(ids) // TOKEN_ID_BYTES,
                    repr(c.reward),
                    int(c.correct),
                    group.policy_version,
                ]
            args.append(group.group_min_len())
        with self._redis_errors():
            outcomes = await self._update_script(
                keys=[
                    keys.index,
                    keys.marker(request.step),
                    *(keys.entry(g.question_id) for g in request.groups),
                ],
                args=args,
            )
        results = []
        for group, outcome in zip(request.groups, outcomes, strict=True):
            applied, choice, index = outcome.decode().split(":")
            results.append(
                UpdateResult(
                    question_id=group.question_id,
                    index=int(index) if index else None,
                    choice=choice,
                    applied=applied == "1",
                )
            )
        return UpdateResponse(step=request.step, results=results)

    # ------------------------------------------------------------------------------------------------
    # Run-level operations

    async def count(self, run_id: str) -> int:
        with self._redis_errors():
            return int(await self.redis.scard(self.keys(run_id).index))

    async def trained_steps(self, run_id: str) -> int:
        """Training steps whose cache updates this run holds (their idempotency markers, kept for
        `update_marker_ttl_seconds`): a run id that a trainer has already used has some."""
        keys = self.keys(run_id)
        with self._redis_errors():
            n = 0
            async for _ in self.redis.scan_iter(match=keys.marker_pattern, count=1000):
                n += 1
            return n

    async def entries_total(self) -> int:
        """Entries of every run this process has served."""
        runs = sorted(self.runs_seen)
        if not runs:
            return 0
        with self._redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            for run in runs:
                pipe.scard(Keys(self.key_prefix, run).index)
            return sum(int(n) for n in await pipe.execute())

    async def delete_run(self, run_id: str, batch: int = 500) -> int:
        """Remove every key of the run (SCAN, not KEYS; UNLINK in batches). Returns the number removed."""
        keys = self.keys(run_id)
        deleted = 0
        with self._redis_errors():
            pending: list[bytes] = []
            async for key in self.redis.scan_iter(match=keys.pattern, count=1000):
                pending.append(key)
                if len(pending) >= batch:
                    deleted += int(await self.redis.unlink(*pending))
                    pending = []
            if pending:
                deleted += int(await self.redis.unlink(*pending))
        self.runs_seen.discard(run_id)
        return deleted

    async def iter_entries(self, run_id: str, chunk: int = 256) -> AsyncIterator[list[CacheEntry]]:
        """Every entry of the run, in chunks (SSCAN over the run's index; each question at most once).

        Not a snapshot: an entry updated during the walk may appear in either state. Export between steps.
        """
        keys = self.keys(run_id)
        seen: set[bytes] = set()
        pending: list[bytes] = []
        with self._redis_errors():
            async for qid in self.redis.sscan_iter(keys.index, count=chunk):
                if qid in seen:
                    continue
                seen.add(qid)
                pending.append(qid)
                if len(pending) >= chunk:
                    yield await self._fetch(keys, pending)
                    pending = []
            if pending:
                yield await self._fetch(keys, pending)

    async def _fetch(self, keys: Keys, qids: list[bytes]) -> list[CacheEntry]:
        pipe = self.redis.pipeline(transaction=False)
        names = [q.decode() for q in qids]
        for q in names:
            pipe.hgetall(keys.entry(q))
        rows = await pipe.execute()
        return [_entry(q, row) for q, row in zip(names, rows, strict=True) if row]


def _entry(question_id: str, row: dict[bytes, bytes]) -> CacheEntry:
    packed = row[b"ids"]
    return CacheEntry(
        question_id=question_id,
        token_ids=packed,
        length=len(packed) // TOKEN_ID_BYTES,
        reward=float(row[b"reward"]),
        correct=row[b"correct"] == b"1",
        policy_version=int(row[b"version"]),
        last_group_min_len=_opt_int(row.get(b"lgml")),
        created_at=float(row[b"created"]),
        updated_at=float(row[b"updated"]),
        update_count=int(row.get(b"updates", b"0")),
        last_step=_opt_int(row.get(b"step")),
    )
