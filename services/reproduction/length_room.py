"""An arm's room for the length-aware reward, over its seeds' steps: the per-step series `rpo reproduce`
keeps from each run's step records (`trainer.rollouts.collected.length_room`), and what they add up to."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LENGTH_ROOM_SERIES = (
    "truncated_ratio",
    "zero_std_groups_ratio",
    "all_correct_groups_ratio",
    "correct_length_groups",
    "correct_length_varied_ratio",
    "correct_length_spread",
    "correct_below_group_mean",
)
"""Per step: what the length-aware reward had to act on (`trainer.rollouts.collected.length_room`)."""


def length_room(rows: list[dict[str, Any]], alpha: float) -> dict[str, Any] | None:
    """An arm's length-room figures over its seeds' steps: the share of steps where the length reward lifted a
    correct response above its floor (a correct response shorter than its group's mean, alpha > 0), the mean
    shares of all-correct groups and of groups with a non-zero advantage, and, over the groups with two or
    more correct responses, how often their lengths vary and by how much. None for a record without them."""
    series = [r["series"] for r in rows if "correct_below_group_mean" in r["series"]]
    if not series:
        return None
    steps = [i for s in series for i in range(len(s["step"]))]
    pick = lambda key: [v for s in series for v in s[key]]  # noqa: E731
    below, counted = pick("correct_below_group_mean"), pick("correct_length_groups")
    varied = pick("correct_length_varied_ratio")
    spread = pick("correct_length_spread")
    groups = sum(counted)
    return {
        "steps": len(steps),
        "lifted_steps_share": (sum(1 for n in below if n > 0) / len(below) if alpha > 0 and below else 0.0),
        "correct_below_mean_per_step": float(np.mean(below)),
        "truncated_share": float(np.mean(pick("truncated_ratio"))),
        "all_correct_groups_share": float(np.mean(pick("all_correct_groups_ratio"))),
        "advantage_groups_share": 1.0 - float(np.mean(pick("zero_std_groups_ratio"))),
        "varied_groups_share": (
            sum(v * n for v, n in zip(varied, counted, strict=True)) / groups if groups else math.nan
        ),
        "correct_length_spread": (
            sum(d * n for d, n in zip(spread, counted, strict=True)) / groups if groups else math.nan
        ),
    }
