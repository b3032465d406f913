"""The learner with LoRA adapters (`train.lora`), in real DeepSpeed engines on CPU (one process each, through
tests/trainer/learner/scripts/learner_steps.py): only the adapter trains, the KL reference is the base with the adapter
off (step 1's KL is 0, as the adapter starts at B = 0), ZeRO-2 and ZeRO-3 agree, the export holds the adapter
and the merged model PEFT's own merge gives, and a checkpoint resumes the adapter and its optimizer exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "learner_steps.py"
REPO = Path(__file__).resolve().parents[3]
LORA = ["--set", "train.lora.rank=8", "--set", "train.lr=1e-3", "--set", "algorithm.beta=0.04"]


def _steps(model_dir: Path, out_dir: Path, tag: str, *args: str) -> dict:
    out = out_dir / f"{tag}.json"
    cmd = [sys.executable, str(SCRIPT), "--model", str(model_dir), "--out", str(out), *LORA, *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_")}
    done = subprocess.run(
        cmd, cwd=REPO, env={**env, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(out.read_text())
    result["log"] = done.stdout + done.stderr
    return result


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("lora")
    return {
        "zero2": _steps(tiny_model_dir, work, "zero2", "--steps", "3", "--export", str(work / "export2")),
        "zero3": _steps(
            tiny_model_dir,
            work,
            "zero3",
            "--steps",
            "3",
            "--set",
            "train.zero_stage=3",
            "--export",
            str(work / "export3"),
        ),
        "saved": _steps(
            tiny_model_dir, work, "saved", "--steps", "2", "--save", str(work / "ckpt"), "--save-after", "1"
        ),
        "resumed": _steps(tiny_model_dir, work, "resumed", "--steps", "1", "--load", str(work / "ckpt")),
        "work": work,
    }


def test_the_reference_is_the_base_with_the_adapter_off_and_the_adapter_learns(runs):
    steps = runs["zero2"]["steps"]
    assert "reference the base with the adapter off" in runs["zero2"]["log"]
    assert "LoRA adapters (rank 8)" in runs["zero2"]["log"]
    assert steps[0]["kl"] == 0.0  # B = 0 at the start: the policy is the base
    assert steps[1]["kl"] > 0.0 and steps[2]["kl"] > steps[1]["kl"]  # the adapter moves it away
    assert steps[0]["loss"] != steps[2]["loss"]


def test_zero2_and_zero3_train_the_same_adapter(runs):
    for two, three in zip(runs["zero2"]["steps"], runs["zero3"]["steps"], strict=True):
        assert three["loss"] == pytest.approx(two["loss"], rel=1e-5)
        assert three["kl"] == pytest.approx(two["kl"], rel=1e-4, abs=1e-9)
        assert three["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-5)
    from safetensors.torch import load_file

    two = load_file(runs["work"] / "export2" / "adapter" / "adapter_model.safetensors")
    three = load_file(runs["work"] / "export3" / "adapter" / "adapter_model.safetensors")
    assert sorted(two) == sorted(three)
    assert max((two[k] - three[k]).abs().max().item() for k in two) < 1e-6


@pytest.mark.parametrize("stage", ["2", "3"])
def test_the_export_is_the_adapter_and_the_merged_model_peft_gives(runs, tiny_model_dir, stage):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    export = runs["work"] / f"export{stage}"
    config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    merged_by_peft = PeftModel.from_pretrained(base, export / "adapter").merge_and_unload().state_dict()
    exported = load_file(export / "model.safetensors")
    assert set(exported) == set(merged_by_peft) - {"lm_head.weight"}  # tied: saved once, as the embedding
    for name, tensor in exported.items():
        assert torch.allclose(tensor, merged_by_peft[name], atol=1e-6), name
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapted = [n for n in exported if any(f".{t}." in n for t in targets) and n.endswith(".weight")]
    assert adapted and all(not torch.equal(exported[n], original[n]) for n in adapted)
    for name in set(exported) - set(adapted):  # embeddings, norms, biases: not trained
        assert torch.equal(exported[name], original[name]), name


def test_a_checkpoint_resumes_the_adapter_and_its_optimizer(runs):
    uninterrupted = runs["saved"]["steps"][1]
    resumed = runs["resumed"]["steps"][0]
    assert runs["resumed"]["client_state"] == {"saved_after": 1}
    for key in ("loss", "kl", "grad_norm"):
        assert resumed[key] == uninterrupted[key], key
