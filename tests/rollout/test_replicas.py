"""Two replicas: both are found, a late one refuses rollouts that need the current policy until it has been
pushed the current weights, and one push brings both to the same version and the same outputs. Last, the
late replica's engine is killed: the replica process shuts down and exits non-zero, naming itself and its
dead engine, so that its supervisor (Docker's restart policy) replaces it."""

from __future__ import annotations

import socket
import subprocess

import httpx
import psutil
import pytest
from rollout_helpers import FAST, PROMPTS, generate, greedy, hf_greedy, random_weights, version_of

from services.core.clients.rollout import discover_replicas, resolve_dns_replicas
from services.core.config import load_config
from services.core.schemas.rollout import GenerateRequest
from services.rollout.server import ENGINE_DIED_EXIT_CODE
from trainer.weights.http_wire import WeightPushError, push_to_all

ENGINE_DEATH_EXIT_SECONDS = 90.0
"""Bound on a replica's exit after its engine died (2 busy cores; the graceful shutdown alone may take 30 s)."""
QUESTION = {"id": "q1", "prompt_ids": [40, 41, 42], "reference": "3"}


def test_static_list_and_dns_discovery(monkeypatch):
    cfg = load_config(None, ["services.rollout_urls=[http://10.0.0.5:8200/, http://10.0.0.6:8200]"])
    assert discover_replicas(cfg) == ["http://10.0.0.5:8200", "http://10.0.0.6:8200"]

    # A real lookup: localhost resolves here to the loopback address.
    cfg = load_config(None, ["services.rollout_discovery=dns://localhost:8200"])
    assert "http://127.0.0.1:8200" in discover_replicas(cfg)
    assert resolve_dns_replicas("dns://no-such-host.invalid:8200") == []

    # What Docker's DNS answers for a scaled service: one record per replica (duplicates per socket type).
    def answer(host, port, *args, **kwargs):
        assert host == "rollout" and port == 8200
        records = ["172.18.0.7", "172.18.0.5", "172.18.0.7", "fd00::3"]
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in records
        ]

    monkeypatch.setattr(socket, "getaddrinfo", answer)
    cfg = load_config(None, ["services.rollout_discovery=dns://rollout:8200"])
    assert discover_replicas(cfg) == [
        "http://172.18.0.5:8200",
        "http://172.18.0.7:8200",
        "http://[fd00::3]:8200",
    ]


@pytest.fixture(scope="module")
def late_replica(tied_replica, rollout_server_factory):
    """A second replica of the same model on another loopback address, started after the first."""
    server = rollout_server_factory(tied_replica.model_dir, host="127.0.0.2")
    yield server
    server.stop()


def test_a_late_replica_refuses_until_pushed_then_both_serve_the_same_version(
    tied_replica, late_replica, tmp_path
):
    a, b = tied_replica, late_replica
    # The trainer's step: replica A serves a newer policy than the late joiner B.
    a.push(random_weights(tmp_path / "step", tied=True, seed=300 + a.version))
    current = a.version
    cfg = load_config(None, [f"services.rollout_urls=[{a.url}, {b.url}]"])
    replicas = discover_replicas(cfg)
    assert replicas == [a.url, b.url]
    assert {url: version_of(url) for url in replicas} == {a.url: current, b.url: 0}

    reply = httpx.post(
        b.url + "/v1/rollouts",
        json={"questions": [QUESTION], "mode": "full", "min_policy_version": current},
        timeout=60,
    )
    assert reply.status_code == 409, reply.text
    assert f"serves policy version 0; this request needs >= {current}" in reply.json()["error"]["message"]

    # The trainer pushes the current weights to every replica that lags (A already serves them).
    results = push_to_all(replicas, current, a.weights, policy=FAST, timeout_seconds=120)
    assert results[a.url].reply is None  # already served: nothing sent again
    assert results[b.url].reply is not None and results[b.url].reply.policy_version == current
    assert {url: version_of(url) for url in replicas} == {a.url: current, b.url: current}

    expected = hf_greedy(a.reference(), PROMPTS, 24)
    assert greedy(a.url) == (current, expected)
    assert greedy(b.url) == (current, expected)
    reply = httpx.post(
        b.url + "/v1/rollouts",
        json={"questions": [QUESTION], "mode": "full", "min_policy_version": current, "reward": "exact"},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["policy_version"] == current


def test_push_to_all_names_the_replica_that_failed_and_its_phase(tied_replica, tmp_path):
    if tied_replica.version == 0:
        tied_replica.push(random_weights(tmp_path / "first", tied=True, seed=400))
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    with pytest.raises(WeightPushError) as caught:
        push_to_all([tied_replica.url, dead], tied_replica.version, tied_replica.weights, policy=FAST)
    assert list(caught.value.failures) == [dead] and caught.value.failures[dead][0] == "connect"
    assert caught.value.succeeded == [tied_replica.url]
    assert f"{dead} [connect]" in str(caught.value)


def test_an_engine_that_dies_ends_the_replica_process_so_that_it_is_replaced(late_replica):
    server = late_replica
    name = server.url.removeprefix("http://")  # the replica's default name: host:port
    assert generate(server.url, GenerateRequest(prompts=[[40, 41]], max_tokens=4)).results
    children = psutil.Process(server.process.pid).children(recursive=True)
    cores = [p for p in children if "EngineCore" in p.name()]
    assert cores, "no vLLM engine core process found"
    for core in cores:
        core.kill()
    psutil.wait_procs(cores, timeout=10)
    # Until it has shut down, a request fails fast (503, or refused once it stopped listening), never a 200.
    try:
        reply = httpx.post(
            server.url + "/v1/generate", json={"prompts": [[40, 41]], "max_tokens": 4}, timeout=60
        )
        assert reply.status_code == 503, reply.text
    except httpx.TransportError:
        pass
    try:  # the watch (1 s), uvicorn's graceful shutdown (at most 30 s), the lifespan's clean-up
        code = server.process.wait(timeout=ENGINE_DEATH_EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the replica still runs {ENGINE_DEATH_EXIT_SECONDS} s after its engine died:\n{server.log_tail()}"
        ) from None
    log = server.log_path.read_text(errors="replace")
    assert code == ENGINE_DIED_EXIT_CODE, f"exit status {code}:\n{server.log_tail()}"
    assert f"replica {name}: the vLLM engine died" in log, server.log_tail()
    assert f"replica {name} exits with status {ENGINE_DIED_EXIT_CODE}: its vLLM engine died" in log
    # it shut down rather than vanished: the processes it had started (reward workers) are gone too
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
