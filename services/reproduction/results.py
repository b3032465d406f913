"""The numbers of `rpo reproduce`: one row per run read back from its directory, per-arm figures over
training seeds, RPO against its full-path arm, equal time read from the curves, the epsilon sweep, the
targets judged on intervals, and the tables as Markdown.

Everything here reads files a run's `rpo run` wrote (`summary.json`, `metrics.jsonl`) and computes; it
starts nothing, so a finished reproduction can be re-tabulated at any time (`build_results`).

Intervals:
- **Accuracy** (a mean over seeds and questions, or a difference between two arms at the same seed, paired
  question by question): a percentile bootstrap that resamples training seeds, then questions
  (`seeds_and_questions_interval`), so it holds the seed-to-seed variation as well as the evaluation's.
  With one seed it is an interval over questions only, and the tables say how many seeds there were.
- **Ratios** (decoded tokens, step time, RPO over full path, one ratio per seed): a Student t interval over
  seeds (`t_interval`); none with one seed.
A question's pass@1 is its share of correct samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from services.core.algorithm import predicted_decode_ratio
from services.reproduction.formatting import ci, label_text, num, pct, ratio_ci, signed
from services.reproduction.length_room import LENGTH_ROOM_SERIES, length_room
from services.reproduction.statistics import interpolate_curve, per_question_scores, ratio_summary, summary_of
from trainer.telemetry.progress import read_records, read_step_records

PHASES = ("rollout", "train", "weight_sync", "cache")
"""The step phases the tables show (reward scoring runs inside rollout)."""
MARGIN = 0.02
"""The accuracy targets' margin: RPO may trail its full-path arm by at most 2 points (interval's lower end)."""
ROLLOUT_TARGET, STEP_TARGET = 0.3, 0.5
"""At L = 0.1l, the upper ends of the rollout-phase and step-time ratios RPO/full must be at most these."""
ONE_SEED_MINUTES, PROTOCOL_MINUTES = 60, 120
LIFTED_STEPS_TARGET = 0.5
"""The varied-length protocol: the length reward lifts a correct response in at least this share of steps."""
VARIED_GROUPS_READING = 0.5
"""Its reading written before the record: the mechanism acted only if correct lengths vary in this share of
the groups with two or more correct responses."""


# ------------------------------------------------------------------------------------------------ runs
def cache_init_seconds(summary: dict[str, Any], events: list[dict[str, Any]]) -> float:
    """Seconds spent filling the cache before the first step, all of them: `rpo run` seeds it before the
    trainer starts (the summary's `cache_init`), and the trainer checks it again, or seeds it itself when
    started alone (its `cache_init` events). A run that does both pays both."""
    seconds = float((summary.get("cache_init") or {}).get("seconds", 0.0))
    return seconds + sum(float(e.get("seconds", 0.0)) for e in events)


def run_row(run_dir: Path) -> dict[str, Any]:
    """What one run measured: every evaluation (per question), tokens, step time and phases, the curve."""
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = read_step_records(run_dir)
    evals = read_records(run_dir, "eval")
    init_seconds = cache_init_seconds(summary, read_records(run_dir, "cache_init"))
    samples = sum(r.samples for r in steps) or 1
    elapsed, clock = [], init_seconds
    for record in steps:
        clock += record.step_seconds
        elapsed.append(clock)
    return {
        "steps": len(steps),
        "evals": {
            r["label"]: {
                "step": r.get("step", 0),
                "split": r.get("split", "test"),
                "temperature": r.get("temperature"),
                "pass_at_1": r["pass_at_1"],
                "pass_at_k": r["pass_at_k"],
                "k": r["k"],
                "mean_response_tokens": r["mean_response_tokens"],
                "per_question": {q: s[0] for q, s in per_question_scores(r).items()},
                "training_seconds": elapsed[r["step"] - 1] if r.get("step") else 0.0,
            }
            for r in evals
        },
        "cache_init_seconds": init_seconds,
        "decoded_tokens_per_sample": sum(r.generated_tokens for r in steps) / samples,
        "reused_prefix_tokens_per_sample": sum(r.reused_prefix_tokens for r in steps) / samples,
        "response_len_mean": sum(r.response_len_mean * r.samples for r in steps) / samples,
        "mean_step_seconds": float(np.mean([r.step_seconds for r in steps])) if steps else math.nan,
        "phases": {
            p: float(np.mean([r.phases.get(p, 0.0) for r in steps])) if steps else math.nan for p in PHASES
        },
        "training_seconds": clock,
        "wall_seconds": summary.get("wall_seconds"),
        "model_seconds": float((summary.get("setup_seconds") or {}).get("model", 0.0)),
        "series": {
            "step": [r.step for r in steps],
            "elapsed_seconds": elapsed,
            "generated_tokens": [r.generated_tokens for r in steps],
            "response_len_mean": [r.response_len_mean for r in steps],
            "accuracy": [r.accuracy for r in steps],
            "reward_mean": [r.reward_mean for r in steps],
            "cache_updates": [r.cache_updates for r in steps],
            **{key: [getattr(r, key) for r in steps] for key in LENGTH_ROOM_SERIES},
        },
    }


def share_before(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """The starting model's evaluations (made once, in the first run) copied into every run without them."""
    before: dict[str, Any] = {}
    for by_seed in runs.values():
        for row in by_seed.values():
            for label, ev in row["evals"].items():
                if ev["step"] == 0 and label not in before:
                    before[label] = ev
    for by_seed in runs.values():
        for row in by_seed.values():
            for label, ev in before.items():
                row["evals"].setdefault(label, ev)
    return before


def curve(row: dict[str, Any]) -> list[tuple[float, dict[str, float]]]:
    """A run's validation curve: (training seconds, per-question pass@1), cache initialisation counted (the
    policy is unchanged while the cache fills, so the starting point is held until training begins)."""
    points = [
        (ev["training_seconds"], ev["per_question"]) for ev in row["evals"].values() if ev["split"] == "val"
    ]
    start = next((p for t, p in points if t == 0.0), None)
    if start is not None and row["cache_init_seconds"] > 0:
        points.append((row["cache_init_seconds"], start))
    return sorted(points, key=lambda p: p[0])


def _cells(rows: list[dict[str, Any]], label: str) -> list[list[float]]:
    """Seeds x questions pass@1 of one evaluation, on the questions every seed answered."""
    tables = [r["evals"][label]["per_question"] for r in rows if label in r["evals"]]
    if not tables:
        return []
    shared = sorted(set.intersection(*(set(t) for t in tables)))
    return [[t[q] for q in shared] for t in tables]


def paired_difference(mine: dict[Any, dict], theirs: dict[Any, dict], label: str) -> dict[str, Any]:
    """One arm's pass@1 minus another's on one evaluation, paired by seed and question, with its interval."""
    return summary_of(_paired_cells(mine, theirs, label))


def _paired_cells(mine: dict[int, dict], theirs: dict[int, dict], label: str) -> list[list[float]]:
    """Seeds x questions differences of one evaluation between two arms run at the same seeds."""
    diffs = []
    seeds = sorted(set(mine) & set(theirs))
    tables = [
        (mine[s]["evals"][label]["per_question"], theirs[s]["evals"][label]["per_question"])
        for s in seeds
        if label in mine[s]["evals"] and label in theirs[s]["evals"]
    ]
    if not tables:
        return []
    shared = sorted(set.intersection(*(set(a) & set(b) for a, b in tables)))
    for a, b in tables:
        diffs.append([a[q] - b[q] for q in shared])
    return diffs


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


# --------------------------------------------------------------------------------------------- results
def final_labels(runs: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """The test evaluations after training (`after`, `after T=1`, ...), main temperature first."""
    labels: set[str] = set()
    for by_seed in runs.values():
        for row in by_seed.values():
            labels |= {
                lab for lab, ev in row["evals"].items() if ev["split"] == "test" and lab.startswith("after")
            }
    return sorted(labels, key=lambda lab: (lab != "after", lab))


def arm_summary(arm: dict[str, Any], by_seed: dict[int, dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    rows = [by_seed[s] for s in sorted(by_seed)]
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    return {
        "name": arm["name"],
        "label": arm["label"],
        "group": arm["group"],
        "settings": arm["settings"],
        "seeds": sorted(by_seed),
        "accuracy": {label: summary_of(_cells(rows, label)) for label in labels},
        "decoded_tokens_per_sample": mean("decoded_tokens_per_sample"),
        "reused_prefix_tokens_per_sample": mean("reused_prefix_tokens_per_sample"),
        "response_len_mean": mean("response_len_mean"),
        "mean_step_seconds": mean("mean_step_seconds"),
        "phases": {p: float(np.mean([r["phases"][p] for r in rows])) for p in PHASES},
        "cache_init_seconds": mean("cache_init_seconds"),
        "training_seconds": mean("training_seconds"),
        "wall_seconds": float(np.mean([r["wall_seconds"] or 0.0 for r in rows])),
        "length_room": length_room(rows, arm["settings"]["alpha"]),
    }


def compare(
    rpo: dict[int, dict[str, Any]], full: dict[int, dict[str, Any]], limit: Any, labels: list[str]
) -> dict[str, Any]:
    """RPO against its full-path arm, seed by seed: ratios with t intervals, accuracy differences with
    seeds-and-questions intervals, and the decoded-token ratio predicted from the measured lengths."""
    seeds = sorted(set(rpo) & set(full))

    def per_seed(fn: Any) -> dict[str, Any]:
        return ratio_summary([fn(rpo[s], full[s]) for s in seeds])

    rest = [p for p in PHASES if p != "rollout"]
    return {
        "seeds": seeds,
        "decoded_tokens": per_seed(
            lambda a, b: _ratio(a["decoded_tokens_per_sample"], b["decoded_tokens_per_sample"])
        ),
        "decoded_tokens_predicted": per_seed(
            lambda a, b: (
                predicted_decode_ratio(limit, a["response_len_mean"], b["response_len_mean"])
                if b["response_len_mean"] > 0
                else math.nan
            )
        ),
        "step_seconds": per_seed(lambda a, b: _ratio(a["mean_step_seconds"], b["mean_step_seconds"])),
        "phases": {p: per_seed(lambda a, b, p=p: _ratio(a["phases"][p], b["phases"][p])) for p in PHASES},
        "other_phases": per_seed(
            lambda a, b: _ratio(sum(a["phases"][p] for p in rest), sum(b["phases"][p] for p in rest))
        ),
        "training_seconds": per_seed(lambda a, b: _ratio(a["training_seconds"], b["training_seconds"])),
        "accuracy_difference": {label: summary_of(_paired_cells(rpo, full, label)) for label in labels},
    }


def equal_time(rpo: dict[int, dict[str, Any]], full: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """RPO's validation accuracy when it finished against the full-path arm's, read off its curve at the
    same training time (cache initialisation counted), seed by seed."""
    diffs, times, rpo_means, full_means = [], [], [], []
    for seed in sorted(set(rpo) & set(full)):
        mine, theirs = curve(rpo[seed]), curve(full[seed])
        if not mine or not theirs:
            continue
        at = rpo[seed]["training_seconds"]
        final, other = mine[-1][1], interpolate_curve(theirs, at)
        shared = sorted(set(final) & set(other))
        diffs.append([final[q] - other[q] for q in shared])
        times.append(at)
        rpo_means.append(float(np.mean([final[q] for q in shared])))
        full_means.append(float(np.mean([other[q] for q in shared])))
    if diffs:
        width = min(len(d) for d in diffs)
        diffs = [d[:width] for d in diffs]
    return {
        **summary_of(diffs),
        "seconds": times,
        "rpo_pass_at_1": float(np.mean(rpo_means)) if rpo_means else math.nan,
        "full_pass_at_1": float(np.mean(full_means)) if full_means else math.nan,
        "full_training_seconds": [full[s]["training_seconds"] for s in sorted(set(rpo) & set(full))],
    }


def build_results(out: Path, plan: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """results.json (what docs/results.md is rendered from), from a reproduction's directory."""
    return results_from_runs(finished_runs(out, plan), plan, meta)


def finished_runs(out: Path, plan: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    """The row of every planned run that finished, by arm and seed."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for run in plan["runs"]:
        run_dir = out / run["dir"]
        summary = run_dir / "summary.json"
        if summary.exists() and json.loads(summary.read_text()).get("ok"):
            runs.setdefault(run["arm"], {})[run["seed"]] = run_row(run_dir)
    return runs


def results_from_runs(
    runs: dict[str, dict[int, dict[str, Any]]], plan: dict[str, Any], meta: dict[str, Any]
) -> dict[str, Any]:
    """The record from the runs' rows (the per-arm figures, comparisons and targets, as one JSON-able dict),
    filling the starting model's evaluations into every row; `merge_records` calls it on joined parts."""
    arms = {a["name"]: a for a in plan["arms"]}
    before = share_before(runs)
    labels = final_labels(runs)
    summaries = {name: arm_summary(arms[name], runs[name], labels) for name in arms if name in runs}
    comparisons = {
        name: {
            "full": arm["full"],
            **compare(runs[name], runs[arm["full"]], arm["settings"]["truncation_limit"], labels),
        }
        for name, arm in arms.items()
        if arm.get("full") and name in runs and arm["full"] in runs
    }
    equal = {
        rpo: equal_time(runs[rpo], runs[full])
        for rpo, full in plan.get("headline_pairs", [])
        if rpo in runs and full in runs
    }
    base = plan.get("epsilon_base")
    epsilon = {
        name: {label: summary_of(_paired_cells(runs[name], runs[base], label)) for label in labels}
        for name in ("rpo-grpo", *[n for n in arms if arms[n]["group"] == "epsilon"])
        if base in runs and name in runs and name != base
    }
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    wall_by_seed = {s: sum(runs[a][s]["wall_seconds"] or 0.0 for a in runs if s in runs[a]) for s in seeds}
    results = {
        **meta,
        "seeds": seeds,
        "eval_before": {
            label: {k: v for k, v in ev.items() if k != "per_question"} for label, ev in before.items()
        },
        "eval_labels": labels,
        "arms": summaries,
        "comparisons": comparisons,
        "equal_time": equal,
        "epsilon": epsilon,
        "wall_seconds_by_seed": wall_by_seed,
        "wall_seconds": sum(wall_by_seed.values()),
        "model_build_seconds": sum(
            row["model_seconds"] for by_seed in runs.values() for row in by_seed.values()
        ),
        "smoke": plan.get("smoke", False),
        "runs": {name: {str(s): row for s, row in sorted(by_seed.items())} for name, by_seed in runs.items()},
    }
    results["targets"] = targets(results, plan)
    return results


# --------------------------------------------------------------------------------------------- targets
def _low(summary: dict[str, Any]) -> float:
    return summary["ci"][0]


def target(text: str, measured: str, met: bool | None) -> dict[str, Any]:
    return {"target": text, "measured": measured, "met": met}


def targets(results: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The protocol's targets, each judged on an interval (None: not measurable from what finished)."""
    arms, comparisons = results["arms"], results["comparisons"]
    out: list[dict[str, Any]] = []
    for rpo, full in plan.get("headline_pairs", []):
        cmp = comparisons.get(rpo)
        if cmp is None:
            continue
        for label in results["eval_labels"]:
            diff = cmp["accuracy_difference"].get(label)
            if not diff or math.isnan(diff["mean"]):
                continue
            low = _low(diff)
            out.append(
                target(
                    f"equal steps, {label_text(label, results)}: {arms[rpo]['label']} - {arms[full]['label']}, "
                    f"lower end of the 95% interval >= -{100 * MARGIN:.0f} points",
                    f"{signed(diff['mean'])}{ci(diff['ci'])} ({diff['seeds']} seeds x {diff['questions']} questions)",
                    None if math.isnan(low) else bool(low >= -MARGIN),
                )
            )
        eq = results["equal_time"].get(rpo)
        if eq and not math.isnan(eq["mean"]):
            out.append(
                target(
                    f"equal time (validation curves, cache initialisation counted): {arms[rpo]['label']} - "
                    f"{arms[full]['label']}, lower end >= -{100 * MARGIN:.0f} points",
                    f"{pct(eq['rpo_pass_at_1'])} vs {pct(eq['full_pass_at_1'])} at "
                    f"{np.mean(eq['seconds']):.0f} s: {signed(eq['mean'])}{ci(eq['ci'])}",
                    None if math.isnan(_low(eq)) else bool(_low(eq) >= -MARGIN),
                )
            )
    for name, cmp in comparisons.items():
        if arms[name]["group"] != "timing":
            continue
        for key, bound, what in (
            (cmp["phases"]["rollout"], ROLLOUT_TARGET, "rollout phase"),
            (cmp["step_seconds"], STEP_TARGET, "step time"),
        ):
            high = key["ci"][1]
            out.append(
                target(
                    f"{arms[name]['label']}: {what} RPO/full, upper end of the 95% interval <= {bound}",
                    f"{num(key['mean'], 3)}{ratio_ci(key['ci'])}",
                    None if math.isnan(high) else bool(high <= bound),
                )
            )
    for name, by_label in results["epsilon"].items():
        diff = by_label.get("after")
        if not diff or math.isnan(diff["mean"]):
            continue
        low, high = diff["ci"]
        resolved = not (math.isnan(low) or low <= 0.0 <= high)
        out.append(
            target(
                f"epsilon sweep: {arms[name]['label']} - epsilon 0 (does the update rule matter?)",
                f"{signed(diff['mean'])}{ci(diff['ci'])}: "
                + ("the interval excludes 0" if resolved else "the interval holds 0, no effect shown"),
                None,
            )
        )
    if plan.get("length_target"):
        out += length_targets(results, plan)
    by_seed = results["wall_seconds_by_seed"]
    if by_seed and not results.get("smoke"):
        first = by_seed[min(by_seed)]
        out.append(
            target(
                f"one seed (`rpo reproduce`) within {ONE_SEED_MINUTES} minutes",
                f"{first / 60:.1f} min",
                bool(first <= ONE_SEED_MINUTES * 60),
            )
        )
        if len(by_seed) >= 3:
            total = sum(by_seed.values())
            minutes = plan.get("protocol_minutes", PROTOCOL_MINUTES)
            out.append(
                target(
                    f"{len(by_seed)} seeds (`rpo reproduce --seeds {len(by_seed)}`) within {minutes} minutes",
                    f"{total / 60:.1f} min",
                    bool(total <= minutes * 60),
                )
            )
    return out


def length_targets(results: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The varied-length protocol's targets on each headline RPO arm with the length reward on: it lifted a
    correct response above the floor in at least half of the steps; and the reading written before the
    record, that the mechanism acted only if correct lengths varied in at least half of the groups with two
    or more correct responses (reported, not a pass or fail)."""
    arms, out = results["arms"], []
    for rpo, _full in plan.get("headline_pairs", []):
        room = arms.get(rpo, {}).get("length_room")
        if not room or arms[rpo]["settings"]["alpha"] <= 0:
            continue
        label = arms[rpo]["label"]
        share = room["lifted_steps_share"]
        out.append(
            target(
                f"{label}: the length reward lifts a correct response above the floor in at least "
                f"{100 * LIFTED_STEPS_TARGET:.0f}% of the steps",
                f"{100 * share:.0f}% of {room['steps']} steps",
                bool(share >= LIFTED_STEPS_TARGET),
            )
        )
        varied = room["varied_groups_share"]
        acted = not math.isnan(varied) and varied >= VARIED_GROUPS_READING
        out.append(
            target(
                f"{label}: the mechanism acted only if correct lengths vary in at least "
                f"{100 * VARIED_GROUPS_READING:.0f}% of the groups with two or more correct responses",
                f"{pct(varied)}% of them vary, by {num(room['correct_length_spread'], 1)} tokens on average: "
                + ("it had room" if acted else "it had little room"),
                None,
            )
        )
    return out
