"""Rollout groups -> training samples -> padded tensors, against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from services.core.config import AlgorithmSection
from services.core.schemas.rollout import RolloutGroup, RolloutSample
from trainer.learner.batch import TrainSample, build_samples, collate, count_loss_tokens, keep_group


def _sample(response: list[int], prefix_len: int, shaped: float, correct: bool) -> RolloutSample:
    return RolloutSample(
        response_ids=response,
        prefix_len=prefix_len,
        suffix_logprobs=[-0.5] * (len(response) - prefix_len),
        finish_reason="stop",
        raw_reward=1.0 if correct else 0.0,
        shaped_reward=shaped,
        correct=correct,
    )


def _group(qid: str, samples: list[RolloutSample]) -> RolloutGroup:
    return RolloutGroup(
        question_id=qid, cache_hit=True, m=1, prefix_len=samples[0].prefix_len, samples=samples
    )


def test_build_samples_advantages_per_group_and_order_kept():
    # Group a: shaped rewards [1, 0, 0.5, 0.5]: mean 0.5, sample std sqrt((0.25 + 0.25) / 3) = 0.408248;
    # A = +-0.5 / (0.408248 + 1e-4) = +-1.224445 and 0 for the two average ones.
    a = _group(
        "a",
        [
            _sample([5, 6, 7], 2, 1.0, True),
            _sample([5, 6, 8, 9], 2, 0.0, False),
            _sample([5, 6], 2, 0.5, True),
            _sample([5, 6, 2], 2, 0.5, True),
        ],
    )
    # Group b: equal rewards: zero advantage everywhere.
    b = _group("b", [_sample([3], 0, 0.5, True), _sample([4], 0, 0.5, True)])
    samples = build_samples([a, b], {"a": [1, 2], "b": [9]}, AlgorithmSection())
    expected = 0.5 / (math.sqrt(0.5 / 3) + 1e-4)
    assert expected == pytest.approx(1.224445, abs=1e-6)
    assert [s.advantage for s in samples] == pytest.approx([expected, -expected, 0.0, 0.0, 0.0, 0.0])
    assert [s.question_id for s in samples] == ["a"] * 4 + ["b"] * 2
    assert samples[1] == TrainSample([1, 2], [5, 6, 8, 9], 2, pytest.approx(-expected), "a")
    assert samples[4].prompt_ids == [9] and samples[4].prefix_len == 0


def test_build_samples_names_a_question_without_prompt():
    with pytest.raises(KeyError, match="q-missing"):
        build_samples([_group("q-missing", [_sample([3], 0, 1.0, True)])], {}, AlgorithmSection())


def test_keep_group_is_dapo_dynamic_sampling():
    assert keep_group(_group("q", [_sample([3], 0, 1, True), _sample([4], 0, 0, False)]))
    assert not keep_group(_group("q", [_sample([3], 0, 1, True), _sample([4], 0, 1, True)]))
    assert not keep_group(_group("q", [_sample([3], 0, 0, False), _sample([4], 0, 0, False)]))


def test_loss_token_counts_full_and_suffix_only():
    samples = [TrainSample([1], [5, 6, 7], 2, 1.0, "a"), TrainSample([1], [5, 6], 5, 1.0, "a")]
    assert count_loss_tokens(samples, suffix_only=False) == 5
    assert count_loss_tokens(samples, suffix_only=True) == 1  # 3 - 2, and a prefix longer than the response
    assert samples[1].loss_tokens(suffix_only=True) == 0


def test_collate_layout_by_hand():
    # Row 0: prompt [10 11 12] (P=3) + response [20 21], prefix 1.  Row 1: prompt [30] (P=1) + [40 41 42],
    # prefix 3 (the whole response is cached). L = max(3+2, 1+3) = 5, T = 3, first_logit = min(P) - 1 = 0.
    samples = [
        TrainSample([10, 11, 12], [20, 21], 1, 0.5, "a"),
        TrainSample([30], [40, 41, 42], 3, -1.0, "b"),
    ]
    full = collate(samples, suffix_only=False, pad_id=0)
    assert full.input_ids.tolist() == [[10, 11, 12, 20, 21], [30, 40, 41, 42, 0]]
    assert full.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert full.response_ids.tolist() == [[20, 21, 0], [40, 41, 42]]
    # Response token t of row i is predicted at column P_i - 1 + t: row 0 at 2, 3; row 1 at 0, 1, 2.
    assert full.logit_index.tolist() == [[2, 3, 0], [0, 1, 2]]
    assert full.first_logit == 0 and full.logits_to_keep == 5
    assert full.loss_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert full.advantages.tolist() == [0.5, -1.0]
    suffix = collate(samples, suffix_only=True)
    assert suffix.loss_mask.tolist() == [[0, 1, 0], [0, 0, 0]]  # row 1 is all prefix: nothing to train


def test_collate_asks_only_for_the_logits_it_needs():
    # Prompts of 4 and 2 tokens: the first response token is predicted at column 1 at the earliest, so the
    # window starts there (first_logit 1, logits_to_keep = L - 1) and indices are relative to it.
    samples = [TrainSample([1, 2, 3, 4], [7], 0, 1.0, "a"), TrainSample([1, 2], [8, 9], 0, 1.0, "b")]
    batch = collate(samples, suffix_only=False)
    assert batch.input_ids.shape == (2, 5)
    assert batch.first_logit == 1 and batch.logits_to_keep == 4
    assert batch.logit_index.tolist() == [[2, 0], [0, 1]]  # columns 3 and (1, 2), minus 1


def test_padded_log_probs_equal_unpadded_ones(tiny_model_dir):
    """token_logprobs on a padded micro-batch gives each response's log-probs as if it were alone."""
    from transformers import AutoModelForCausalLM

    from trainer.learner.logprobs import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    samples = [
        TrainSample([5, 6, 7, 8, 9], [20, 21, 22], 1, 1.0, "a"),
        TrainSample([5], [30, 31, 32, 33, 34, 35], 2, -1.0, "b"),
        TrainSample([40, 41, 42], [50], 0, 0.0, "c"),
    ]
    with torch.no_grad():
        batched = token_logprobs(model, collate(samples, suffix_only=False))  # [3, 6]
        for i, s in enumerate(samples):
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # [P+T, V]
            p, r = len(s.prompt_ids), len(s.response_ids)
            alone = logp[p - 1 : p - 1 + r].gather(1, torch.tensor(s.response_ids)[:, None]).squeeze(1)
            torch.testing.assert_close(batched[i, :r], alone, rtol=0, atol=1e-5)


def test_keep_group_on_shaped_rewards_keeps_an_all_correct_group_of_different_lengths():
    group = _group("q", [_sample([3], 0, 1.0, True), _sample([4, 5], 0, 0.8, True)])
    assert not keep_group(group)  # DAPO's rule: all correct -> dropped
    assert keep_group(group, "reward")  # shaped rewards differ -> kept
    same = _group("q", [_sample([3], 0, 0.0, False), _sample([4], 0, 0.0, False)])
    assert not keep_group(same, "reward")


def test_lagged_samples_carry_behaviour_log_probs_aligned_with_their_decoded_tokens_in_both_layouts():
    from trainer.learner.batch import pack

    group = _group("a", [_sample([5, 6, 7, 8], 2, 1.0, True), _sample([5, 6, 9], 2, 0.0, False)])
    group.samples[0].suffix_logprobs = [-0.1, -0.2]
    group.samples[1].suffix_logprobs = [-0.3]
    on_policy = build_samples([group], {"a": [1, 2]}, AlgorithmSection())
    assert all(s.behaviour_logprobs is None for s in on_policy)
    assert collate(on_policy, suffix_only=False).behaviour_logp is None  # the loss then has no weight at all
    lagged = build_samples([group], {"a": [1, 2]}, AlgorithmSection(), lagged=[True])
    assert [s.behaviour_logprobs for s in lagged] == [[-0.1, -0.2], [-0.3]]
    for batch in (collate(lagged, suffix_only=False), pack([lagged], suffix_only=False)):
        # response positions: the 2 cached-prefix tokens have no behaviour log-prob, the decoded ones do
        assert batch.behaviour_mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
        expected = torch.tensor([[0, 0, -0.1, -0.2], [0, 0, -0.3, 0]])
        torch.testing.assert_close(batch.behaviour_logp, expected)
