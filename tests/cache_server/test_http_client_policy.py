"""The one client retry policy (services.core.http_client) against a real local server: retries transport
errors and 5xx (honouring Retry-After), never 4xx, rotates over base URLs, bounds attempts and total time,
and names the URL and phase when it gives up."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from cache_server.embedded import free_port
from services.core.errors import Conflict, Unavailable
from services.core.http_client import (
    AsyncServiceClient,
    RetryPolicy,
    ServiceCallError,
    ServiceClient,
    ServiceHTTPError,
)
from services.core.server_kit import install_common, serve_in_thread

calls: Counter[str] = Counter()


def make_app() -> FastAPI:
    app = FastAPI()

    async def ready() -> None:
        return None

    install_common(app, registry=CollectorRegistry(), readiness=ready, api_token=None, max_body_bytes=2**20)

    @app.get("/flaky/{key}/{failures}")
    async def flaky(key: str, failures: int) -> dict:
        calls[key] += 1
        if calls[key] <= failures:
            raise Unavailable("warming up", retry_after_seconds=0.2)
        return {"attempt": calls[key]}

    @app.get("/conflict/{key}")
    async def conflict(key: str) -> dict:
        calls[key] += 1
        raise Conflict("weights are being updated", field="policy_version")

    @app.get("/hang/{seconds}")
    async def hang(seconds: float) -> dict:
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    @app.get("/slow/{key}")
    async def slow(key: str) -> dict:
        calls[key] += 1
        await asyncio.sleep(1)
        return {}

    return app


@pytest.fixture(scope="module")
def server_url():
    with serve_in_thread(make_app()) as url:
        yield url


POLICY = RetryPolicy(
    connect_timeout_seconds=1,
    read_timeout_seconds=5,
    max_attempts=3,
    max_total_seconds=10,
    backoff_seconds=0.01,
)


async def test_5xx_is_retried_and_retry_after_is_honoured(server_url):
    async with AsyncServiceClient(server_url, POLICY) as client:
        start = time.monotonic()
        r = await client.request("GET", "/flaky/a/2", phase="test.flaky")
        assert r.json() == {"attempt": 3}
        # Two waits of at least Retry-After (rounded up to whole seconds on the wire: 1 s each).
        assert time.monotonic() - start >= 2.0


def test_retries_give_up_after_max_attempts_naming_url_and_phase(server_url):
    policy = RetryPolicy(max_attempts=2, backoff_seconds=0.01, max_total_seconds=10)
    with ServiceClient(server_url, policy) as client:
        with pytest.raises(ServiceCallError) as failure:
            client.request("GET", "/flaky/b/5", phase="test.give_up")
    assert calls["b"] == 2
    message = str(failure.value)
    assert server_url in message and "test.give_up" in message and "2 attempt" in message
    assert failure.value.status == 503


async def test_4xx_is_never_retried_and_carries_the_server_message(server_url):
    async with AsyncServiceClient(server_url, POLICY) as client:
        with pytest.raises(ServiceHTTPError) as failure:
            await client.request("GET", "/conflict/c", phase="test.conflict")
    assert calls["c"] == 1
    err = failure.value
    assert (err.status, err.error_type, err.field) == (409, "conflict", "policy_version")
    assert "weights are being updated" in str(err) and "test.conflict" in str(err)


async def test_a_dead_replica_is_skipped_for_the_next_one(server_url):
    dead = f"http://127.0.0.1:{free_port()}"
    async with AsyncServiceClient([dead, server_url], POLICY) as client:
        for _ in range(
            4
        ):  # calls start on alternating replicas; each one that starts on the dead one fails over
            assert (await client.request("GET", "/flaky/d/0", phase="test.rotate")).status_code == 200
    async with AsyncServiceClient([dead], POLICY) as client:
        with pytest.raises(ServiceCallError) as failure:
            await client.request("GET", "/healthz", phase="test.dead")
    assert dead in str(failure.value) and "ConnectError" in str(failure.value)


async def test_read_timeouts_bound_each_attempt_and_the_total(server_url):
    policy = RetryPolicy(
        read_timeout_seconds=0.3, max_attempts=5, max_total_seconds=1.0, backoff_seconds=0.01
    )
    async with AsyncServiceClient(server_url, policy) as client:
        start = time.monotonic()
        with pytest.raises(ServiceCallError) as failure:
            await client.request("GET", "/slow/e", phase="test.slow")
    assert time.monotonic() - start < 1.5
    assert "ReadTimeout" in str(failure.value) and calls["e"] <= 4


def test_a_long_wait_is_named_while_it_lasts(server_url, caplog):
    """No silent waits: past `notice_after_seconds` the call logs its URL and phase, then again at that interval."""
    policy = RetryPolicy(notice_after_seconds=0.5, read_timeout_seconds=30, max_attempts=1)
    with caplog.at_level("WARNING", logger="rpo.client"), ServiceClient(server_url, policy) as client:
        assert client.request("GET", "/hang/1.9", phase="weight push v7").json() == {"slept": 1.9}
    notices = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert 2 <= len(notices) <= 4, notices
    assert notices[0].startswith(f"weight push v7: still waiting on {server_url}/hang/1.9 after ")
    caplog.clear()

    async def call() -> dict:
        async with AsyncServiceClient(server_url, policy) as client:
            return (await client.request("GET", "/hang/1.2", phase="rollout (step 3)")).json()

    with caplog.at_level("WARNING", logger="rpo.client"):
        assert asyncio.run(call()) == {"slept": 1.2}
        quick = RetryPolicy(notice_after_seconds=5)
        with ServiceClient(server_url, quick) as client:  # a call shorter than the notice: nothing logged
            client.request("GET", "/hang/0.2", phase="quick")
    notices = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert notices and all("rollout (step 3): still waiting" in n for n in notices)
