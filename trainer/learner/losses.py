"""GRPO and DAPO policy losses over prefix+suffix tokens (docs/algorithm.md, step 5), as pure torch functions,
with TRL's four normalisers (`policy_loss`, `algorithm.loss_type`).

Tensors are [B, T]: B responses, T response positions (right-padded). `loss_mask` is 1 where a token is
trained on: by default every real token of o_i = cached prefix + new suffix (the paper's Eq. 5 and the
release code: prefix tokens are off-policy and get no correction); `response_loss_mask(...,
suffix_only=True)` gives the ablation.

Normalisers can be passed in so that a batch split into micro-batches and DeepSpeed ranks sums to the same
loss as the whole batch on one rank: GRPO divides by the number of sequences, DAPO by the number of tokens,
of the WHOLE batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def response_loss_mask(
    prefix_lens: torch.Tensor, response_lens: torch.Tensor, width: int, suffix_only: bool
) -> torch.Tensor:
    """[B, width] float mask over response positions: all tokens, or only positions >= prefix_len."""
    positions = torch.arange(width, device=response_lens.device).unsqueeze(0)  # [1, T]
    mask = positions < response_lens.unsqueeze(1)  # [B, T]
    if suffix_only:
        mask = mask & (positions >= prefix_lens.unsqueeze(1))
    return mask.to(torch.float32)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (always >= 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


@dataclass
class LossStats:
    """Detached numbers for logging one loss call."""

    loss: float
    clip_fraction: float
    kl: float
    tokens: int


def truncated_importance_weights(
    old_logp: torch.Tensor, behaviour_logp: torch.Tensor, behaviour_mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """[B, T] min(exp(old - behaviour), cap) where `behaviour_mask` is 1 (tokens decoded by an older policy),
    1 elsewhere (cached-prefix tokens and on-policy samples get no correction). Detached: a weight, not a
    path for gradients."""
    ratio = torch.exp(old_logp.detach() - behaviour_logp).clamp(max=cap)
    return torch.where(behaviour_mask > 0, ratio, torch.ones_like(ratio))


def _clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high):
    ratio = torch.exp(logp - old_logp)  # [B, T]
    adv = advantages.unsqueeze(1)  # [B, 1]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    surrogate = torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).to(torch.float32)
    return surrogate, was_clipped


LOSS_TYPES = ("grpo", "dr_grpo", "bnpo", "dapo")
"""TRL's names for how the per-token objective is summed and normalised (`algorithm.loss_type`)."""


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    loss_type: str,
    eps_low: float,
    eps_high: float,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    max_completion_length: int | None = None,
    micro_batches: int = 1,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """The clipped surrogate with an optional k3 KL, per token l_t = -(w min(r A, clip(r, 1-eps_low,
    1+eps_high) A) - beta KL_t), summed over the mask and normalised as TRL's `loss_type` says:

    - `grpo`: (1/N) sum_i (1/|o_i|) sum_t l_t, N = `num_sequences` (the whole batch; default B);
    - `dr_grpo`: sum l_t / (N x `max_completion_length`);
    - `bnpo`: sum l_t / (this call's mask tokens), divided by `micro_batches` (TRL's gradient accumulation
      steps times processes: the mean of the micro-batches' token means);
    - `dapo`: sum l_t / `num_tokens` (the whole batch's mask tokens; default this call's).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    surrogate, was_clipped = _clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    if is_weights is not None:
        surrogate = surrogate * is_weights
    per_token = surrogate
    kl = torch.zeros_like(logp)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("the loss needs ref_logp when beta > 0")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token - beta * kl
    masked = per_token * loss_mask
    tokens = loss_mask.sum()
    n = num_sequences if num_sequences is not None else logp.shape[0]
    if loss_type == "grpo":
        loss = -(masked.sum(dim=1) / loss_mask.sum(dim=1).clamp(min=1.0)).sum() / n
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        loss = -masked.sum() / (n * max_completion_length)
    elif loss_type == "bnpo":
        loss = -masked.sum() / tokens.clamp(min=1.0) / micro_batches
    else:
        denom = float(num_tokens) if num_tokens is not None else tokens.clamp(min=1.0)
        loss = -masked.sum() / denom
    stats = LossStats(
        loss=float(loss.detach()),
        clip_fraction=float((was_clipped * loss_mask).sum() / tokens.clamp(min=1.0)),
        kl=float((kl.detach() * loss_mask).sum() / tokens.clamp(min=1.0)),
        tokens=int(tokens.item()),
    )
    return loss, stats


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    beta: float = 0.04,
    num_sequences: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """GRPO: -(1/N) sum_i (1/|o_i|) sum_t [w min(r A, clip(r, 1-eps, 1+eps) A) - beta KL_k3].

    Per-sequence 1/|o_i| uses the masked token count of each sequence; N is `num_sequences` (whole batch)
    or B. `ref_logp` is required when beta > 0. `is_weights` (w, [B, T]): the truncated importance weights
    of samples from an older policy (`truncated_importance_weights`); None: 1.
    """
    return policy_loss(
        logp,
        old_logp,
        advantages,
        loss_mask,
        loss_type="grpo",
        eps_low=clip_eps,
        eps_high=clip_eps,
        ref_logp=ref_logp,
        beta=beta,
        num_sequences=num_sequences,
        is_weights=is_weights,
    )


def dapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    num_tokens: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """DAPO: clip-higher surrogate, token-level mean over ALL tokens of the batch, no KL term.

    `num_tokens` is the masked token count of the whole batch (across micro-batches and ranks); default: this
    call's count. `is_weights`: as in `grpo_loss`.
    """
    return policy_loss(
        logp,
        old_logp,
        advantages,
        loss_mask,
        loss_type="dapo",
        eps_low=clip_eps_low,
        eps_high=clip_eps_high,
        num_tokens=num_tokens,
        is_weights=is_weights,
    )
