"""The long task's repair property on the built-in warm model: from prefixes cut out of the model's own
WRONG answers (m ~ U{1..L}, suffix budget m, as an RPO step does), how many continuations reach the right
answer? With two controls: right answers cut and continued the same way, and fresh answers from scratch,
each with a 95% interval. On the validation split.

    .venv/bin/python bench/repair_rate.py                      # L = 0.5l and L = 0.1l on builtin:tiny-warm-long
    .venv/bin/python bench/repair_rate.py --limit 0.5l --wrong 96
    .venv/bin/python bench/repair_rate.py --out docs/records/repair-long-2026-12-05.json

Prints one JSON object per L (`services.reproduction.repair.RepairResult`); `--out` also writes them, with the
command, the machine and the date, as a record.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rpo_vs_grpo import machine  # noqa: E402

from services.core.synthetic_long import LongTaskConfig  # noqa: E402
from services.models.model_path import resolve_model_path  # noqa: E402
from services.reproduction.repair import repair_rate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin:tiny-warm-long", help="model path or builtin name")
    parser.add_argument(
        "--limit", action="append", help="L: tokens or a share of l (repeatable; default 0.5l and 0.1l)"
    )
    parser.add_argument("--wrong", type=int, default=64, help="wrong answers to cut and continue")
    parser.add_argument("--samples", type=int, default=4, help="continuations per wrong answer (G)")
    parser.add_argument("--out", type=Path, help="also write the figures as a JSON record here")
    args = parser.parse_args()
    model = resolve_model_path(args.model)
    results = []
    for raw in args.limit or ["0.5l", "0.1l"]:
        limit = raw if raw.endswith("l") else int(raw)
        started = time.monotonic()
        result = repair_rate(
            model, LongTaskConfig(), wrong_wanted=args.wrong, limit=limit, samples=args.samples
        )
        results.append({"limit": limit, **result.as_dict(), "seconds": round(time.monotonic() - started, 1)})
        print(json.dumps(results[-1]))
    if args.out:
        record = {
            "command": " ".join([".venv/bin/python", "bench/repair_rate.py", *sys.argv[1:]]),
            "model": args.model,
            "wrong_wanted": args.wrong,
            "samples": args.samples,
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"),
            "results": results,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
