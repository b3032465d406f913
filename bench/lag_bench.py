"""`train.max_lag` 0 against 1, side by side in one run: step time and rollout accuracy of full-path GRPO and
of RPO, each arm through the real services (bench/rpo_vs_grpo.py's arm: fresh cache server, one vLLM
replica, the DeepSpeed trainer on CPU), one arm after the other, never concurrently.

With `max_lag: 1` the replica decodes step k+1 while the learner trains step k; the step time is then about
the longer of the two plus the weight push and the cache commit, instead of their sum. On a CPU box both
share the same cores, which bounds what overlap can give (docs/training.md, "Rollouts one step ahead").

    .venv/bin/python bench/lag_bench.py --steps 12
    .venv/bin/python bench/lag_bench.py --steps 8 --preset reproduce.yaml   # the long task (rpo reproduce's base)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rpo_vs_grpo import machine, run_arm  # noqa: E402

from services.core.config import load_config  # noqa: E402
from services.core.logs import setup_logging  # noqa: E402
from services.models.model_path import resolve_model_path  # noqa: E402
from services.supervisor.main_job import PRESET, preset_path  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--questions-per-step", type=int, default=16)
    parser.add_argument(
        "--preset", default=PRESET, help="a preset of services/supervisor/presets (its model too)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--modes", default="full,rpo", help="algorithm.mode of the arms, each at max_lag 0 and 1"
    )
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    setup_logging("WARNING")
    model = resolve_model_path(load_config(preset_path(args.preset), args.set).model.path)
    began = time.monotonic()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rpo-lag-bench-") as tmp:
        for mode, lag in [(m, lag) for m in args.modes.split(",") for lag in (0, 1)]:
            arm = argparse.Namespace(
                steps=args.steps,
                questions_per_step=args.questions_per_step,
                preset=args.preset,
                set=[f"train.max_lag={lag}", *args.set],
            )
            work = Path(tmp) / f"lag{lag}"
            work.mkdir(exist_ok=True)
            results[f"{mode}, max_lag {lag}"] = run_arm(mode, arm, work, model)
            print(
                f"{mode}, max_lag {lag}: {results[f'{mode}, max_lag {lag}']['step_seconds']:.3f} s/step",
                flush=True,
            )
    lines = [
        f"{args.steps} steps of {args.questions_per_step} questions per arm ({', '.join([args.preset, *args.set])}); "
        f"{machine()}; {time.strftime('%Y-%m-%d')}, {time.monotonic() - began:.0f} s in all.",
        "",
        "| arm | step, s (steps 2..) | rollout | train | weight sync | cache | rollout accuracy | vs max_lag 0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        mode = name.split(",")[0]
        base = results[f"{mode}, max_lag 0"]["step_seconds"]
        p = r["phases"]
        lines.append(
            f"| {name} | {r['step_seconds']:.3f} | {p['rollout']:.3f} | {p['train']:.3f} | "
            f"{p['weight_sync']:.3f} | {p['cache']:.3f} | {r['accuracy']:.1%} | {r['step_seconds'] / base:.2f} |"
        )
    print("\n".join(lines))
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "preset": args.preset,
                    "settings": args.set,
                    "steps": args.steps,
                    "machine": machine(),
                    "date": time.strftime("%Y-%m-%d"),
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
