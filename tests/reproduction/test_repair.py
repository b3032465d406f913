"""The long task's repair property (services/core/synthetic_long.py, item "a trace in which an error early on
can be caught later"): from prefixes cut out of the warm model's own WRONG answers, with RPO's truncation
(m ~ U{1..0.5l}) and suffix budget (m new tokens), continuations still reach the right answer; and the two
controls are measured beside it (right answers continued the same way, fresh answers).

The suite never builds the 20-minute `builtin:tiny-warm-long` model: a smaller instance of the same task
(four terms instead of ten) is warm-started here in 1,000 steps, about three and a half minutes on a 2-core
CPU. bench/repair_rate.py measures the built-in model (docs/results.md)."""

from __future__ import annotations

import math

import pytest

from services.core.synthetic_long import LongTaskConfig
from services.models.tiny_model import WARM_LAYERS, build_tiny_model, warm_start
from services.reproduction.repair import repair_rate

MINI = LongTaskConfig(num_terms=4, train_size=4000, eval_size=200, val_size=400, error_rate=0.3)
MINI_STEPS = 1000
pytestmark = pytest.mark.timeout(1200)  # the module's setup warm-starts a model


@pytest.fixture(scope="module")
def mini_long_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini-long")
    random_dir = build_tiny_model(root / "random", num_layers=WARM_LAYERS, seed=0)
    # No time cap: on a busy machine a capped warm start stops early and the model (and so the rate) depends
    # on the load; every step, however long it takes, gives the same model.
    metrics = warm_start(
        random_dir,
        root / "warm",
        task_cfg=MINI,
        steps=MINI_STEPS,
        group_by_length=True,
        eval_questions=100,
        max_seconds=math.inf,
    )
    return root / "warm", metrics


def test_continuations_of_wrong_answers_reach_the_right_answer(mini_long_model):
    model, _ = mini_long_model
    # Answers sampled at T = 1.0: the mini model is nearly always right greedily, so its wrong answers are rare.
    result = repair_rate(
        model, MINI, wrong_wanted=32, max_questions=400, limit="0.5l", samples=4, answer_temperature=1.0
    )
    assert result.wrong_answers >= 12, result
    assert result.continuations == 4 * result.wrong_answers
    # Measurably often: a wrong prefix is not a dead end (at least 5 right continuations, from at least 3
    # different wrong answers, so the rate's interval clears zero).
    assert result.repaired >= 5 and result.answers_repaired >= 3, result
    # The controls: right answers were cut and continued as often, and every sampled question got a fresh answer.
    assert result.right_answers == result.wrong_answers and result.right_continuations == result.continuations
    assert result.fresh_samples == result.questions_sampled and 0 < result.fresh_rate < 1
    # A right prefix keeps its answer right more often than a wrong one is repaired.
    assert result.kept_rate > result.rate, result
    for name in ("rate", "kept_rate", "fresh_rate"):
        low, high = result.intervals[name]
        assert low <= getattr(result, name) <= high, (name, result)
