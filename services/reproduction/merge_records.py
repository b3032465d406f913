"""One record from a protocol run in parts: `python -m services.reproduction.merge_records --task T A.json
B.json > results.json`.

`rpo reproduce` resumes a protocol in its own run directory, but a run directory is scratch (git-ignored);
what survives a machine is the committed record. A protocol whose seeds ran on different days, each
part recorded by `rpo reproduce` (for example `--seeds 2 --set train.seed=1` after a committed seed 0),
is joined here from the records' own rows, and every figure is computed again over all of them, as
`rpo reproduce --seeds N` would in one go.

The parts must be one protocol on one machine: the same task and base configuration (the one the
protocol's preset gives now), the same CPU and disjoint (arm, seed) runs; anything else is refused with
what differs. Evaluations sample with the part's first training seed, so the starting model is evaluated
once per part: as in one `rpo reproduce`, every run shares the first part's evaluation, and each later
part's is kept in its entry under `parts` beside its command, commit and date. Two parts that sampled with
the same seed must agree on it question by question (the warm model is rebuilt by each part; this catches
a rebuild that gave another model)."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from services.reproduction.protocols import PROTOCOLS
from services.reproduction.reproduce import Reproduction
from services.reproduction.results import results_from_runs
from services.supervisor.main_job import preset_path

RECORD_KEYS = (
    "task",
    "command",
    "commit",
    "date",
    "machine",
    "learner",
    "base_config",
    "seeds",
    "eval_before",
    "runs",
)
"""What a part's record must hold to be joined."""


class MergeError(ValueError):
    """The records cannot be joined; the message says which record and what differs."""


def merge_records(
    records: list[tuple[str, dict[str, Any]]], task: str, joined_by: str = ""
) -> dict[str, Any]:
    """The record of every run in `records` (name, record), recomputed over all of them; `joined_by` is the
    command that joined them, kept in the record."""
    if len(records) < 2:
        raise MergeError("give two or more records to join")
    if task not in PROTOCOLS:
        raise MergeError(f"unknown task {task!r}; choose from {', '.join(PROTOCOLS)}")
    for name, record in records:
        missing = [key for key in RECORD_KEYS if key not in record]
        if missing:
            raise MergeError(f"{name} is not an `rpo reproduce` record: it has no {', '.join(missing)}")
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    owner: dict[tuple[str, int], str] = {}
    for name, record in records:
        if record.get("smoke"):
            raise MergeError(f"{name} is a smoke record (--smoke): its runs are not the protocol's")
        for arm, by_seed in record["runs"].items():
            for seed, row in by_seed.items():
                key = (arm, int(seed))
                if key in owner:
                    raise MergeError(f"{name} and {owner[key]} both hold arm {arm} at seed {seed}")
                owner[key] = name
                runs.setdefault(arm, {})[int(seed)] = copy.deepcopy(row)
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    plan = _plan(task, seeds)
    unplanned = sorted(f"{arm} seed {seed}" for arm, seed in owner if (arm, seed) not in _planned(plan))
    if unplanned:
        raise MergeError(f"runs outside the {task} protocol at seeds {seeds}: {', '.join(unplanned)}")
    first_name, first = records[0]
    for name, record in records:
        if record["base_config"] != plan["base"]:
            raise MergeError(
                f"{name}: its base configuration is not the {task} protocol's as its preset gives it now "
                f"(differs in {', '.join(_differing(record['base_config'], plan['base']))})"
            )
        if record["machine"]["cpu"] != first["machine"]["cpu"]:
            raise MergeError(
                f"{name} ran on {record['machine']['cpu']!r}, {first_name} on {first['machine']['cpu']!r}: "
                "step times from two machines do not join"
            )
        if _eval_seed(record) == _eval_seed(first):
            _check_same_start(name, record, first_name, first)
    # As in one `rpo reproduce`, the starting model's evaluations are the first part's, shared by every run:
    # a later part sampled its own with another seed, kept in its entry under `parts`.
    for arm, seed in owner:
        if owner[(arm, seed)] != first_name:
            evals = runs[arm][seed]["evals"]
            runs[arm][seed]["evals"] = {label: ev for label, ev in evals.items() if ev["step"] != 0}
    parts = [
        {
            "seeds": record["seeds"],
            "command": record["command"],
            "commit": record["commit"],
            "date": record["date"],
            "eval_before": record["eval_before"],
        }
        for _, record in records
    ]
    latest = max(records, key=lambda nr: nr[1]["date"])[1]
    meta = {
        "task": first["task"],
        "command": "; ".join(p["command"] for p in parts),
        "commit": latest["commit"],
        "date": latest["date"],
        "machine": first["machine"],
        "learner": first["learner"],
        "base_config": plan["base"],
        "parts": parts,
        "joined_by": joined_by
        or f"python -m services.reproduction.merge_records --task {task} "
        + " ".join(name for name, _ in records),
    }
    return results_from_runs(runs, plan, meta)


def _plan(task: str, seeds: list[int]) -> dict[str, Any]:
    """What `rpo reproduce --task T --seeds N` would plan over these seeds (arms, pairs, targets)."""
    protocol = PROTOCOLS[task]
    reproduction = Reproduction(
        preset_path(protocol.preset),
        [f"train.seed={seeds[0]}"],
        seeds=seeds[-1] - seeds[0] + 1,
        smoke=False,
        command="",
        protocol=protocol,
    )
    return {**reproduction.plan, "seeds": seeds}


def _planned(plan: dict[str, Any]) -> set[tuple[str, int]]:
    return {(run["arm"], run["seed"]) for run in plan["runs"]}


def _differing(mine: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} against {b!r})")
    return out


def _eval_seed(record: dict[str, Any]) -> int:
    """The seed a part's evaluations sampled with: its first training seed (`train.seed`)."""
    return min(record["seeds"])


def _check_same_start(name: str, record: dict[str, Any], first_name: str, first: dict[str, Any]) -> None:
    """Two parts that sampled with the same seed evaluated the same starting model: equal before-training
    scores, question by question. (Parts at other seeds sample differently; their scores cannot say.)"""
    for label in first["eval_before"]:
        mine, theirs = _before(record, label), _before(first, label)
        if mine is None or theirs is None:
            raise MergeError(f"{name if mine is None else first_name} has no {label!r} evaluation")
        if mine != theirs:
            differ = sum(1 for q in set(mine) | set(theirs) if mine.get(q) != theirs.get(q))
            raise MergeError(
                f"{name} and {first_name} evaluated different starting models: {label!r} differs on "
                f"{differ} of {len(theirs)} questions (was the warm model built on another machine?)"
            )


def _before(record: dict[str, Any], label: str) -> dict[str, float] | None:
    for by_seed in record["runs"].values():
        for row in by_seed.values():
            ev = row["evals"].get(label)
            if ev is not None and ev["step"] == 0:
                return ev["per_question"]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.reproduction.merge_records", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--task", required=True, choices=sorted(PROTOCOLS), help="the protocol the parts ran")
    parser.add_argument("records", nargs="+", type=Path, help="results.json of each part, in order")
    args = parser.parse_args(argv)
    loaded = []
    for path in args.records:
        try:
            loaded.append((str(path), json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"merge_records: {path}: {exc}", file=sys.stderr)
            return 2
    try:
        merged = merge_records(loaded, args.task)
    except MergeError as exc:
        print(f"merge_records: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(merged, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
