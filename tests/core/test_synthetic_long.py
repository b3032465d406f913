"""The long-reasoning task (`builtin:arith-long`): determinism, three disjoint splits, the trace (two passes
in different orders, a redo when they disagree), several correct texts per question, errors anywhere that
are caught or decided early or late, and the checker."""

import random
import re
import statistics

import pytest

from services.core.config import DataSection
from services.core.data import load_questions
from services.core.synthetic import PROMPT_TEMPLATE
from services.core.synthetic_long import (
    ORDERS,
    InjectedError,
    LongTaskConfig,
    check_answer,
    correct_texts,
    make_split,
    order_indices,
    question_text,
    random_error,
    solve,
    split_of,
    warm_start_rows,
    worked_pass,
)

SMALL = LongTaskConfig(train_size=400, eval_size=60, val_size=40)
LETTERS = "ABCDEFGHIJ"


def _boxed(text: str) -> int:
    return int(re.findall(r"\\boxed\{(-?\d+)\}", text)[-1])


def _totals(text: str) -> list[int]:
    return [int(t) for t in re.findall(r"total (-?\d+)\.", text)]


def _orders(text: str) -> list[str]:
    return re.findall(r"order ([A-Z]+):", text)


def _wrong_steps(text: str) -> list[int]:
    return [
        i
        for i, (a, b, c) in enumerate(re.findall(r"(\d+)\+(\d+)=(\d+)\.", text))
        if int(a) + int(b) != int(c)
    ]


def test_same_config_same_rows_and_three_disjoint_splits():
    assert make_split(SMALL, "train") == make_split(LongTaskConfig(train_size=400, eval_size=60), "train")
    train, val, test = ({r["question"] for r in make_split(SMALL, s)} for s in ("train", "val", "eval"))
    assert (len(train), len(val), len(test)) == (400, 40, 60)
    assert not train & val and not train & test and not val & test
    assert all(split_of(q) == "val" for q in val) and all(split_of(q) == "eval" for q in test)
    # growing a split appends; another seed gives other questions
    assert make_split(LongTaskConfig(val_size=10), "val") == make_split(SMALL, "val")[:10]
    assert make_split(LongTaskConfig(train_size=100), "train") == make_split(SMALL, "train")[:100]
    assert {r["question"] for r in make_split(LongTaskConfig(train_size=400, seed=1), "train")} != train
    with pytest.raises(ValueError, match="split must be"):
        make_split(SMALL, "test")


def test_clean_solution_adds_twice_in_different_orders_and_boxes_the_sum():
    for row in make_split(SMALL, "eval"):
        terms, text = row["terms"], row["solution"]
        assert len(terms) == 10 and row["answer"] == str(sum(terms))
        assert (
            row["question"]
            == question_text(terms)
            == " ".join(f"{n}={t}" for n, t in zip(LETTERS, terms, strict=True)) + " sum?"
        )
        assert _orders(text) == ["ABCDEFGHIJ", "JIHGFEDCBA"]
        for name, term, added in re.findall(r"([A-Z])=(\d+): \d+\+(\d+)=", text):
            assert int(term) == int(added) == terms[LETTERS.index(name)]
        assert "wait" not in text and text.endswith(f" ok \\boxed{{{sum(terms)}}}")
        assert _totals(text) == [sum(terms), sum(terms)] and not _wrong_steps(text)
        assert check_answer(text, row["answer"]) == 1.0


def test_every_question_has_six_distinct_correct_texts():
    assert order_indices("interleaved", 10) == [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]
    for row in make_split(SMALL, "eval")[:20]:
        texts = correct_texts(row["terms"])
        assert len(set(texts)) == 6
        assert all(check_answer(t, row["answer"]) == 1.0 and "wait" not in t for t in texts)
        # each pass visits every term once, in its order
        for t in texts:
            for order in _orders(t):
                assert sorted(order) == list(LETTERS) and order in {
                    "".join(LETTERS[i] for i in order_indices(o, 10)) for o in ORDERS
                }


def test_answers_are_at_least_250_tokens():
    # one token per character on the tiny model, + EOS; every clean text of every held-out question
    lengths = [
        len(t) + 1
        for r in make_split(LongTaskConfig(eval_size=200), "eval")
        for t in correct_texts(r["terms"])
    ]
    assert min(lengths) >= 250 and statistics.mean(lengths) >= 300


@pytest.mark.parametrize("pass_index", [0, 1])
def test_an_error_anywhere_is_caught_and_the_redo_decides(pass_index):
    """An error in the first pass is decided late (by the check and the redo); one in the check is decided
    early (the redo agrees with the first pass). Steps at the start, the middle and the end alike."""
    for row in make_split(SMALL, "eval")[:10]:
        terms = row["terms"]
        for step in (0, 4, 8):
            error = InjectedError(pass_index, step, 10)
            text = solve(terms, ("interleaved", "forward"), error)
            totals = _totals(text)
            assert len(totals) == 3 and totals[pass_index] == sum(terms) + 10
            assert totals[1 - pass_index] == totals[2] == sum(terms)
            assert f" wait {totals[0]}!={totals[1]} redo order " in text
            assert _orders(text)[2] == "JIHGFEDCBA"  # the redo takes the remaining order
            assert _boxed(text) == sum(terms)
            passes = re.split(r" check | redo ", text)
            assert _wrong_steps(passes[pass_index]) == [step]  # later steps add correctly to the wrong sum
            assert len(text) > len(row["solution"])  # a redo costs tokens: the length reward's lever


def test_an_error_missed_boxes_a_wrong_total():
    """Two passes wrong alike agree on a wrong total: the error is missed and the reward is 0."""
    terms = make_split(SMALL, "eval")[0]["terms"]
    first, first_total = worked_pass(terms, "forward", error_at=8, delta=1)
    check, check_total = worked_pass(terms, "backward", error_at=8, delta=1)
    assert first_total == check_total == sum(terms) + 1
    missed = f"{first} check {check} ok \\boxed{{{check_total}}}"
    assert check_answer(missed, str(sum(terms))) == 0.0


def test_warm_start_rows_use_every_order_and_inject_errors_anywhere():
    cfg = LongTaskConfig(train_size=2000, error_rate=0.3)
    rows = warm_start_rows(cfg)
    with_redo = [r for r in rows if " redo " in r["solution"]]
    assert 0.22 < len(with_redo) / len(rows) < 0.32  # an error of +-10 or +-1 always changes the total
    assert all(check_answer(r["solution"], r["answer"]) == 1.0 for r in rows)
    assert {tuple(_orders(r["solution"])[:2]) for r in rows} == {
        tuple("".join(LETTERS[i] for i in order_indices(o, 10)) for o in pair)
        for pair in [(a, b) for a in ORDERS for b in ORDERS if a != b]
    }
    # errors in both passes, at early and late steps
    where = set()
    for r in with_redo:
        passes = re.split(r" check | wait ", r["solution"])
        for index in (0, 1):
            for step in _wrong_steps(passes[index]):
                where.add((index, step))
    assert {p for p, _ in where} == {0, 1} and {s for _, s in where} == set(range(9))
    assert [r["question"] for r in rows] == [r["question"] for r in make_split(cfg, "train")]
    assert warm_start_rows(cfg) == rows  # seeded
    assert not [
        r for r in warm_start_rows(LongTaskConfig(train_size=300, error_rate=0.0)) if "redo" in r["solution"]
    ]


def test_injected_errors_never_make_a_partial_sum_negative():
    rng = random.Random(0)
    for row in make_split(SMALL, "train")[:200]:
        error = random_error(row["terms"], rng)
        text = solve(row["terms"], ("forward", "backward"), error)
        assert "=-" not in text and "+-" not in text


def test_checker_scores_the_last_box_only():
    row = make_split(SMALL, "eval")[0]
    assert check_answer(row["solution"], row["answer"]) == 1.0
    wrong = row["solution"].rsplit("\\boxed", 1)[0] + f"\\boxed{{{int(row['answer']) + 1}}}"
    assert check_answer(wrong, row["answer"]) == 0.0
    assert check_answer(row["solution"].rsplit(" ok ", 1)[0], row["answer"]) == 0.0  # cut before the box


def test_worked_pass_and_config_validation():
    assert worked_pass([1, 2, 3]) == ("order ABC: B=2: 1+2=3. C=3: 3+3=6. total 6.", 6)
    assert worked_pass([1, 2, 3], error_at=0, delta=10) == (
        "order ABC: B=2: 1+2=13. C=3: 13+3=16. total 16.",
        16,
    )
    assert worked_pass([1, 2, 3], "backward") == ("order CBA: B=2: 3+2=5. A=1: 5+1=6. total 6.", 6)
    assert worked_pass([1, 2, 3, 4], "interleaved") == (
        "order ACBD: C=3: 1+3=4. B=2: 4+2=6. D=4: 6+4=10. total 10.",
        10,
    )
    with pytest.raises(ValueError, match="two different orders"):
        solve([1, 2, 3], ("forward", "forward"))
    with pytest.raises(ValueError, match="unknown order"):
        worked_pass([1, 2, 3], "sideways")
    for bad in (
        {"num_terms": 2},
        {"num_terms": 27},
        {"max_digits": 0},
        {"error_rate": 1.5},
        {"train_size": -1},
        {"val_size": -1},
    ):
        with pytest.raises(ValueError):
            LongTaskConfig(**bad)


def test_builtin_datasets_load_the_long_task_splits():
    fields = DataSection()
    train = load_questions("builtin:arith-long", fields, 50)
    val = load_questions("builtin:arith-long-val", fields, 50)
    test = load_questions("builtin:arith-long-eval", fields, 50)
    assert len(train) == len(val) == len(test) == 50
    texts = [{q.question for q in split} for split in (train, val, test)]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    assert train[0].id.startswith("arith-long-train-") and val[0].id.startswith("arith-long-val-")
    assert PROMPT_TEMPLATE.format(question=train[0].question)


def _without_lookups(text: str) -> str:
    """A trace with every step's lookup (`C=9: `) dropped: what both wordings share."""
    return re.sub(r"[A-Z]=\d+: ", "", text)


def test_varied_wording_differs_from_the_full_one_only_in_the_length_of_correct_answers():
    full, varied = LongTaskConfig(train_size=600), LongTaskConfig(train_size=600, wording="varied")
    full_rows, varied_rows = warm_start_rows(full), warm_start_rows(varied)
    # The same questions, orders, errors and redos, row for row; only the wording of the steps differs.
    assert [r["question"] for r in full_rows] == [r["question"] for r in varied_rows]
    assert [_without_lookups(r["solution"]) for r in full_rows] == [
        _without_lookups(r["solution"]) for r in varied_rows
    ]
    assert all(check_answer(r["solution"], r["answer"]) == 1.0 for r in varied_rows)
    # About half the steps are terse, so two correct answers to one question differ in length.
    steps = [s for r in varied_rows for s in re.findall(r"(?:[A-Z]=\d+: )?\d+\+\d+=\d+\.", r["solution"])]
    terse = sum(1 for s in steps if "=" not in s.split("+")[0])
    assert 0.45 < terse / len(steps) < 0.55
    lengths = [len(r["solution"]) for r in varied_rows if " redo " not in r["solution"]]
    assert statistics.pstdev(lengths) > 10 > statistics.pstdev([len(solve(r["terms"])) for r in full_rows])
    # The splits are the same questions under their own ids.
    assert [r["question"] for r in make_split(varied, "val")] == [
        r["question"] for r in make_split(full, "val")
    ]
    assert make_split(varied, "val")[0]["id"].startswith("arith-long-var-val-")
    with pytest.raises(ValueError, match="wording"):
        LongTaskConfig(wording="short")


def test_builtin_datasets_load_the_varied_task():
    fields = DataSection()
    for split, suffix in (("train", ""), ("val", "-val"), ("eval", "-eval")):
        varied = load_questions(f"builtin:arith-long-var{suffix}", fields, 20)
        full = load_questions(f"builtin:arith-long{suffix}", fields, 20)
        assert [q.question for q in varied] == [q.question for q in full]
        assert varied[0].id.startswith(f"arith-long-var-{split}-")
