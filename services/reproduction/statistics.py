"""The statistics of the results tables, each a pure function tested on inputs with known answers
(tests/reproduction/test_statistics.py).

- Accuracy (a mean over seeds and questions, or a difference between two arms at the same seed, paired
  question by question): a percentile bootstrap that resamples training seeds, then questions
  (`seeds_and_questions_interval`), so it holds the seed-to-seed variation as well as the evaluation's. With
  one seed it is an interval over questions only.
- Ratios (RPO over full path, one per seed): a Student t interval over seeds (`t_interval`); none with one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from trainer.rollouts.evaluate import pass_at_k

BOOTSTRAP_RESAMPLES = 2000
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
"""Two-sided 95% Student t quantiles for 1..10 degrees of freedom (beyond: 1.96 is within 5%)."""


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


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% Student t interval of the mean of `values` (one per seed); NaNs with fewer than two."""
    data = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if data.size < 2:
        return (math.nan, math.nan)
    df = data.size - 1
    quantile = _T975[df - 1] if df <= len(_T975) else 1.96
    half = quantile * float(data.std(ddof=1)) / math.sqrt(data.size)
    mean = float(data.mean())
    return (mean - half, mean + half)


def per_question_scores(eval_record: dict[str, Any], k: int | None = None) -> dict[str, tuple[float, float]]:
    """Question id -> (pass@1, pass@k) from an evaluation's per-question [samples, correct] counts."""
    k = k or eval_record["k"]
    scores = {}
    for qid, (n, c) in eval_record.get("correct_per_question", {}).items():
        scores[qid] = (pass_at_k(n, c, 1), pass_at_k(n, c, min(k, n)))
    return scores


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


def summary_of(cells: list[list[float]]) -> dict[str, Any]:
    """Mean of a seeds x questions table with its seeds-and-questions interval."""
    if not cells or not cells[0]:
        return {"mean": math.nan, "ci": (math.nan, math.nan), "seeds": 0, "questions": 0}
    return {
        "mean": float(np.mean(cells)),
        "ci": seeds_and_questions_interval(cells),
        "seeds": len(cells),
        "questions": len(cells[0]),
    }


def ratio_summary(per_seed: list[float]) -> dict[str, Any]:
    """Mean of one ratio per seed with its t interval."""
    values = [v for v in per_seed if not math.isnan(v)]
    return {
        "mean": float(np.mean(values)) if values else math.nan,
        "ci": t_interval(values),
        "per_seed": per_seed,
    }


def interpolate_curve(points: list[tuple[float, dict[str, float]]], seconds: float) -> dict[str, float]:
    """Per-question pass@1 at `seconds` on a curve of (time, {question: pass@1}) points: linear between the
    two evaluations around it, the last one after the curve's end (training stopped there)."""
    points = sorted(points, key=lambda p: p[0])
    if seconds <= points[0][0]:
        return dict(points[0][1])
    for (t0, a), (t1, b) in zip(points, points[1:], strict=False):
        if seconds <= t1:
            w = (seconds - t0) / (t1 - t0) if t1 > t0 else 1.0
            return {q: (1 - w) * a[q] + w * b[q] for q in a if q in b}
    return dict(points[-1][1])
