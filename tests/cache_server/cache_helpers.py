"""Constants and builders shared by the cache server tests (fixtures live in conftest.py)."""

from __future__ import annotations

import subprocess
import time

import redis

from cache_server.embedded import find_server_binary
from services.core.config import RunConfig, load_config
from services.core.http_client import RetryPolicy
from services.core.schemas.cache import GroupUpdate, PutEntry, UpdateCandidate

REDIS_URL = "redis://127.0.0.1:6379/0"
TOKEN = "test-token-0123456789"
MAX_BODY_BYTES = 4 * 2**20
FAST_RETRIES = RetryPolicy(
    connect_timeout_seconds=2,
    read_timeout_seconds=10,
    max_attempts=2,
    max_total_seconds=20,
    backoff_seconds=0.05,
)


def make_config(*overrides: str) -> RunConfig:
    base = [
        f"services.api_token={TOKEN}",
        f"cache_server.max_body_bytes={MAX_BODY_BYTES}",
        "cache_server.redis_timeout_seconds=1",
        "cache_server.retry_after_seconds=1",
    ]
    return load_config(None, [*base, *overrides])


def run_keys(r: redis.Redis, run_id: str) -> list[bytes]:
    return list(r.scan_iter(match=f"rpo:{{{run_id}}}:*", count=1000))


def entry(qid: str, ids: list[int], **kw) -> PutEntry:
    return PutEntry(question_id=qid, token_ids=ids, **kw)


def group(qid: str, rewards: list[float], correct: list[bool] | None = None, prefix=(), version=1, **kw):
    """A group whose candidate i has suffix [100 + i] (so the stored answer tells which one was chosen)."""
    correct = correct if correct is not None else [r > 0 for r in rewards]
    candidates = [
        UpdateCandidate(suffix_ids=[100 + i], reward=r, correct=c)
        for i, (r, c) in enumerate(zip(rewards, correct, strict=True))
    ]
    return GroupUpdate(
        question_id=qid, prefix_ids=list(prefix), candidates=candidates, policy_version=version, **kw
    )


def start_redis_server(port: int, data_dir) -> subprocess.Popen:
    """A bare `redis-server` (or Valkey) on `port` (AOF in data_dir), waited for until it answers."""
    proc = subprocess.Popen(
        [find_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes", "--dir", str(data_dir),
         "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    for _ in range(200):
        try:
            if client.ping():
                return proc
        except redis.RedisError:
            time.sleep(0.025)
    proc.kill()
    raise RuntimeError(f"redis-server did not answer on port {port}")


def stop_redis_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=15)
