"""Evaluation: the pass@k estimator, and `rpo eval` through a real rollout replica."""

from __future__ import annotations

import pytest

from trainer.evaluate import pass_at_k


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == 0.25  # c / n for k = 1
    assert pass_at_k(4, 1, 4) == 1.0  # any correct sample among all n
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every k-subset holds a correct one
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)
