"""Auth everywhere it matters, on a real replica started with a token: every mutating route of the API and
the weight port refuse a missing or wrong token (401) before reading a body, and the token never appears
in an error body, the replica's log, or what `rpo config show` prints."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

TOKEN = "replica-secret-7f3a9c"
QUESTION = {"id": "q1", "prompt_ids": [40, 41, 42], "reference": "3"}
BAD_HEADERS = [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
]


@pytest.fixture(scope="module")
def guarded(tiny_model_dir, rollout_server_factory):
    server = rollout_server_factory(tiny_model_dir, overrides=[f"services.api_token={TOKEN}"])
    yield server
    server.stop()


def _routes(server) -> list[tuple[str, str, dict]]:
    weight_port = httpx.get(server.url + "/v1/weights/version", timeout=10).json()["weight_port"]
    plane = f"http://127.0.0.1:{weight_port}"
    return [
        ("POST", server.url + "/v1/rollouts", {"json": {"questions": [QUESTION], "mode": "full"}}),
        ("POST", server.url + "/v1/weights/nccl/init", {"json": {"init_info": {}}}),
        ("POST", server.url + "/v1/weights/nccl/start", {"json": {"version": 1}}),
        ("POST", server.url + "/v1/weights/nccl/update", {"json": {"version": 1, "update_info": {}}}),
        ("POST", server.url + "/v1/weights/nccl/finish", {"json": {"version": 1}}),
        ("POST", server.url + "/v1/engine/sleep", {"json": {"level": 1}}),
        ("POST", server.url + "/v1/engine/wake", {}),
        (
            "PUT",
            plane + "/v1/weights/1",
            {"content": b"\0" * 64, "headers": {"Content-Type": "application/octet-stream"}},
        ),
    ]


def test_every_mutating_route_refuses_a_missing_or_wrong_token(guarded):
    for method, url, kwargs in _routes(guarded):
        for headers in BAD_HEADERS:
            sent = {**kwargs, "headers": {**kwargs.get("headers", {}), **headers}}
            r = httpx.request(method, url, timeout=30, **sent)
            assert r.status_code == 401, (method, url, headers, r.status_code, r.text)
            assert r.json()["error"]["type"] == "unauthorized" and TOKEN not in r.text
        # with the token the same request gets past auth (to whatever the route answers next)
        sent = {**kwargs, "headers": {**kwargs.get("headers", {}), "Authorization": f"Bearer {TOKEN}"}}
        r = httpx.request(method, url, timeout=120, **sent)
        assert r.status_code != 401, (method, url, r.text)
        assert TOKEN not in r.text
    assert (
        httpx.get(guarded.url + "/v1/weights/version", timeout=10).json()["policy_version"] == 0
    )  # nothing applied
    log = guarded.log_path.read_text(errors="replace")
    assert TOKEN not in log, "the token leaked into the replica's log"


def test_the_token_never_appears_in_the_resolved_config():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_")}
    for args, extra_env in (
        (["--set", f"services.api_token={TOKEN}"], {}),
        ([], {"RPO_API_TOKEN": TOKEN}),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "services.cli", "config", "show", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, **extra_env},
        )
        assert out.returncode == 0, out.stderr
        assert "api_token" in out.stdout and TOKEN not in out.stdout + out.stderr
