"""The tables of `rpo reproduce` as Markdown (the run directory's `results.md`), from results.json alone."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from services.reproduction.formatting import ci, label_text, num, pct, ratio_ci, signed
from services.reproduction.results import PHASES


def accuracy_table(results: dict[str, Any]) -> str:
    """Test pass@1 before and after, at each evaluation temperature, with seeds-and-questions intervals."""
    labels = results["eval_labels"]
    heads = " | ".join(f"pass@1 after, {label_text(lab, results)} [95% CI]" for lab in labels)
    lines = [f"| arm | seeds | {heads} | response tokens |", "|---" * (3 + len(labels)) + "|"]
    before = results["eval_before"]
    cells = " | ".join(
        pct(before[lab.replace("after", "before", 1)]["pass_at_1"])
        if lab.replace("after", "before", 1) in before
        else "n/a"
        for lab in labels
    )
    lines.append(f"| starting model (before) | - | {cells} | - |")
    for row in results["arms"].values():
        acc = " | ".join(
            f"{pct(row['accuracy'][lab]['mean'])}{ci(row['accuracy'][lab]['ci'])}" for lab in labels
        )
        lines.append(f"| {row['label']} | {len(row['seeds'])} | {acc} | {num(row['response_len_mean'], 1)} |")
    return "\n".join(lines)


def cost_table(results: dict[str, Any]) -> str:
    """Tokens and times per arm (means over seeds)."""
    lines = [
        "| arm | decoded tokens / sample | reused prefix tokens / sample | step s | "
        + " | ".join(f"{p} s" for p in PHASES)
        + " | cache init s | training s | wall s |",
        "|---" * 11 + "|",
    ]
    for row in results["arms"].values():
        lines.append(
            f"| {row['label']} | {num(row['decoded_tokens_per_sample'], 1)} | "
            f"{num(row['reused_prefix_tokens_per_sample'], 1)} | {num(row['mean_step_seconds'])} | "
            + " | ".join(num(row["phases"][p]) for p in PHASES)
            + f" | {num(row['cache_init_seconds'], 1)} | {num(row['training_seconds'], 0)} | {num(row['wall_seconds'], 0)} |"
        )
    return "\n".join(lines)


def ratio_table(results: dict[str, Any]) -> str:
    """RPO over its full-path arm, seed by seed, with t intervals; accuracy differences paired."""
    labels = results["eval_labels"]
    lines = [
        "| RPO arm / full arm | seeds | decoded tokens [95% CI] | predicted | rollout [95% CI] | step [95% CI] | "
        + " | ".join(f"pass@1 RPO - full, {label_text(lab, results)} [95% CI]" for lab in labels)
        + " |",
        "|---" * (6 + len(labels)) + "|",
    ]
    arms = results["arms"]
    for name, cmp in results["comparisons"].items():
        full = arms[cmp["full"]]
        diffs = " | ".join(
            f"{signed(cmp['accuracy_difference'][lab]['mean'])}{ci(cmp['accuracy_difference'][lab]['ci'])}"
            for lab in labels
        )
        lines.append(
            f"| {arms[name]['label']} / {full['label']} | {len(cmp['seeds'])} "
            f"| {num(cmp['decoded_tokens']['mean'], 3)}{ratio_ci(cmp['decoded_tokens']['ci'])} "
            f"| {num(cmp['decoded_tokens_predicted']['mean'], 3)} "
            f"| {num(cmp['phases']['rollout']['mean'], 3)}{ratio_ci(cmp['phases']['rollout']['ci'])} "
            f"| {num(cmp['step_seconds']['mean'], 3)}{ratio_ci(cmp['step_seconds']['ci'])} | {diffs} |"
        )
    return "\n".join(lines)


def length_room_table(results: dict[str, Any]) -> str:
    """What the length-aware reward had to act on, per arm over its steps and seeds ("" for a record made
    before the per-step figures were kept)."""
    rows = [row for row in results["arms"].values() if row.get("length_room")]
    if not rows:
        return ""
    lines = [
        "| arm | steps | steps where it lifted a correct response | correct below the group mean / step | "
        "all-correct groups | groups with a non-zero advantage | groups whose correct lengths vary | "
        "spread of correct lengths, tokens | responses cut at their token budget |",
        "|---" * 9 + "|",
    ]
    for row in rows:
        room = row["length_room"]
        lifted = f"{pct(room['lifted_steps_share'])}%" if row["settings"]["alpha"] > 0 else "- (alpha 0)"
        lines.append(
            f"| {row['label']} | {room['steps']} | {lifted} | {num(room['correct_below_mean_per_step'], 1)} | "
            f"{pct(room['all_correct_groups_share'])}% | {pct(room['advantage_groups_share'])}% | "
            f"{pct(room['varied_groups_share'])}% | {num(room['correct_length_spread'], 1)} | "
            f"{pct(room['truncated_share'])}% |"
        )
    return "\n".join(lines)


def targets_table(results: dict[str, Any]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in results["targets"]:
        met = {True: "yes", False: "no", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines)


TABLES: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("Test accuracy", accuracy_table),
    ("Tokens and time", cost_table),
    ("RPO against full path", ratio_table),
    ("Room for the length reward", length_room_table),
    ("Targets", targets_table),
)
"""The sections a rendering of a record holds, in order: the run directory's results.md and docs/results.md
(a table with nothing to show, "" from its function, is left out with its heading)."""


def table_sections(
    results: dict[str, Any], intros: Mapping[str, str] | None = None, level: int = 2
) -> list[str]:
    """Markdown lines of every table in `TABLES`, each under its heading (at `level`) and after its intro."""
    lines: list[str] = []
    for title, table in TABLES:
        body = table(results)
        if not body:
            continue
        lines += [f"{'#' * level} {title}", ""]
        if intros and title in intros:
            lines += [intros[title], ""]
        lines += [body, ""]
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """Every table of a reproduction, as one Markdown document (the run directory's `results.md`)."""
    seeds = results["seeds"]
    parts = [
        f"# rpo reproduce: {results['task']}",
        "",
        f"Command: `{results['command']}`; commit {results.get('commit') or 'unknown'}  ",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"{results['machine']['gpu']}; {results['date']}; learner: {results['learner']}; "
        f"training seeds {', '.join(map(str, seeds)) or 'none'}; total wall time {results['wall_seconds']:.0f} s.",
        "",
        *table_sections(results),
    ]
    return "\n".join(parts).rstrip("\n") + "\n"
