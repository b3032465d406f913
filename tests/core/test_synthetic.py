"""The synthetic arithmetic task: determinism, disjoint splits, correct traces, the difficulty knob, the checker."""

import json
import re

import pytest

from services.core.config import DataSection
from services.core.data import load_questions
from services.core.synthetic import (
    PROMPT_TEMPLATE,
    SyntheticTaskConfig,
    check_answer,
    make_dataset_files,
    make_split,
    solve,
)

SMALL = SyntheticTaskConfig(train_size=300, eval_size=60)


def test_same_seed_same_rows_other_seed_other_rows():
    assert make_split(SMALL, "train") == make_split(
        SyntheticTaskConfig(train_size=300, eval_size=60), "train"
    )
    assert make_split(SMALL, "eval") == make_split(SMALL, "eval")
    other = SyntheticTaskConfig(train_size=300, eval_size=60, seed=1)
    assert [r["question"] for r in make_split(other, "train")] != [
        r["question"] for r in make_split(SMALL, "train")
    ]


def test_splits_never_share_a_question_even_across_seeds():
    train = {r["question"] for r in make_split(SMALL, "train")}
    evals = {r["question"] for r in make_split(SMALL, "eval")}
    assert len(train) == 300 and len(evals) == 60
    assert not train & evals
    for seed in (1, 2):
        cfg = SyntheticTaskConfig(train_size=300, eval_size=60, seed=seed)
        assert not {r["question"] for r in make_split(cfg, "eval")} & train


def test_growing_a_split_only_appends():
    small = make_split(SyntheticTaskConfig(train_size=50, eval_size=10), "train")
    large = make_split(SyntheticTaskConfig(train_size=120, eval_size=30), "train")
    assert large[:50] == small
    assert make_split(SyntheticTaskConfig(eval_size=10), "eval") == make_split(SMALL, "eval")[:10]


def test_rows_have_unique_ids_and_the_documented_fields():
    rows = make_split(SMALL, "train") + make_split(SMALL, "eval")
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(set(r) == {"id", "question", "answer", "solution"} for r in rows)
    assert rows[0]["id"].startswith("arith-train-") and rows[-1]["id"].startswith("arith-eval-")


@pytest.mark.parametrize("num_terms,max_digits", [(2, 1), (4, 2), (7, 3)])
def test_trace_steps_are_correct_and_end_in_the_boxed_sum(num_terms, max_digits):
    cfg = SyntheticTaskConfig(num_terms=num_terms, max_digits=max_digits, train_size=40, eval_size=10)
    for row in make_split(cfg, "train") + make_split(cfg, "eval"):
        terms = [int(t) for t in row["question"].removesuffix("=?").split("+")]
        assert len(terms) == num_terms and all(0 <= t < 10**max_digits for t in terms)
        assert row["answer"] == str(sum(terms))
        assert row["solution"].endswith(f"\\boxed{{{sum(terms)}}}")
        steps = re.findall(r"(\d+)\+(\d+)=(\d+)\.", row["solution"])
        assert len(steps) == num_terms - 1
        running = terms[0]
        for (a, b, c), term in zip(steps, terms[1:], strict=True):
            assert (int(a), int(b), int(c)) == (running, term, running + term)
            running += term
        assert check_answer(row["solution"], row["answer"]) == 1.0


def test_worked_example():
    assert solve([61, 58, 35]) == "61+58=119. 119+35=154. \\boxed{154}"


def test_more_terms_make_longer_traces():
    def mean_len(num_terms: int) -> float:
        rows = make_split(SyntheticTaskConfig(num_terms=num_terms, train_size=50, eval_size=5), "train")
        return sum(len(r["solution"]) for r in rows) / len(rows)

    lengths = [mean_len(n) for n in (2, 4, 8, 16)]
    assert lengths == sorted(lengths) and lengths[0] < 30 < lengths[1]
    assert 150 < lengths[-1] < 400  # a few hundred one-character tokens


def test_too_small_a_task_space_raises_instead_of_looping():
    with pytest.raises(ValueError, match="distinct"):
        make_split(SyntheticTaskConfig(num_terms=2, max_digits=1, train_size=200, eval_size=5), "train")
    with pytest.raises(ValueError):
        SyntheticTaskConfig(num_terms=1)
    with pytest.raises(ValueError):
        make_split(SMALL, "test")


@pytest.mark.parametrize(
    "response,reference,expected",
    [
        ("61+58=119. \\boxed{119}", "119", 1.0),
        ("\\boxed{ 119 }", "119", 1.0),
        ("\\boxed{120} then \\boxed{119}", "119", 1.0),  # the last boxed wins
        ("\\boxed{119} then \\boxed{120}", "119", 0.0),
        ("\\boxed{118}", "119", 0.0),
        ("\\boxed{119.0}", "119", 0.0),  # exact, not numeric
        ("the answer is 119", "119", 0.0),  # no boxed
        ("\\boxed{119", "119", 0.0),  # unclosed
        ("", "119", 0.0),
    ],
)
def test_checker(response, reference, expected):
    assert check_answer(response, reference) == expected


def test_dataset_files_round_trip(tmp_path):
    paths = make_dataset_files(SMALL, tmp_path / "data")
    assert set(paths) == {"train", "eval"}
    for split, path in paths.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows == make_split(SMALL, split)


def test_data_loading_sees_the_same_questions_and_template():
    fields = DataSection(synthetic_train_size=30, synthetic_eval_size=5)
    loaded = load_questions("builtin:arith", fields)
    rows = make_split(SyntheticTaskConfig(train_size=30, eval_size=5), "train")
    assert [(q.id, q.question, q.answer) for q in loaded] == [
        (r["id"], r["question"], r["answer"]) for r in rows
    ]
    assert PROMPT_TEMPLATE == DataSection().prompt_template
