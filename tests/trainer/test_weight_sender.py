"""The trainer's weight sender (trainer/weight_sender.py): the transport chosen once, NCCL's control flow (set
up, send, set up again when the replicas change, fall back to HTTP when it fails) with vLLM's trainer-side
engine replaced at its boundary (the group object), catch-up pushes over HTTP, and the HTTP side against a
real replica (one of the trainer tests' warm-model replicas)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import httpx
import pytest

from services.core.config import load_config
from services.core.http_client import RetryPolicy
from trainer.weight_push import push_to_all
from trainer.weight_sender import PushKind, WeightSender

FAST = RetryPolicy(connect_timeout_seconds=5, read_timeout_seconds=120, max_attempts=1, max_total_seconds=180)


class FakeGroup:
    """Stands where `NcclReplicaGroup` (vLLM's NCCL engine) would: records calls, fails when told to."""

    def __init__(self, log: list, urls: list[str], fail_on: str | None):
        self.log, self.urls, self.fail_on = log, urls, fail_on
        if fail_on == "setup":
            raise RuntimeError("replica http://10.0.0.9:8200 did not join the NCCL group within 600 s")
        log.append(("setup", tuple(urls)))

    def push(self, version: int) -> None:
        if self.fail_on == "send":
            raise RuntimeError("NCCL error: unhandled system error")
        self.log.append(("send", version))

    def close(self) -> None:
        self.log.append(("close", tuple(self.urls)))


def _version(url: str) -> int:
    return httpx.get(url + "/v1/weights/version", timeout=10).json()["policy_version"]


@pytest.fixture
def replica(training_replicas, warm_model_dir):
    """A real replica that takes pushes, what it serves now, and the weights it started from."""
    from safetensors.torch import load_file

    url = training_replicas[0].url
    weights = load_file(str(warm_model_dir / "model.safetensors"))
    return SimpleNamespace(url=url, version=_version(url), weights=weights)


@pytest.fixture
def nccl_cfg():
    return load_config(None, ["rollout.weight_transfer=nccl"])


def test_nccl_group_is_set_up_once_reused_and_set_up_again_when_replicas_change(nccl_cfg):
    calls: list = []
    http: list = []
    sync = WeightSender(
        nccl_cfg,
        lambda replicas, version, reason: http.append((tuple(replicas), version, reason)),
        make_group=lambda urls: FakeGroup(calls, urls, None),
    )
    assert sync.use_nccl
    assert sync.push(["http://b:8200", "http://a:8200"], 1, PushKind.STEP, "step 1") == "nccl"
    assert (
        sync.push(["http://a:8200", "http://b:8200"], 2, PushKind.STEP, "step 2") == "nccl"
    )  # same set, any order
    assert (
        sync.push(["http://a:8200", "http://b:8200", "http://c:8200"], 3, PushKind.STEP, "step 3") == "nccl"
    )  # one joined
    assert sync.push(["http://a:8200"], 4, PushKind.STEP, "step 4") == "nccl"  # two left
    assert sync.push(["http://a:8200"], 4, PushKind.CATCH_UP) == "http"  # a late replica: HTTP, not the group
    sync.close()
    assert calls == [
        ("setup", ("http://a:8200", "http://b:8200")),
        ("send", 1),
        ("send", 2),
        ("close", ("http://a:8200", "http://b:8200")),
        ("setup", ("http://a:8200", "http://b:8200", "http://c:8200")),
        ("send", 3),
        ("close", ("http://a:8200", "http://b:8200", "http://c:8200")),
        ("setup", ("http://a:8200",)),
        ("send", 4),
        ("close", ("http://a:8200",)),
    ]
    assert http == [(("http://a:8200",), 4, "catch up")]


@pytest.mark.parametrize("fail_on", ["setup", "send"])
def test_a_failed_nccl_transfer_falls_back_to_http_on_a_real_replica(nccl_cfg, replica, fail_on, caplog):
    calls: list = []
    attempts: list = []
    version = replica.version + 1

    def http_push(replicas, v, reason):  # the real HTTP push, to the real replica among `replicas`
        push_to_all([u for u in replicas if u == replica.url], v, replica.weights, policy=FAST)

    def make_group(urls):
        attempts.append(tuple(urls))
        return FakeGroup(calls, urls, fail_on)

    sync = WeightSender(nccl_cfg, http_push, make_group=make_group)
    with caplog.at_level(logging.WARNING, logger="rpo.train"):
        assert sync.push([replica.url], version, PushKind.STEP, f"step {version}") == "http"
    replica.version = version
    assert _version(replica.url) == version  # the replica serves the step's weights all the same
    warning = next(r.getMessage() for r in caplog.records if "NCCL weight transfer failed" in r.getMessage())
    assert f"in {fail_on}" in warning and f"version {version} goes over HTTP" in warning
    assert attempts == [(replica.url,)]
    # The same replicas again: straight to HTTP, no second wait on a group that cannot form ...
    assert sync.push([replica.url], version + 1, PushKind.STEP, f"step {version + 1}") == "http"
    replica.version = version + 1
    assert attempts == [(replica.url,)] and _version(replica.url) == version + 1
    # ... until they change, when NCCL is tried again (and fails again here: HTTP once more).
    joined = sorted([replica.url, "http://127.0.0.9:8200"])
    assert sync.push(joined, version + 2, PushKind.STEP, f"step {version + 2}") == "http"
    replica.version = version + 2
    assert attempts == [(replica.url,), tuple(joined)] and _version(replica.url) == version + 2


def test_nccl_needs_one_trainer_process_on_a_gpu(nccl_cfg, caplog):
    http: list = []
    with caplog.at_level(logging.WARNING, logger="rpo.train"):
        sync = WeightSender(nccl_cfg, lambda *a: http.append(a), on_gpu=False)
    assert not sync.use_nccl and "the trainer runs on CPU" in caplog.text
    assert sync.push(["http://a:8200"], 1, PushKind.STEP, "step 1") == "http" and http == [
        (["http://a:8200"], 1, "step 1")
    ]
    assert not WeightSender(nccl_cfg, lambda *a: None, on_gpu=True, world_size=2).use_nccl
    assert not WeightSender(load_config(None, []), lambda *a: None, on_gpu=True).use_nccl  # http configured


def test_with_lora_every_push_goes_over_http_and_the_log_says_why(caplog):
    """The NCCL transfer carries whole models; an adapter goes over HTTP, said once at start."""
    cfg = load_config(None, ["rollout.weight_transfer=nccl", "train.lora.rank=8"])
    calls: list = []
    http: list = []
    with caplog.at_level(logging.WARNING, logger="rpo.train"):
        sender = WeightSender(
            cfg,
            lambda replicas, version, reason: http.append((tuple(replicas), version)),
            make_group=lambda urls: FakeGroup(calls, urls, None),
        )
    assert not sender.use_nccl
    assert "train.lora is on" in caplog.text and "goes over HTTP" in caplog.text
    assert sender.push(["http://a:8200"], 1, PushKind.STEP, "step 1") == "http"
    assert calls == [] and http == [(("http://a:8200",), 1)]
