"""Verifiable rewards: boxed extraction, math-verify equivalence, the exact checker, the plug-in registry."""

import logging
import sys

import pytest

from services.core.rewards import (
    RewardSpecError,
    exact_boxed_reward,
    last_boxed,
    math_reward,
    resolve_reward,
    score_safely,
)


def test_last_boxed_takes_the_last_and_balances_braces():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed("no answer") is None
    assert last_boxed(r"\boxed{7} and a broken \boxed{8") == "7"


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        (r"so \boxed{154}", "154", 1.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", 1.0),
        (r"\boxed{155}", "154", 0.0),
        ("154", "154", 0.0),  # no boxed answer: no credit
        (r"first \boxed{154} then \boxed{3}", "154", 0.0),  # the last boxed answer counts
    ],
)
def test_math_reward(response, reference, expected):
    assert math_reward(response, reference) == expected


def test_exact_checker():
    assert exact_boxed_reward(r"... \boxed{ 154 }", "154") == 1.0
    assert exact_boxed_reward(r"\boxed{154.0}", "154") == 0.0
    assert exact_boxed_reward("154", "154") == 0.0


def test_registry_builtins_and_auto():
    assert resolve_reward("math") is math_reward
    assert resolve_reward("auto", "builtin:arith") is exact_boxed_reward
    assert resolve_reward("auto", "data/train.jsonl") is math_reward


def test_registry_plugin(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def length_bonus(response, reference):\n    return 0.25\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = resolve_reward("my_rewards:length_bonus")
    assert fn("x", "y") == 0.25
    with pytest.raises(RewardSpecError, match="no callable 'missing'"):
        resolve_reward("my_rewards:missing")
    with pytest.raises(RewardSpecError, match="cannot import"):
        resolve_reward("no_such_module_xyz:f")
    with pytest.raises(RewardSpecError, match="package.module:function"):
        resolve_reward("bogus")
    sys.modules.pop("my_rewards", None)


def test_a_raising_reward_scores_zero_and_names_the_question(caplog):
    def broken(response, reference):
        raise RuntimeError("boom")

    with caplog.at_level(logging.WARNING):
        assert score_safely(broken, "r", "a", question_id="q-17") == 0.0
    assert "q-17" in caplog.text and "boom" in caplog.text
    assert score_safely(lambda r, a: float("nan"), "r", "a", "q-18") == 0.0
    assert score_safely(lambda r, a: "high", "r", "a", "q-19") == 0.0
    assert score_safely(lambda r, a: True, "r", "a", "q-20") == 1.0
