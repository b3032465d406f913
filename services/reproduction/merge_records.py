"""One record from a protocol run in parts: `python -m services.reproduction.merge_records --task T A.json
B.json [--plots DIR] > results.json`.

`rpo reproduce` resumes a protocol in its own run directory, but a run directory is scratch (git-ignored);
what survives a machine is the committed record. A protocol whose seeds ran on different days, each
part recorded by `rpo reproduce` (for example `--seeds 2 --set train.seed=1` after a committed seed 0),
is joined here from the records' own rows, and every figure is computed again over all of them, as
`rpo reproduce --seeds N` would in one go.

The parts must be one protocol on one machine: the same task, base configuration and learner, the same CPU
and disjoint (arm, seed) runs; anything else is refused with what differs. The starting model is evaluated
once per part, in its first run, with that run's seed (`train.seed`): as in one `rpo reproduce`, every run
shares the evaluation of the part with the lowest seed, and each other part's is kept in its entry under
`parts` beside its command, commit and date. Two parts whose first runs share a seed must agree on it
question by question (the warm model is rebuilt by each part; this catches a rebuild that gave another
model). `--plots DIR` writes the joined record's plots, as `rpo reproduce` does for its own.

A part given as `FILE:ARM,ARM` gives only those arms' runs: a follow-up protocol whose full-path arms are an
earlier protocol's, run for run, takes them from that protocol's record. Every run joined must have its
protocol's settings for its arm (the seed aside); a part whose arm was run otherwise is refused."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any

from services.reproduction.plots import write_plots
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


log = logging.getLogger("rpo.merge_records")


class MergeError(ValueError):
    """The records cannot be joined; the message says which record and what differs."""


def merge_records(
    records: list[tuple[str, dict[str, Any]]], task: str, joined_by: str = ""
) -> dict[str, Any]:
    """The record of every run in `records` (name, record), recomputed over all of them; `joined_by` is the
    command that joined them, kept in the record. The parts are taken in the order of their lowest seed, so
    the first is the one a single `rpo reproduce` would have started with."""
    if len(records) < 2:
        raise MergeError("give two or more records to join")
    if task not in PROTOCOLS:
        raise MergeError(f"unknown task {task!r}; choose from {', '.join(PROTOCOLS)}")
    for name, record in records:
        if not isinstance(record, dict):
            raise MergeError(f"{name} is not an `rpo reproduce` record (not a JSON object)")
        missing = [key for key in RECORD_KEYS if key not in record]
        if missing:
            raise MergeError(f"{name} is not an `rpo reproduce` record: it has no {', '.join(missing)}")
        if not record["seeds"] or not record["runs"]:
            raise MergeError(f"{name} holds no finished run")
        if record.get("smoke"):
            raise MergeError(f"{name} is a smoke record (--smoke): its runs are not the protocol's")
    ordered = sorted(enumerate(records), key=lambda item: (min(item[1][1]["seeds"]), item[0]))
    plan = _plan(
        task, sorted({int(s) for _, r in records for by_seed in r["runs"].values() for s in by_seed})
    )
    for name, record in records:
        _check_settings(name, record, plan, task)
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    owner: dict[tuple[str, int], int] = {}
    for index, (name, record) in ordered:
        for arm, by_seed in record["runs"].items():
            for seed, row in by_seed.items():
                key = (arm, int(seed))
                if key in owner:
                    raise MergeError(
                        f"{name} and {records[owner[key]][0]} both hold arm {arm} at seed {seed}"
                    )
                owner[key] = index
                runs.setdefault(arm, {})[int(seed)] = copy.deepcopy(row)
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    unplanned = sorted(f"{arm} seed {seed}" for arm, seed in owner if (arm, seed) not in _planned(plan))
    if unplanned:
        raise MergeError(f"runs outside the {task} protocol at seeds {seeds}: {', '.join(unplanned)}")
    first_index, (first_name, first) = ordered[0]
    for _, (name, record) in ordered[1:]:
        for key in ("task", "base_config", "learner"):
            if record[key] != first[key]:
                differs = (
                    f" (differs in {', '.join(_differing(record[key], first[key]))})"
                    if isinstance(record[key], dict)
                    else f" ({record[key]!r} against {first[key]!r})"
                )
                raise MergeError(f"{name} and {first_name} ran with another {key}{differs}")
        if record["machine"]["cpu"] != first["machine"]["cpu"]:
            raise MergeError(
                f"{name} ran on {record['machine']['cpu']!r}, {first_name} on {first['machine']['cpu']!r}: "
                "step times from two machines do not join"
            )
        if _eval_seed(record) == _eval_seed(first):
            _check_same_start(name, record, first_name, first)
    if first["base_config"] != plan["base"]:
        log.warning(
            "the parts ran with another base configuration than the %s preset gives now (%s); the arms' "
            "settings in the joined record are today's",
            task,
            ", ".join(_differing(first["base_config"], plan["base"])),
        )
    # As in one `rpo reproduce`, the starting model is evaluated once, in the first run, and every run shares
    # that evaluation: a later part's own, sampled with its first run's seed, is kept under `parts`.
    for (arm, seed), index in owner.items():
        if index != first_index:
            evals = runs[arm][seed]["evals"]
            runs[arm][seed]["evals"] = {label: ev for label, ev in evals.items() if ev["step"] != 0}
    parts = [
        {
            "seeds": record["seeds"],
            "command": record["command"],
            "commit": record["commit"],
            "date": record["date"],
            "eval_before": copy.deepcopy(record["eval_before"]),
            **({"arms_taken": record["arms_taken"]} if "arms_taken" in record else {}),
        }
        for _, (_, record) in ordered
    ]
    latest = max(ordered, key=lambda item: (item[1][1]["date"], item[0]))[1][1]  # on one day, the last given
    meta = {
        "task": first["task"],
        "command": "; ".join(p["command"] for p in parts),
        "commit": latest["commit"],
        "date": latest["date"],
        "machine": copy.deepcopy(first["machine"]),
        "learner": first["learner"],
        "base_config": copy.deepcopy(first["base_config"]),
        "parts": parts,
        "joined_by": joined_by
        or f"python -m services.reproduction.merge_records --task {task} "
        + " ".join(name for name, _ in records),
    }
    return results_from_runs(runs, plan, meta)


def take_arms(name: str, record: dict[str, Any], arms: list[str]) -> dict[str, Any]:
    """`record` with only these arms' runs (`FILE:ARM,ARM`): the seeds are theirs, the rest is kept."""
    if not isinstance(record, dict):
        raise MergeError(f"{name} is not an `rpo reproduce` record (not a JSON object)")
    missing = [arm for arm in arms if arm not in record.get("runs", {})]
    if missing:
        held = ", ".join(sorted(record.get("runs", {}))) or "none"
        raise MergeError(f"{name} holds no run of arm {', '.join(missing)} (it holds {held})")
    taken = copy.deepcopy(record)
    taken["runs"] = {arm: taken["runs"][arm] for arm in arms}
    taken["seeds"] = sorted({int(seed) for by_seed in taken["runs"].values() for seed in by_seed})
    taken["arms_taken"] = list(arms)
    return taken


def _check_settings(name: str, record: dict[str, Any], plan: dict[str, Any], task: str) -> None:
    """Every arm `record` brings was run with the settings `task`'s protocol gives it, the seed aside."""
    planned = {arm["name"]: arm["settings"] for arm in plan["arms"]}
    for arm in record["runs"]:
        if arm not in planned:
            continue  # refused below as a run outside the protocol
        ran = record.get("arms", {}).get(arm, {}).get("settings")
        if ran is None:
            raise MergeError(f"{name} does not say which settings arm {arm} ran with")
        differs = _differing(
            {k: v for k, v in ran.items() if k != "seed"},
            {k: v for k, v in planned[arm].items() if k != "seed"},
        )
        if differs:
            drift = (
                "; the preset has changed since this part ran, in "
                + ", ".join(_differing(record["base_config"], plan["base"]))
                if record.get("base_config") not in (None, plan["base"])
                else ""
            )
            raise MergeError(
                f"{name}: arm {arm} ran with other settings than the {task} protocol gives it "
                f"({', '.join(differs)}){drift}"
            )


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
    """The seed a part's evaluation of the starting model sampled with: its first run's (`train.seed`)."""
    return min(record["seeds"])


def _check_same_start(name: str, record: dict[str, Any], first_name: str, first: dict[str, Any]) -> None:
    """Two parts whose first runs share a seed evaluated the same starting model: equal before-training
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


def _part_spec(spec: str) -> tuple[Path, list[str]]:
    """`FILE` or `FILE:ARM,ARM` (the arms to take from it)."""
    path, sep, arms = spec.rpartition(":")
    if not sep or "/" in arms or arms.endswith(".json"):
        return Path(spec), []
    names = [a.strip() for a in arms.split(",") if a.strip()]
    if not names:
        raise MergeError(f"{spec}: name the arms to take after the colon (FILE:ARM,ARM)")
    return Path(path), names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.reproduction.merge_records", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--task", required=True, choices=sorted(PROTOCOLS), help="the protocol the parts ran")
    parser.add_argument(
        "records", nargs="+", help="results.json of each part; FILE:ARM,ARM takes only those arms' runs"
    )
    parser.add_argument("--plots", type=Path, metavar="DIR", help="also write the joined record's plots here")
    args = parser.parse_args(argv)
    loaded = []
    try:
        for spec in args.records:
            path, arms = _part_spec(spec)
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                print(f"merge_records: {path}: {exc}", file=sys.stderr)
                return 2
            loaded.append((spec, take_arms(spec, record, arms) if arms else record))
        merged = merge_records(loaded, args.task)
    except MergeError as exc:
        print(f"merge_records: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(merged, indent=2, default=str))
    if args.plots is not None:
        for path in write_plots(merged, args.plots):
            print(f"merge_records: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
