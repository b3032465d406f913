"""Hostile input, generated: schemathesis reads the cache server's own OpenAPI document and sends requests
built from it (valid and invalid, 25 of each per route) to the real server over the real Redis.
No answer may be a 5xx other than the documented 503 (with Retry-After), and a refused request (4xx) must
write nothing. Each request is sent with and without the bearer token."""

from __future__ import annotations

import itertools

import pytest
import redis
import schemathesis
from cache_helpers import TOKEN
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode


def _snapshot(client: redis.Redis, path: str) -> dict[bytes, bytes]:
    """The keys of the run a request names (`/v1/runs/{run_id}/...`), with their serialised values."""
    parts = path.split("/")
    if len(parts) < 4 or parts[:3] != ["", "v1", "runs"]:
        return {}
    pattern = "rpo:{" + "".join(f"[{c}]" if c in "*?[]\\" else c for c in parts[3]) + "}:*"
    return {key: client.dump(key) or b"" for key in sorted(client.scan_iter(match=pattern, count=1000))}


@pytest.fixture(scope="module")
def cache_schema(cache_url, redis_client):
    """The server's OpenAPI document; the runs the fuzzer created are removed afterwards."""
    existing = set(redis_client.scan_iter(match="rpo:*", count=1000))
    yield schemathesis.openapi.from_url(cache_url + "/openapi.json")
    created = set(redis_client.scan_iter(match="rpo:*", count=1000)) - existing
    if created:
        redis_client.unlink(*created)


def test_no_5xx_and_a_refused_request_writes_nothing(cache_schema, cache_url, redis_client):
    operations = [result.ok() for result in cache_schema.get_all_operations()]
    assert len(operations) >= 8  # every route of the document, health and metrics included
    for operation, mode in itertools.product(operations, GenerationMode):  # valid and invalid requests

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
                before = _snapshot(redis_client, case.formatted_path)
                response = case.call(base_url=cache_url, headers=headers, timeout=30)
                status = response.status_code
                where = (case.method, case.formatted_path, status, response.text[:300])
                assert status < 500 or (status == 503 and "retry-after" in response.headers), where
                if 400 <= status < 500:
                    assert _snapshot(redis_client, case.formatted_path) == before, where
                    body = response.json()
                    assert set(body) == {"error"} and {"type", "message", "field"} <= set(body["error"]), (
                        where
                    )
                    assert TOKEN not in response.text

        try:
            check()
        except Unsatisfiable:  # a route without inputs has no invalid request to build
            assert mode == GenerationMode.NEGATIVE, operation.label
