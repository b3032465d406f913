"""The algorithm core against values derived by hand from docs/algorithm.md (derivations in comments)."""

import math
import random
from collections import Counter

import pytest

from services.core import algorithm as A


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


class TestTruncationLimit:
    def test_fixed(self):
        assert A.truncation_limit(300, last_group_min_len=17, cached_len=900) == 300

    def test_relative_uses_last_group_min_length(self):
        assert A.truncation_limit("l", last_group_min_len=120, cached_len=900) == 120
        assert A.truncation_limit("0.5l", last_group_min_len=121, cached_len=900) == 60  # floor(121 / 2)

    def test_relative_falls_back_to_cached_answer_length(self):
        assert A.truncation_limit("l", last_group_min_len=None, cached_len=90) == 90
        assert A.truncation_limit("0.5l", last_group_min_len=None, cached_len=90) == 45

    def test_any_share_of_l_rounds_down_exactly(self):
        # 0.1 * 70 is 7.000000000000001 in binary floating point and 0.1 * 30 is 3.0000000000000004: exact here
        assert A.truncation_limit("0.1l", last_group_min_len=70, cached_len=900) == 7
        assert A.truncation_limit("0.1l", last_group_min_len=29, cached_len=900) == 2
        assert A.truncation_limit(".25l", last_group_min_len=None, cached_len=90) == 22
        assert A.truncation_limit("1.0l", last_group_min_len=33, cached_len=90) == 33

    @pytest.mark.parametrize("bad", [-1, True, "2l", "1.5l", "0.5", "l0.5"])
    def test_rejects_bad_specs(self, bad):
        with pytest.raises(ValueError):
            A.truncation_limit(bad, None, 10)


class TestTruncate:
    def test_m_zero_keeps_whole_answer(self):
        # a[:-0] would be empty: the classic bug.
        assert A.truncate([1, 2, 3, 4, 5], 0) == [1, 2, 3, 4, 5]

    def test_cuts_from_the_end(self):
        assert A.truncate([1, 2, 3, 4, 5], 2) == [1, 2, 3]

    @pytest.mark.parametrize("m", [5, 7, 1000])
    def test_m_at_or_past_length_cuts_everything(self, m):
        assert A.truncate([1, 2, 3, 4, 5], m) == []

    def test_negative_m_rejected(self):
        with pytest.raises(ValueError):
            A.truncate([1], -1)


def test_draw_truncation_is_uniform_on_closed_range():
    rng = random.Random(0)
    draws = Counter(A.draw_truncation(4, rng) for _ in range(5000))
    assert set(draws) == {0, 1, 2, 3, 4}  # both ends inclusive
    for count in draws.values():  # 1000 expected each; sd ~ 28
        assert 850 < count < 1150
    assert A.draw_truncation(0, rng) == 0


class TestSuffixBudget:
    def test_m_caps_new_tokens(self):
        assert A.suffix_budget(40, "m", prefix_len=100, max_response_tokens=4096) == 40

    def test_fixed_cap(self):
        assert A.suffix_budget(40, 64, prefix_len=100, max_response_tokens=4096) == 64

    def test_response_never_exceeds_max_length(self):
        assert A.suffix_budget(40, "m", prefix_len=4090, max_response_tokens=4096) == 6

    def test_at_least_one_token(self):
        assert A.suffix_budget(0, "m", prefix_len=100, max_response_tokens=4096) == 1


class TestLengthShaping:
    def test_paper_formula_on_a_group(self):
        # lengths 100, 200, 300 -> l_ref = 200. alpha = 0.01:
        # correct len 100: sigmoid(0.01 * 100) = sigmoid(1) = 0.731059 (inside [0.5, 1])
        # correct len 200: sigmoid(0) = 0.5
        # wrong   len 300: 0 (shaping touches correct responses only)
        got = A.length_shaped_rewards([1, 1, 0], [100, 200, 300], alpha=0.01)
        assert got == pytest.approx([sigmoid(1.0), 0.5, 0.0])
        assert got[0] == pytest.approx(0.7310585786)

    def test_long_correct_response_is_clipped_to_lower_bound(self):
        # l_ref = 200; len 300: sigmoid(-1) = 0.2689 -> clipped up to 0.5
        assert A.length_shaped_rewards([1, 1], [100, 300], alpha=0.01) == pytest.approx([sigmoid(1.0), 0.5])

    def test_steep_alpha_clips_to_upper_bound(self):
        # alpha = 1: sigmoid(100) = 1 - 4e-44 -> 1.0
        assert A.length_shaped_rewards([1, 1], [100, 300], alpha=1.0) == pytest.approx([1.0, 0.5])

    def test_alpha_zero_gives_every_correct_response_half(self):
        assert A.length_shaped_rewards([1, 0, 1], [5, 50, 500], alpha=0.0) == [0.5, 0.0, 0.5]

    def test_reference_length_includes_wrong_responses(self):
        # l_ref = mean(10, 30) = 20 even though only the first is correct: sigmoid(0.1 * 10) = sigmoid(1)
        assert A.length_shaped_rewards([1, 0], [10, 30], alpha=0.1)[0] == pytest.approx(sigmoid(1.0))

    def test_custom_bounds(self):
        assert A.length_shaped_rewards([1], [10], alpha=0.01, low=0.7, high=0.9) == pytest.approx([0.7])

    def test_negative_and_partial_rewards_of_wrong_responses_are_kept_as_written(self):
        # A TRL-style -1 penalty and a partial 0.3: not correct, so neither is shaped nor floored at 0.
        got = A.length_shaped_rewards([-1.0, 0.3, 0.0], [10, 20, 30], alpha=0.01)
        assert got == [-1.0, 0.3, 0.0]

    def test_a_wrong_answer_with_a_format_bonus_is_not_shaped_as_if_correct(self):
        # correctness weight 1, format weight 0.1. Group: correct+format (len 100), wrong+format (len 300).
        # l_ref = 200; correct one: f = sigmoid(0.01 * 100) = sigmoid(1); R = 1.1 + 1 * (sigmoid(1) - 1).
        # Wrong one keeps its format bonus, 0.1, unshaped (before: 0.1 * clip(sigmoid(-1)) = 0.05).
        got = A.length_shaped_rewards(
            [1.1, 0.1], [100, 300], alpha=0.01, correct=[True, False], contributions=[1.0, 0.0]
        )
        assert got == pytest.approx([0.1 + sigmoid(1.0), 0.1])

    def test_shaping_scales_only_the_correctness_contribution_of_a_correct_response(self):
        # correctness weight 2 (score 1), a -0.5 penalty term: raw = 2 - 0.5 = 1.5, contribution 2.
        # Alone in its group (l_ref = len): f = sigmoid(0) = 0.5 -> R = 1.5 + 2 * (0.5 - 1) = 0.5.
        got = A.length_shaped_rewards([1.5], [40], alpha=0.01, correct=[True], contributions=[2.0])
        assert got == pytest.approx([0.5])


class TestAdvantages:
    def test_hand_computed(self):
        # R = [1, 0, 0, 0]: mean 0.25; sample var = (0.75^2 + 3 * 0.25^2) / 3 = 0.25; std = 0.5
        got = A.group_advantages([1, 0, 0, 0])
        assert got == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])

    def test_population_std_option(self):
        # population var = 0.75 / 4 = 0.1875; std = 0.4330127
        got = A.group_advantages([1, 0, 0, 0], unbiased_std=False)
        assert got[0] == pytest.approx(0.75 / (math.sqrt(0.1875) + 1e-4))

    def test_equal_rewards_give_zero(self):
        assert A.group_advantages([0.5, 0.5, 0.5]) == [0.0, 0.0, 0.0]
        assert A.group_advantages([1.0]) == [0.0]


def test_overlong_penalty():
    # L_max = 100, L_cache = 20: soft zone (80, 100]
    assert A.overlong_penalty(80, 100, 20) == 0.0
    assert A.overlong_penalty(90, 100, 20) == pytest.approx(-0.5)  # (80 - 90) / 20
    assert A.overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert A.overlong_penalty(101, 100, 20) == -1.0
    assert A.overlong_penalty(101, 100, 0) == -1.0 and A.overlong_penalty(100, 100, 0) == 0.0


def test_dynamic_sampling_filter():
    assert A.dynamic_sampling_keep([True, False, False])
    assert not A.dynamic_sampling_keep([True, True, True])
    assert not A.dynamic_sampling_keep([False, False])


class TestSelectForCache:
    rewards = [0.2, 0.9, 0.5, 0.0]
    correct = [True, True, True, False]

    def test_epsilon_one_always_takes_best(self):
        rng = random.Random(1)
        picks = {A.select_for_cache(self.rewards, self.correct, 1.0, rng) for _ in range(200)}
        assert picks == {A.CacheChoice(1, "best")}

    def test_epsilon_zero_takes_others_uniformly(self):
        rng = random.Random(2)
        picks = Counter(A.select_for_cache(self.rewards, self.correct, 0.0, rng).index for _ in range(3000))
        assert set(picks) == {0, 2, 3}  # never the best (index 1), wrong ones included
        for count in picks.values():  # 1000 expected each
            assert 850 < count < 1150

    def test_epsilon_is_probability_of_best(self):
        rng = random.Random(3)
        n = 20000
        best = sum(
            A.select_for_cache(self.rewards, self.correct, 0.1, rng).choice == "best" for _ in range(n)
        )
        # Binomial(20000, 0.1): mean 2000, sd 42.4; 5 sd bound
        assert abs(best - 2000) < 5 * 42.5

    def test_only_correct_restricts_pool(self):
        rng = random.Random(4)
        picks = {
            A.select_for_cache(self.rewards, self.correct, 0.0, rng, only_correct=True).index
            for _ in range(300)
        }
        assert picks == {0, 2}
        assert A.select_for_cache([0, 0], [False, False], 0.5, rng, only_correct=True) is None

    def test_ties_and_single_response(self):
        rng = random.Random(5)
        assert A.select_for_cache([0.5, 0.5], [True, True], 1.0, rng) == A.CacheChoice(0, "best")
        assert A.select_for_cache([0.0], [False], 0.0, rng) == A.CacheChoice(0, "best")

    def test_rejects_bad_epsilon(self):
        with pytest.raises(ValueError):
            A.select_for_cache([1.0], [True], 1.5, random.Random(0))


def test_dynamic_sampling_on_shaped_rewards_keeps_all_correct_groups_of_different_lengths():
    # all correct, different lengths -> shaped rewards differ -> kept (the correctness filter drops it)
    shaped = A.length_shaped_rewards([1.0, 1.0, 1.0], [100, 120, 300], alpha=0.01)
    assert not A.dynamic_sampling_keep([True, True, True])
    assert A.dynamic_sampling_keep_rewards(shaped)
    assert not A.dynamic_sampling_keep_rewards([0.0, 0.0, 0.0])
    assert not A.dynamic_sampling_keep_rewards([0.5, 0.5])
    assert A.dynamic_sampling_keep_rewards([0.0, 1.0])
    assert not A.dynamic_sampling_keep_rewards([])


def test_expected_suffix_tokens_by_hand():
    # m ~ U{0..4}, answer of 100 tokens: decoded max(1, m) -> (1 + 1 + 2 + 3 + 4) / 5
    assert A.expected_suffix_tokens(4, 100) == pytest.approx(11 / 5)
    # an answer shorter than L: a suffix regrows at most the whole answer
    assert A.expected_suffix_tokens(4, 2) == pytest.approx((1 + 1 + 2 + 2 + 2) / 5)
    assert A.expected_suffix_tokens(0, 50) == 1.0
    with pytest.raises(ValueError):
        A.expected_suffix_tokens(-1, 5)


def test_predicted_decode_ratio():
    # L = 32 on answers of 280 tokens against full-path responses of 280: (1 + 1 + ... + 32) / 33 / 280
    assert A.predicted_decode_ratio(32, 280, 280) == pytest.approx((1 + 32 * 33 / 2) / 33 / 280)
    # L = 0.5l: L = 140 on the same answers
    assert A.predicted_decode_ratio("0.5l", 280, 280) == pytest.approx((1 + 140 * 141 / 2) / 141 / 280)
    # L = l: a whole-answer cut is possible, about half an answer on average
    assert A.predicted_decode_ratio("l", 100, 100) == pytest.approx((1 + 100 * 101 / 2) / 101 / 100)
    # the built-in short task's regime: L = 64 > answers of 45 -> much of the answer is decoded again
    assert A.predicted_decode_ratio(64, 45, 45) > 0.6
    with pytest.raises(ValueError):
        A.predicted_decode_ratio(32, 100, 0)
