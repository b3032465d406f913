"""docs/results.md's second part: the varied-length task's record (`rpo reproduce --task arith-long-var`),
and both tasks side by side, rendered from the two committed records like the rest of the page."""

from __future__ import annotations

import math
from typing import Any

from services.reproduction.formatting import ci, label_text, num, pct, provenance, signed
from services.reproduction.plots import PLOTS, plot_names
from services.reproduction.results_tables import table_sections

VARIED_TASK = """\
The task is `builtin:arith-long-var`: the same questions, orders, checks, redos and errors as
`builtin:arith-long`, with one property changed. Each step of a pass is written in full (`C=9: 6+9=15.`) or
tersely (`6+9=15.`), so correct answers that continue the same prefix differ in length, by 5 tokens for each
step written the other way. On `arith-long` a suffix must regrow the cut tail, whose length the task fixes,
so RPO's correct responses are the longest of their group and the length-aware reward gives them its floor;
here a correct suffix can be shorter than another. The protocol was written before this record:
docs/training.md, "The varied-length protocol"."""


def room_intro(budget: str) -> str:
    """The length-room table's intro; `budget` says what RPO's suffix budget is in the record."""
    return (
        "Per arm, over its steps and seeds: the steps where the length-aware reward lifted a correct response "
        "above\nits floor (a correct response shorter than its group's mean, alpha > 0), the mean number of "
        "such responses\nper step, the shares of all-correct groups and of groups with a non-zero advantage, "
        "and over the groups with\ntwo or more correct responses, how often their lengths differ and by how "
        f"much. A response cut at its token\nbudget (in RPO the suffix budget, {budget}; in full path "
        "`algorithm.max_response_tokens`) has no boxed answer and scores 0."
    )


ROOM_INTRO = room_intro(
    "`algorithm.suffix_budget: m`, so a suffix is never longer than the tail it\nreplaces"
)


def lifted_steps(results: dict[str, Any], name: str) -> tuple[int, int]:
    """Steps (over seeds) at which the length-aware reward lifted a correct response above its floor, and all
    steps: a correct response scores between the floor and 1, so a step's mean reward exceeds floor x
    accuracy exactly when one was lifted (read this way, a record without the per-step counts answers too)."""
    floor = float(results["base_config"]["algorithm"].get("shaping_low", 0.5))
    steps = acted = 0
    for row in results["runs"].get(name, {}).values():
        for reward, accuracy in zip(row["series"]["reward_mean"], row["series"]["accuracy"], strict=True):
            steps += 1
            acted += reward > floor * accuracy + 1e-9
    return acted, steps


def difference(results: dict[str, Any], rpo: str, label: str) -> str:
    cmp = results["comparisons"].get(rpo)
    diff = (cmp or {}).get("accuracy_difference", {}).get(label)
    if not diff or math.isnan(diff["mean"]):
        return "-"
    return f"{signed(diff['mean'])}{ci(diff['ci'])}"


def side_by_side(first: dict[str, Any], varied: dict[str, Any]) -> list[str]:
    """The headline pair (alpha 0.01) and the pair without the length reward on both tasks, with what the
    length reward had to act on."""
    rows = [
        "| | `arith-long` | `arith-long-var` |",
        "|---|---|---|",
        f"| seeds | {', '.join(map(str, first['seeds']))} | {', '.join(map(str, varied['seeds']))} |",
        "| starting pass@1, T=0.6 / T=1 | "
        + " | ".join(
            f"{pct(r['eval_before']['before']['pass_at_1'])} / {pct(r['eval_before']['before T=1']['pass_at_1'])}"
            for r in (first, varied)
        )
        + " |",
    ]
    for rpo, what in (("rpo-grpo", "alpha 0.01"), ("rpo-grpo-no-length", "no length reward")):
        for label in first["eval_labels"]:
            rows.append(
                f"| RPO+GRPO - GRPO, {what}, equal steps, {label_text(label, first)} | "
                f"{difference(first, rpo, label)} | {difference(varied, rpo, label)} |"
            )
    cells = []
    for results in (first, varied):
        acted, steps = lifted_steps(results, "rpo-grpo")
        cells.append(f"{acted} of {steps}" if steps else "-")
    rows.append(
        f"| steps where the length reward lifted a correct RPO+GRPO response (alpha 0.01) | {' | '.join(cells)} |"
    )
    room = (varied["arms"].get("rpo-grpo") or {}).get("length_room")
    rows.append(
        "| RPO+GRPO's groups (two or more correct) whose correct lengths vary | not recorded | "
        + (f"{pct(room['varied_groups_share'])}%" if room else "-")
        + " |"
    )
    rows.append(
        "| RPO+GRPO's responses cut at their token budget (the suffix budget m) | not recorded | "
        + (f"{pct(room['truncated_share'])}%" if room else "-")
        + " |"
    )
    rows.append(
        "| RPO+GRPO decoded / response tokens per sample | "
        + " | ".join(
            f"{num(r['arms']['rpo-grpo']['decoded_tokens_per_sample'], 0)} / "
            f"{num(r['arms']['rpo-grpo']['response_len_mean'], 0)}"
            if "rpo-grpo" in r["arms"]
            else "-"
            for r in (first, varied)
        )
        + " |"
    )
    return rows


def reading(varied: dict[str, Any]) -> list[str]:
    """What the varied record shows: one sentence per target, met or not, in the record's words; then, for
    each RPO arm against its full-path arm, how many responses were cut at their token budget (a cut response
    has no boxed answer and scores 0), beside its accuracy difference."""
    lines = []
    for t in varied["targets"]:
        verdict = {True: "met", False: "not met", None: "a reading"}[t["met"]]
        lines.append(f"- **{t['target']}:** {t['measured']} ({verdict}).")
    arms = varied["arms"]
    for name, cmp in varied["comparisons"].items():
        mine, theirs = arms[name].get("length_room"), arms[cmp["full"]].get("length_room")
        if not mine or not theirs:
            continue
        budget = arms[name]["settings"]["suffix_budget"]
        lines.append(
            f"- **Cut at the budget, {arms[name]['label']} against {arms[cmp['full']]['label']}:** "
            f"{pct(mine['truncated_share'])}% of its responses against {pct(theirs['truncated_share'])}%, "
            + (
                "its suffixes capped at the m tokens cut (a regrown tail may not be longer than the one it "
                "replaces)"
                if budget == "m"
                else f"its suffixes capped at {budget} tokens"
            )
            + f"; pass@1 after training {difference(varied, name, 'after')} points at T = 0.6."
        )
    return lines


def second_task_section(first: dict[str, Any], varied: dict[str, Any], record: str) -> list[str]:
    """The page's lines for the varied-length record: its header, tables, the side-by-side table, and its
    targets read out."""
    machine = varied["machine"]
    seeds = varied["seeds"]
    minutes = ", ".join(
        f"seed {s}: {v / 60:.1f}"
        for s, v in sorted(varied["wall_seconds_by_seed"].items(), key=lambda kv: int(kv[0]))
    )
    partial = (
        f" The protocol asks for three seeds of its headline arms; this record holds {len(seeds)}, so its "
        "intervals are over questions only where one seed is shown."
        if len(seeds) < 3
        else ""
    )
    images = [
        line
        for name in plot_names(varied)
        for line in (f"![{PLOTS[name]}](results/arith-long-var/{name})", "")
    ]
    return [
        "## The second task: correct answers that vary in length",
        "",
        VARIED_TASK,
        "",
        provenance(varied, record),
        f"- **Machine:** {machine['cpu']}, {machine['cores']} cores, {machine['gpu']}; {varied['date']}.",
        f"- **Seeds:** {', '.join(map(str, seeds))}; wall time {varied['wall_seconds'] / 60:.1f} minutes "
        f"({minutes} minutes, building the warm model included).{partial}",
        "",
        *table_sections(varied, {"Room for the length reward": ROOM_INTRO}, level=3),
        "### Both tasks side by side",
        "",
        *side_by_side(first, varied),
        "",
        "### Reading the second task",
        "",
        *reading(varied),
        "",
        "### The second task's plots",
        "",
        "One line per arm, from its first seed's run.",
        "",
        *images[:-1],
    ]
