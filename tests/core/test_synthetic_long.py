"""The long-reasoning task (`builtin:arith-long`): determinism, disjoint splits, the three-part trace, the
injected errors the warm start learns to repair, and the checker."""

import random
import re
import statistics

import pytest

from services.core.config import DataSection
from services.core.data import load_questions
from services.core.synthetic import PROMPT_TEMPLATE
from services.core.synthetic_long import (
    LongTaskConfig,
    check_answer,
    first_pass_error,
    make_split,
    question_text,
    solve,
    warm_start_rows,
    worked_pass,
)

SMALL = LongTaskConfig(train_size=400, eval_size=60)


def _boxed(text: str) -> int:
    return int(re.findall(r"\\boxed\{(-?\d+)\}", text)[-1])


def _totals(text: str) -> list[int]:
    """The total each pass reaches: the last partial sum before `check:`, before `ok`/`wait`, before the box."""
    parts = re.split(r" check: | ok | wait \S+ redo: ", text)
    return [int(re.findall(r"=(-?\d+)\.", p)[-1]) for p in parts if re.search(r"=(-?\d+)\.", p)]


def test_same_config_same_rows_and_splits_are_disjoint():
    assert make_split(SMALL, "train") == make_split(LongTaskConfig(train_size=400, eval_size=60), "train")
    train = {r["question"] for r in make_split(SMALL, "train")}
    evals = {r["question"] for r in make_split(SMALL, "eval")}
    assert len(train) == 400 and len(evals) == 60 and not train & evals
    assert make_split(LongTaskConfig(train_size=100), "train") == make_split(SMALL, "train")[:100]
    other = {r["question"] for r in make_split(LongTaskConfig(train_size=400, seed=1), "train")}
    assert other != train


def test_clean_solution_adds_checks_the_other_way_and_boxes_the_sum():
    for row in make_split(SMALL, "eval"):
        terms, text = row["terms"], row["solution"]
        assert len(terms) == 10 and row["answer"] == str(sum(terms))
        assert (
            row["question"]
            == question_text(terms)
            == " ".join(f"{n}={t}" for n, t in zip("ABCDEFGHIJ", terms, strict=True)) + " sum?"
        )
        first, rest = text.split(" check: ")
        assert first.startswith(f"B={terms[1]}: {terms[0]}+{terms[1]}=")
        assert rest.startswith(f"I={terms[-2]}: {terms[-1]}+{terms[-2]}=")  # the check runs right to left
        # each step names its term and adds that term
        for name, term, added in re.findall(r"([A-Z])=(\d+): \d+\+(\d+)=", text):
            assert int(term) == int(added) == terms["ABCDEFGHIJ".index(name)]
        assert "wait" not in text and " ok \\boxed{" in text
        assert _totals(text) == [sum(terms), sum(terms)]
        assert _boxed(text) == sum(terms) and check_answer(text, row["answer"]) == 1.0
        # every step is right
        for a, b, c in re.findall(r"(\d+)\+(\d+)=(\d+)\.", text):
            assert int(a) + int(b) == int(c)


def test_answers_are_long_enough_for_a_tenth_to_be_a_real_truncation():
    lengths = [len(r["solution"]) + 1 for r in make_split(LongTaskConfig(eval_size=200), "eval")]
    # one token per character on the tiny model, + EOS
    assert statistics.mean(lengths) >= 250 and min(lengths) >= 230


def test_an_error_in_the_first_pass_is_caught_by_the_check_and_repaired_by_the_redo():
    rng = random.Random(0)
    for row in make_split(SMALL, "eval")[:40]:
        terms = row["terms"]
        error_at, delta = first_pass_error(terms, rng)
        assert 0 <= error_at < (len(terms) - 1) // 2 and delta in (-10, -1, 1, 10)
        text = solve(terms, error_at, delta)
        first_total, check_total, redo_total = _totals(text)
        assert first_total == sum(terms) + delta != check_total == sum(terms) == redo_total
        assert f" wait {first_total}!={check_total} redo: " in text
        assert _boxed(text) == sum(terms) and check_answer(text, row["answer"]) == 1.0
        # only the erring step is wrong; later steps add correctly to the wrong partial sum
        steps = re.findall(r"(\d+)\+(\d+)=(\d+)\.", text.split(" check: ")[0])
        wrong = [i for i, (a, b, c) in enumerate(steps) if int(a) + int(b) != int(c)]
        assert wrong == [error_at]
        assert len(text) > len(row["solution"])  # a redo costs tokens: the length reward's lever


def test_warm_start_rows_inject_errors_into_about_the_configured_share():
    cfg = LongTaskConfig(train_size=2000, error_rate=0.25)
    rows = warm_start_rows(cfg)
    with_redo = [r for r in rows if " redo: " in r["solution"]]
    assert 0.2 < len(with_redo) / len(rows) < 0.3
    assert all(check_answer(r["solution"], r["answer"]) == 1.0 for r in rows)
    assert [r["question"] for r in rows] == [r["question"] for r in make_split(cfg, "train")]
    assert warm_start_rows(cfg) == rows  # seeded
    assert not [
        r for r in warm_start_rows(LongTaskConfig(train_size=300, error_rate=0.0)) if "redo" in r["solution"]
    ]


def test_checker_scores_the_last_box_only():
    row = make_split(SMALL, "eval")[0]
    assert check_answer(row["solution"], row["answer"]) == 1.0
    wrong = row["solution"].rsplit("\\boxed", 1)[0] + f"\\boxed{{{int(row['answer']) + 1}}}"
    assert check_answer(wrong, row["answer"]) == 0.0
    assert check_answer(row["solution"].rsplit(" ok ", 1)[0], row["answer"]) == 0.0  # cut before the box


def test_worked_pass_and_config_validation():
    assert worked_pass([1, 2, 3]) == ("B=2: 1+2=3. C=3: 3+3=6.", 6)
    assert worked_pass([1, 2, 3], error_at=0, delta=10) == ("B=2: 1+2=13. C=3: 13+3=16.", 16)
    assert worked_pass([1, 2, 3], reverse=True) == ("B=2: 3+2=5. A=1: 5+1=6.", 6)
    for bad in (
        {"num_terms": 2},
        {"num_terms": 27},
        {"max_digits": 0},
        {"error_rate": 1.5},
        {"train_size": -1},
    ):
        with pytest.raises(ValueError):
            LongTaskConfig(**bad)


def test_builtin_datasets_load_the_long_task():
    fields = DataSection()
    train = load_questions("builtin:arith-long", fields, 50)
    evals = load_questions("builtin:arith-long-eval", fields, 50)
    assert len(train) == len(evals) == 50
    assert not {q.question for q in train} & {q.question for q in evals}
    assert train[0].id.startswith("arith-long-train-") and PROMPT_TEMPLATE.format(question=train[0].question)
