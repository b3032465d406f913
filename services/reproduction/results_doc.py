"""docs/results.md, rendered from a committed reproduction record (results.json), prose included: every
number on the page comes from the record, so the page can be checked against it by rendering it again.

    .venv/bin/python -m services.reproduction.results_doc docs/results/results.json > docs/results.md

The reading is written from the record too: each sentence states what a table shows (met or not, an
interval that holds zero or not), and where RPO trails, it says so.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

from services.reproduction.formatting import ci, label_text, num, pct, provenance, ratio_ci, signed
from services.reproduction.results import paired_difference
from services.reproduction.results_follow_up import BUDGET_RECORD, follow_up_section
from services.reproduction.results_second_task import lifted_steps, second_task_section
from services.reproduction.results_tables import table_sections

INTRO = """\
`rpo reproduce` trains GRPO and RPO+GRPO (each with and without the length-aware reward, each RPO arm
paired with its own kind), RPO+GRPO at L = 0.1l and at epsilon 0 and 1, and DAPO and RPO+DAPO, from one warm
model, once per training seed (docs/training.md, "`rpo reproduce`", has the protocol). This page is
rendered from the record that run wrote, `docs/results/results.json`, by
`python -m services.reproduction.results_doc docs/results/results.json`; a test renders it again and compares.
Its second part, "The second task", is rendered the same way from the varied-length task's record
(`rpo reproduce --task arith-long-var`), where correct answers differ in length from the same prefix, and
sets both tasks side by side. Nothing here ran on a GPU unless the machine line says so."""

FOLLOW_UP_INTRO = """Its third part, "The fixed-budget follow-up", is rendered from the record of the second task's headline pairs
with RPO's suffix budget fixed (`rpo reproduce --task arith-long-var-budget`)."""

TASK = """\
The task is `builtin:arith-long` (`services/core/synthetic_long.py`): ten one-digit terms named A to J. An
answer adds them in one of three orders (left to right, right to left, odd letters then even), writes the
total, adds them again from scratch in another order as a check, and boxes the total when the two agree;
otherwise it adds a third time in the remaining order and boxes that. So every question has six correct
texts without a redo, an error can sit at any step of either pass, it is caught when the passes disagree,
and the answer is decided by the first pass (the check erred) or late (the first pass erred). The test
split is evaluated only before and after training; the curves and every choice of the preset use the
validation split."""


def _protocol(results: dict[str, Any]) -> str:
    """The protocol in short, its sizes read from the record's base configuration."""
    base = results["base_config"]
    data, train, algo, sampling = base["data"], base["train"], base["algorithm"], base["sampling"]
    questions, per_step, epochs = data["max_questions"], train["questions_per_step"], train["epochs"]
    steps = math.ceil(questions * epochs / per_step)
    if train["max_steps"] is not None:
        steps = min(steps, train["max_steps"])
    extra = " and ".join(f"T = {t:g}" for t in sampling["eval_extra_temperatures"])
    bullets = [
        "**Arms:** GRPO / RPO+GRPO and GRPO / RPO+GRPO without the length-aware reward (`algorithm.alpha: 0`), "
        f"each RPO arm paired with its own kind, at L = {algo['truncation_limit']}; RPO+GRPO at L = 0.1l; "
        f"RPO+GRPO at epsilon 0 and 1 beside the headline's {algo['epsilon']:g}; DAPO and RPO+DAPO at the first "
        "seed only, updating twice per batch (not at equal optimizer steps with GRPO, and said so in their "
        "labels).",
        f"**Training:** {steps} steps of {per_step} questions x G = {algo['group_size']} over {questions} "
        f"questions, {epochs} epochs, at T = {sampling['temperature']:g}: every question comes back, so the "
        "cache entries the epsilon rule updated are read again.",
        f"**Evaluation:** the test split ({data['eval_max_questions']} questions, {sampling['eval_samples']} "
        "samples each) before training, once for all arms, and after, at "
        f"T = {sampling['eval_temperature']:g} (the paper's)" + (f" and at {extra}" if extra else "") + "; "
        f"the validation split ({data['val_max_questions']} questions) before, every {train['eval_every']} "
        "steps and after: the curves equal time is read from, on a time axis that counts RPO's cache "
        "initialisation.",
        "**Statistics** (`services/reproduction/statistics.py`): accuracy and paired differences with a bootstrap "
        "that resamples training seeds, then questions; RPO/full ratios seed by seed with Student t intervals.",
        "**Targets**, each judged on an interval and each shown able to fail by "
        "`tests/reproduction/test_targets.py`: the lower end of RPO - full at equal steps and at equal time at "
        "least -2 points, for both headline pairs and both temperatures; at L = 0.1l the upper ends of the "
        "rollout-phase ratio at most 0.3 and of the step-time ratio at most 0.5; the epsilon sweep reported as "
        "an interval that holds zero or not; one seed within 60 minutes and three within two hours.",
    ]
    return "\n".join(
        [
            'docs/training.md, "`rpo reproduce`", lists the arms and what each run evaluates. In short:',
            "",
            *(textwrap.fill(b, 110, initial_indent="- ", subsequent_indent="  ") for b in bullets),
        ]
    )


VARIED_RECORD = "docs/results/arith-long-var/results.json"
"""Where the varied-length task's record is committed."""

REMAKE = """\
To make the record again (it resumes run by run, and `--arms` runs it in parts):

    bash scripts/bootstrap.sh
    .venv/bin/rpo reproduce --seeds 3 --run-dir runs/reproduce
    cp runs/reproduce/results.json runs/reproduce/*.png docs/results/
    .venv/bin/rpo reproduce --task arith-long-var --seeds 3 --run-dir runs/reproduce-var
    cp runs/reproduce-var/results.json runs/reproduce-var/*.png docs/results/arith-long-var/
    .venv/bin/python -m services.reproduction.results_doc docs/results/results.json \\
        docs/results/arith-long-var/results.json > docs/results.md

A record made in parts (its command line above names them) is joined from the parts' own records with
`python -m services.reproduction.merge_records --task <task> <part records> --plots <its folder> >
results.json`, which computes every figure again over all the runs and draws the plots; the parts' records
are committed beside it (`parts/`).

The warm model is built on the machine that runs the protocol, and its quality depends on the CPU model
(the "before" row shows the one this record started from): read a record made elsewhere with its own
"before" row."""

TABLE_INTROS = {
    "Test accuracy": "pass@1 on the test split after training, the mean over seeds; the interval resamples seeds, "
    "then questions.",
    "Tokens and time": "Means over seeds. Phases: rollout (reward scoring included), train (the learner), weight "
    "sync, cache (the cache update commit). Training time counts cache initialisation; wall time is the whole "
    "`rpo run`.",
    "RPO against full path": "Ratios are taken seed by seed, with Student t intervals over seeds; pass@1 "
    "differences are paired question by question at the same seed.",
}


def _pair_sentences(results: dict[str, Any]) -> list[str]:
    arms, lines, explained = results["arms"], [], set()
    for name, cmp in results["comparisons"].items():
        if arms[name]["group"] != "headline":
            continue
        full = arms[cmp["full"]]["label"]
        for label, diff in cmp["accuracy_difference"].items():
            if math.isnan(diff["mean"]):
                continue
            low, high = diff["ci"]
            verdict = (
                "its lower end is above -2 points (the target is met)"
                if low >= -0.02
                else "its lower end reaches below -2 points (the target is not met)"
            )
            trails = ""
            if high < 0:
                trails = " RPO trails: the whole interval is below zero."
            if high < 0 and name not in explained:
                explained.add(name)
                rpo_row = arms[name]
                trails += (
                    " What the record shows of the difference: "
                    f"of {num(rpo_row['response_len_mean'], 0)} response tokens per sample, "
                    f"{arms[name]['label']} decoded {num(rpo_row['decoded_tokens_per_sample'], 0)} and took "
                    f"{num(rpo_row['reused_prefix_tokens_per_sample'], 0)} from the cache, written by earlier "
                    f"policies, where {full} decoded all {num(arms[cmp['full']]['response_len_mean'], 0)} "
                    "with the current one."
                )
            lines.append(
                f"- **Equal steps, {label_text(label, results)}:** {arms[name]['label']} - {full} is "
                f"{signed(diff['mean'])} points{ci(diff['ci'])} over {diff['seeds']} seeds x "
                f"{diff['questions']} questions; {verdict}.{trails}"
            )
    return lines


def _validation_gap_sentences(results: dict[str, Any]) -> list[str]:
    """Each headline pair's difference after training on the validation split beside the test split's: the
    curves and every choice were made on validation, the targets are judged on test."""
    arms, runs, lines = results["arms"], results["runs"], []
    for name, cmp in results["comparisons"].items():
        full = cmp["full"]
        if arms[name]["group"] != "headline" or name not in runs or full not in runs:
            continue
        val = paired_difference(runs[name], runs[full], "val after")
        test = cmp["accuracy_difference"].get("after")
        if math.isnan(val["mean"]) or not test:
            continue
        lines.append(
            f"- **Validation beside test, {arms[name]['label']} - {arms[full]['label']}:** after training, "
            f"{signed(val['mean'])} points{ci(val['ci'])} on the validation split ({val['questions']} questions) "
            f"and {signed(test['mean'])} points{ci(test['ci'])} on the test split ({test['questions']}), both "
            "at T = 0.6."
        )
    return lines


def _length_reward_sentences(results: dict[str, Any]) -> list[str]:
    """Whether the length-aware reward acted, from the per-step series: a correct response scores between
    the clip's floor and 1, so a step's mean reward equals floor x accuracy exactly when every correct
    response got the floor (no shorter than its group's mean length)."""
    floor = float(results["base_config"]["algorithm"].get("shaping_low", 0.5))
    arms, runs, lines = results["arms"], results["runs"], []
    for name, arm in arms.items():
        settings = arm["settings"]
        if arm["group"] != "headline" or settings["alpha"] == 0 or name not in runs:
            continue
        acted, steps = lifted_steps(results, name)
        twin = next(
            (
                other
                for other, o in arms.items()
                if o["settings"] == {**settings, "alpha": 0.0} and other in runs
            ),
            None,
        )
        same = ""
        if twin and all(
            runs[twin].get(seed, {}).get("series", {}).get(key) == row["series"][key]
            for seed, row in runs[name].items()
            for key in ("generated_tokens", "accuracy")
        ):
            same = (
                f" {arm['label']} and {arms[twin]['label']} decoded the same number of tokens with the same "
                "accuracy at every step of every seed."
            )
        lines.append(
            f"- **The length-aware reward in {arm['label']}** (alpha = {settings['alpha']:g}) raised a correct "
            f"response above the floor, {floor:g}, at {acted} of {steps} steps (over seeds); at the others "
            f"every correct response was no shorter than its group's mean and scored the floor, as with "
            f"alpha = 0.{same}"
        )
    return lines


def _reuse_sentence(results: dict[str, Any]) -> list[str]:
    """RPO arms against the same full-path arm at different truncation limits: how the difference at equal
    steps moves with the share of each answer that was decoded (the rest came from the cache)."""
    arms, comparisons = results["arms"], results["comparisons"]
    by_full: dict[str, list[str]] = {}
    for name, cmp in comparisons.items():
        if arms[name]["group"] in ("headline", "timing"):
            by_full.setdefault(cmp["full"], []).append(name)
    lines = []
    for full, names in by_full.items():
        limits = {arms[n]["settings"]["truncation_limit"] for n in names}
        if len(limits) < 2:
            continue
        for label in results["eval_labels"]:
            parts = []
            for name in sorted(names, key=lambda n: -arms[n]["decoded_tokens_per_sample"]):
                diff = comparisons[name]["accuracy_difference"][label]
                row = arms[name]
                limit = row["settings"]["truncation_limit"]
                named = row["label"] if "L=" in row["label"] else f"{row['label']} (L = {limit})"
                parts.append(
                    f"{named} decoded "
                    f"{num(row['decoded_tokens_per_sample'], 0)} of {num(row['response_len_mean'], 0)} tokens per "
                    f"sample and is {signed(diff['mean'])} points{ci(diff['ci'])}"
                )
            lines.append(
                f"- **Decoded share and accuracy, {label_text(label, results)}, against {arms[full]['label']}:** "
                + "; ".join(parts)
                + "."
            )
    return lines


def _equal_time_sentences(results: dict[str, Any]) -> list[str]:
    lines = []
    arms = results["arms"]
    for name, eq in results["equal_time"].items():
        if math.isnan(eq["mean"]):
            continue
        full = arms[results["comparisons"][name]["full"]]["label"]
        lines.append(
            f"- **Equal time:** when {arms[name]['label']} finished (on average {sum(eq['seconds']) / len(eq['seconds']):.0f} s "
            f"of training, cache initialisation included), its validation pass@1 was {pct(eq['rpo_pass_at_1'])}%; "
            f"{full}'s curve read at the same time gives {pct(eq['full_pass_at_1'])}%: {signed(eq['mean'])} points"
            f"{ci(eq['ci'])}. {full} trained for "
            f"{sum(eq['full_training_seconds']) / max(1, len(eq['full_training_seconds'])):.0f} s."
        )
    return lines


def _cost_sentences(results: dict[str, Any]) -> list[str]:
    lines = []
    arms = results["arms"]
    for name, cmp in results["comparisons"].items():
        if arms[name]["group"] not in ("headline", "timing") or arms[name]["settings"]["alpha"] == 0:
            continue
        full = arms[cmp["full"]]["label"]
        lines.append(
            f"- **{arms[name]['label']} against {full}:** decoded tokens per sample "
            f"{num(cmp['decoded_tokens']['mean'], 3)}{ratio_ci(cmp['decoded_tokens']['ci'])} (predicted from the "
            f"measured lengths: {num(cmp['decoded_tokens_predicted']['mean'], 3)}; near it by construction, since "
            f"a suffix may hold at most m new tokens), rollout phase "
            f"{num(cmp['phases']['rollout']['mean'], 3)}{ratio_ci(cmp['phases']['rollout']['ci'])}, step time "
            f"{num(cmp['step_seconds']['mean'], 3)}{ratio_ci(cmp['step_seconds']['ci'])}."
        )
    return lines


def _cache_update_counts(results: dict[str, Any], name: str) -> dict[str, int]:
    """How the cache entries of an arm were updated, summed over its steps and seeds (`best`: the group's
    best response replaced the entry; `other`: another one did)."""
    counts: dict[str, int] = {}
    for row in results["runs"].get(name, {}).values():
        for step in row["series"]["cache_updates"]:
            for kind, n in step.items():
                counts[kind] = counts.get(kind, 0) + n
    return counts


def _epsilon_sentences(results: dict[str, Any]) -> list[str]:
    lines = []
    arms = results["arms"]
    swept = [n for n in arms if n in results["epsilon"] or arms[n]["group"] == "epsilon"]
    if swept:
        counts = []
        for name in swept:
            c = _cache_update_counts(results, name)
            counts.append(
                f"{arms[name]['label']} {c.get('best', 0)} of {c.get('best', 0) + c.get('other', 0)}"
            )
        lines.append(
            "- **The epsilon rule acted:** the group's best response replaced the cache entry in "
            + "; ".join(counts)
            + " updates (summed over seeds)."
        )
    by_epsilon = sorted(swept, key=lambda n: arms[n]["settings"].get("epsilon", 0.0))
    training = _last_epoch_accuracy(results, by_epsilon)
    if training:
        lines.append(
            "- **On the training questions**, where RPO continues each answer from the entry the rule kept, "
            f"accuracy (the mean over the last epoch's steps, {training.pop('steps')}, and over seeds) was "
            + "; ".join(f"{arms[n]['label']} {pct(v)}%" for n, v in training.items())
            + ". Held-out questions are answered from the start, with no cache entry; the differences below "
            "are there."
        )
    for name, by_label in results["epsilon"].items():
        for label, diff in by_label.items():
            if math.isnan(diff["mean"]):
                continue
            low, high = diff["ci"]
            shown = (
                "excludes zero"
                if not (low <= 0 <= high)
                else "holds zero: no effect on held-out accuracy is shown"
            )
            lines.append(
                f"- **{results['arms'][name]['label']} - epsilon 0, {label_text(label, results)}:** "
                f"{signed(diff['mean'])} points{ci(diff['ci'])}; the interval {shown}."
            )
    return lines


def _last_epoch_accuracy(results: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Training accuracy over the last epoch's steps, mean over seeds, per arm (in `names` order, once
    each), and the steps it covers under "steps"; {} when an arm has no steps."""
    base = results.get("base_config")
    if not base or not base["data"].get("max_questions"):
        return {}
    per_epoch = math.ceil(base["data"]["max_questions"] / base["train"]["questions_per_step"])
    out: dict[str, Any] = {}
    for name in dict.fromkeys(names):
        rows = list(results["runs"].get(name, {}).values())
        if not rows or not all(r["series"]["accuracy"] for r in rows):
            return {}
        out[name] = sum(sum(r["series"]["accuracy"][-per_epoch:]) / per_epoch for r in rows) / len(rows)
        last = rows[0]["series"]["step"][-1]
    return {"steps": f"{last - per_epoch + 1}-{last}", **out} if out else {}


def _dapo_sentences(results: dict[str, Any]) -> list[str]:
    arms = results["arms"]
    if "rpo-dapo" not in results["comparisons"]:
        return []
    diff = results["comparisons"]["rpo-dapo"]["accuracy_difference"].get("after")
    if not diff:
        return []
    return [
        f"- **DAPO** ran at {len(arms['dapo']['seeds'])} seed(s) and updates twice per batch (its clip-higher "
        f"only acts when the ratio can leave 1), so it is not at equal optimizer steps with GRPO: "
        f"{arms['rpo-dapo']['label']} - {arms['dapo']['label']} at {label_text('after', results)} is "
        f"{signed(diff['mean'])} points{ci(diff['ci'])}."
    ]


def _unmet(results: dict[str, Any]) -> list[str]:
    return [f"- {t['target']}: {t['measured']}." for t in results["targets"] if t["met"] is False]


def render_results_doc(
    results: dict[str, Any],
    record: str = "docs/results/results.json",
    varied: dict[str, Any] | None = None,
    varied_record: str = VARIED_RECORD,
    budget: dict[str, Any] | None = None,
    budget_record: str = BUDGET_RECORD,
) -> str:
    """The whole of docs/results.md from a reproduction's results.json, the varied-length task's record
    beside it when given, and the fixed-budget follow-up's after that."""
    machine = results["machine"]
    seeds = results["seeds"]
    minutes = ", ".join(
        f"seed {s}: {v / 60:.1f}"
        for s, v in sorted(results["wall_seconds_by_seed"].items(), key=lambda kv: int(kv[0]))
    )
    parts = [
        "# Results: RPO against GRPO and DAPO in the paper's regime, in miniature",
        "",
        INTRO + ("\n" + FOLLOW_UP_INTRO if varied is not None and budget is not None else ""),
        "",
        provenance(results, record),
        f"- **Machine:** {machine['cpu']}, {machine['cores']} cores, {machine['gpu']}; {results['date']}.",
        f"- **Seeds:** {', '.join(map(str, seeds))}; wall time {results['wall_seconds'] / 60:.1f} minutes "
        f"({minutes} minutes; wall time is every run's `rpo run` from start to end, and includes "
        f"{results.get('model_build_seconds', 0.0) / 60:.1f} minutes of finding or building the warm model).",
        f"- **Learner:** {results['learner']}.",
        "",
        "## The task",
        "",
        TASK,
        "",
        "## The protocol",
        "",
        _protocol(results),
        "",
        *table_sections(results, TABLE_INTROS),
        "## Reading",
        "",
        *_pair_sentences(results),
        *_validation_gap_sentences(results),
        *_reuse_sentence(results),
        *_length_reward_sentences(results),
        *_equal_time_sentences(results),
        *_cost_sentences(results),
        *_epsilon_sentences(results),
        *_dapo_sentences(results),
    ]
    unmet = _unmet(results)
    if unmet:
        parts += ["", "Targets not met:", "", *unmet]
    if varied is not None:
        parts += ["", *second_task_section(results, varied, varied_record)]
        if budget is not None:
            parts += ["", *follow_up_section(varied, budget, budget_record)]
    parts += [
        "",
        "## The first task's plots",
        "",
        "![validation pass@1 against training time](results/accuracy_vs_time.png)",
        "",
        "![decoded tokens per step](results/decoded_tokens_per_step.png)",
        "",
        "![response length per step](results/response_length.png)",
        "",
        "## Making the record again",
        "",
        REMAKE,
    ]
    return "\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2, 3):
        print(
            "usage: python -m services.reproduction.results_doc RESULTS_JSON [VARIED_RESULTS_JSON "
            "[BUDGET_RESULTS_JSON]] > docs/results.md",
            file=sys.stderr,
        )
        return 2
    records = []
    for name in argv:
        path = Path(name)
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"{path}: cannot read the record: {exc}", file=sys.stderr)
            return 2
    varied = records[1] if len(records) >= 2 else None
    budget = records[2] if len(records) == 3 else None
    sys.stdout.write(
        render_results_doc(
            records[0],
            argv[0],
            varied,
            argv[1] if varied else VARIED_RECORD,
            budget,
            argv[2] if budget else BUDGET_RECORD,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
