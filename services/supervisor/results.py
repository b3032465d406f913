"""The numbers of `rpo reproduce`: one row per arm read back from its run directory, 95% intervals,
RPO/full ratios, the issue's targets, and the tables as Markdown.

Everything here reads files an arm's `rpo run` wrote (`summary.json`, `metrics.jsonl`) and computes; it
starts nothing, so a finished reproduction can be re-tabulated at any time (`build_results`).

Intervals are percentile bootstraps over held-out questions (2,000 resamples, fixed seed): a question's
pass@1 is its share of correct samples, its pass@k the unbiased estimator. A difference between two arms
is bootstrapped question by question (paired: the arms answer the same questions), which is tighter than
comparing two separate intervals.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.core.algorithm import predicted_decode_ratio
from trainer.evaluate import pass_at_k
from trainer.progress import read_records, read_step_records

BOOTSTRAP_RESAMPLES = 2000
PHASES = ("rollout", "train", "weight_sync", "cache")
"""The step phases the table shows (reward scoring runs inside rollout)."""


def bootstrap_interval(values: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of `values`."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(BOOTSTRAP_RESAMPLES, data.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return (float(low), float(high))


def seeds_and_questions_interval(cells: Sequence[Sequence[float]], seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of a seeds x questions table (every row the same
    questions): each resample draws training seeds, then questions, both with replacement, so the interval
    holds the seed-to-seed variation as well as the evaluation's."""
    data = np.asarray(cells, dtype=float)
    if data.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, data.shape[0], size=(BOOTSTRAP_RESAMPLES, data.shape[0]))
    columns = rng.integers(0, data.shape[1], size=(BOOTSTRAP_RESAMPLES, data.shape[1]))
    means = np.array([data[np.ix_(r, c)].mean() for r, c in zip(rows, columns, strict=True)])
    low, high = np.percentile(means, [2.5, 97.5])
    return (float(low), float(high))


def per_question_scores(eval_record: dict[str, Any], k: int | None = None) -> dict[str, tuple[float, float]]:
    """Question id -> (pass@1, pass@k) from an evaluation's per-question [samples, correct] counts."""
    k = k or eval_record["k"]
    scores = {}
    for qid, (n, c) in eval_record.get("correct_per_question", {}).items():
        scores[qid] = (pass_at_k(n, c, 1), pass_at_k(n, c, min(k, n)))
    return scores


def eval_summary(eval_record: dict[str, Any] | None) -> dict[str, Any] | None:
    """pass@1 and pass@k of one evaluation with their 95% intervals."""
    if not eval_record:
        return None
    scores = per_question_scores(eval_record)
    p1 = [s[0] for s in scores.values()]
    pk = [s[1] for s in scores.values()]
    return {
        "pass_at_1": eval_record["pass_at_1"],
        "pass_at_1_ci": bootstrap_interval(p1),
        "pass_at_k": eval_record["pass_at_k"],
        "pass_at_k_ci": bootstrap_interval(pk),
        "k": eval_record["k"],
        "questions": eval_record["questions"],
        "mean_response_tokens": eval_record["mean_response_tokens"],
        "step": eval_record.get("step", 0),
    }


def paired_difference(after: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """pass@1 of `after` minus `reference` over the questions both answered, with a paired 95% interval."""
    mine, theirs = per_question_scores(after), per_question_scores(reference)
    shared = sorted(set(mine) & set(theirs))
    diffs = [mine[q][0] - theirs[q][0] for q in shared]
    return {
        "difference": float(np.mean(diffs)) if diffs else math.nan,
        "ci": bootstrap_interval(diffs),
        "questions": len(shared),
    }


def arm_row(arm_dir: Path, arm: dict[str, Any]) -> dict[str, Any]:
    """What one arm measured: accuracy before/after, tokens, step time and its phases, wall time."""
    summary = json.loads((arm_dir / "summary.json").read_text())
    steps = read_step_records(arm_dir)
    evals = read_records(arm_dir, "eval")
    samples = sum(r.samples for r in steps) or 1
    step_seconds = [r.step_seconds for r in steps]
    elapsed, clock = [], 0.0
    for seconds in step_seconds:
        clock += seconds
        elapsed.append(clock)
    by_label = {r["label"]: r for r in evals}
    settings = arm["settings"]
    return {
        "name": arm["name"],
        "label": arm["label"],
        "settings": settings,
        "steps": len(steps),
        "eval_before": eval_summary(by_label.get("before")),
        "eval_after": eval_summary(by_label.get("after")),
        "evals": [
            {
                "label": r["label"],
                "step": r.get("step", 0),
                "training_seconds": elapsed[r["step"] - 1] if r.get("step") else 0.0,
                "pass_at_1": r["pass_at_1"],
            }
            for r in evals
        ],
        "decoded_tokens_per_sample": sum(r.generated_tokens for r in steps) / samples,
        "reused_prefix_tokens_per_sample": sum(r.reused_prefix_tokens for r in steps) / samples,
        "response_len_mean": sum(r.response_len_mean * r.samples for r in steps) / samples,
        "full_path_reference": summary.get("full_path_reference"),
        "mean_step_seconds": float(np.mean(step_seconds)) if steps else math.nan,
        "phases": {
            p: float(np.mean([r.phases.get(p, 0.0) for r in steps])) if steps else math.nan for p in PHASES
        },
        "training_seconds": clock,
        "wall_seconds": summary.get("wall_seconds"),
        "series": {
            "step": [r.step for r in steps],
            "elapsed_seconds": elapsed,
            "generated_tokens": [r.generated_tokens for r in steps],
            "decoded_tokens_per_sample": [r.decoded_tokens_per_sample for r in steps],
            "response_len_mean": [r.response_len_mean for r in steps],
            "accuracy": [r.accuracy for r in steps],
            "reward_mean": [r.reward_mean for r in steps],
        },
    }


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def compare(rpo: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """RPO/full ratios of two arms, and the predicted decoded-token ratio beside the measured one."""
    limit = rpo["settings"]["truncation_limit"]
    predicted = (
        predicted_decode_ratio(limit, rpo["response_len_mean"], full["response_len_mean"])
        if full["response_len_mean"] > 0
        else math.nan
    )
    measured = _ratio(rpo["decoded_tokens_per_sample"], full["decoded_tokens_per_sample"])
    rest = [p for p in PHASES if p != "rollout"]
    return {
        "rpo": rpo["name"],
        "full": full["name"],
        "decoded_tokens_predicted": predicted,
        "decoded_tokens_measured": measured,
        "step_seconds": _ratio(rpo["mean_step_seconds"], full["mean_step_seconds"]),
        "phases": {p: _ratio(rpo["phases"][p], full["phases"][p]) for p in PHASES},
        "other_phases": _ratio(sum(rpo["phases"][p] for p in rest), sum(full["phases"][p] for p in rest)),
        "training_seconds": _ratio(rpo["training_seconds"], full["training_seconds"]),
        "wall_seconds": _ratio(rpo["wall_seconds"], full["wall_seconds"]),
    }


def accuracy_at(row: dict[str, Any], seconds: float) -> float:
    """pass@1 of an arm at `seconds` of training time, read off its evaluations (linear in between;
    the last evaluation after the run's end)."""
    points = sorted((e["training_seconds"], e["pass_at_1"]) for e in row["evals"])
    if not points:
        return math.nan
    times, values = zip(*points, strict=True)
    return float(np.interp(seconds, times, values))


def gpu_projection(comparison: dict[str, Any], rollout_share: float) -> float:
    """Step-time ratio RPO/full if rollout took `rollout_share` of a full-path step (as on a GPU run) and
    the rollout and the other phases (train, weight sync, cache, together) each kept the ratio measured here:
    share * rollout ratio + (1 - share) * other phases' ratio."""
    return rollout_share * comparison["phases"]["rollout"] + (1 - rollout_share) * comparison["other_phases"]


# ------------------------------------------------------------------------------------------------ tables
def _pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _ci(pair: Sequence[float] | None) -> str:
    if not pair or any(math.isnan(v) for v in pair):
        return ""
    return f" [{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]"


def _num(value: float | None, digits: int = 2) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def main_table(results: dict[str, Any]) -> str:
    """The paper's table in shape: one row per arm."""
    arms = results["arms"]
    before = results.get("eval_before") or {}
    k = before.get("k") or 1
    lines = [
        f"| arm | pass@1 before | pass@1 after [95% CI] | pass@{k} before | pass@{k} after [95% CI] | "
        "decoded tokens / sample | predicted RPO/full | measured RPO/full | reused prefix tokens / sample | "
        "step s | rollout s | train s | weight sync s | cache s | wall s |",
        "|---" * 15 + "|",
    ]
    for name, row in arms.items():
        after = row.get("eval_after") or {}
        cmp = results["comparisons"].get(name) or {}
        lines.append(
            f"| {row['label']} | {_pct(before.get('pass_at_1'))}{_ci(before.get('pass_at_1_ci'))} "
            f"| {_pct(after.get('pass_at_1'))}{_ci(after.get('pass_at_1_ci'))} "
            f"| {_pct(before.get('pass_at_k'))} | {_pct(after.get('pass_at_k'))}{_ci(after.get('pass_at_k_ci'))} "
            f"| {_num(row['decoded_tokens_per_sample'], 1)} "
            f"| {_num(cmp.get('decoded_tokens_predicted'), 3) if cmp else '-'} "
            f"| {_num(cmp.get('decoded_tokens_measured'), 3) if cmp else '-'} "
            f"| {_num(row['reused_prefix_tokens_per_sample'], 1)} | {_num(row['mean_step_seconds'])} | "
            + " | ".join(_num(row["phases"][p]) for p in PHASES)
            + f" | {_num(row['wall_seconds'], 0)} |"
        )
    return "\n".join(lines)


def ratio_table(results: dict[str, Any]) -> str:
    """RPO over its full-path counterpart, phase by phase."""
    lines = [
        "| RPO arm / full arm | decoded tokens | rollout | train | weight sync | cache | step | training time "
        "| arm wall time | pass@1 after, RPO - full [paired 95% CI] |",
        "|---" * 10 + "|",
    ]
    for name, cmp in results["comparisons"].items():
        diff = cmp.get("pass_at_1_difference") or {}
        arms = results["arms"]
        lines.append(
            f"| {arms[name]['label']} / {arms[cmp['full']]['label']} | {_num(cmp['decoded_tokens_measured'], 3)} | "
            + " | ".join(_num(cmp["phases"][p]) for p in PHASES)
            + f" | {_num(cmp['step_seconds'])} | {_num(cmp['training_seconds'])} | {_num(cmp['wall_seconds'])} "
            f"| {_signed(diff.get('difference'))}{_ci(diff.get('ci'))} |"
        )
    return "\n".join(lines)


def _signed(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:+.1f}"


def sweep_table(results: dict[str, Any], parameter: str) -> str:
    """One sweep: the RPO+GRPO arm with one setting varied."""
    rows = results["sweeps"].get(parameter, [])
    lines = [
        f"| {parameter} | pass@1 after [95% CI] | RPO - full [paired 95% CI] | decoded tokens / sample "
        "| predicted RPO/full | measured RPO/full | step s | rollout s | step RPO/full |",
        "|---" * 9 + "|",
    ]
    for point in rows:
        row = results["arms"][point["arm"]]
        cmp = results["comparisons"].get(point["arm"]) or {}
        after = row.get("eval_after") or {}
        diff = cmp.get("pass_at_1_difference") or {}
        lines.append(
            f"| {point['value']} | {_pct(after.get('pass_at_1'))}{_ci(after.get('pass_at_1_ci'))} "
            f"| {_signed(diff.get('difference'))}{_ci(diff.get('ci'))} "
            f"| {_num(row['decoded_tokens_per_sample'], 1)} | {_num(cmp.get('decoded_tokens_predicted'), 3)} "
            f"| {_num(cmp.get('decoded_tokens_measured'), 3)} | {_num(row['mean_step_seconds'])} "
            f"| {_num(row['phases']['rollout'])} | {_num(cmp.get('step_seconds'))} |"
        )
    return "\n".join(lines)


def targets_table(results: dict[str, Any]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for target in results["targets"]:
        met = {True: "yes", False: "no", None: "n/a"}[target["met"]]
        lines.append(f"| {target['target']} | {target['measured']} | {met} |")
    return "\n".join(lines)


def gpu_projection_line(results: dict[str, Any]) -> str:
    projection = results["gpu_projection"]
    arms = results["arms"]
    parts = [f"{arms[n]['label']} {ratio:.2f}" for n, ratio in projection["step_ratio"].items()]
    return (
        f"Step time RPO/full projected for a GPU run where rollout is {100 * projection['rollout_share']:.0f}% "
        f"of a full-path step (an assumption) and rollout and the other phases keep the ratios measured "
        f"here: {', '.join(parts) or 'n/a'}."
    )


def render_markdown(results: dict[str, Any]) -> str:
    """Every table of a reproduction, as one Markdown document (the run directory's `results.md`)."""
    parts = [
        f"# rpo reproduce: {results['task']}",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"{results['machine']['gpu']}; {results['date']}; learner: {results['learner']}; "
        f"total wall time {results['wall_seconds']:.0f} s.",
        "",
        "## Arms",
        "",
        main_table(results),
        "",
        "## RPO / full path",
        "",
        ratio_table(results),
        "",
        gpu_projection_line(results),
        "",
        "## Targets",
        "",
        targets_table(results),
    ]
    for parameter in results["sweeps"]:
        parts += ["", f"## Sweep: {parameter}", "", sweep_table(results, parameter)]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ results
def build_results(out: Path, plan: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Every finished arm's row, the comparisons, the sweeps and the targets, as one JSON-able dict."""
    arms: dict[str, dict[str, Any]] = {}
    after_records: dict[str, dict[str, Any]] = {}
    for arm in plan["arms"]:
        arm_dir = out / "arms" / arm["name"]
        if not (arm_dir / "summary.json").exists():
            continue
        arms[arm["name"]] = arm_row(arm_dir, arm)
        after = {r["label"]: r for r in read_records(arm_dir, "eval")}.get("after")
        if after:
            after_records[arm["name"]] = after
    # The starting model is the same in every arm: it is evaluated once, in the first arm.
    eval_before = next((row["eval_before"] for row in arms.values() if row["eval_before"]), None)
    for row in arms.values():
        if row["eval_before"] is None and eval_before is not None:
            row["eval_before"] = eval_before
            row["evals"].insert(
                0,
                {
                    "label": "before",
                    "step": 0,
                    "training_seconds": 0.0,
                    "pass_at_1": eval_before["pass_at_1"],
                },
            )
    comparisons = {
        arm["name"]: compare(arms[arm["name"]], arms[arm["full"]])
        for arm in plan["arms"]
        if arm.get("full") and arm["name"] in arms and arm["full"] in arms
    }
    # Accuracy against the arm's own full-path counterpart (RPO+DAPO against DAPO, a G point against GRPO
    # at that G), paired question by question; `differences` below are all against the reference arm.
    for name, cmp in comparisons.items():
        if name in after_records and cmp["full"] in after_records:
            cmp["pass_at_1_difference"] = paired_difference(after_records[name], after_records[cmp["full"]])
    reference = plan.get("reference")
    differences = {
        name: paired_difference(record, after_records[reference])
        for name, record in after_records.items()
        if reference in after_records and name != reference
    }
    results = {
        **meta,
        "eval_before": eval_before,
        "arms": arms,
        "comparisons": comparisons,
        "differences": differences,
        "sweeps": {
            parameter: [p for p in points if p["arm"] in arms]
            for parameter, points in plan.get("sweeps", {}).items()
        },
    }
    main_names = [a["name"] for a in plan["arms"] if not a.get("sweep")]
    results["main_wall_seconds"] = sum(arms[n]["wall_seconds"] or 0.0 for n in main_names if n in arms)
    results["gpu_projection"] = {
        "rollout_share": meta["gpu_rollout_share"],
        "step_ratio": {n: gpu_projection(c, meta["gpu_rollout_share"]) for n, c in comparisons.items()},
    }
    results["targets"] = targets(results, plan)
    return results


def targets(results: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with what was measured and whether it is met (None: not measurable)."""
    arms, comparisons = results["arms"], results["comparisons"]
    out: list[dict[str, Any]] = []
    for name in plan.get("main_rpo_arms", []):
        cmp = comparisons.get(name)
        if cmp is None:
            continue
        off = cmp["decoded_tokens_measured"] / cmp["decoded_tokens_predicted"] - 1
        out.append(
            {
                "target": f"{arms[name]['label']}: decoded tokens RPO/full within 20% of the predicted ratio",
                "measured": f"{cmp['decoded_tokens_measured']:.3f} vs {cmp['decoded_tokens_predicted']:.3f} "
                f"predicted ({100 * off:+.0f}%)",
                "met": bool(abs(off) <= 0.2),
            }
        )
    rpo, full = plan.get("headline_timing", (None, None))
    cmp = comparisons.get(rpo)
    if cmp is not None:
        out.append(
            {
                "target": f"{arms[rpo]['label']}: rollout phase RPO/full <= 0.3",
                "measured": f"{cmp['phases']['rollout']:.3f}",
                "met": bool(cmp["phases"]["rollout"] <= 0.3),
            }
        )
        out.append(
            {
                "target": f"{arms[rpo]['label']}: step time RPO/full <= 0.5",
                "measured": f"{cmp['step_seconds']:.3f}",
                "met": bool(cmp["step_seconds"] <= 0.5),
            }
        )
    rpo, full = plan.get("headline_accuracy", (None, None))
    if rpo in arms and full in arms:
        mine, theirs = arms[rpo].get("eval_after"), arms[full].get("eval_after")
        if mine and theirs:
            # the paired mean difference the RPO/full table prints, so both tables show one float
            diff = comparisons[rpo].get("pass_at_1_difference", {})
            gap = diff.get("difference", mine["pass_at_1"] - theirs["pass_at_1"])
            out.append(
                {
                    "target": f"{arms[rpo]['label']} pass@1 after >= {arms[full]['label']} - 2 points (equal steps)",
                    "measured": f"{100 * mine['pass_at_1']:.1f} vs {100 * theirs['pass_at_1']:.1f} "
                    f"({100 * gap:+.1f}, paired 95% CI{_ci(diff.get('ci'))})",
                    "met": bool(gap >= -0.02),
                }
            )
            at = arms[rpo]["training_seconds"]
            other = accuracy_at(arms[full], at)
            out.append(
                {
                    "target": f"{arms[rpo]['label']} ahead of {arms[full]['label']} at equal wall-clock time",
                    "measured": f"at {at:.0f} s of training: {100 * mine['pass_at_1']:.1f} vs "
                    f"{100 * other:.1f} (interpolated between evaluations)",
                    "met": bool(mine["pass_at_1"] > other),
                }
            )
    out.append(
        {
            "target": "default reproduction (main arms) within 60 minutes",
            "measured": f"{results['main_wall_seconds'] / 60:.1f} min",
            "met": bool(results["main_wall_seconds"] <= 3600) if not plan.get("smoke") else None,
        }
    )
    return out
