"""The figures of scripts/gpu_smoke.sh and its transport check, from the runs' own step records
(OUT/run-http, OUT/run-nccl: metrics.jsonl, `weight_transport` of each step that pushed, trainer/telemetry/records.py).

Prints, per run, the mean step, rollout, train and weight-sync times and the decode rate (the first step,
which pays warm-up, left out), then whether every push of the run went the expected way: HTTP for
run-http and, for run-nccl, NCCL on a GPU box (NCCL=gpu), HTTP where the trainer runs on CPU (cpu); run-nccl
absent with NCCL=skip (one GPU). Exit 1 if a push went another way, a silent fall-back to HTTP
("http_fallback") included, or a run recorded no step. Usage: gpu_smoke_records.py OUT_DIR gpu|cpu|skip
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def step_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
    return [r for r in rows if r.get("kind") == "step"]


def main(out: Path, nccl: str) -> int:
    bad = 0
    for name in ("run-http", "run-nccl"):
        records = step_records(out / name)
        if name == "run-nccl" and nccl == "skip":
            continue
        if not records:
            print(f"[fail] {name}: no steps recorded")
            bad = 1
            continue
        rest = records[1:] or records  # the first step pays warm-up

        def mean(key, rest=rest) -> float:
            return statistics.fmean(key(r) for r in rest)

        print(
            f"{name}: step {mean(lambda r: r['step_seconds']):.2f} s, "
            f"rollout {mean(lambda r: r['phases']['rollout']):.2f} s, "
            f"train {mean(lambda r: r['phases']['train']):.2f} s, "
            f"weight sync {mean(lambda r: r['phases']['weight_sync']):.3f} s, "
            f"decode {mean(lambda r: r['tokens_per_second']):,.0f} tokens/s"
        )
        pushed = [r for r in records if r.get("weight_sync_seconds") is not None]
        used = sorted({r.get("weight_transport") or "unnamed" for r in pushed})
        want = "nccl" if name == "run-nccl" and nccl == "gpu" else "http"
        if used != [want]:
            print(
                f"[fail] {name}: weights went over {', '.join(used) or 'nothing'}, expected {want} on every push"
            )
            bad = 1
        elif name == "run-nccl":
            why = " (the trainer runs on CPU: NCCL weight transfer needs a GPU)" if nccl == "cpu" else ""
            print(
                f"run-nccl: weights went over {want.upper()}{why}, on all {len(pushed)} pushes (step records)"
            )
    return bad


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in ("gpu", "cpu", "skip"):
        sys.exit("usage: python scripts/gpu_smoke_records.py OUT_DIR gpu|cpu|skip")
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
