"""Several weighted reward functions (services.core.reward_terms): both calling conventions, what a TRL-style
function receives, the weighted sum, the correctness function, and failures that score 0 instead of raising."""

from __future__ import annotations

import logging
import math

import pytest

from services.core.config import ConfigError, load_config
from services.core.reward_examples import boxed_format_reward
from services.core.reward_terms import ScoringGroup, score_groups, takes_batches
from services.core.rewards import exact_boxed_reward
from services.core.schemas.rollout import RewardTerm

RECEIVED: list[dict] = []


def recording_reward(completions, **kwargs):
    """A TRL-style function that keeps what it was given and scores each completion's length parity."""
    RECEIVED.append({"completions": completions, **kwargs})
    return [float(len(str(c)) % 2) for c in completions]


def solution_only(completions, solution):
    """No **kwargs: it must get only what it names."""
    return [1.0 if s in c[0]["content"] else 0.0 for c, s in zip(completions, solution, strict=True)]


def half_none(completions, **kwargs):
    return [None if i % 2 else 0.25 for i in range(len(completions))]


def raises(completions, **kwargs):
    raise RuntimeError("judge unreachable")


def too_few(completions, **kwargs):
    return [1.0]


def not_finite(completions, **kwargs):
    return [math.nan, math.inf, "x", 0.5][: len(completions)]


def _spec(fn) -> str:
    return f"{__name__}:{fn.__name__}"


def _groups() -> list[ScoringGroup]:
    plain = ScoringGroup(
        question_id="q1",
        reference="7",
        texts=["3+4=7 \\boxed{7}", "3+4=8 \\boxed{8}"],
        completion_ids=[[1, 2], [3]],
        prompt="What is 3+4?",
        columns={"id": "q1", "answer": "7", "level": 2},
    )
    chat = ScoringGroup(
        question_id="q2",
        reference="5",
        texts=["2+3=5 \\boxed{5}"],
        completion_ids=[[4, 5, 6]],
        prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}],
        columns={"solution": "5", "level": 1},
    )
    return [plain, chat]


def test_a_single_function_scores_as_before_and_decides_correctness():
    groups = _groups()
    scored = score_groups([RewardTerm(function="exact", name="exact")], 0, "builtin:arith", groups)
    raws = [[s.raw for s in g] for g in scored]
    assert (
        raws == [[exact_boxed_reward(t, g.reference) for t in g.texts] for g in groups] == [[1.0, 0.0], [1.0]]
    )
    assert [[s.correct for s in g] for g in scored] == [[True, False], [True]]
    assert scored[0][1].scores == {"exact": 0.0}


def test_a_trl_style_function_gets_prompts_completions_ids_reference_and_every_column():
    RECEIVED.clear()
    assert takes_batches(recording_reward) and not takes_batches(exact_boxed_reward)
    score_groups([RewardTerm(function=_spec(recording_reward))], 0, "x.jsonl", _groups())
    (call,) = RECEIVED  # one call for the whole batch
    assert call["prompts"] == ["What is 3+4?", "What is 3+4?", _groups()[1].prompt]
    assert call["completions"][:2] == ["3+4=7 \\boxed{7}", "3+4=8 \\boxed{8}"]
    assert call["completions"][2] == [{"role": "assistant", "content": "2+3=5 \\boxed{5}"}]  # conversational
    assert call["completion_ids"] == [[1, 2], [3], [4, 5, 6]]
    assert call["reference"] == ["7", "7", "5"]
    # every column by its own name, one value per completion; a column a row lacks is None
    assert call["level"] == [2, 2, 1]
    assert call["solution"] == [None, None, "5"]
    assert call["answer"] == ["7", "7", None]


def test_a_function_without_kwargs_gets_only_what_it_names():
    chat = _groups()[1]
    scored = score_groups([RewardTerm(function=_spec(solution_only))], 0, "x.jsonl", [chat])
    assert scored[0][0].raw == 1.0


def test_the_reward_is_the_weighted_sum_none_counts_zero_and_correctness_follows_the_named_function():
    terms = [
        RewardTerm(function="format", weight=0.1),
        RewardTerm(function="exact", weight=2.0),
        RewardTerm(function=_spec(half_none), weight=1.0, name="partial"),
    ]
    groups = _groups()
    scored = score_groups(terms, 1, "builtin:arith", groups)
    flat = [s for g in scored for s in g]
    assert [s.scores for s in flat] == [
        {"format": 1.0, "exact": 1.0, "partial": 0.25},
        {"format": 1.0, "exact": 0.0, "partial": None},
        {"format": 1.0, "exact": 1.0, "partial": 0.25},
    ]
    assert [s.raw for s in flat] == pytest.approx([0.1 + 2.0 + 0.25, 0.1, 0.1 + 2.0 + 0.25])
    assert [s.correct for s in flat] == [True, False, True]  # by `exact`, not by the format reward
    by_format = score_groups(terms, 0, "builtin:arith", groups)
    assert [s.correct for g in by_format for s in g] == [True, True, True]


@pytest.mark.parametrize(
    ("fn", "logged"),
    [(raises, "failed on questions q1, q2: RuntimeError: judge unreachable"), (too_few, "returned 1 values")],
)
def test_a_failing_batch_function_scores_zero_with_a_warning_naming_it(fn, logged, caplog):
    with caplog.at_level(logging.WARNING, logger="rpo.rewards"):
        scored = score_groups(
            [RewardTerm(function="exact"), RewardTerm(function=_spec(fn), weight=5.0)], 0, "b", _groups()
        )
    assert [s.raw for g in scored for s in g] == [1.0, 0.0, 1.0]  # the other function still counts
    assert fn.__name__ in caplog.text and logged in caplog.text


def test_non_finite_and_non_numeric_scores_count_zero(caplog):
    with caplog.at_level(logging.WARNING, logger="rpo.rewards"):
        scored = score_groups([RewardTerm(function=_spec(not_finite))], 0, "b", _groups())
    assert [s.raw for g in scored for s in g] == [0.0, 0.0, 0.0]
    assert "returned nan" in caplog.text and "returned inf" in caplog.text and "returned 'x'" in caplog.text


def test_a_reward_file_path_loads_without_being_on_the_path(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def short(completions, **kwargs):\n    return [1.0 if len(c) < 16 else 0.0 for c in completions]\n"
    )
    term = RewardTerm(function=f"{tmp_path / 'my_rewards.py'}:short")
    assert term.label() == "short"
    scored = score_groups([term], 0, "b", _groups())
    assert [s.raw for g in scored for s in g] == [1.0, 1.0, 1.0]


def test_the_example_format_reward():
    completions = [
        "3+4=7 so \\boxed{7}",
        "\\boxed{7}",  # no reasoning before it
        "3+4=7 \\boxed{7} and more",  # something after it
        "\\boxed{6} no, 3+4=7 \\boxed{7}",  # two answers
        [{"role": "assistant", "content": "2+3=5 \\boxed{5}\n"}],
    ]
    assert boxed_format_reward(completions) == [1.0, 0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reward.function=math", "reward.functions=[{function: exact}]"], "not both"),
        (["reward.functions=[{function: exact}, {function: exact}]"], "named 'exact'"),
        (["reward.functions=[{function: exact}]", "reward.correctness=format"], "'format' is not one of"),
        (["reward.functions=[{function: exact, weight: .inf}]"], "reward.functions.0.weight"),
        (["reward.functions=[{function: exact, wieght: 1}]"], "wieght"),
    ],
)
def test_reward_settings_that_cannot_work_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_reward_functions_from_the_environment_take_yaml(monkeypatch):
    monkeypatch.setenv("RPO_REWARD__FUNCTIONS", "[{function: exact}, {function: format, weight: 0.1}]")
    monkeypatch.setenv("RPO_REWARD__CORRECTNESS", "exact")
    cfg = load_config(None, [])
    assert [(t.label(), t.weight) for t in cfg.reward.reward_terms()] == [("exact", 1.0), ("format", 0.1)]
    assert cfg.reward.correctness_index() == 0


def test_a_relative_reward_file_reaches_the_replicas_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["reward.functions=[{function: ./r.py:short}, {function: exact}]"])
    assert cfg.reward.functions[0].function == "./r.py:short"  # the config keeps what the user wrote
    wire = cfg.reward.wire()
    assert [t.function for t in wire["rewards"]] == [f"{tmp_path / 'r.py'}:short", "exact"]
    assert wire["rewards"][0].label() == "short"
