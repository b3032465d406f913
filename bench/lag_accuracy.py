"""Held-out accuracy at equal steps, `train.max_lag` 0 against 1, over several training seeds: each (seed, lag)
is one whole `rpo run` of the built-in preset (its own services, cache init, 60 steps, evaluation before and
after), one after the other, never concurrently.

The interval of each lag's pass@1 resamples training seeds and then held-out questions, so it holds the
seed-to-seed variation as well as the evaluation's; the paired difference (lag 1 - lag 0) pairs each
question with itself under the same seed. A run whose summary.json is already in --work is read, not run
again, so an interrupted comparison continues where it stopped.

    .venv/bin/python bench/lag_accuracy.py --seeds 3 --out docs/records/lag-accuracy-<date>.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rpo_vs_grpo import machine, run_main_job  # noqa: E402

from services.reproduction.statistics import per_question_scores, seeds_and_questions_interval  # noqa: E402

LAGS = (0, 1)


def run_one(work: Path, seed: int, lag: int, overrides: list[str]) -> dict:
    """The summary of `rpo run` at this seed and lag (run now unless --work already holds it)."""
    run_dir = work / f"seed{seed}-lag{lag}"
    summary = run_dir / "summary.json"
    if not (summary.exists() and json.loads(summary.read_text()).get("ok")):
        began = time.monotonic()
        run_main_job(run_dir, [f"train.seed={seed}", f"train.max_lag={lag}", *overrides])
        print(f"seed {seed}, max_lag {lag}: {time.monotonic() - began:.0f} s", flush=True)
    return json.loads(summary.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "lag-accuracy")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    summaries = {(s, lag): run_one(args.work, s, lag, args.set) for s in range(args.seeds) for lag in LAGS}

    questions = sorted(per_question_scores(summaries[(0, 0)]["eval_after"]))
    table = {
        lag: [
            [per_question_scores(summaries[(s, lag)]["eval_after"])[q][0] for q in questions]
            for s in range(args.seeds)
        ]
        for lag in LAGS
    }
    figures: dict = {"seeds": args.seeds, "questions": len(questions), "settings": args.set, "lags": {}}
    for lag in LAGS:
        cells = np.asarray(table[lag])
        figures["lags"][lag] = {
            "pass_at_1": float(cells.mean()),
            "ci": seeds_and_questions_interval(cells),
            "per_seed": [float(row.mean()) for row in cells],
            "before": [summaries[(s, lag)]["eval_before"]["pass_at_1"] for s in range(args.seeds)],
            "mean_step_seconds": [summaries[(s, lag)]["mean_step_seconds"] for s in range(args.seeds)],
        }
    difference = np.asarray(table[1]) - np.asarray(table[0])
    figures["difference"] = {"mean": float(difference.mean()), "ci": seeds_and_questions_interval(difference)}
    low, high = figures["lags"][0]["ci"]
    figures["within_lag0_interval"] = low <= figures["lags"][1]["pass_at_1"] <= high

    lines = [
        f"`rpo run` (the preset{', ' + ', '.join(args.set) if args.set else ''}), training seeds 0..{args.seeds - 1}, "
        f"{len(questions)} held-out questions; {machine()}; {time.strftime('%Y-%m-%d')}, "
        f"{time.monotonic() - began:.0f} s in all.",
        "",
        "| max_lag | pass@1 after [95% CI, seeds and questions] | per seed | step s (per seed) |",
        "|---|---|---|---|",
    ]
    for lag in LAGS:
        f = figures["lags"][lag]
        lines.append(
            f"| {lag} | {f['pass_at_1']:.1%} [{f['ci'][0]:.1%}, {f['ci'][1]:.1%}] | "
            f"{', '.join(f'{a:.1%}' for a in f['per_seed'])} | "
            f"{', '.join(f'{t:.2f}' for t in f['mean_step_seconds'])} |"
        )
    d = figures["difference"]
    lines += [
        "",
        f"max_lag 1 - max_lag 0, paired by seed and question: {d['mean'] * 100:+.1f} points "
        f"[{d['ci'][0] * 100:+.1f}, {d['ci'][1] * 100:+.1f}]; max_lag 1 inside max_lag 0's interval: "
        f"{'yes' if figures['within_lag0_interval'] else 'no'}.",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text(
            json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), **figures}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
