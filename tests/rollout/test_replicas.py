"""Two replicas: both are found, a late one refuses rollouts that need the current policy until it has been
pushed the current weights, and one push brings both to the same version and the same outputs. Last, the
late replica's engine is killed: requests get 503 while the process keeps answering."""

from __future__ import annotations

import socket

import httpx
import psutil
import pytest
from rollout_helpers import FAST, PROMPTS, generate, greedy, hf_greedy, random_weights, version_of

from services.core.clients.rollout import discover_replicas, resolve_dns_replicas
from services.core.config import load_config
from services.core.schemas.rollout import GenerateRequest
from trainer.weight_push import WeightPushError, push_to_all

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


def test_an_engine_that_dies_gives_503_and_the_process_keeps_answering(late_replica):
    server = late_replica
    assert generate(server.url, GenerateRequest(prompts=[[40, 41]], max_tokens=4)).results
    cores = [
        p for p in psutil.Process(server.process.pid).children(recursive=True) if "EngineCore" in p.name()
    ]
    assert cores, "no vLLM engine core process found"
    for core in cores:
        core.kill()
    psutil.wait_procs(cores, timeout=10)
    reply = httpx.post(server.url + "/v1/generate", json={"prompts": [[40, 41]], "max_tokens": 4}, timeout=60)
    assert reply.status_code == 503 and "engine" in reply.json()["error"]["message"], reply.text
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 503
    assert server.process.poll() is None, "the replica process died with its engine"
