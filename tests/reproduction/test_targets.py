"""The protocol's targets are judged on intervals, and each can fail: known inputs on both sides of every
bound (services/reproduction/results.py, `targets`)."""

from __future__ import annotations

import pytest

from services.reproduction.results import targets
from services.reproduction.results_tables import targets_table

PLAN = {"headline_pairs": [["rpo-grpo", "grpo"]]}


def _summary(mean: float, low: float, high: float) -> dict:
    return {"mean": mean, "ci": (low, high), "seeds": 3, "questions": 200}


def _results(
    *,
    steps_ci=(-0.019, 0.01),
    time_ci=(-0.01, 0.03),
    rollout_ci=(0.05, 0.29),
    step_ci=(0.1, 0.49),
    epsilon_ci=(0.001, 0.02),
    wall_by_seed=None,
) -> dict:
    arms = {
        "grpo": {"label": "GRPO", "group": "headline"},
        "rpo-grpo": {"label": "RPO+GRPO", "group": "headline"},
        "rpo-grpo-0.1l": {"label": "RPO+GRPO, L=0.1l", "group": "timing"},
        "rpo-grpo-eps1": {"label": "RPO+GRPO, epsilon=1", "group": "epsilon"},
    }
    ratio = lambda ci: {"mean": sum(ci) / 2, "ci": ci}  # noqa: E731
    return {
        "arms": arms,
        "eval_labels": ["after"],
        "runs": {"grpo": {"0": {"evals": {"after": {"temperature": 0.6}}}}},
        "comparisons": {
            "rpo-grpo": {"accuracy_difference": {"after": _summary(sum(steps_ci) / 2, *steps_ci)}},
            "rpo-grpo-0.1l": {
                "accuracy_difference": {},
                "phases": {"rollout": ratio(rollout_ci)},
                "step_seconds": ratio(step_ci),
            },
        },
        "equal_time": {
            "rpo-grpo": {
                **_summary(sum(time_ci) / 2, *time_ci),
                "seconds": [100.0],
                "rpo_pass_at_1": 0.8,
                "full_pass_at_1": 0.79,
            }
        },
        "epsilon": {"rpo-grpo-eps1": {"after": _summary(sum(epsilon_ci) / 2, *epsilon_ci)}},
        "wall_seconds_by_seed": wall_by_seed or {0: 3000.0, 1: 2000.0, 2: 2000.0},
        "smoke": False,
    }


def _met(results: dict, starts: str) -> bool | None:
    found = [t for t in targets(results, PLAN) if t["target"].startswith(starts)]
    assert len(found) == 1, [t["target"] for t in targets(results, PLAN)]
    return found[0]["met"]


def test_equal_steps_is_judged_on_the_lower_end_not_the_mean():
    assert _met(_results(steps_ci=(-0.019, 0.01)), "equal steps") is True
    # a mean of +0.5 points does not save an interval that reaches below -2
    assert _met(_results(steps_ci=(-0.021, 0.031)), "equal steps") is False
    failing = _results(steps_ci=(-0.021, 0.031))
    text = targets_table({**failing, "targets": targets(failing, PLAN)})
    assert "T=0.6" in text and "| no |" in text


def test_equal_time_is_judged_on_the_lower_end():
    assert _met(_results(time_ci=(-0.02, 0.0)), "equal time") is True
    assert _met(_results(time_ci=(-0.0201, 0.05)), "equal time") is False


@pytest.mark.parametrize(
    ("what", "inside", "outside"),
    [("rollout_ci", (0.05, 0.3), (0.05, 0.301)), ("step_ci", (0.2, 0.5), (0.2, 0.51))],
)
def test_timing_targets_are_judged_on_the_upper_end(what, inside, outside):
    starts = "RPO+GRPO, L=0.1l: " + ("rollout" if what == "rollout_ci" else "step")
    assert _met(_results(**{what: inside}), starts) is True
    assert _met(_results(**{what: outside}), starts) is False


def test_the_epsilon_sweep_says_whether_its_interval_excludes_zero():
    shown = [t for t in targets(_results(epsilon_ci=(0.001, 0.02)), PLAN) if "epsilon" in t["target"]][0]
    hidden = [t for t in targets(_results(epsilon_ci=(-0.001, 0.02)), PLAN) if "epsilon" in t["target"]][0]
    assert "excludes 0" in shown["measured"] and "holds 0" in hidden["measured"]
    assert shown["met"] is None  # a report, not a pass/fail


def test_time_targets_take_the_first_seed_and_all_seeds():
    assert _met(_results(wall_by_seed={0: 3600.0, 1: 1800.0, 2: 1800.0}), "one seed") is True
    assert _met(_results(wall_by_seed={0: 3601.0, 1: 1800.0, 2: 1800.0}), "one seed") is False
    assert _met(_results(wall_by_seed={0: 2400.0, 1: 2400.0, 2: 2400.0}), "3 seeds") is True
    assert _met(_results(wall_by_seed={0: 2400.0, 1: 2400.0, 2: 2401.0}), "3 seeds") is False
    # one seed recorded: no protocol target
    assert not [t for t in targets(_results(wall_by_seed={0: 100.0}), PLAN) if "seeds (" in t["target"]]


def _with_room(lifted_share: float, varied_share: float, alpha: float = 0.1) -> dict:
    results = _results()
    results["arms"]["rpo-grpo"]["settings"] = {"alpha": alpha}
    results["arms"]["rpo-grpo"]["length_room"] = {
        "steps": 12,
        "lifted_steps_share": lifted_share,
        "varied_groups_share": varied_share,
        "correct_length_spread": 7.5,
    }
    return results


def test_the_length_reward_target_is_half_the_steps_and_the_reading_half_the_groups():
    plan = {**PLAN, "length_target": True}

    def found(results: dict, starts: str) -> dict:
        (hit,) = [t for t in targets(results, plan) if t["target"].startswith(starts)]
        return hit

    lifted = "RPO+GRPO: the length reward lifts"
    assert found(_with_room(0.5, 0.6), lifted)["met"] is True
    assert found(_with_room(0.49, 0.6), lifted)["met"] is False
    reading = "RPO+GRPO: the mechanism acted only if"
    assert "it had room" in found(_with_room(0.5, 0.5), reading)["measured"]
    assert "little room" in found(_with_room(0.5, 0.49), reading)["measured"]
    assert found(_with_room(0.5, 0.5), reading)["met"] is None  # a reading, not a pass or fail
    # without the length reward, or in a protocol that does not target it, nothing is judged
    assert not [
        t for t in targets(_with_room(1.0, 1.0, alpha=0.0), plan) if "length reward lifts" in t["target"]
    ]
    assert not [t for t in targets(_with_room(1.0, 1.0), PLAN) if "length reward lifts" in t["target"]]


def test_the_varied_protocol_allows_its_three_seeds_two_and_a_half_hours():
    plan = {**PLAN, "protocol_minutes": 150}
    (hit,) = [
        t
        for t in targets(_results(wall_by_seed={0: 3000.0, 1: 3000.0, 2: 3000.0}), plan)
        if "3 seeds" in t["target"]
    ]
    assert hit["met"] is True and "150 minutes" in hit["target"]
