"""Scoring a batch of responses with several weighted reward functions (`reward.functions`).

Two calling conventions, told apart by the function's signature:
- per response, `(response: str, reference: str) -> float` (the built-ins `math` and `exact`, and this
  project's earlier single-function form);
- in batches, TRL's: a function with a `completions` parameter is called once per batch with keyword lists,
  one item per response: `prompts`, `completions`, `completion_ids`, `reference`, and every other column of
  the dataset row by its own name; it returns one float (or None: "does not apply") per response. A
  conversational row's completions are `[{"role": "assistant", "content": text}]` and its prompt the list of
  turns, as TRL passes them. A function without `**kwargs` gets only the names it declares.

A response's reward is the weighted sum of its scores (None counts 0); it is correct when the correctness
function (the first, unless `reward.correctness` names another) scores >= 1. Guarantee, as for one function:
scoring never raises. A function that raises, returns the wrong number of scores, or a non-finite one scores
0 where it failed, with a warning naming the function and the question.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.core.rewards import BUILTIN_REWARDS, resolve_reward, score_safely
from services.core.schemas.rollout import RewardTerm

log = logging.getLogger("rpo.rewards")

_RESOLVED: dict[tuple[str, str], Callable[..., Any]] = {}
"""Resolved functions of this process, by (spec, dataset): a worker imports a user's module once."""


@dataclass
class ScoringGroup:
    """One question's responses and what a reward function may ask about them (pickled to a worker)."""

    question_id: str
    reference: str
    texts: list[str]
    completion_ids: list[list[int]]
    prompt: str | list[dict[str, str]] = ""
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleScore:
    raw: float
    """Weighted sum of the functions' scores."""
    correct: bool
    scores: dict[str, float | None]
    """Each function's own score, by its label."""


def takes_batches(fn: Callable[..., Any]) -> bool:
    """True for TRL-style functions (they have a `completions` parameter)."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature: per-response
        return False


def resolved(spec: str, dataset: str) -> Callable[..., Any]:
    key = (spec, dataset)
    fn = _RESOLVED.get(key)
    if fn is None:
        fn = _RESOLVED[key] = resolve_reward(spec, dataset)
    return fn


def score_groups(
    terms: Sequence[RewardTerm], correctness: int, dataset: str, groups: Sequence[ScoringGroup]
) -> list[list[SampleScore]]:
    """Every response of `groups` scored by every term; one batch call per batch-style function."""
    per_term: list[list[float | None]] = []
    for term in terms:
        fn = resolved(term.function, dataset)
        if takes_batches(fn):
            per_term.append(_score_batch(fn, term.label(), groups))
        else:
            per_term.append(
                [score_safely(fn, text, g.reference, g.question_id) for g in groups for text in g.texts]
            )
    out: list[list[SampleScore]] = []
    k = 0
    for group in groups:
        scored = []
        for _ in group.texts:
            scores = [column[k] for column in per_term]
            raw = sum(t.weight * s for t, s in zip(terms, scores, strict=True) if s is not None)
            decisive = scores[correctness]
            scored.append(
                SampleScore(
                    raw=float(raw),
                    correct=decisive is not None and decisive >= 1.0,
                    scores={t.label(): s for t, s in zip(terms, scores, strict=True)},
                )
            )
            k += 1
        out.append(scored)
    return out


def shaping_note(
    terms: Sequence[RewardTerm], correctness: int, length_shaping: bool, alpha: float
) -> str | None:
    """The line said at start when length-aware shaping changes a user's rewards (None: shaping off, or only the
    built-in rewards, where it is the paper's rule)."""
    if not length_shaping or all(t.function in (*BUILTIN_REWARDS, "auto") for t in terms):
        return None
    decisive = terms[correctness]
    return (
        f"length-aware shaping is on (algorithm.alpha={alpha}): a response that {decisive.label()} marks "
        f"correct gets its {decisive.label()} term (weight {decisive.weight:g}) scaled by a length factor in "
        "[algorithm.shaping_low, shaping_high]; other terms and wrong responses keep their values as written. "
        "Set algorithm.length_shaping: false for the weighted sum as TRL uses it."
    )


def _batch_kwargs(fn: Callable[..., Any], groups: Sequence[ScoringGroup]) -> dict[str, list[Any]]:
    """TRL's keyword lists for one call, cut down to what `fn` declares when it has no `**kwargs`."""
    kwargs: dict[str, list[Any]] = {"prompts": [], "completions": [], "completion_ids": [], "reference": []}
    names = {name for g in groups for name in g.columns}
    columns: dict[str, list[Any]] = {name: [] for name in sorted(names - set(kwargs))}
    for g in groups:
        conversational = isinstance(g.prompt, list)
        for text, ids in zip(g.texts, g.completion_ids, strict=True):
            kwargs["prompts"].append(g.prompt)
            kwargs["completions"].append([{"role": "assistant", "content": text}] if conversational else text)
            kwargs["completion_ids"].append(ids)
            kwargs["reference"].append(g.columns.get("reference", g.reference))
            for name, values in columns.items():
                values.append(g.columns.get(name))
    kwargs.update(columns)
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {name: values for name, values in kwargs.items() if name in params}
    return kwargs


def _score_batch(fn: Callable[..., Any], label: str, groups: Sequence[ScoringGroup]) -> list[float | None]:
    n = sum(len(g.texts) for g in groups)
    where = ", ".join(g.question_id for g in groups[:3]) + (" ..." if len(groups) > 3 else "")
    try:
        result = fn(**_batch_kwargs(fn, groups))
    except Exception as exc:  # noqa: BLE001 - a user's reward function may raise anything
        log.warning(
            "reward function %s failed on questions %s: %s: %s", label, where, type(exc).__name__, exc
        )
        return [0.0] * n
    if isinstance(result, str | bytes) or not isinstance(result, Sequence) or len(result) != n:
        got = f"{len(result)} values" if isinstance(result, Sequence) else type(result).__name__
        log.warning(
            "reward function %s returned %s for %d responses (questions %s); scored 0", label, got, n, where
        )
        return [0.0] * n
    scores: list[float | None] = []
    for value in result:
        if value is None:
            scores.append(None)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            log.warning("reward function %s returned %r (questions %s); scored 0", label, value, where)
            number = 0.0
        scores.append(number)
    return scores
