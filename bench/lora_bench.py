"""LoRA (`train.lora`) against full fine-tuning, side by side in one run, one measurement after the other:

1. push size: the bytes of one step's push, the whole model against the adapter, from the manifests a replica
   checks a push against (the preset's model, and Qwen2.5-1.5B and 7B shapes at rank 16 in bf16, from the
   numbers of their config.json);
2. trainer memory: peak resident memory of a learner process over two training steps, less its resident
   memory before the model loads, full against LoRA, on the preset's model and on a ~100M-parameter model
   of the same architecture (where the model's state, not the Python runtime, is what is measured);
3. step time and push time at the preset: `rpo train` on fresh services (bench/rpo_vs_grpo.py's arm);
4. with --accuracy: held-out pass@1 after `rpo run` (60 steps of the preset), full against LoRA, paired by
   question.

    .venv/bin/python bench/lora_bench.py --rank 8 --steps 8 --accuracy --out docs/records/lora-<date>.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rpo_vs_grpo import machine, run_arm, run_main_job  # noqa: E402

from services.core.logs import setup_logging  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {
    # From the models' config.json: hidden, intermediate, layers, attention heads, key/value heads, head dim,
    # vocabulary, tied embeddings.
    "Qwen2.5-1.5B": dict(
        hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, head_dim=128, vocab=151936, tied=True
    ),
    "Qwen2.5-7B": dict(
        hidden=3584,
        intermediate=18944,
        layers=28,
        heads=28,
        kv_heads=4,
        head_dim=128,
        vocab=152064,
        tied=False,
    ),
}


def shape_figures(shape: dict, rank: int, bytes_per_value: int = 2) -> dict:
    """Parameters of the model and of a rank-`rank` adapter on every attention and MLP projection."""
    h, i, kv = shape["hidden"], shape["intermediate"], shape["kv_heads"] * shape["head_dim"]
    q = shape["heads"] * shape["head_dim"]
    linear = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    linear |= {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    per_layer = sum(a * b for a, b in linear.values()) + q + 2 * kv + 2 * h  # + q/k/v biases, two norms
    model = shape["layers"] * per_layer + shape["vocab"] * h * (1 if shape["tied"] else 2) + h
    adapter = shape["layers"] * sum(rank * (a + b) for a, b in linear.values())
    return {
        "model_bytes": model * bytes_per_value,
        "adapter_bytes": adapter * bytes_per_value,
        "ratio": adapter / model,
    }


def push_bytes(model_dir: Path, rank: int) -> dict:
    from services.core.adapter_wire import AdapterManifest
    from services.core.config_training import LoraSection
    from services.core.weight_wire import WeightManifest

    full = WeightManifest.from_model_dir(model_dir, "F32").total_bytes
    adapter = AdapterManifest.for_base(model_dir, LoraSection(rank=rank), "F32").total_bytes
    return {"model_bytes": full, "adapter_bytes": adapter, "ratio": adapter / full}


CHILD = """
import json, os, random, sys
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, {repo!r})
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import torch, deepspeed, transformers, peft  # the runtime, before the model
from services.core.config import load_config
from trainer.learner.batch import TrainSample
from trainer.learner.engine import Learner
before = rss("VmRSS")
cfg = load_config(None, {overrides!r})
learner = Learner(cfg, {model!r}, total_steps=10)
rng = random.Random(0)
samples = []
for g in range(4):
    prompt = [rng.randrange(3, 131) for _ in range(12)]
    for _ in range(6):
        samples.append(TrainSample(prompt_ids=prompt, response_ids=[rng.randrange(3, 131) for _ in range(48)],
                                   prefix_len=0, advantage=rng.uniform(-1, 1), question_id=f"q{{g}}"))
for _ in range(2):
    learner.train_step(samples)
print(json.dumps({{"before": before, "peak": rss("VmHWM")}}))
"""


def learner_memory(model_dir: Path, rank: int) -> dict:
    """Peak resident bytes of a learner process over two steps, less those before the model loaded."""
    sets = ["train.precision=float32", "train.gradient_checkpointing=false", "train.micro_batch_size=24"]
    sets += ["algorithm.beta=0.04", f"train.lora.rank={rank}"]
    code = CHILD.format(repo=str(REPO), overrides=sets, model=str(model_dir))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"the learner memory child failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {"model_state_peak_bytes": figures["peak"] - figures["before"], **figures}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--lora-lr", type=float, default=2e-4, help="LoRA's learning rate (full: the preset's)"
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--questions-per-step", type=int, default=16)
    parser.add_argument("--accuracy", action="store_true", help="also `rpo run` both ways and compare pass@1")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    setup_logging("WARNING")
    from services.models.model_path import resolve_model_path
    from services.models.tiny_model import build_tiny_model

    began = time.monotonic()
    preset_model = resolve_model_path("builtin:tiny-warm")
    results: dict = {
        "rank": args.rank,
        "lora_lr": args.lora_lr,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    results["push"] = {"preset": push_bytes(preset_model, args.rank)}
    results["push"] |= {name: shape_figures(shape, 16) for name, shape in SHAPES.items()}
    with tempfile.TemporaryDirectory(prefix="rpo-lora-bench-") as tmp:
        mid = build_tiny_model(Path(tmp) / "mid", num_layers=8, hidden_size=1024, intermediate_size=2816)
        results["memory"] = {
            f"{name}, {'LoRA' if rank else 'full'}": learner_memory(model, rank)
            for name, model in [("preset model", preset_model), ("~100M model", mid)]
            for rank in (0, args.rank)
        }
        arms = {}
        for name, sets in [
            ("full", []),
            ("LoRA", [f"train.lora.rank={args.rank}", f"train.lr={args.lora_lr}"]),
        ]:
            arm = argparse.Namespace(steps=args.steps, questions_per_step=args.questions_per_step, set=sets)
            work = Path(tmp) / name
            work.mkdir()
            arms[name] = run_arm("rpo", arm, work, preset_model)
            print(f"{name}: {arms[name]['step_seconds']:.3f} s/step", flush=True)
        results["steps"] = arms
        if args.accuracy:
            from services.reproduction.statistics import paired_difference

            full = run_main_job(Path(tmp) / "run-full", [])
            lora = run_main_job(
                Path(tmp) / "run-lora", [f"train.lora.rank={args.rank}", f"train.lr={args.lora_lr}"]
            )
            results["accuracy"] = {
                "full": full["eval_after"]["pass_at_1"],
                "lora": lora["eval_after"]["pass_at_1"],
                "before": full["eval_before"]["pass_at_1"],
                "lora_minus_full": paired_difference(lora["eval_after"], full["eval_after"]),
            }
    results["seconds"] = time.monotonic() - began
    print(render(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


def render(r: dict) -> str:
    mb = 2**20
    lines = [
        f"LoRA rank {r['rank']} (lr {r['lora_lr']}) against full fine-tuning; {r['machine']}; {r['date']}.",
        "",
    ]
    lines += ["| model | full push, MB | adapter push, MB | adapter / full |", "|---|---|---|---|"]
    for name, p in r["push"].items():
        lines.append(
            f"| {name} | {p['model_bytes'] / mb:.1f} | {p['adapter_bytes'] / mb:.2f} | {p['ratio']:.2%} |"
        )
    lines += ["", "| learner | peak memory above the runtime, MB |", "|---|---|"]
    for name, m in r["memory"].items():
        lines.append(f"| {name} | {m['model_state_peak_bytes'] / mb:.0f} |")
    lines += ["", "| preset, RPO | step, s | train | weight sync | rollout |", "|---|---|---|---|---|"]
    for name, s in r["steps"].items():
        p = s["phases"]
        lines.append(
            f"| {name} | {s['step_seconds']:.3f} | {p['train']:.3f} | {p['weight_sync']:.3f} | {p['rollout']:.3f} |"
        )
    if "accuracy" in r:
        a = r["accuracy"]
        d = a["lora_minus_full"]
        lines += [
            "",
            f"pass@1 after 60 steps: full {a['full']:.1%}, LoRA {a['lora']:.1%} (before {a['before']:.1%}); "
            f"LoRA - full {d['difference'] * 100:+.1f} points [{d['ci'][0] * 100:+.1f}, {d['ci'][1] * 100:+.1f}].",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
