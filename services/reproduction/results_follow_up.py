"""docs/results.md's third part: the fixed-budget follow-up's record (`rpo reproduce --task
arith-long-var-budget`), each of its pairs set beside the same pair in the varied-length record, where RPO's
suffix budget is m. Rendered from the two committed records, like the rest of the page."""

from __future__ import annotations

from typing import Any

from services.reproduction.formatting import label_text, num, pct, provenance, ratio_ci
from services.reproduction.plots import PLOTS, plot_names
from services.reproduction.protocols import PROTOCOLS
from services.reproduction.results_second_task import difference, lifted_steps, reading, room_intro
from services.reproduction.results_tables import table_sections

BUDGET_TASK = "arith-long-var-budget"
BUDGET_RECORD = "docs/results/arith-long-var-budget/results.json"
"""Where the follow-up's record is committed."""

INTRO = """\
In the varied-length record most of RPO's responses are cut at the suffix budget m: a tail regrown with
more steps written in full than the cached tail cannot fit in the m tokens that were cut, and a cut response
has no answer and scores 0. The paper allows a fixed cap in place of m. This follow-up, written before its
record (docs/training.md, "The fixed-budget follow-up"), runs the varied protocol's three headline pairs with
RPO's suffix budget fixed at 160 tokens, at every seed."""

REMAKE = """To make it again from scratch, all six arms (`rpo reproduce` resumes run by run):

    .venv/bin/rpo reproduce --task arith-long-var-budget --seeds 3
    cp runs/reproduce-var-budget/results.json runs/reproduce-var-budget/*.png \\
        docs/results/arith-long-var-budget/

`--arms` runs it in parts in the same directory, as the record above was made (its RPO arms first); a record
whose GRPO runs come from another record's parts is joined with `merge_records` (PART:ARM,ARM takes only those
arms' runs), which refuses runs that started from another model. Then render the page with
the three records: `python -m services.reproduction.results_doc docs/results/results.json
docs/results/arith-long-var/results.json docs/results/arith-long-var-budget/results.json > docs/results.md`."""


def _taken(budget: dict[str, Any]) -> list[str]:
    """The arms whose runs the follow-up took from other records (`merge_records` FILE:ARM,ARM)."""
    return sorted({arm for part in budget.get("parts", []) for arm in part.get("arms_taken", [])})


TARGETS_NOTE = (
    "The record's targets table judges what every `rpo reproduce` record judges; the follow-up's own targets, "
    "fixed before it ran, are its equal-step and length-reward rows, and its equal-time rows are read beside "
    "them."
)


def _origin(budget: dict[str, Any]) -> str:
    """Which of the record's runs were made for it, from its parts, and which of its targets are the
    follow-up's own."""
    taken = _taken(budget)
    if not taken:
        return f"Every arm ran for this record. {TARGETS_NOTE}"
    commits = sorted({p["commit"] for p in budget["parts"] if p.get("arms_taken")})
    return (
        f"The runs of {', '.join(f'`{a}`' for a in taken)} were taken from the varied record's parts (commit "
        f"{', '.join(f'`{c[:7]}`' for c in commits)}), with the same names, settings and seeds; the other arms "
        f"ran for this record; `git diff {commits[-1][:7]} {budget['commit'][:7]} -- trainer` shows what the "
        "training code changed between them. "
        f"{TARGETS_NOTE} Its wall times count the runs of every part."
    )


ROOM = room_intro("here `algorithm.suffix_budget: 160`, so a suffix may be longer than\nthe tail it replaces")


def _pairs() -> list[tuple[str, str, str]]:
    """(follow-up RPO arm, varied RPO arm, GRPO arm) for each headline pair, in protocol order."""
    return [
        (rpo, varied_rpo, full)
        for (rpo, full), (varied_rpo, _) in zip(
            PROTOCOLS[BUDGET_TASK].headline_pairs, PROTOCOLS["arith-long-var"].headline_pairs, strict=True
        )
    ]


def _room(results: dict[str, Any], arm: str, key: str) -> str:
    room = results["arms"].get(arm, {}).get("length_room")
    return f"{pct(room[key])}%" if room else "-"


def _step_ratio(results: dict[str, Any], rpo: str) -> str:
    cmp = results["comparisons"].get(rpo)
    return f"{num(cmp['step_seconds']['mean'], 3)}{ratio_ci(cmp['step_seconds']['ci'])}" if cmp else "-"


def _lifted(results: dict[str, Any], arm: str) -> str:
    if arm not in results["arms"]:
        return "-"
    if results["arms"][arm]["settings"]["alpha"] == 0:
        return "- (alpha 0)"
    acted, steps = lifted_steps(results, arm)
    return f"{acted} of {steps}" if steps else "-"


def _label(arm: str, *records: dict[str, Any]) -> str:
    return next((r["arms"][arm]["label"] for r in records if arm in r["arms"]), arm)


def _tokens(results: dict[str, Any], arm: str) -> str:
    row = results["arms"].get(arm)
    if not row:
        return "-"
    return f"{num(row['decoded_tokens_per_sample'], 0)} / {num(row['response_len_mean'], 0)}"


def beside_varied(varied: dict[str, Any], budget: dict[str, Any]) -> list[str]:
    """Per pair, a table of the varied record's figures (budget m) beside the follow-up's (budget 160)."""
    lines: list[str] = []
    for rpo, varied_rpo, full in _pairs():
        both = ((varied, varied_rpo), (budget, rpo))
        figures = [
            *(
                (
                    f"RPO+GRPO - GRPO at equal steps, test, {label_text(label, budget)} [95% CI]",
                    *(difference(r, a, label) for r, a in both),
                )
                for label in budget["eval_labels"]
            ),
            ("RPO's responses cut at their budget", *(_room(r, a, "truncated_share") for r, a in both)),
            (
                "RPO's groups with a non-zero advantage",
                *(_room(r, a, "advantage_groups_share") for r, a in both),
            ),
            (
                "RPO's groups (two or more correct) whose correct lengths vary",
                *(_room(r, a, "varied_groups_share") for r, a in both),
            ),
            (
                "steps where the length reward lifted a correct RPO response",
                *(_lifted(r, a) for r, a in both),
            ),
            ("RPO's step time / GRPO's [95% CI]", *(_step_ratio(r, a) for r, a in both)),
            ("RPO's decoded / response tokens per sample", *(_tokens(r, a) for r, a in both)),
        ]
        lines += [
            f"**{_label(rpo, budget)} against {_label(full, budget, varied)}**",
            "",
            "| | suffix budget m (varied record) | suffix budget 160 (follow-up) |",
            "|---|---|---|",
            *(f"| {what} | {m} | {fixed} |" for what, m, fixed in figures),
            "",
        ]
    return lines[:-1]


def follow_up_section(
    varied: dict[str, Any], budget: dict[str, Any], record: str = BUDGET_RECORD
) -> list[str]:
    """The page's lines for the follow-up's record: header, tables, the pairs beside the varied record's,
    its targets read out, and its plots."""
    machine, taken = budget["machine"], _taken(budget)
    folder = record.rsplit("/", 1)[0].removeprefix("docs/")
    images = [line for name in plot_names(budget) for line in (f"![{PLOTS[name]}]({folder}/{name})", "")]
    return [
        "## The fixed-budget follow-up: RPO's tails may grow past the tail they replace",
        "",
        INTRO,
        "",
        _origin(budget),
        "",
        provenance(budget, record),
        f"- **Machine:** {machine['cpu']}, {machine['cores']} cores, {machine['gpu']}; {budget['date']}"
        + (
            " (the runs taken from the varied record's parts ran on the same CPU model on theirs)."
            if taken
            else "."
        ),
        f"- **Seeds:** {', '.join(map(str, budget['seeds']))}; wall time of the runs made for this record "
        f"{_own_minutes(budget):.1f} minutes, finding or building the warm model included.",
        "",
        *table_sections(budget, {"Room for the length reward": ROOM}, level=3),
        "### Each pair beside the varied record's",
        "",
        (
            "The same GRPO runs in both columns; only RPO's suffix budget differs."
            if {full for _, _, full in _pairs()} <= set(taken)
            else "The GRPO runs of the two columns are the two records' own, each from its record's starting "
            f"model: pass@1 at T = 0.6 {_start(varied)} in the varied record, {_start(budget)} here."
        ),
        "",
        *beside_varied(varied, budget),
        "",
        "### Reading the follow-up",
        "",
        *reading(budget),
        "",
        "### The follow-up's plots",
        "",
        "One line per arm, from its first seed's run.",
        "",
        *images[:-1],
        "",
        REMAKE,
    ]


def _start(results: dict[str, Any]) -> str:
    before = results["eval_before"].get("before")
    return f"{pct(before['pass_at_1'])}%" if before else "not recorded"


def _own_minutes(budget: dict[str, Any]) -> float:
    """Minutes of the runs made for this record, not those taken from another record's parts."""
    taken = set(_taken(budget))
    seconds = sum(
        row["wall_seconds"] or 0.0
        for arm, by_seed in budget["runs"].items()
        if arm not in taken
        for row in by_seed.values()
    )
    return seconds / 60  # a run's wall time holds its finding or building the warm model
