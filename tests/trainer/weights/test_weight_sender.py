"""The trainer's weight path (trainer/weights/): the transport chosen once, NCCL's control flow (set up, send,
set up again when the replicas change, fall back to HTTP when it fails) with vLLM's trainer-side engine
replaced at its boundary (the group object), catch-up pushes over HTTP, and the real HTTP transport against a
real replica (one of the trainer tests' warm-model replicas).

The transport each push used is said everywhere (step record, log line, Prometheus label): checked with the
real HTTP push, and with the real NCCL group (vLLM's trainer-side engine) failing for real on this CPU-only
machine ("Cannot access accelerator device"), which must read "http_fallback", or stop the run when
`rollout.require_nccl` forbids the fall-back. Each set-up of the group takes a fresh rendezvous port."""

from __future__ import annotations

import logging
import socket
from types import SimpleNamespace

import httpx
import pytest

from services.core.config import ConfigError, load_config
from trainer.telemetry.metrics import TrainerMetrics
from trainer.telemetry.progress import format_step_line
from trainer.telemetry.records import StepRecord
from trainer.weights.http import HttpTransport
from trainer.weights.nccl import NcclTransport
from trainer.weights.sender import PushKind, WeightSender, use_nccl
from trainer.weights.transport import WeightPayload, WeightTransferError


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


class StaticWeights:
    """A `WeightSource` of fixed tensors (the learner's own source is tested with the learner)."""

    def __init__(self, tensors: dict):
        self.payload = WeightPayload(list(tensors.items()))

    def read(self) -> WeightPayload:
        return self.payload


class RecordedHttp:
    """Stands where the HTTP transport would, for the control-flow tests that reach no replica."""

    name = "http"

    def __init__(self):
        self.pushes: list = []

    def push(self, replicas, version, label):
        self.pushes.append((tuple(replicas), version, label))

    def close(self):
        pass


class RealReplicaOnly:
    """The real HTTP transport, to the one real replica among the replicas a test names."""

    name = "http"

    def __init__(self, cfg, replica):
        self.http, self.url = HttpTransport(cfg, StaticWeights(replica.weights)), replica.url

    def push(self, replicas, version, label):
        self.http.push([u for u in replicas if u == self.url], version, label)

    def close(self):
        self.http.close()


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
    http = RecordedHttp()
    nccl = NcclTransport(nccl_cfg, None, make_group=lambda urls, port: FakeGroup(calls, urls, None))
    sync = WeightSender(nccl, http)
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
    assert http.pushes == [(("http://a:8200",), 4, "catch up")]


@pytest.mark.parametrize("fail_on", ["setup", "send"])
def test_a_failed_nccl_transfer_falls_back_to_http_on_a_real_replica(nccl_cfg, replica, fail_on, caplog):
    calls: list = []
    attempts: list = []
    version = replica.version + 1

    def make_group(urls, port):
        attempts.append(tuple(urls))
        return FakeGroup(calls, urls, fail_on)

    sync = WeightSender(NcclTransport(nccl_cfg, None, make_group), RealReplicaOnly(nccl_cfg, replica))
    with caplog.at_level(logging.WARNING, logger="rpo.train"):
        assert sync.push([replica.url], version, PushKind.STEP, f"step {version}") == "http_fallback"
    replica.version = version
    assert _version(replica.url) == version  # the replica serves the step's weights all the same
    warning = next(r.getMessage() for r in caplog.records if "NCCL weight transfer failed" in r.getMessage())
    assert f"in {fail_on}" in warning and f"version {version} goes over HTTP" in warning
    assert attempts == [(replica.url,)]
    # The same replicas again: straight to HTTP, no second wait on a group that cannot form ...
    assert sync.push([replica.url], version + 1, PushKind.STEP, f"step {version + 1}") == "http_fallback"
    replica.version = version + 1
    assert attempts == [(replica.url,)] and _version(replica.url) == version + 1
    # ... until they change, when NCCL is tried again (and fails again here: HTTP once more).
    joined = sorted([replica.url, "http://127.0.0.9:8200"])
    assert sync.push(joined, version + 2, PushKind.STEP, f"step {version + 2}") == "http_fallback"
    replica.version = version + 2
    assert attempts == [(replica.url,), tuple(joined)] and _version(replica.url) == version + 2


def test_nccl_needs_one_trainer_process_on_a_gpu(nccl_cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="rpo.train"):
        assert not use_nccl(nccl_cfg, on_gpu=False, world_size=1)
    assert "the trainer runs on CPU" in caplog.text
    assert not use_nccl(nccl_cfg, on_gpu=True, world_size=2)
    assert not use_nccl(load_config(None, []), on_gpu=True, world_size=1)  # http configured
    assert use_nccl(nccl_cfg, on_gpu=True, world_size=1)
    http = RecordedHttp()
    sync = WeightSender(http)  # what `for_learner` builds when NCCL is not used: HTTP alone
    assert not sync.use_nccl
    assert sync.push(["http://a:8200"], 1, PushKind.STEP, "step 1") == "http"
    assert sync.push(["http://b:8200"], 1, PushKind.CATCH_UP) == "http"
    assert http.pushes == [(("http://a:8200",), 1, "step 1"), (("http://b:8200",), 1, "catch up")]


def test_with_lora_every_push_goes_over_http_and_the_log_says_why(caplog):
    """The NCCL transfer carries whole models; an adapter goes over HTTP, said once at start."""
    cfg = load_config(None, ["rollout.weight_transfer=nccl", "train.lora.rank=8"])
    with caplog.at_level(logging.WARNING, logger="rpo.train"):
        assert not use_nccl(cfg, on_gpu=True, world_size=1)
    assert "train.lora is on" in caplog.text and "goes over HTTP" in caplog.text


def _free_port_pair() -> int:
    """A port p with p and p + 1 both free now."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("", port + 1))
                except OSError:
                    continue
                return port
    raise AssertionError("no pair of free ports")


def _said(metrics: TrainerMetrics, transport: str) -> float:
    value = metrics.registry.get_sample_value("rpo_train_weight_sync_seconds_count", {"transport": transport})
    return value or 0.0


def _record_of(transport: str, seconds: float) -> StepRecord:
    phases = {"rollout": 0.5, "reward": 0.1, "train": 0.8, "weight_sync": seconds, "cache": 0.1}
    return StepRecord(
        step=1, policy_version=1, epoch=0, questions=1, trained_groups=1, samples=4, rounds=1, reward_mean=0.0,
        accuracy=0.0, response_len_mean=1.0, cache_hit_rate=0.0, generated_tokens=4, reused_prefix_tokens=0,
        decoded_tokens_per_sample=1.0, tokens_per_second=1.0, rollout_retries=0, step_seconds=1.5,
        phases=phases, weight_sync_seconds=seconds, weight_transport=transport,
    )  # fmt: skip


def test_an_http_push_says_http_in_the_record_the_log_line_and_the_metric(replica):
    version = replica.version + 1
    cfg = load_config(None, [])
    sender = WeightSender(HttpTransport(cfg, StaticWeights(replica.weights)))
    transport = sender.push([replica.url], version, PushKind.STEP, f"step {version}")
    replica.version = version
    assert transport == "http" and _version(replica.url) == version
    record = _record_of(transport, 0.25)
    assert StepRecord.from_json(record.to_json()).weight_transport == "http"  # metrics.jsonl keeps it
    assert "sync 0.25 (http) cache" in format_step_line(record, 10)
    metrics = TrainerMetrics()
    assert _said(metrics, "nccl") == _said(metrics, "http_fallback") == _said(metrics, "http") == 0.0
    metrics.observe_step(record)
    assert _said(metrics, "http") == 1.0 and _said(metrics, "nccl") == 0.0


def test_a_real_nccl_setup_that_fails_goes_over_http_said_once_as_http_fallback(replica, caplog):
    """vLLM's real NCCL trainer engine on this CPU-only machine: its set-up fails ("Cannot access
    accelerator device"); the push reaches the replica over HTTP and says so."""
    import torch

    cfg = load_config(None, ["rollout.weight_transfer=nccl", f"train.nccl_port={_free_port_pair()}"])
    # the trainer believes it has a GPU, as on a box where CUDA or NCCL is broken: vLLM's real engine
    sender = WeightSender(
        NcclTransport(cfg, torch.nn.Linear(2, 2)), HttpTransport(cfg, StaticWeights(replica.weights))
    )
    version = replica.version + 1
    with caplog.at_level(logging.WARNING, logger="rpo.train"):
        first = sender.push([replica.url], version, PushKind.STEP, f"step {version}")
        replica.version = version
        second = sender.push([replica.url], version + 1, PushKind.STEP, f"step {version + 1}")
        replica.version = version + 1
    assert first == second == "http_fallback" and _version(replica.url) == version + 1
    failures = [r.getMessage() for r in caplog.records if "NCCL weight transfer failed" in r.getMessage()]
    assert len(failures) == 1, failures  # the cause once, not at every push
    assert "in setup" in failures[0] and "Cannot access accelerator device" in failures[0]
    assert "transport http_fallback" in failures[0]
    record = _record_of(first, 0.5)
    assert "sync 0.50 (http_fallback)" in format_step_line(record, 10)
    metrics = TrainerMetrics()
    metrics.observe_step(record)
    assert _said(metrics, "http_fallback") == 1.0 and _said(metrics, "http") == 0.0


def test_require_nccl_turns_the_fall_back_into_an_error_naming_phase_and_cause(replica):
    import torch

    cfg = load_config(
        None,
        ["rollout.weight_transfer=nccl", "rollout.require_nccl=true", f"train.nccl_port={_free_port_pair()}"],
    )
    http = RecordedHttp()
    sender = WeightSender(NcclTransport(cfg, torch.nn.Linear(2, 2)), http, require_primary=True)
    with pytest.raises(WeightTransferError) as failed:
        sender.push([replica.url], replica.version + 1, PushKind.STEP, "step 1")
    message = str(failed.value)
    assert "failed in setup" in message and "Cannot access accelerator device" in message
    assert "rollout.require_nccl forbids the HTTP fall-back" in message
    assert http.pushes == [] and _version(replica.url) == replica.version  # nothing went over HTTP


def test_require_nccl_refuses_at_start_what_cannot_use_nccl():
    strict = ["rollout.weight_transfer=nccl", "rollout.require_nccl=true"]
    with pytest.raises(ConfigError, match="the trainer runs on CPU: NCCL cannot carry"):
        use_nccl(load_config(None, strict), on_gpu=False, world_size=1)
    with pytest.raises(ConfigError, match="the trainer has 2 ranks"):
        use_nccl(load_config(None, strict), on_gpu=True, world_size=2)
    with pytest.raises(ConfigError, match="train.lora is on"):
        use_nccl(load_config(None, [*strict, "train.lora.rank=8"]), on_gpu=True, world_size=1)
    with pytest.raises(ConfigError, match="rollout.weight_transfer must be nccl"):
        use_nccl(load_config(None, ["rollout.require_nccl=true"]), on_gpu=True, world_size=1)


def test_each_setup_of_the_group_takes_a_fresh_free_port(nccl_cfg):
    first = _free_port_pair()
    cfg = load_config(None, ["rollout.weight_transfer=nccl", f"train.nccl_port={first}"])
    ports: list[int] = []
    calls: list = []

    def make_group(urls, port):
        ports.append(port)
        return FakeGroup(calls, urls, None)

    sender = WeightSender(NcclTransport(cfg, None, make_group), RecordedHttp())
    assert sender.push(["http://a:8200"], 1, PushKind.STEP) == "nccl"
    with socket.socket() as busy:  # something else listens on the next port meanwhile
        busy.bind(("", first + 1))
        busy.listen()
        assert sender.push(["http://a:8200", "http://b:8200"], 2, PushKind.STEP) == "nccl"
    assert sender.push(["http://a:8200"], 3, PushKind.STEP) == "nccl"
    sender.close()
    # never the previous group's port (its store may linger), never a busy one
    assert ports == [first, first + 2, first]
