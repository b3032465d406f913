"""GRPO and DAPO losses against hand-computed values (derivations in comments)."""

import math

import pytest
import torch

from trainer.learner.losses import dapo_loss, grpo_loss, k3_kl, response_loss_mask


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_response_loss_mask_full_and_suffix_only():
    prefix = torch.tensor([2, 0])
    lengths = torch.tensor([4, 3])
    full = response_loss_mask(prefix, lengths, 5, suffix_only=False)
    suffix = response_loss_mask(prefix, lengths, 5, suffix_only=True)
    assert full.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert suffix.tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]


def test_k3_kl_hand_value():
    # logp = log 0.5, ref = log 0.25: delta = log 0.5; k3 = 0.5 - log 0.5 - 1 = 0.193147
    got = k3_kl(t([math.log(0.5)]), t([math.log(0.25)]))
    assert got.item() == pytest.approx(0.5 + math.log(2) - 1)
    assert k3_kl(t([-1.0]), t([-1.0])).item() == 0.0


def test_grpo_on_policy_is_minus_mean_advantage():
    # ratio 1 everywhere, beta 0: per-seq mean of A_i is A_i; loss = -(2 + 0) / 2 = -1
    logp = t([[-1.0, -2.0], [-0.5, -0.5]])
    loss, stats = grpo_loss(
        logp, logp.clone(), t([2.0, 0.0]), torch.ones(2, 2, dtype=torch.float64), beta=0.0
    )
    assert loss.item() == pytest.approx(-1.0)
    assert stats.clip_fraction == 0.0


def test_grpo_clips_positive_advantage_but_not_negative():
    # ratio = e^0.5 = 1.6487. A = +1: min(1.6487, 1.2) = 1.2. A = -1: min(-1.6487, -1.2) = -1.6487
    logp, old = t([[0.5], [0.5]]), t([[0.0], [0.0]])
    mask = torch.ones(2, 1, dtype=torch.float64)
    pos, stats = grpo_loss(logp[:1], old[:1], t([1.0]), mask[:1], beta=0.0)
    neg, _ = grpo_loss(logp[1:], old[1:], t([-1.0]), mask[1:], beta=0.0)
    assert pos.item() == pytest.approx(-1.2)
    assert stats.clip_fraction == 1.0
    assert neg.item() == pytest.approx(math.exp(0.5))


def test_grpo_kl_term():
    # A = 0, ratio 1: loss = beta * k3 = 0.04 * 0.193147 = 0.0077259
    logp = t([[math.log(0.5)]])
    loss, stats = grpo_loss(
        logp,
        logp.clone(),
        t([0.0]),
        torch.ones(1, 1, dtype=torch.float64),
        ref_logp=t([[math.log(0.25)]]),
        beta=0.04,
    )
    assert loss.item() == pytest.approx(0.04 * (0.5 + math.log(2) - 1))
    assert stats.kl == pytest.approx(0.5 + math.log(2) - 1)
    with pytest.raises(ValueError):
        grpo_loss(logp, logp, t([0.0]), torch.ones(1, 1), beta=0.04)


def test_grpo_per_sequence_vs_dapo_token_level_normalisation():
    # Sequence 0 has 1 token with A = +1, sequence 1 has 3 tokens with A = -1, ratio 1.
    # GRPO: -(1/2) * (1/1 * 1 + 1/3 * (-3)) = 0
    # DAPO: -(1 * 1 + (-1) * 3) / 4 tokens = 0.5
    logp = torch.zeros(2, 3, dtype=torch.float64)
    mask = t([[1, 0, 0], [1, 1, 1]])
    adv = t([1.0, -1.0])
    g, _ = grpo_loss(logp, logp.clone(), adv, mask, beta=0.0)
    d, stats = dapo_loss(logp, logp.clone(), adv, mask)
    assert g.item() == pytest.approx(0.0)
    assert d.item() == pytest.approx(0.5)
    assert stats.tokens == 4


def test_dapo_clip_higher():
    # ratio 1.25, A = 1: GRPO (eps 0.2) clips to 1.2; DAPO (eps_high 0.28) keeps 1.25
    logp, old = t([[math.log(1.25)]]), t([[0.0]])
    mask = torch.ones(1, 1, dtype=torch.float64)
    g, _ = grpo_loss(logp, old, t([1.0]), mask, beta=0.0)
    d, _ = dapo_loss(logp, old, t([1.0]), mask)
    assert g.item() == pytest.approx(-1.2)
    assert d.item() == pytest.approx(-1.25)
    # ratio 0.7 with A = -1: lower clip 0.8 for both -> min(-0.7, -0.8) = -0.8
    d_low, _ = dapo_loss(t([[math.log(0.7)]]), old, t([-1.0]), mask)
    assert d_low.item() == pytest.approx(0.8)


def test_suffix_only_mask_changes_the_loss():
    # Token 0 is the prefix (ratio 1), token 1 has ratio e^0.2 = 1.2214 (clipped to 1.2 at A = +1), token 2 ratio 1.
    logp = t([[-1.0, -1.0, -1.0]])
    old = t([[-1.0, -1.2, -1.0]])
    adv = t([1.0])
    full = response_loss_mask(torch.tensor([1]), torch.tensor([3]), 3, suffix_only=False).double()
    suffix = response_loss_mask(torch.tensor([1]), torch.tensor([3]), 3, suffix_only=True).double()
    lf, _ = grpo_loss(logp, old, adv, full, beta=0.0)
    ls, _ = grpo_loss(logp, old, adv, suffix, beta=0.0)
    assert lf.item() == pytest.approx(-(1 + 1.2 + 1) / 3)
    assert ls.item() == pytest.approx(-(1.2 + 1) / 2)


def test_global_normalisers_make_micro_batches_add_up():
    torch.manual_seed(0)
    logp = torch.randn(4, 5, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(4, 5, dtype=torch.float64)
    ref = logp + 0.1 * torch.randn(4, 5, dtype=torch.float64)
    adv = torch.randn(4, dtype=torch.float64)
    mask = response_loss_mask(torch.tensor([0, 1, 2, 0]), torch.tensor([5, 3, 4, 2]), 5, False).double()
    whole_g, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref)
    parts_g = sum(
        grpo_loss(logp[s], old[s], adv[s], mask[s], ref_logp=ref[s], num_sequences=4)[0]
        for s in (slice(0, 2), slice(2, 4))
    )
    assert parts_g.item() == pytest.approx(whole_g.item())
    n_tokens = int(mask.sum())
    whole_d, _ = dapo_loss(logp, old, adv, mask)
    parts_d = sum(
        dapo_loss(logp[s], old[s], adv[s], mask[s], num_tokens=n_tokens)[0]
        for s in (slice(0, 1), slice(1, 4))
    )
    assert parts_d.item() == pytest.approx(whole_d.item())


def test_gradient_flows_only_through_masked_tokens():
    logp = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    mask = t([[1, 1, 0]])
    loss, _ = grpo_loss(logp, logp.detach().clone(), t([1.0]), mask, beta=0.0)
    loss.backward()
    # d/dlogp of -(1/2) * sum_t r_t * A with r = exp(logp - old) = 1 -> -0.5 for masked tokens, 0 otherwise
    assert logp.grad.tolist() == [[-0.5, -0.5, 0.0]]


def test_truncated_importance_weights_by_hand():
    """w = min(exp(old - behaviour), cap) on the lagged tokens, 1 elsewhere (prefix tokens, on-policy rows)."""
    from trainer.learner.losses import truncated_importance_weights

    old = t([[-1.0, -0.5, -2.0], [-1.0, -1.0, -1.0]])
    behaviour = t([[-1.2, -2.0, -1.0], [0.0, 0.0, 0.0]])
    mask = t([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # row 0: a cached-prefix token, then two decoded ones
    w = truncated_importance_weights(old, behaviour, mask, cap=2.0)
    # exp(-0.5 + 2.0) = exp(1.5) = 4.48 -> capped at 2; exp(-2.0 + 1.0) = exp(-1) = 0.3679 (not raised to 1)
    torch.testing.assert_close(w, t([[1.0, 2.0, math.exp(-1.0)], [1.0, 1.0, 1.0]]))


def test_grpo_with_importance_weights_scales_each_tokens_surrogate():
    """On-policy ratio 1, so the surrogate of token t is w_t A; per sequence the mean over its tokens."""
    from trainer.learner.losses import truncated_importance_weights

    logp = t([[-1.0, -0.5], [-0.3, -0.7]]).requires_grad_(True)
    behaviour = t([[-1.0, -0.9], [-0.3, -0.7]])
    mask = t([[0.0, 1.0], [0.0, 0.0]])  # sample 0's second token lagged; sample 1 on-policy
    w = truncated_importance_weights(logp, behaviour, mask, cap=2.0)  # [[1, exp(0.4)], [1, 1]]
    advantages = t([1.0, -2.0])
    loss, _ = grpo_loss(
        logp, logp.detach(), advantages, torch.ones(2, 2, dtype=torch.float64), beta=0.0, is_weights=w
    )
    by_hand = -((1.0 * 1 + math.exp(0.4) * 1) / 2 + (-2.0 - 2.0) / 2) / 2
    assert loss.item() == pytest.approx(by_hand)
    plain, _ = grpo_loss(logp, logp.detach(), advantages, torch.ones(2, 2, dtype=torch.float64), beta=0.0)
    assert plain.item() == pytest.approx(-((1.0 + 1.0) / 2 + (-4.0) / 2) / 2)  # weights None: as before
    loss.backward()  # the weight is a constant: the gradient is w * A * dlogp / |o|
    assert logp.grad[0].tolist() == pytest.approx([-1.0 / 2 / 2, -math.exp(0.4) / 2 / 2])
