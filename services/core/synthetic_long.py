"""A long-reasoning synthetic task: the paper's regime (long answers, errors that can happen anywhere and be
caught or missed later) in miniature, for `rpo reproduce`.

A question is a sum of `num_terms` one-digit numbers, each named by a letter. A worked answer adds them
twice, in two different orders, and compares:

    Q: A=6 B=0 C=9 D=4 ... J=3 sum?
    A: order ACEGIBDFHJ: C=9: 6+9=15. E=... total 53. check order JIHGFEDCBA: I=5: 3+5=8. ... total 53.
       ok \\boxed{53}

1. a first pass in one of three orders (`ORDERS`: left to right, right to left, odd letters then even), the
   order written out first, one partial sum per step (the term looked up by name, then added), and its
   `total`;
2. `check` a second pass, from scratch, in another of the orders, and its total;
3. `ok \\boxed{T}` when the totals agree, else `wait A!=B redo` a third pass in the remaining order, and
   `\\boxed{T}` of that pass.

What makes the task fair to full-path and truncated training alike:

- **Several correct texts per question**: six clean traces (any ordered pair of distinct orders), more with
  a redo, so a cached answer is one of several right ways, not the only text the reward accepts.
- **Errors anywhere, decided early or late.** The warm start injects one error (a partial sum off by 1 or
  10) into `error_rate` of its traces, at any step of the first pass or of the check. An error in the check
  is caught by the redo, which then agrees with the first pass: the first pass decided the answer. An error
  in the first pass is caught by the check and decided by the redo. A pass whose error is not caught (both
  passes wrong alike, an `ok` over unequal totals, a wrong redo) is missed and boxes a wrong total. So a
  cut of any length can remove, or keep, what decides the answer.
- **Answers of at least 250 tokens** (one token per character on the tiny model): about 290 without a
  redo, 430 with one.

**Two wordings, one property apart.** With `wording="full"` (the `arith-long` task) every step names its
term (`C=9: 6+9=15.`), so the correct answers that continue one prefix differ in length by a redo at most.
With `wording="varied"` (`arith-long-var`) the warm start writes each step in full or tersely (`6+9=15.`),
one or the other at random, so correct answers from the same prefix differ in length as real reasoning
does, by 5 tokens for each step written the other way. Questions, splits, orders and errors are the same
in both; only the length of a correct answer varies.

Splits: `train`, and two held-out splits, `val` (for every choice made while building the comparison) and
`eval` (the test split, touched only by final evaluations). Guarantees, as for `services.core.synthetic`:
the same config gives the same rows; a question's split is a pure function of its text (the three splits
are disjoint); growing a split only appends rows; every clean solution ends in `\\boxed{sum}`, which
`check_answer` scores 1.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import string
from dataclasses import dataclass
from typing import Literal

from services.core.rewards import exact_boxed_reward
from services.core.synthetic import distinct_questions, is_eval_question

ERROR_DELTAS = (-10, -1, 1, 10)
"""How an injected error changes a partial sum: a slipped carry in the units or the tens."""

ORDERS = ("forward", "backward", "interleaved")
"""The orders a pass can add in: left to right, right to left, odd-numbered letters then even ones."""

Split = Literal["train", "val", "eval"]
Wording = Literal["full", "varied"]
TERSE_SHARE = 0.5
"""With `wording="varied"`, the share of steps the warm start writes tersely (each drawn on its own)."""


@dataclass(frozen=True)
class LongTaskConfig:
    """Difficulty, split sizes, seed, and the warm start's share of traces with an error to catch."""

    num_terms: int = 10
    max_digits: int = 1
    train_size: int = 8000
    eval_size: int = 500
    val_size: int = 300
    seed: int = 0
    error_rate: float = 0.3
    wording: Wording = "full"
    """full: every step names its term; varied: the warm start writes each step in full or tersely."""

    def __post_init__(self) -> None:
        if not 3 <= self.num_terms <= 26:
            raise ValueError(f"num_terms must be in 3..26 (one letter each), got {self.num_terms}")
        if not 1 <= self.max_digits <= 6:
            raise ValueError(f"max_digits must be in 1..6, got {self.max_digits}")
        if min(self.train_size, self.eval_size, self.val_size) < 0:
            raise ValueError(
                "train_size, eval_size and val_size must be >= 0, got "
                f"{self.train_size}, {self.eval_size}, {self.val_size}"
            )
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {self.error_rate}")
        if self.wording not in ("full", "varied"):
            raise ValueError(f"wording must be 'full' or 'varied', got {self.wording!r}")

    @property
    def name(self) -> str:
        """The task's name: the dataset `builtin:<name>` and the prefix of its row ids."""
        return "arith-long" if self.wording == "full" else "arith-long-var"


def names(count: int) -> str:
    """The letters that name the terms of a question: A, B, C, ..."""
    return string.ascii_uppercase[:count]


def order_indices(order: str, count: int) -> list[int]:
    """The term positions a pass visits, in `order`."""
    if order == "forward":
        return list(range(count))
    if order == "backward":
        return list(range(count - 1, -1, -1))
    if order == "interleaved":
        return [*range(0, count, 2), *range(1, count, 2)]
    raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")


def question_text(terms: list[int]) -> str:
    """`A=7 B=3 C=9 ... sum?`: each term named by a letter, so a step can look its term up by name."""
    return " ".join(f"{name}={term}" for name, term in zip(names(len(terms)), terms, strict=True)) + " sum?"


def worked_pass(
    terms: list[int],
    order: str = "forward",
    error_at: int | None = None,
    delta: int = 0,
    terse: random.Random | None = None,
) -> tuple[str, int]:
    """One pass: `order ACEG...:` then the partial sums in that order (`C=9: 6+9=15.`: the term looked up by
    name, then the addition), then `total T.`; returns the text and T. With `error_at`, that step's sum is
    off by `delta` and every later step adds correctly to the wrong value (only another pass catches it).
    With `terse`, each step is written without its lookup (`6+9=15.`) with probability `TERSE_SHARE`."""
    letters = names(len(terms))
    visit = order_indices(order, len(terms))
    steps = [f"order {''.join(letters[i] for i in visit)}:"]
    total = terms[visit[0]]
    for index, position in enumerate(visit[1:]):
        term = terms[position]
        new_total = total + term + (delta if index == error_at else 0)
        lookup = "" if terse is not None and terse.random() < TERSE_SHARE else f"{letters[position]}={term}: "
        steps.append(f"{lookup}{total}+{term}={new_total}.")
        total = new_total
    steps.append(f"total {total}.")
    return " ".join(steps), total


@dataclass(frozen=True)
class InjectedError:
    """One wrong partial sum: in pass 0 (the first) or 1 (the check), at step `step`, off by `delta`."""

    pass_index: int
    step: int
    delta: int


def solve(
    terms: list[int],
    orders: tuple[str, str] = ("forward", "backward"),
    error: InjectedError | None = None,
    terse: random.Random | None = None,
) -> str:
    """The trace of the module docstring with the first pass and the check in `orders`; the redo, when the
    totals disagree, takes the remaining order. `error` puts one wrong partial sum in a pass; `terse` (the
    varied wording) draws each step's wording."""
    if orders[0] == orders[1] or any(o not in ORDERS for o in orders):
        raise ValueError(f"the first pass and the check need two different orders of {ORDERS}, got {orders}")
    passes = []
    for index, order in enumerate(orders):
        wrong = error if error is not None and error.pass_index == index else None
        step, delta = (wrong.step, wrong.delta) if wrong else (None, 0)
        passes.append(worked_pass(terms, order, step, delta, terse))
    (first, first_total), (check, check_total) = passes
    if first_total == check_total:
        return f"{first} check {check} ok \\boxed{{{check_total}}}"
    remaining = next(o for o in ORDERS if o not in orders)
    redo, redo_total = worked_pass(terms, remaining, terse=terse)
    return f"{first} check {check} wait {first_total}!={check_total} redo {redo} \\boxed{{{redo_total}}}"


def correct_texts(terms: list[int]) -> list[str]:
    """Every clean trace of a question: one per ordered pair of distinct orders."""
    return [solve(terms, pair) for pair in itertools.permutations(ORDERS, 2)]


def random_error(terms: list[int], rng: random.Random) -> InjectedError:
    """An error at any step of the first pass or the check. A negative delta is only drawn where it cannot
    make the partial sum negative (checked against the smallest sum that many terms can have)."""
    pass_index = rng.randrange(2)
    step = rng.randrange(len(terms) - 1)
    deltas = [d for d in ERROR_DELTAS if d > 0 or sum(sorted(terms)[: step + 2]) + d >= 0]
    return InjectedError(pass_index, step, rng.choice(deltas))


def _in_validation(question: str) -> bool:
    """Whether a held-out question is in `val` (else `eval`): a second pure function of the text."""
    digest = hashlib.sha256(b"rpo-val:" + question.encode("utf-8")).digest()
    return digest[0] % 2 == 0


def split_of(question: str) -> Split:
    """The split a question belongs to: one bucket in ten is held out, and halved into `val` and `eval`."""
    if not is_eval_question(question):
        return "train"
    return "val" if _in_validation(question) else "eval"


def make_split(cfg: LongTaskConfig, split: Split) -> list[dict]:
    """Rows `{id, question, answer, solution, terms}` of one split, with clean solutions (forward, then the
    check backward); raises if the task space runs out first."""
    if split not in ("train", "val", "eval"):
        raise ValueError(f"split must be 'train', 'val' or 'eval', got {split!r}")
    want = {"train": cfg.train_size, "val": cfg.val_size, "eval": cfg.eval_size}[split]
    rows: list[dict] = []
    if want == 0:
        return rows
    questions = distinct_questions(
        f"rpo-synthetic-long-{cfg.seed}-{cfg.num_terms}-{cfg.max_digits}",
        cfg.num_terms,
        cfg.max_digits,
        question_text,
    )
    for question, terms in questions:
        if split_of(question) != split:
            continue
        rows.append(
            {
                "id": f"{cfg.name}-{split}-{len(rows):05d}",
                "question": question,
                "answer": str(sum(terms)),
                "solution": solve(terms),
                "terms": terms,
            }
        )
        if len(rows) == want:
            return rows
    raise ValueError(
        f"only {len(rows)} distinct {split} questions exist at this difficulty; asked for {want}: "
        "raise the number of terms or digits, or lower the size"
    )


def warm_start_rows(cfg: LongTaskConfig) -> list[dict]:
    """The train split with each solution's orders drawn at random, and an error injected into the first
    pass or the check of `error_rate` of them (chosen by the config's seed), so the warm start sees every
    order, checks that disagree, and redos that decide. The varied wording draws each step's wording from
    a generator of its own, so both wordings share their orders and errors row for row."""
    rng = random.Random(f"rpo-synthetic-long-errors-{cfg.seed}")
    terse = random.Random(f"rpo-synthetic-long-wording-{cfg.seed}") if cfg.wording == "varied" else None
    pairs = list(itertools.permutations(ORDERS, 2))
    rows = []
    for row in make_split(cfg, "train"):
        orders = rng.choice(pairs)
        error = random_error(row["terms"], rng) if rng.random() < cfg.error_rate else None
        rows.append({**row, "solution": solve(row["terms"], orders, error, terse)})
    return rows


def check_answer(response_text: str, reference: str) -> float:
    """1.0 iff the LAST `\\boxed{...}` content equals the reference (the `exact` reward)."""
    return exact_boxed_reward(response_text, reference)
