"""Fixtures of the cache server tests: the real Redis on 127.0.0.1:6379 (each test in its own run
namespace, removed afterwards), the real app served by uvicorn on a free loopback port, and real clients.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from cache_helpers import FAST_RETRIES, REDIS_URL, TOKEN, make_config, run_keys

from cache_server.app import create_app
from services.core.clients.cache import CacheClient, SyncCacheClient
from services.core.server_kit import serve_in_thread


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"these tests need Redis on 127.0.0.1:6379 (python scripts/ensure_redis.py): {exc}")
    yield client
    client.close()


@pytest.fixture
def run_id(redis_client: redis.Redis) -> Iterator[str]:
    """A fresh run namespace; every key under it is removed after the test."""
    rid = f"t-{uuid.uuid4().hex[:12]}"
    yield rid
    keys = run_keys(redis_client, rid)
    if keys:
        redis_client.unlink(*keys)


@pytest.fixture(scope="session")
def cache_url(redis_client: redis.Redis) -> Iterator[str]:
    """The real app under uvicorn on a free port, over the shared Redis, with a bearer token configured."""
    with serve_in_thread(create_app(make_config(), redis_url=REDIS_URL)) as url:
        yield url


@pytest.fixture
async def cache(cache_url: str):
    async with CacheClient(cache_url, token=TOKEN, policy=FAST_RETRIES) as client:
        yield client


@pytest.fixture
def sync_cache(cache_url: str) -> Iterator[SyncCacheClient]:
    with SyncCacheClient(cache_url, token=TOKEN, policy=FAST_RETRIES) as client:
        yield client
