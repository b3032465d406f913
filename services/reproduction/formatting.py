"""How the results' numbers are written: percentages, signed differences, intervals, temperatures. Shared by
the targets (results.py) and the tables (results_tables.py), so both print one float the same way."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def ci(pair: Sequence[float] | None) -> str:
    if not pair or any(math.isnan(v) for v in pair):
        return ""
    return (
        f" [{100 * pair[0]:+.1f}, {100 * pair[1]:+.1f}]"
        if pair[0] < 0
        else f" [{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]"
    )


def ratio_ci(pair: Sequence[float] | None) -> str:
    if not pair or any(math.isnan(v) for v in pair):
        return ""
    return f" [{pair[0]:.3f}, {pair[1]:.3f}]"


def num(value: float | None, digits: int = 2) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def signed(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:+.1f}"


def label_text(label: str, results: dict[str, Any]) -> str:
    """`after` -> `T=0.6`, the evaluation's temperature."""
    for by_seed in results["runs"].values():
        for row in by_seed.values():
            if label in row["evals"]:
                return f"T={row['evals'][label]['temperature']:g}"
    return label


def provenance(results: dict[str, Any], record: str) -> str:
    """The page's command line for a record: its command and commit, or, for a record joined from parts
    (`merge_records`), each part's seeds, command, commit and date, and the join."""
    parts = results.get("parts")
    if not parts:
        return f"- **Command:** `{results['command']}` at commit `{results.get('commit') or 'unknown'}`; record `{record}`."
    runs = "; ".join(
        f"seed{'s' if len(p['seeds']) > 1 else ''} {', '.join(map(str, p['seeds']))}: `{p['command']}` at commit "
        f"`{p['commit']}` ({p['date']})"
        for p in parts
    )
    return (
        f"- **Commands:** run in {len(parts)} parts, each recorded by `rpo reproduce`, joined by `{results['joined_by']}` "
        f"(every figure recomputed over all the runs): {runs}. Record `{record}`."
    )
