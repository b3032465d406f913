"""A long-reasoning synthetic task: the paper's regime (long answers, errors that can be noticed and
repaired later) in miniature, for `rpo reproduce`.

A question is a sum of `num_terms` one-digit numbers, each named by a letter, and the worked answer reasons
in three parts, like a reasoning model's trace:

    Q: A=6 B=0 C=9 D=4 ... J=3 sum?
    A: B=0: 6+0=6. C=9: 6+9=15. ... check: I=5: 3+5=8. H=8: 8+8=16. ... ok \\boxed{53}

1. a first pass, left to right, one partial sum per step (the term looked up by name, then added);
2. `check:` a second pass that re-derives the total the other way (right to left), from scratch;
3. `ok \\boxed{T}` when both totals agree, else `wait A!=B redo:` a third pass, left to right, and
   `\\boxed{T}` of that pass.

So an error early in the first pass is not fatal: the check disagrees and the redo repairs it. The warm
start teaches the repair by injecting one error (a partial sum off by 1 or 10, a slipped carry) into the
first pass of `error_rate` of its traces, whose check then disagrees and whose redo is right. From a prefix
cut out of a wrong answer (RPO's situation), the model can still reach the right answer, which is what
makes RPO's truncations meaningful here (`services/demo/repair.py` measures it; docs/results.md).

With the defaults an answer is about 270 tokens (one token per character on the tiny model) and about
400 with a redo, so the paper's L of about a tenth of the answer is about 30 tokens.

Guarantees, as for `services.core.synthetic`: the same config gives the same rows; a question's split is a
pure function of its text (train and eval are disjoint); growing a split only appends rows; every clean
solution ends in `\\boxed{sum}`, which `check_answer` scores 1.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Literal

from services.core.rewards import exact_boxed_reward
from services.core.synthetic import distinct_questions, take_split

ERROR_DELTAS = (-10, -1, 1, 10)
"""How an injected first-pass error changes a partial sum: a slipped carry in the units or the tens."""


@dataclass(frozen=True)
class LongTaskConfig:
    """Difficulty, split sizes, seed, and the warm start's share of traces with an error to repair."""

    num_terms: int = 10
    max_digits: int = 1
    train_size: int = 8000
    eval_size: int = 500
    seed: int = 0
    error_rate: float = 0.25

    def __post_init__(self) -> None:
        if not 3 <= self.num_terms <= 26:
            raise ValueError(f"num_terms must be in 3..26 (one letter each), got {self.num_terms}")
        if not 1 <= self.max_digits <= 6:
            raise ValueError(f"max_digits must be in 1..6, got {self.max_digits}")
        if self.train_size < 0 or self.eval_size < 0:
            raise ValueError(
                f"train_size and eval_size must be >= 0, got {self.train_size}, {self.eval_size}"
            )
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {self.error_rate}")


def names(count: int) -> str:
    """The letters that name the terms of a question: A, B, C, ..."""
    return string.ascii_uppercase[:count]


def question_text(terms: list[int]) -> str:
    """`A=7 B=3 C=9 ... sum?`: each term named by a letter, so a step can look its term up by name."""
    return " ".join(f"{name}={term}" for name, term in zip(names(len(terms)), terms, strict=True)) + " sum?"


def worked_pass(
    terms: list[int], error_at: int | None = None, delta: int = 0, reverse: bool = False
) -> tuple[str, int]:
    """One pass of partial sums (`B=3: 7+3=10.`: the term looked up by name, then the addition)
    left to right, or right to left with `reverse`, and the total it reaches. With `error_at`, that step's
    sum is off by `delta` and every later step adds correctly to the wrong value (so only a re-derivation
    catches it)."""
    named = list(zip(names(len(terms)), terms, strict=True))
    if reverse:
        named.reverse()
    steps = []
    total = named[0][1]
    for index, (name, term) in enumerate(named[1:]):
        new_total = total + term + (delta if index == error_at else 0)
        steps.append(f"{name}={term}: {total}+{term}={new_total}.")
        total = new_total
    return " ".join(steps), total


def solve(terms: list[int], error_at: int | None = None, delta: int = 0) -> str:
    """The three-part trace of the module docstring; with `error_at`, the first pass holds that error."""
    first, first_total = worked_pass(terms, error_at, delta)
    check, check_total = worked_pass(terms, reverse=True)
    if first_total == check_total:
        return f"{first} check: {check} ok \\boxed{{{check_total}}}"
    redo, redo_total = worked_pass(terms)
    return f"{first} check: {check} wait {first_total}!={check_total} redo: {redo} \\boxed{{{redo_total}}}"


def first_pass_error(terms: list[int], rng: random.Random) -> tuple[int, int]:
    """Where (a step in the first half of the first pass: "an error early on") and by how much to err;
    the delta never makes a partial sum negative."""
    steps = len(terms) - 1
    error_at = rng.randrange(max(1, steps // 2))
    right = sum(terms[: error_at + 2])
    deltas = [d for d in ERROR_DELTAS if right + d >= 0]
    return error_at, rng.choice(deltas)


def make_split(cfg: LongTaskConfig, split: Literal["train", "eval"]) -> list[dict]:
    """Rows `{id, question, answer, solution, terms}` of one split, with clean (error-free) solutions."""
    questions = distinct_questions(
        f"rpo-synthetic-long-{cfg.seed}-{cfg.num_terms}-{cfg.max_digits}",
        cfg.num_terms,
        cfg.max_digits,
        question_text,
    )
    want = cfg.train_size if split == "train" else cfg.eval_size
    return take_split(
        questions,
        split,
        want,
        lambda index, question, terms: {
            "id": f"arith-long-{split}-{index:05d}",
            "question": question,
            "answer": str(sum(terms)),
            "solution": solve(terms),
            "terms": terms,
        },
    )


def warm_start_rows(cfg: LongTaskConfig) -> list[dict]:
    """The train split with an error injected into the first pass of `error_rate` of the solutions
    (chosen by the config's seed), so the warm start sees checks that disagree and redos that repair."""
    rng = random.Random(f"rpo-synthetic-long-errors-{cfg.seed}")
    rows = []
    for row in make_split(cfg, "train"):
        if rng.random() < cfg.error_rate:
            error_at, delta = first_pass_error(row["terms"], rng)
            row = {**row, "solution": solve(row["terms"], error_at, delta)}
        rows.append(row)
    return rows


def check_answer(response_text: str, reference: str) -> float:
    """1.0 iff the LAST `\\boxed{...}` content equals the reference (the `exact` reward)."""
    return exact_boxed_reward(response_text, reference)
