"""The long task's repair property on the built-in warm model: from prefixes cut out of the model's own
WRONG answers (m ~ U{1..L}, suffix budget m, as an RPO step does), how many continuations reach the right
answer? With two controls: right answers cut and continued the same way, and fresh answers from scratch,
each with a 95% interval. On the validation split.

    .venv/bin/python bench/repair_rate.py                      # L = 0.5l and L = 0.1l on builtin:tiny-warm-long
    .venv/bin/python bench/repair_rate.py --limit 0.5l --wrong 96

Prints one JSON object per L (`services.demo.repair.RepairResult`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.core.synthetic_long import LongTaskConfig  # noqa: E402
from services.demo.model_path import resolve_model_path  # noqa: E402
from services.demo.repair import repair_rate  # noqa: E402


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
    args = parser.parse_args()
    model = resolve_model_path(args.model)
    for raw in args.limit or ["0.5l", "0.1l"]:
        limit = raw if raw.endswith("l") else int(raw)
        started = time.monotonic()
        result = repair_rate(
            model, LongTaskConfig(), wrong_wanted=args.wrong, limit=limit, samples=args.samples
        )
        print(
            json.dumps({"limit": limit, **result.as_dict(), "seconds": round(time.monotonic() - started, 1)})
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
