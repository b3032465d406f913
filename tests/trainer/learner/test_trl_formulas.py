"""TRL's GRPO options mean here what TRL's GRPOTrainer computes, on fixed batches with hand-derived numbers:
`scale_rewards` (group, batch, none) in the advantages, `loss_type` (grpo, dr_grpo, bnpo, dapo) in the
loss and its gradient, the k3 KL added per token as TRL adds it, and `mask_truncated_completions`."""

from __future__ import annotations

import math

import pytest
import torch

from services.core.algorithm import batch_advantages
from services.core.config import AlgorithmSection
from services.core.schemas.rollout import RolloutGroup, RolloutSample
from trainer.learner.batch import build_samples, collate, count_loss_tokens
from trainer.learner.losses import policy_loss

# Two groups of 4: a correctness-style 1, a -1 penalty, two zeros; then a group whose rewards are all equal.
REWARDS = [[1.0, -1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]]


def test_scale_rewards_group_divides_by_each_groups_sample_std():
    # group 1: mean 0, sample std sqrt((1 + 1) / 3) = sqrt(2/3); group 2: std 0 -> advantages 0
    s = math.sqrt(2 / 3)
    got = batch_advantages(REWARDS, "group", 1e-4)
    assert got[0] == pytest.approx([1 / (s + 1e-4), -1 / (s + 1e-4), 0.0, 0.0], abs=1e-12)
    assert got[1] == [0.0] * 4


def test_scale_rewards_batch_divides_by_the_whole_batchs_sample_std():
    # all 8 rewards: mean 2/8 = 0.25; squared deviations 0.5625 + 1.5625 + 2 * 0.0625 + 4 * 0.0625 = 2.5;
    # sample std sqrt(2.5 / 7). The mean subtracted is still each group's own.
    s = math.sqrt(2.5 / 7)
    got = batch_advantages(REWARDS, "batch", 1e-4)
    assert got[0] == pytest.approx([1 / (s + 1e-4), -1 / (s + 1e-4), 0.0, 0.0], abs=1e-12)
    assert got[1] == pytest.approx([0.0] * 4, abs=1e-15)


def test_scale_rewards_none_keeps_the_centred_rewards():
    assert batch_advantages(REWARDS, "none") == [[1.0, -1.0, 0.0, 0.0], [0.0] * 4]


# A batch of 2 sequences, T = 4: row 0 has 3 loss tokens with A = 1, row 1 one token with A = -2. With
# pi_theta = pi_old the ratio is 1 and TRL's per-token loss is -A (+ beta * KL).
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
ADV = torch.tensor([1.0, -2.0])


def _loss(loss_type: str, **kwargs):
    logp = torch.full((2, 4), math.log(0.5), requires_grad=True)
    loss, stats = policy_loss(
        logp, logp.detach(), ADV, MASK, loss_type=loss_type, eps_low=0.2, eps_high=0.2, **kwargs
    )
    loss.backward()
    return float(loss), logp.grad, stats


def test_loss_type_grpo_means_each_sequence_then_the_batch():
    # ((3 * -1) / 3 + (1 * 2) / 1) / 2 = 0.5; d/dlogp of -r A / |o_i| / N: -1/6 (row 0), +1 (row 1)
    loss, grad, _ = _loss("grpo")
    assert loss == pytest.approx(0.5)
    assert grad[0, :3].tolist() == pytest.approx([-1 / 6] * 3)
    assert grad[1, 0].item() == pytest.approx(1.0)
    assert grad[0, 3].item() == 0.0


def test_loss_type_dr_grpo_divides_by_sequences_times_max_completion_length():
    # (3 * -1 + 1 * 2) / (2 * 8) = -1/16; each token's gradient -A / 16
    loss, grad, _ = _loss("dr_grpo", max_completion_length=8)
    assert loss == pytest.approx(-1 / 16)
    assert grad[0, 0].item() == pytest.approx(-1 / 16)
    assert grad[1, 0].item() == pytest.approx(2 / 16)


def test_loss_type_bnpo_is_the_micro_batch_token_mean_over_accumulation_steps():
    # (3 * -1 + 2) / 4 tokens = -0.25; as one of 2 accumulated micro-batches: -0.125
    assert _loss("bnpo")[0] == pytest.approx(-0.25)
    assert _loss("bnpo", micro_batches=2)[0] == pytest.approx(-0.125)


def test_loss_type_dapo_divides_by_the_whole_batchs_tokens():
    # this call's 4 tokens by default; 10 when the whole batch (other micro-batches, ranks) holds 10
    assert _loss("dapo")[0] == pytest.approx(-0.25)
    assert _loss("dapo", num_tokens=10)[0] == pytest.approx(-0.1)


def test_the_kl_term_is_added_per_token_before_normalising_as_trl_does():
    # ref = log 0.25, logp = log 0.5: k3 = exp(-ln 2) + ln 2 - 1 = 0.5 + ln 2 - 1 per token; grpo:
    # ((-1 + beta k3) + (2 + beta k3)) / 2 = 0.5 + beta k3
    k3 = 0.5 + math.log(2) - 1
    ref = torch.full((2, 4), math.log(0.25))
    loss, _, stats = _loss("grpo", ref_logp=ref, beta=0.04)
    assert loss == pytest.approx(0.5 + 0.04 * k3)
    assert stats.kl == pytest.approx(k3)


def _sample(n: int, reward: float, finish: str) -> RolloutSample:
    return RolloutSample(
        response_ids=list(range(1, n + 1)),
        prefix_len=0,
        suffix_logprobs=[0.0] * n,
        finish_reason=finish,
        raw_reward=reward,
        shaped_reward=reward,
        correct=False,
    )


def test_mask_truncated_completions_drops_a_cut_response_from_the_loss_but_not_from_its_group():
    group = RolloutGroup(
        question_id="q",
        cache_hit=False,
        m=0,
        prefix_len=0,
        samples=[_sample(3, 1.0, "stop"), _sample(5, -1.0, "length")],
    )
    cfg = AlgorithmSection(mask_truncated_completions=True, scale_rewards="none")
    samples = build_samples([group], {"q": [7, 8]}, cfg)
    # the cut response still shapes its group's advantages (mean 0): +1 and -1
    assert [s.advantage for s in samples] == [1.0, -1.0]
    assert [s.masked for s in samples] == [False, True]
    assert count_loss_tokens(samples, suffix_only=False) == 3  # DAPO's normaliser leaves it out
    batch = collate(samples, suffix_only=False)
    assert batch.loss_mask.sum(dim=1).tolist() == [3.0, 0.0]
    # off: both train
    samples = build_samples([group], {"q": [7, 8]}, AlgorithmSection(scale_rewards="none"))
    assert count_loss_tokens(samples, suffix_only=False) == 8


def test_lr_scheduler_linear_falls_to_zero_at_the_last_step_as_transformers_linear_schedule():
    from trainer.learner.lr_schedule import LRSchedule

    # warm-up 2 steps (1/3, 2/3), then (total - step) / (total - warmup): step 6 of 10 -> 4/8
    linear = LRSchedule(total=10, warmup=2, kind="linear")
    assert [linear(0), linear(1), linear(2), linear(6), linear(10)] == pytest.approx(
        [1 / 3, 2 / 3, 1, 0.5, 0]
    )


def test_adam_betas_and_epsilon_reach_deepspeeds_optimizer_config():
    from types import SimpleNamespace

    from services.core.config import load_config
    from trainer.learner.engine import Learner

    cfg = load_config(None, ["train.adam_beta1=0.8", "train.adam_beta2=0.95", "train.adam_epsilon=1e-6"])
    learner = SimpleNamespace(cfg=cfg, stage=2, on_cpu=True, world=1, dtype=torch.float32)
    params = Learner._deepspeed_config(learner)["optimizer"]["params"]
    assert (params["betas"], params["eps"]) == ([0.8, 0.95], 1e-6)


def test_trls_sampling_options_reach_the_training_rollouts_only():
    from services.core.clients.replica_set import RolloutPlans
    from services.core.config import load_config

    cfg = load_config(
        None,
        [
            "sampling.top_k=20",
            "sampling.min_p=0.05",
            "sampling.repetition_penalty=1.1",
            "algorithm.length_shaping=false",
        ],
    )
    plans = RolloutPlans.from_config(cfg)
    t = plans.training
    assert (t.top_k, t.min_p, t.repetition_penalty, t.length_shaping) == (20, 0.05, 1.1, False)
    for other in (plans.initialisation, plans.evaluation):  # their own sampling.init_* / eval_* only
        assert (other.top_k, other.min_p, other.repetition_penalty) == (0, 0.0, 1.0)


def test_entropy_comes_out_of_the_log_softmax_pass_equal_to_torchs_and_changes_nothing_else():
    """TRL's `entropy` metric: the policy's per-token entropy, here from the same chunked pass (chunks of 3
    rows over 10) as the log-probs, which stay bit for bit those computed without it."""
    from trainer.learner.logprobs import selected_logprobs

    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=gen)).requires_grad_()
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    entropy: list[torch.Tensor] = []
    logp = selected_logprobs(logits, targets, chunk_bytes=3 * 11 * 4, entropy=entropy)
    expected = torch.distributions.Categorical(logits=logits.detach()).entropy()
    assert torch.allclose(entropy[0], expected, atol=1e-5) and not entropy[0].requires_grad
    assert torch.equal(logp, selected_logprobs(logits, targets, chunk_bytes=3 * 11 * 4))
