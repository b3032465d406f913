"""Which evaluations the trainer runs at each point (trainer/loop.py, `TrainingRecipe._evaluations`): the
test set only before and after training, at every configured temperature; the validation set for the
curve when there is one."""

from __future__ import annotations

from services.core.config import load_config
from trainer.loop import TrainingRecipe


def _plan(*overrides: str) -> TrainingRecipe:
    return TrainingRecipe(load_config(None, list(overrides)))


def test_without_a_validation_set_every_evaluation_uses_the_test_set():
    recipe = _plan("sampling.eval_temperature=0.6")
    assert recipe._evaluations("before") == [("before", "test", "builtin:arith-eval", 0.6)]
    assert recipe._evaluations("step 3") == [("step 3", "test", "builtin:arith-eval", 0.6)]


def test_with_a_validation_set_the_test_set_is_touched_only_before_and_after():
    recipe = _plan(
        "data.val_dataset=builtin:arith-long-val",
        "data.eval_dataset=builtin:arith-long-eval",
        "sampling.eval_temperature=0.6",
        "sampling.eval_extra_temperatures=[1.0, 0.3]",
    )
    assert recipe._evaluations("after") == [
        ("after", "test", "builtin:arith-long-eval", 0.6),
        ("after T=1", "test", "builtin:arith-long-eval", 1.0),
        ("after T=0.3", "test", "builtin:arith-long-eval", 0.3),
        ("val after", "val", "builtin:arith-long-val", 0.6),
    ]
    assert recipe._evaluations("step 3") == [("val step 3", "val", "builtin:arith-long-val", 0.6)]
    # no test set: the curve still runs
    no_test = _plan("data.val_dataset=builtin:arith-long-val", "data.eval_dataset=null")
    assert no_test._evaluations("before") == [("val before", "val", "builtin:arith-long-val", 0.6)]
    assert _plan("data.eval_dataset=null")._evaluations("after") == []


def test_a_negative_extra_temperature_is_refused_with_its_field():
    import pytest

    from services.core.config import ConfigError

    with pytest.raises(ConfigError, match="sampling.eval_extra_temperatures"):
        load_config(None, ["sampling.eval_extra_temperatures=[1.0, -0.5]"])
