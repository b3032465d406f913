"""Hostile input, generated, against a real replica: schemathesis builds requests from the replica's own
OpenAPI document. Routes that decode (`/v1/generate`, `/v1/rollouts`) get invalid requests only (a valid one
may ask for a thousand samples of a thousand tokens; the valid space is covered by the other tests); every
other route gets valid and invalid ones. No answer may be a 5xx other than a documented 503 with
Retry-After; a refused request changes nothing: the served version stays, and the cache of the run it
names is untouched."""

from __future__ import annotations

import itertools

import httpx
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

DECODING = {"/v1/generate", "/v1/rollouts"}
REDIS_URL = "redis://127.0.0.1:6379/0"


def _run_keys(client: redis.Redis, body: object) -> dict[bytes, bytes]:
    run_id = body.get("run_id") if isinstance(body, dict) else None
    if not isinstance(run_id, str) or not run_id:
        return {}
    pattern = "rpo:{" + "".join(f"[{c}]" if c in "*?[]\\" else c for c in run_id) + "}:*"
    return {key: client.dump(key) or b"" for key in client.scan_iter(match=pattern, count=1000)}


def test_no_5xx_and_a_refused_request_changes_nothing(rollout_server):
    url = rollout_server.url
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= DECODING
    version = httpx.get(url + "/v1/weights/version", timeout=10).json()["policy_version"]
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        for operation, mode in itertools.product(operations, GenerationMode):
            if operation.path in DECODING and mode == GenerationMode.POSITIVE:
                continue

            @given(case=operation.as_strategy(mode))
            @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def check(case):
                before = _run_keys(client, case.body)
                response = case.call(base_url=url, timeout=60, allow_redirects=False)
                status = response.status_code
                where = (case.method, case.formatted_path, status, response.text[:300])
                assert status < 500 or (status == 503 and "retry-after" in response.headers), where
                if 400 <= status < 500:
                    assert _run_keys(client, case.body) == before, where
                    assert set(response.json()) == {"error"}, where

            try:
                check()
            except Unsatisfiable:  # a route without inputs has no invalid request to build
                assert mode == GenerationMode.NEGATIVE, operation.label
    finally:
        client.close()
    served = httpx.get(url + "/v1/weights/version", timeout=10).json()["policy_version"]
    assert served == version  # nothing the fuzzer sent became weights
