"""The cache service's FastAPI application: `create_app(config)`.

The lifespan owns the Redis connection pool (created on start-up, closed on exit). The service starts even
when Redis is down: /readyz and every cache route answer 503 with Retry-After until it is back, and the
pool reconnects by itself (no restart).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aredis
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from cache_server.metrics import CacheMetrics
from cache_server.routes import router
from cache_server.store import CacheStore
from services.core.config import RunConfig
from services.core.errors import ServiceError
from services.core.server_kit import install_common

log = logging.getLogger("rpo.cache")


def redis_pool(url: str, *, max_connections: int, timeout_seconds: float) -> aredis.Redis:
    """An asyncio Redis client with a bounded pool and timeouts; one quick retry covers a stale connection
    after Redis restarted, and an unreachable Redis fails fast (the route answers 503)."""
    return aredis.Redis.from_url(
        url,
        max_connections=max_connections,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
        health_check_interval=30,
    )


def create_app(config: RunConfig, *, redis_url: str | None = None) -> FastAPI:
    """The app over the Redis at `redis_url` (default `services.redis_url`; one of them must be set:
    `rpo serve cache` starts the embedded server first when neither is)."""
    url = redis_url or config.services.redis_url
    if not url:
        raise ValueError("no Redis URL: set services.redis_url, or start the embedded server first")
    settings = config.cache_server

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis_pool(
            url,
            max_connections=settings.redis_max_connections,
            timeout_seconds=settings.redis_timeout_seconds,
        )
        app.state.store = CacheStore(
            client,
            key_prefix=settings.key_prefix,
            marker_ttl_seconds=settings.update_marker_ttl_seconds,
            max_batch_questions=settings.max_batch_questions,
            max_tokens_per_entry=settings.max_tokens_per_entry,
            retry_after_seconds=settings.retry_after_seconds,
        )
        app.state.store.runs_seen.add(config.services.run_id)  # the entries gauge shows it from the start
        try:
            await app.state.store.ping()
            log.info("cache server ready on Redis %s", _redact(url))
        except ServiceError:
            log.warning("Redis %s does not answer yet; serving 503 until it does", _redact(url))
        try:
            yield
        finally:
            await client.aclose()

    app = FastAPI(
        title="rpo cache server",
        version="1",
        description="The RPO experience cache: one answer per (run, question), truncated prefixes, "
        "epsilon-greedy updates (see docs/api.md).",
        lifespan=lifespan,
    )
    registry = CollectorRegistry()
    app.state.cache_metrics = metrics = CacheMetrics(registry)

    async def readiness() -> None:
        await app.state.store.ping()

    async def refresh_gauges() -> None:
        metrics.entries.set(await app.state.store.entries_total())

    install_common(
        app,
        registry=registry,
        readiness=readiness,
        api_token=config.services.api_token,
        max_body_bytes=settings.max_body_bytes,
        before_metrics=refresh_gauges,
    )
    app.include_router(router)
    return app


def _redact(url: str) -> str:
    """The URL without a password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
