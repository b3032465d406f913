"""The learner alone: the shared layout (`train.share_prefix`) against one row per response, on CPU.

Two shapes on a tiny Qwen2 of the warm model's architecture (4 layers, hidden 128):
- `preset`: the built-in run's step, 16 questions x G = 6, 14-token prompts, ~45-token answers of which
  RPO with L = 64 regenerates a random tail (about a third of the groups are misses: whole answers);
  the preset's learner settings (GRPO with the KL term, one micro-batch of 96, no checkpointing);
- `paper`: the paper's proportions shrunk, 16 groups x G = 6, 40-token prompts, 400-token cached
  prefixes, suffixes of 1-40 tokens; GRPO with the KL term, gradient checkpointing, micro-batches of 24.

Per shape: `tokens_ratio` (tokens the model is fed, shared / per-response), `time_ratio` (median learner
step time, shared / per-response, rounds interleaved in one run so both see the same machine), and
`max_rel_loss_diff` / `max_rel_grad_diff` (the whole-batch objective and its gradients in both layouts,
same weights, float32).

    .venv/bin/python bench/learner_bench.py                  # prints a markdown table
    .venv/bin/python bench/learner_bench.py --json out.json  # and writes the figures
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from services.core.config import RunConfig, load_config  # noqa: E402
from trainer.learner.batch import TrainSample, count_loss_tokens, make_micro_batch, plan_micro_batches  # noqa: E402

SHAPES = {
    "preset": [
        "algorithm.beta=0.04", "train.micro_batch_size=96", "train.gradient_checkpointing=false",
        "train.precision=float32", "train.lr=2e-5",
    ],
    "paper": [
        "algorithm.beta=0.04", "train.micro_batch_size=24", "train.gradient_checkpointing=true",
        "train.precision=float32", "train.lr=1e-6",
    ],
}  # fmt: skip


def make_samples(shape: str, seed: int = 0, groups: int = 16, group_size: int = 6) -> list[TrainSample]:
    """One step's samples of `shape` (see the module docstring); token ids drawn from the byte range."""
    rng = random.Random(seed)
    samples = []
    for g in range(groups):
        if shape == "preset":
            prompt_len, answer = 14, rng.randint(38, 52)
            prefix_len = max(0, answer - rng.randint(0, 64))  # m ~ U{0..64}; m >= answer is a miss
            suffix_lens = [max(1, answer - prefix_len + rng.randint(-6, 6)) for _ in range(group_size)]
        else:
            prompt_len, prefix_len = 40, 400
            suffix_lens = [rng.randint(1, 40) for _ in range(group_size)]
        prompt = [rng.randrange(3, 131) for _ in range(prompt_len)]
        prefix = [rng.randrange(3, 131) for _ in range(prefix_len)]
        for n in suffix_lens:
            own = [rng.randrange(3, 131) for _ in range(n)]
            samples.append(TrainSample(prompt, prefix + own, prefix_len, rng.uniform(-1.5, 1.5), f"q{g}"))
    return samples


def objective_diffs(model_dir: Path, cfg: RunConfig, samples: list[TrainSample]) -> tuple[float, float]:
    """Relative differences of the whole-batch GRPO objective (against a perturbed reference, so the KL term
    counts) and of its gradients, shared layout against per-response, same weights."""
    from transformers import AutoModelForCausalLM

    from trainer.learner.logprobs import token_logprobs
    from trainer.learner.losses import grpo_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    width = max(len(s.response_ids) for s in samples)
    shift = 0.1 * torch.randn(len(samples), width, generator=torch.Generator().manual_seed(1))  # [N, T]
    results = {}
    for share in (False, True):
        model.zero_grad()
        total = 0.0
        for rows in plan_micro_batches(samples, cfg.train.micro_batch_size, share):
            batch = make_micro_batch(samples, rows, cfg.algorithm.loss_on_suffix_only, share)
            order = [i for row in rows for i in row]
            logp = token_logprobs(model, batch)
            ref = logp.detach() + shift[order, : logp.shape[1]]
            loss, _ = grpo_loss(
                logp, logp.detach(), batch.advantages, batch.loss_mask, ref_logp=ref, beta=0.04,
                num_sequences=len(samples),
            )  # fmt: skip
            loss.backward()
            total += float(loss.detach())
        results[share] = (total, {k: p.grad.clone() for k, p in model.named_parameters()})
    (loss_a, grads_a), (loss_b, grads_b) = results[False], results[True]
    grad_diff = max(
        float((grads_b[k] - g).abs().max() / g.abs().max().clamp(min=1e-30)) for k, g in grads_a.items()
    )
    return abs(loss_b - loss_a) / abs(loss_a), grad_diff


def bench_shape(shape: str, model_dir: Path, rounds: int) -> dict:
    from trainer.learner.engine import Learner

    samples = make_samples(shape)
    learners = {}
    for share in (False, True):
        cfg = load_config(None, [*SHAPES[shape], f"train.share_prefix={str(share).lower()}"])
        learners[share] = Learner(cfg, str(model_dir), total_steps=rounds + 1)
        learners[share].train_step(samples)  # warm-up: allocator, DeepSpeed's first-step set-up
    times: dict[bool, list[float]] = {False: [], True: []}
    fed: dict[bool, int] = {}
    for r in range(rounds):
        for share in (r % 2 == 0, r % 2 == 1):  # alternate who goes first
            started = time.perf_counter()
            stats = learners[share].train_step(samples)
            times[share].append(time.perf_counter() - started)
            fed[share] = stats.model_tokens
        print(
            f"[{shape}] round {r + 1}/{rounds}: per-response {times[False][-1]:.3f} s, shared {times[True][-1]:.3f} s",
            flush=True,
        )
    loss_diff, grad_diff = objective_diffs(model_dir, learners[True].cfg, samples)
    per_response, shared = statistics.median(times[False]), statistics.median(times[True])
    return {
        "shape": shape,
        "samples": len(samples),
        "loss_tokens": count_loss_tokens(samples, False),
        "model_tokens_per_response": fed[False],
        "model_tokens_shared": fed[True],
        "tokens_ratio": fed[True] / fed[False],
        "seconds_per_response": per_response,
        "seconds_shared": shared,
        "time_ratio": shared / per_response,
        "max_rel_loss_diff": loss_diff,
        "max_rel_grad_diff": grad_diff,
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per layout and shape")
    parser.add_argument("--shapes", default="preset,paper", help="comma-separated: preset, paper")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    from services.models.tiny_model import WARM_LAYERS, build_tiny_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", num_layers=WARM_LAYERS)
        for shape in args.shapes.split(","):
            results.append(bench_shape(shape.strip(), model_dir, args.rounds))
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"\nMachine: {machine}; {args.rounds} interleaved rounds per layout\n")
    print(
        "| shape | tokens fed, per-response | shared | tokens_ratio | step s, per-response | shared | time_ratio | max_rel_loss_diff | max_rel_grad_diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['shape']} | {r['model_tokens_per_response']:,} | {r['model_tokens_shared']:,} | {r['tokens_ratio']:.3f} "
            f"| {r['seconds_per_response']:.3f} | {r['seconds_shared']:.3f} | {r['time_ratio']:.3f} "
            f"| {r['max_rel_loss_diff']:.1e} | {r['max_rel_grad_diff']:.1e} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
