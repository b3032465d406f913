"""A synthetic verifiable task: multi-step addition with a worked, checkable trace.

Used by the tests and the built-in demo, where no data set can be downloaded. A question such as
`61+58+35=?` has the worked solution `61+58=119. 119+35=154. \\boxed{154}`: one step per extra term, so
the number of terms is the knob for trace length (2 terms: about 15 characters; 16 terms: about 200) and
the digit count the knob for per-step difficulty.

Guarantees:
- The same config gives the same rows, byte for byte (own `random.Random`, no global state).
- Train and eval never share a question: a question's split is a pure function of its text (a hash
  bucket), so the splits are disjoint for every size, and across seeds too.
- Growing `train_size` (or `eval_size`) only appends rows; the existing ones keep their ids and content.
- Every solution ends in `\\boxed{answer}`, where `answer` is the exact sum, and `check_answer` scores it 1.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.core.rewards import exact_boxed_reward

PROMPT_TEMPLATE = "Q: {question}\nA: "
"""Plain prompt of the task; the same default as `data.prompt_template`, used by the warm start."""

_EVAL_BUCKETS = 10
"""One question in this many (by hash of its text) belongs to the eval split."""


@dataclass(frozen=True)
class SyntheticTaskConfig:
    """Difficulty, split sizes and seed of the arithmetic task."""

    num_terms: int = 4
    max_digits: int = 2
    train_size: int = 2000
    eval_size: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_terms < 2:
            raise ValueError(f"num_terms must be >= 2, got {self.num_terms}")
        if not 1 <= self.max_digits <= 18:
            raise ValueError(f"max_digits must be in 1..18, got {self.max_digits}")
        if self.train_size < 0 or self.eval_size < 0:
            raise ValueError(
                f"train_size and eval_size must be >= 0, got {self.train_size}, {self.eval_size}"
            )


def is_eval_question(question: str) -> bool:
    """Whether a question belongs to the eval split: a pure function of its text (one bucket in ten)."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % _EVAL_BUCKETS == 0


def solve(terms: list[int]) -> str:
    """The worked trace of a sum, one partial sum per step, ending in the boxed result."""
    steps = []
    total = terms[0]
    for term in terms[1:]:
        new_total = total + term
        steps.append(f"{total}+{term}={new_total}.")
        total = new_total
    return " ".join(steps) + f" \\boxed{{{total}}}"


def distinct_questions(
    rng_key: str, num_terms: int, max_digits: int, render: Callable[[list[int]], str]
) -> Iterator[tuple[str, list[int]]]:
    """Distinct `(question, terms)` in a fixed order for `rng_key`, each question `render(terms)`; stops
    when the task space looks exhausted (10,000 repeats in a row). Shared by the synthetic tasks."""
    rng = random.Random(rng_key)
    high = 10**max_digits - 1
    seen: set[str] = set()
    misses = 0
    while misses < 10_000:
        terms = [rng.randint(0, high) for _ in range(num_terms)]
        question = render(terms)
        if question in seen:
            misses += 1
            continue
        seen.add(question)
        misses = 0
        yield question, terms


def take_split(
    questions: Iterator[tuple[str, list[int]]],
    split: Literal["train", "eval"],
    want: int,
    make_row: Callable[[int, str, list[int]], dict],
) -> list[dict]:
    """The first `want` questions of `split` (by `is_eval_question`) as `make_row(index, question,
    terms)`; raises if the stream runs out first. Shared by the synthetic tasks."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rows: list[dict] = []
    if want == 0:
        return rows
    for question, terms in questions:
        if is_eval_question(question) != (split == "eval"):
            continue
        rows.append(make_row(len(rows), question, terms))
        if len(rows) == want:
            return rows
    raise ValueError(
        f"only {len(rows)} distinct {split} questions exist at this difficulty; asked for {want}: "
        "raise the number of terms or digits, or lower the size"
    )


def make_split(cfg: SyntheticTaskConfig, split: Literal["train", "eval"]) -> list[dict]:
    """Rows `{id, question, answer, solution}` of one split; raises if the task space is too small."""
    questions = distinct_questions(
        f"rpo-synthetic-{cfg.seed}-{cfg.num_terms}-{cfg.max_digits}",
        cfg.num_terms,
        cfg.max_digits,
        lambda terms: "+".join(str(t) for t in terms) + "=?",
    )
    want = cfg.train_size if split == "train" else cfg.eval_size
    return take_split(
        questions,
        split,
        want,
        lambda index, question, terms: {
            "id": f"arith-{split}-{index:05d}",
            "question": question,
            "answer": str(sum(terms)),
            "solution": solve(terms),
        },
    )


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows one JSON object a line (via a temp file, so a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def make_dataset_files(cfg: SyntheticTaskConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write `train.jsonl` and `eval.jsonl` under `out_dir`; returns {"train": path, "eval": path}."""
    out = Path(out_dir)
    return {split: write_jsonl(make_split(cfg, split), out / f"{split}.jsonl") for split in ("train", "eval")}


def check_answer(response_text: str, reference: str) -> float:
    """1.0 iff the LAST `\\boxed{...}` content, stripped, equals the reference; the `exact` reward itself."""
    return exact_boxed_reward(response_text, reference)
