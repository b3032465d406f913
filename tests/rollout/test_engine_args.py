"""How a replica's settings become vLLM's engine arguments (pure; no engine starts): on GPU the engine spans
every GPU the replica holds (tensor parallelism of `gpus.per_replica`, or of what its claim gave it), on CPU
one process and the CPU-only settings; vLLM's own `AsyncEngineArgs` accepts what is produced."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.config import GpusSection, load_config
from services.core.gpu_claims import plan_gpus
from services.rollout.engine import engine_args, engine_kwargs, tensor_parallel_size

MODEL = Path(__file__).resolve().parent / "_no_such_model"
"""A path that names no model: vLLM's engine args take it as a local path only while it exists, so the test
that builds them makes it exist (a missing path is a Hub id to vLLM, and the suite runs offline)."""


@pytest.fixture
def model_dir(tmp_path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


@pytest.mark.parametrize("per_replica", [1, 2, 4])
def test_on_gpu_a_replica_shards_over_its_gpus_per_replica(per_replica, model_dir):
    cfg = load_config(None, [f"gpus.per_replica={per_replica}"])
    kwargs = engine_kwargs(cfg, model_dir, on_cpu=False)
    assert kwargs["tensor_parallel_size"] == per_replica
    assert kwargs["gpu_memory_utilization"] == cfg.rollout.gpu_memory_utilization
    assert "kv_cache_memory_bytes" not in kwargs
    args = engine_args(cfg, model_dir, on_cpu=False)  # vLLM's own engine args take it as given
    assert args.tensor_parallel_size == per_replica


def test_the_claim_decides_how_many_gpus_the_engine_spans():
    gpus = GpusSection(per_replica=2)
    cfg = load_config(None, ["gpus.per_replica=2", "rollout.gpu_memory_utilization=0.4"])
    own = plan_gpus("rollout", ["0", "1", "2", "3", "4"], gpus, 0.4, set())
    assert own.devices == ["1", "2"]
    assert engine_kwargs(cfg, MODEL, on_cpu=False, gpu_devices=len(own.devices))["tensor_parallel_size"] == 2
    # a box too small for 1 + 2 GPUs: the replica shares the trainer's one GPU, so it runs unsharded
    shared = plan_gpus("rollout", ["0", "1"], gpus, 0.4, set())
    assert shared.shared_with_trainer and shared.devices == ["0"]
    assert tensor_parallel_size(cfg, on_cpu=False, gpu_devices=len(shared.devices)) == 1
    with pytest.raises(ValueError, match="needs at least one GPU"):
        tensor_parallel_size(cfg, on_cpu=False, gpu_devices=0)


@pytest.mark.parametrize("per_replica", [1, 3])
def test_on_cpu_per_replica_does_not_apply(per_replica):
    cfg = load_config(None, [f"gpus.per_replica={per_replica}"])
    kwargs = engine_kwargs(cfg, MODEL, on_cpu=True, gpu_devices=None)
    assert kwargs["tensor_parallel_size"] == 1
    assert kwargs["kv_cache_memory_bytes"] == cfg.rollout.kv_cache_bytes and kwargs["enforce_eager"] is True
    assert "gpu_memory_utilization" not in kwargs


def test_nccl_weight_transfer_with_a_sharded_replica_is_refused_by_name():
    cfg = load_config(None, ["gpus.per_replica=2", "rollout.weight_transfer=nccl"])
    with pytest.raises(ValueError, match=r"weight_transfer=nccl takes one GPU per replica.*spans 2"):
        engine_kwargs(cfg, MODEL, on_cpu=False)
    one = load_config(None, ["rollout.weight_transfer=nccl"])
    assert engine_kwargs(one, MODEL, on_cpu=False)["weight_transfer_config"] == {"backend": "nccl"}


def test_sleep_mode_reaches_the_gpu_engine_and_is_refused_on_cpu(tmp_path):
    from services.core.config import ConfigError
    from services.rollout.engine import check_sleep_mode

    cfg = load_config(None, ["rollout.sleep_mode=true"])
    kwargs = engine_kwargs(cfg, tmp_path, on_cpu=False)
    assert kwargs["enable_sleep_mode"] is True
    assert engine_args(cfg, tmp_path, on_cpu=False).enable_sleep_mode  # vLLM's own engine args take it
    assert "enable_sleep_mode" not in engine_kwargs(load_config(None, []), tmp_path, on_cpu=False)
    with pytest.raises(ConfigError, match="rollout.sleep_mode.*CPU"):
        engine_kwargs(cfg, tmp_path, on_cpu=True)
    with pytest.raises(ConfigError, match="rollout.sleep_mode"):  # vLLM's CPU platform says it has none
        check_sleep_mode(cfg)
    check_sleep_mode(load_config(None, []))  # off: nothing to check


def test_trust_remote_code_reaches_the_engine_only_when_asked(model_dir):
    """`model.trust_remote_code` (TRL's `trust_remote_code`), off by default, is what vLLM's engine gets."""
    assert engine_args(load_config(None, []), model_dir, on_cpu=True).trust_remote_code is False
    cfg = load_config(None, ["model.trust_remote_code=true"])
    assert engine_args(cfg, model_dir, on_cpu=True).trust_remote_code is True
