"""The statistics of the results tables on inputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from services.reproduction.statistics import (
    bootstrap_interval,
    interpolate_curve,
    paired_difference,
    seeds_and_questions_interval,
    t_interval,
)


def test_a_constant_has_a_point_interval_and_nothing_has_none():
    assert bootstrap_interval([0.25] * 40) == (0.25, 0.25)
    assert all(np.isnan(bootstrap_interval([])))


def test_the_mean_of_coin_flips_has_the_normal_approximations_width():
    values = [1.0, 0.0] * 200  # mean 0.5, standard error 0.5 / sqrt(400) = 0.025
    low, high = bootstrap_interval(values)
    assert low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006)
    assert high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)


def test_seed_to_seed_variation_widens_the_interval():
    questions = [1.0, 0.0] * 100
    same_seeds = [questions] * 3
    # Three seeds whose mean accuracy is 0.5, 0.6 and 0.7 (each wrong answer scores d instead of 0): an
    # interval over questions alone knows nothing of that spread; the seeds-and-questions one must.
    shifted = [[v if v else d for v in questions] for d in (0.0, 0.2, 0.4)]
    low_same, high_same = seeds_and_questions_interval(same_seeds)
    low_shift, high_shift = seeds_and_questions_interval(shifted)
    assert low_same == pytest.approx(bootstrap_interval(questions)[0], abs=0.02)
    assert (high_shift - low_shift) > 1.5 * (high_same - low_same)
    assert low_shift < 0.6 < high_shift  # the mean over seeds, 0.6, inside
    assert seeds_and_questions_interval([[0.5] * 10] * 3) == (0.5, 0.5)


def test_a_paired_difference_is_taken_question_by_question():
    def record(correct: dict[str, int]) -> dict:
        return {"k": 4, "correct_per_question": {q: [4, c] for q, c in correct.items()}}

    after = record({"a": 4, "b": 2, "c": 0, "only-here": 4})
    before = record({"a": 2, "b": 2, "c": 0})
    result = paired_difference(after, before)
    assert result["questions"] == 3  # the questions both answered
    assert result["difference"] == pytest.approx((0.5 + 0 + 0) / 3)
    low, high = result["ci"]
    assert 0.0 <= low <= result["difference"] <= high <= 0.5


def test_a_t_interval_over_seeds_has_the_textbook_width():
    # mean 0.3, sample sd 0.1, n = 3: half-width t(0.975, 2) * 0.1 / sqrt(3) = 4.303 * 0.0577 = 0.2484
    low, high = t_interval([0.2, 0.3, 0.4])
    assert (low, high) == pytest.approx((0.3 - 0.24844, 0.3 + 0.24844), abs=1e-4)
    assert all(np.isnan(t_interval([0.3])))  # one seed: no interval, not a zero-width one
    assert t_interval([0.5, 0.5]) == (0.5, 0.5)


def test_a_curve_is_read_linearly_between_evaluations_and_held_after_its_end():
    points = [(0.0, {"a": 0.0, "b": 1.0}), (10.0, {"a": 1.0, "b": 1.0}), (30.0, {"a": 0.5, "b": 0.0})]
    assert interpolate_curve(points, 5.0) == {"a": 0.5, "b": 1.0}
    assert interpolate_curve(points, 20.0) == {"a": 0.75, "b": 0.5}
    assert interpolate_curve(points, 99.0) == {"a": 0.5, "b": 0.0}  # training stopped: its last point
    assert interpolate_curve(points, -1.0) == {"a": 0.0, "b": 1.0}
