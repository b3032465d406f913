"""What logging completions and the learner's extra metrics cost a step, against the preset's step time.

1. `rpo train` on the `tiny-demo` preset (RPO, fresh services, bench/rpo_vs_grpo.py's arm) for `--steps`
   steps with `train.log_completions` on and every response logged: the feature works in the real loop, the
   step records give the step time and completions.jsonl every response of every step.
2. Each step's groups rebuilt from its logged responses (text re-encoded with the model's tokenizer), then
   timed on rank 0's path, per step:
   - `metrics`: the extra step figures (`trainer.rollouts.collected.reward_spread`: raw/shaped reward, std,
     zero-std groups, lengths, truncation), the step line (`format_step_line`) and the Prometheus update
     (`TrainerMetrics.observe_step`, every gauge, old and new);
   - `completions`: `train.log_completions` at its default (8 responses: decode, rows, completions.jsonl);
   - `completions + tables`: the same plus the table to TensorBoard, MLflow and W&B (offline, file store),
     as the step waits for it (the table is queued for the tracker's thread);
   - `tables written (tracker's thread)`: that plus the tracker's thread writing the table (`flush()`), the
     most the step could lose to it where the cores are all taken;
   - `entropy`: what asking the learner's log-prob pass for the entropy adds, on the step's whole batch
     through the tiny model (forward, log-probs and backward, with and without; the learner asks on the
     first update only).
Each but the tracker's write runs on the step's own path; the share is its median over the median step time
(steps 2 onwards).

    .venv/bin/python bench/completions_bench.py --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rpo_vs_grpo import machine  # noqa: E402

from services.core.logs import setup_logging  # noqa: E402
from services.core.schemas.rollout import RolloutGroup, RolloutSample  # noqa: E402
from services.models.model_path import resolve_model_path  # noqa: E402
from trainer.rollouts.collected import reward_spread  # noqa: E402
from trainer.telemetry.completions import StepCompletions, read_completions  # noqa: E402
from trainer.telemetry.metrics import TrainerMetrics  # noqa: E402
from trainer.telemetry.progress import format_step_line, read_records  # noqa: E402
from trainer.telemetry.records import StepRecord  # noqa: E402
from trainer.telemetry.tracking import BACKENDS, Tracker  # noqa: E402

TARGET = 0.02
"""The target: completions and the extra metrics cost under 2% of the preset's step."""


def trained_run(args: argparse.Namespace, work: Path) -> tuple[list[dict], list[dict]]:
    """Step records and every logged response of a real preset run with `train.log_completions` on."""
    from rpo_vs_grpo import run_arm

    arm_args = argparse.Namespace(
        steps=args.steps,
        questions_per_step=args.questions_per_step,
        set=["train.log_completions=true", "train.num_completions_to_log=null", *args.set],
    )
    run_arm("rpo", arm_args, work, resolve_model_path("builtin:tiny-warm"))
    return read_records(work / "rpo", "step"), read_completions(work / "rpo")


def rebuilt(rows: list[dict], tokenizer) -> tuple[list[RolloutGroup], list[SimpleNamespace]]:
    """One step's groups and learner samples, from its logged responses."""
    groups: dict[str, list[RolloutSample]] = {}
    samples = []
    for row in rows:
        ids = tokenizer.encode(row["completion"], add_special_tokens=False) or [0]
        groups.setdefault(row["question_id"], []).append(
            RolloutSample(
                response_ids=ids,
                prefix_len=min(row["prefix_len"], len(ids)),
                suffix_logprobs=[0.0] * len(ids),
                finish_reason=row["finish_reason"],
                raw_reward=row["raw_reward"],
                shaped_reward=row["shaped_reward"],
                correct=row["correct"],
                reward_scores=row["reward_scores"],
            )
        )
        samples.append(SimpleNamespace(question_id=row["question_id"], advantage=row["advantage"]))
    built = [
        RolloutGroup(question_id=q, cache_hit=True, m=0, prefix_len=0, samples=members)
        for q, members in groups.items()
    ]
    return built, samples


def entropy_cost(groups: list[RolloutGroup], prompts: dict[str, list[int]], model) -> float:
    """Seconds the entropy adds to one forward + log-probs + backward of the whole batch: after a warm-up
    call, 5 calls each way, alternating; the difference of the medians (negative: below the noise)."""
    import torch

    from trainer.learner.batch import TrainSample, collate
    from trainer.learner.logprobs import token_logprobs

    batch = collate(
        [
            TrainSample(prompts[g.question_id], list(s.response_ids), 0, 1.0, g.question_id)
            for g in groups
            for s in g.samples
        ],
        suffix_only=False,
    )

    def once(with_entropy: bool) -> float:
        t = time.perf_counter()
        logp = token_logprobs(model, batch, torch.float32, entropy=[] if with_entropy else None)
        (logp * batch.loss_mask).sum().backward()
        return time.perf_counter() - t

    once(True)
    offs, ons = [], []
    for _ in range(5):
        offs.append(once(False))
        ons.append(once(True))
    PASS_SECONDS.append(statistics.median(offs))
    return statistics.median(ons) - statistics.median(offs)


PASS_SECONDS: list[float] = []
"""The whole batch's forward + log-probs + backward without the entropy, per step (for the report)."""


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--questions-per-step", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    setup_logging("WARNING")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    from transformers import AutoTokenizer

    began = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-warm"))
    with tempfile.TemporaryDirectory(prefix="rpo-completions-bench-") as tmp:
        work = Path(tmp)
        records, logged = trained_run(args, work)
        step_seconds = statistics.median(r["step_seconds"] for r in records[1:])
        questions = [
            SimpleNamespace(id=r["question_id"], prompt_as_given=lambda r=r: r["prompt"]) for r in logged
        ]
        metrics = TrainerMetrics()
        plain = StepCompletions(work / "plain", tokenizer, questions, 8, None)
        tracker = Tracker(list(BACKENDS), work / "tracked", "bench-completions", {"bench": "completions"})
        tabled = StepCompletions(work / "tracked", tokenizer, questions, 8, tracker)
        costs: dict[str, list[float]] = {
            "metrics": [],
            "completions": [],
            "completions + tables": [],
            "tables written (tracker's thread)": [],
            "entropy": [],
        }
        from transformers import AutoModelForCausalLM

        from services.core.config import DataSection
        from services.core.data import encode_prompt

        model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-warm"))
        fields = DataSection()
        prompts = {r["question_id"]: encode_prompt(tokenizer, r["prompt"], fields) for r in logged}
        for record in records:
            rows = [r for r in logged if r["step"] == record["step"]]
            groups, samples = rebuilt(rows, tokenizer)
            collected = SimpleNamespace(train_groups=groups, samples=samples)
            typed = StepRecord.from_json(record)

            def figures(typed=typed, groups=groups) -> None:
                for key, value in reward_spread(groups).items():
                    setattr(typed, key, value)
                format_step_line(typed, len(records))
                metrics.observe_step(typed)

            costs["metrics"].append(timed(figures))
            costs["completions"].append(timed(lambda c=collected, s=record["step"]: plain.step(s, c)))
            costs["completions + tables"].append(
                timed(lambda c=collected, s=record["step"]: tabled.step(s, c))
            )
            costs["tables written (tracker's thread)"].append(
                costs["completions + tables"][-1] + timed(tracker.flush)
            )
            costs["entropy"].append(entropy_cost(groups, prompts, model))
        plain.close()
        tabled.close()
        tracker.close()
    results = {
        name: {"per_step_ms": statistics.median(v) * 1000, "max_step_ms": max(v) * 1000}
        for name, v in costs.items()
    }
    responses = len(logged) // max(1, len(records))
    results["entropy"]["pass_ms"] = statistics.median(PASS_SECONDS) * 1000
    lines = [
        f"Completions and extra metrics against the step: {args.steps} RPO steps of the tiny-demo preset "
        f"({responses} responses a step), median step {step_seconds:.3f} s (steps 2..); {machine()}; "
        f"{time.strftime('%Y-%m-%d')}, {time.monotonic() - began:.0f} s in all.",
        "",
        "| what | per step, ms (median) | max, ms | share of the step |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['per_step_ms']:.2f} | {r['max_step_ms']:.2f} | "
            f"{r['per_step_ms'] / 1000 / step_seconds:.2%} |"
        )
    default = (
        sum(results[k]["per_step_ms"] for k in ("metrics", "completions", "entropy")) / 1000 / step_seconds
    )
    lines += [
        "",
        f"Entropy: against a forward + log-probs + backward of the whole batch of "
        f"{results['entropy']['pass_ms']:.0f} ms (median).",
        f"Metrics + entropy + completions (no tracker): {default:.2%} of the step (target < {TARGET:.0%}).",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"step_seconds": step_seconds, "results": results}, indent=2) + "\n")
    return 0 if default < TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
