"""How far to warm-start a tiny long-task model: one warm start, its checkpoints scored on the validation split.

The long task's warm start runs at a constant rate, so the checkpoint after k steps of a long probe is the
model a k-step build makes. At each checkpoint this samples every validation question once at T = 0.6
(the evaluation temperature) and at T = 1.0 (the training temperature) with HF `generate`, and reports
pass@1 and the length of correct answers; the build's step count is chosen from this table, never from the
test split. One JSON record is written.

    .venv/bin/python bench/warm_probe.py --wording varied --steps 1000 --every 100 --first 600 \\
        --record docs/records/warm-probe-var-2026-12-07.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rpo_vs_grpo import machine  # noqa: E402

from services.core.logs import setup_logging  # noqa: E402
from services.core.synthetic import PROMPT_TEMPLATE  # noqa: E402
from services.core.synthetic_long import LongTaskConfig, check_answer, make_split  # noqa: E402
from services.models.tiny_model import (  # noqa: E402
    EOS_ID,
    PAD_ID,
    WARM_BATCH_SIZE,
    WARM_LAYERS,
    WARM_LR,
    build_tiny_model,
    warm_start,
)

TEMPERATURES = (0.6, 1.0)


def sampled_scores(model, tokenizer, rows: list[dict], temperature: float, seed: int) -> dict:
    """pass@1 of one sample per row at `temperature`, and the lengths of the correct answers."""
    import torch

    torch.manual_seed(seed)
    model.eval()
    tokenizer.padding_side = "left"
    prompts = [PROMPT_TEMPLATE.format(question=r["question"]) for r in rows]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **batch, do_sample=True, temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=512,
            eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        )  # fmt: skip
    model.train()
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    correct = [len(t) for t, r in zip(texts, rows, strict=True) if check_answer(t, r["answer"]) == 1.0]
    return {
        "pass_at_1": len(correct) / len(rows),
        "correct_length_mean": statistics.fmean(correct) if correct else None,
        "correct_length_sd": statistics.pstdev(correct) if len(correct) > 1 else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wording", choices=("full", "varied"), default="varied")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--first", type=int, default=600, help="first checkpoint scored")
    parser.add_argument("--questions", type=int, default=64, help="validation questions")
    parser.add_argument("--record", type=Path, help="write the JSON record here")
    args = parser.parse_args()
    setup_logging("INFO")
    from transformers import AutoTokenizer

    task = LongTaskConfig(wording=args.wording)
    rows = make_split(task, "val")[: args.questions]
    points: list[dict] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rpo-warm-probe-") as tmp:
        random_dir = build_tiny_model(Path(tmp) / "random", tie_word_embeddings=True, num_layers=WARM_LAYERS)
        tokenizer = AutoTokenizer.from_pretrained(random_dir)

        def score(step: int, model) -> None:
            if step < args.first or (step - args.first) % args.every:
                return
            point = {"steps": step}
            for t in TEMPERATURES:
                point[f"T={t:g}"] = sampled_scores(model, tokenizer, rows, t, seed=step)
            points.append(point)
            print(
                f"[probe] {step} steps: pass@1 "
                + " / ".join(f"{100 * point[f'T={t:g}']['pass_at_1']:.0f}%" for t in TEMPERATURES)
                + " at T = "
                + " / ".join(f"{t:g}" for t in TEMPERATURES),
                flush=True,
            )

        warm_start(
            random_dir, Path(tmp) / "model", task_cfg=task, max_seconds=float("inf"), steps=args.steps,
            batch_size=WARM_BATCH_SIZE, lr=WARM_LR, seed=0, group_by_length=True, schedule="constant",
            on_step=score, eval_questions=0,
        )  # fmt: skip
    record = {
        "command": " ".join(["bench/warm_probe.py", *sys.argv[1:]]),
        "date": date.today().isoformat(),
        "machine": machine(),
        "task": {"wording": args.wording, "validation_questions": len(rows)},
        "minutes": round((time.monotonic() - started) / 60, 1),
        "points": points,
    }
    print(json.dumps(record, indent=1))
    if args.record:
        args.record.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
