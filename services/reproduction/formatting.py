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
