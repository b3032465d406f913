"""The memory plan (services/core/memory_plan.py, `rpo plan`): its static figures against the bytes the real
learner holds, and its verdicts on a 7B model on one 24 GiB GPU.

- parameter counts equal the real torch models' (the tiny Qwen2s, a ~100M Qwen2 made here from a config,
  random init, no download), and LoRA's adapter count equals PEFT's;
- weights, gradients and optimizer state equal, within 1%, the tensor bytes of the real DeepSpeed learner
  (trainer/learner/engine.py on CPU, float32, ZeRO-0 and ZeRO-2) for the tiny model, and of the real model and a real
  torch AdamW after one step for the ~100M one (what the learner runs at ZeRO-0 in float32);
- `rpo plan` refuses full fine-tuning of a Qwen2-7B-like model on one 24 GiB GPU (exit 2, naming LoRA and
  offload) and accepts it with LoRA on a trainer GPU of its own, and with LoRA, offload and sleep mode on one
  shared GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest

from services.cli.main import main
from services.core.config import load_config
from services.core.gpu_box import parse_size
from services.core.memory_plan import Box, GiB, plan_memory, trainer_rank
from services.core.model_shape import read_shape, shape_from_config
from services.models.fit_plan import plan_or_refuse

QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
"""Qwen2-7B's shapes (7.62B parameters)."""

QWEN2_100M = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 8,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _close(planned: int, counted: int) -> bool:
    return abs(planned - counted) <= 0.01 * counted


def test_parameter_counts_equal_the_torch_models(tiny_model_dir, tiny_model_untied_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    for directory in (tiny_model_dir, tiny_model_untied_dir):
        model = AutoModelForCausalLM.from_pretrained(directory)
        assert read_shape(directory).params() == sum(p.numel() for p in model.parameters())
    # The tiny Qwen2 by hand: embeddings 131 x 128; a layer: q, k, v 128 x 128 + bias, o 128 x 128, the MLP
    # 3 x 128 x 384, two norms; two layers, a final norm, the head tied.
    layer = 3 * (128 * 128 + 128) + 128 * 128 + 3 * 128 * 384 + 2 * 128
    assert read_shape(tiny_model_dir).params() == 131 * 128 + 2 * layer + 128
    with torch.device("meta"):  # Qwen2-7B's count without its memory
        big = AutoModelForCausalLM.from_config(AutoConfig.for_model(**QWEN2_7B))
    assert shape_from_config(QWEN2_7B).params() == sum(p.numel() for p in big.parameters()) == 7_615_616_512


def test_lora_adapter_count_equals_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"),
    )
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # r x (in + out) per adapted linear: 4 x (128 + 128) twice and 4 x (384 + 128), in each of 2 layers
    assert read_shape(tiny_model_dir).lora_params(4, targets) == trained == 2 * 4 * (256 + 256 + 512)


def _learner_bytes(model_dir, *overrides):
    """(weights, gradients, optimizer state) bytes of the real learner over one train_step: gradients as the
    optimizer holds them when it steps (ZeRO's reduced partitions, else the parameters' .grad), the optimizer
    state after the step (AdamW's moments and ZeRO's float32 master partition)."""
    import torch

    from services.core.config import load_config as load
    from trainer.learner.batch import TrainSample
    from trainer.learner.engine import Learner

    cfg = load(None, ["train.micro_batch_size=2", "train.warmup_ratio=0", "algorithm.beta=0", *overrides])
    learner = Learner(cfg, str(model_dir), 4)
    model, optimizer = learner.engine.module, learner.engine.optimizer
    seen: dict[str, int] = {}
    step = optimizer.step

    def counting_step(*args, **kwargs):
        partitions = getattr(optimizer, "averaged_gradients", None) or {}
        held = [t for group in partitions.values() if isinstance(partitions, dict) for t in group or []]
        held += [t for group in partitions if isinstance(partitions, list) for t in group or []]
        seen["gradients"] = _bytes(held) + _bytes(p.grad for p in model.parameters() if p.grad is not None)
        return step(*args, **kwargs)

    optimizer.step = counting_step
    samples = [
        TrainSample([5, 6, 7], [8, 9, 10, 11], 0, a, f"q{i}") for i, a in enumerate((1.0, -1.0, 0.5, -0.5))
    ]
    learner.train_step(samples)
    inner = getattr(optimizer, "optimizer", optimizer)
    moments = [
        v for state in inner.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0
    ]
    master = getattr(optimizer, "single_partition_of_fp32_groups", [])
    trained = [p for p in model.parameters() if p.requires_grad]
    return (
        _bytes(model.parameters()),
        seen["gradients"],
        _bytes(moments) + _bytes(master),
        sum(p.numel() for p in trained),
    )


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step")  # the count's hook on the optimizer
@pytest.mark.parametrize(
    "overrides", [("train.zero_stage=0",), ("train.zero_stage=2",), ("train.lora.rank=8",)]
)
def test_static_figures_equal_the_learners_tensor_bytes(tiny_model_dir, overrides):
    weights, gradients, optimizer, trained = _learner_bytes(tiny_model_dir, *overrides)
    cfg = load_config(None, ["train.micro_batch_size=2", "algorithm.beta=0", *overrides])
    planned, host, trainable = trainer_rank(read_shape(tiny_model_dir), cfg, on_gpu=False, tokens=16)
    assert trainable == trained and host == 0
    assert _close(planned["weights"], weights), (planned["weights"], weights)
    assert _close(planned["gradients"], gradients), (planned["gradients"], gradients)
    assert _close(planned["optimizer"], optimizer), (planned["optimizer"], optimizer)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step")  # the count's hook on the optimizer
def test_static_figures_of_a_100m_model_equal_the_learners_tensor_bytes(tmp_path):
    """The ~100M Qwen2 (random weights, saved as an HF folder) through the real learner at ZeRO-0 in float32,
    one train_step: its parameters, gradients and optimizer state counted on the real tensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**QWEN2_100M)).save_pretrained(tmp_path)
    shape = read_shape(tmp_path)
    overrides = ("train.zero_stage=0", "train.precision=float32")
    weights, gradients, optimizer, trained = _learner_bytes(tmp_path, *overrides)
    assert 90e6 < shape.params() == trained < 110e6
    cfg = load_config(None, ["train.micro_batch_size=2", "algorithm.beta=0", *overrides])
    planned, _, _ = trainer_rank(shape, cfg, on_gpu=False, tokens=16)
    assert _close(planned["weights"], weights), (planned["weights"], weights)
    assert _close(planned["gradients"], gradients), (planned["gradients"], gradients)
    assert _close(planned["optimizer"], optimizer), (planned["optimizer"], optimizer)


def test_zero_partitions_and_offload_move_the_figures():
    """Two ranks at ZeRO-2 split the gradients and optimizer state in two; ZeRO-3 with offload leaves the
    trainer's GPU without weights or optimizer state (they go to host memory)."""
    shape = shape_from_config(QWEN2_7B)
    one, _, _ = trainer_rank(shape, load_config(None, ["train.precision=bf16"]), True, 1024)
    two, _, _ = trainer_rank(
        shape, load_config(None, ["train.precision=bf16", "train.num_processes=2"]), True, 1024
    )
    p = shape.params()
    assert one["weights"] == two["weights"] == 2 * p  # bf16, replicated below ZeRO-3
    assert one["optimizer"] == 12 * p and two["optimizer"] == 6 * p  # master + two moments, float32
    assert one["gradients"] == 6 * p and two["gradients"] == 3 * p  # bf16 + the float32 copy, partitioned
    cfg = load_config(
        None, ["train.zero_stage=3", "train.offload_params=true", "train.offload_optimizer=true"]
    )
    off, host, _ = trainer_rank(shape, cfg, True, 1024)
    assert off["weights"] == off["optimizer"] == off["reference"] == 0
    assert host >= 2 * p + 12 * p


def _write_7b(tmp_path):
    path = tmp_path / "qwen2-7b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(QWEN2_7B))
    return str(path.parent)


def test_rpo_plan_refuses_full_fine_tuning_of_7b_on_one_24gib_gpu(tmp_path):
    model = _write_7b(tmp_path)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "plan",
            "--model",
            model,
            "--gpus",
            "1",
            "--gpu-memory",
            "24GiB",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "does not fit" in out.stderr
    assert "train.lora.rank" in out.stderr and "train.offload_params=true" in out.stderr
    assert "rollout.sleep_mode=true" in out.stderr  # the one shared GPU needs the engine asleep
    assert "optimizer state" in out.stdout and "NO" in out.stdout  # the figures are printed before


def test_rpo_plan_accepts_7b_with_lora_or_offload_where_the_figures_allow(tmp_path, capsys):
    model = _write_7b(tmp_path)
    box = ["--model", model, "--gpu-memory", "24GiB", "--set", "train.micro_batch_size=1"]
    # The trainer on a 24 GiB GPU of its own (the replica on the second): full fine-tuning does not fit,
    # LoRA does (bf16 base 14.2 GiB + an adapter of 40M parameters).
    assert main(["plan", *box, "--gpus", "2"]) == 2
    assert main(["plan", *box, "--gpus", "2", "--set", "train.lora.rank=16"]) == 0
    # One shared 24 GiB GPU: LoRA with the base offloaded to host memory, the engine asleep while it steps.
    offload = [
        "--set",
        "train.zero_stage=3",
        "--set",
        "train.offload_params=true",
        "--set",
        "rollout.sleep_mode=true",
    ]
    assert main(["plan", *box, "--gpus", "1", "--set", "train.lora.rank=16", *offload]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("the plan fits") and "sleeps while the learner steps" in out


def test_a_shared_gpu_is_split_by_the_plan(tmp_path):
    """One 80 GiB GPU, Qwen2-7B-like with LoRA: vLLM gets what the trainer's peak and the headroom leave, at
    most what its KV cache can use, and the trainer's cap is the rest."""
    cfg = load_config(None, ["train.lora.rank=16", "train.micro_batch_size=2", "model.max_model_len=4096"])
    plan = plan_memory(shape_from_config(QWEN2_7B), cfg, Box(1, 80 * GiB))
    assert plan.fits and plan.shared
    trainer, replica = plan.processes
    assert plan.rollout_memory_utilization * 80 * GiB >= replica.gpu["weights"] + replica.gpu["runtime"]
    split = plan.rollout_memory_utilization + plan.trainer_memory_fraction + cfg.gpus.shared_headroom_fraction
    assert split == pytest.approx(1.0, abs=2e-3)
    assert plan.trainer_memory_fraction * 80 * GiB >= trainer.total
    assert replica.gpu["kv_cache"] > 0 and plan.kv_sequences >= 1


def test_sizes_and_the_cpu_skip():
    assert parse_size("80GiB") == 80 * 2**30 and parse_size("24GB") == 24 * 10**9
    assert parse_size("81920MiB") == 80 * 2**30
    for bad in ("24XB", "lots", "0GiB"):
        with pytest.raises(ValueError, match="memory|above 0"):
            parse_size(bad)
    assert plan_or_refuse(load_config(None, []), None) is None  # no GPU: nothing to plan


def test_rpo_run_splits_one_gpu_by_the_plan(tiny_model_dir, tmp_path):
    """`rpo run`'s fit (services/supervisor/gpu_split.py): on one GPU the replica's share and the trainer's
    cap are the plan's, and services/core/gpu_claims.py's own rule accepts them; two GPUs keep the configured
    share; a run that does not fit is refused naming a fix."""
    from services.core.cli_args import UsageError
    from services.core.gpu_claims import plan_gpus
    from services.supervisor.gpu_split import fit_to_gpus

    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"train.run_dir={tmp_path / 'run'}"])
    fitted = fit_to_gpus(cfg, Box(1, 24 * GiB))
    plan = plan_memory(read_shape(tiny_model_dir), cfg, Box(1, 24 * GiB))
    util = fitted.rollout.gpu_memory_utilization
    assert util == plan.rollout_memory_utilization != cfg.rollout.gpu_memory_utilization
    assert fitted.gpus.claim_dir == str(tmp_path / "run" / "gpu-claims")
    replica = plan_gpus("rollout", ["0"], fitted.gpus, util, set())
    trainer = plan_gpus("trainer", ["0"], fitted.gpus, util, set())
    assert replica.shared_with_trainer and replica.memory_fraction == util
    assert trainer.memory_fraction == pytest.approx(plan.trainer_memory_fraction)
    two = fit_to_gpus(cfg, Box(2, 24 * GiB))
    assert two.rollout.gpu_memory_utilization == cfg.rollout.gpu_memory_utilization and two.gpus.claim_dir
    asleep = fit_to_gpus(
        cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"sleep_mode": True})}),
        Box(1, 24 * GiB),
    )
    assert (
        asleep.gpus.claim_dir is None
    )  # no trainer cap: the engine gives its memory back while the learner steps
    with pytest.raises(UsageError, match="micro_batch_size|offload"):
        fit_to_gpus(load_config(None, [f"model.path={_write_7b(tmp_path)}"]), Box(1, 24 * GiB))


def test_rpo_plan_reads_a_hub_models_config_from_the_cache(offline_hub, capsys):
    """A Hub id, offline: only its config.json is read, through huggingface_hub, from the prepared cache."""
    assert main(["plan", "--model", "rpo-test/tiny-qwen2", "--gpus", "1", "--gpu-memory", "24GiB"]) == 0
    assert "model qwen2: 444,160 parameters" in capsys.readouterr().out  # the tiny Qwen2 of the cache
    assert main(["plan", "--model", "rpo-test/not-there", "--gpus", "1", "--gpu-memory", "24GiB"]) == 2
    assert "hf download rpo-test/not-there" in capsys.readouterr().err
