"""Rollout groups -> training samples -> padded tensors for the learner.

Guarantees:
- every sample of a group gets the group-relative advantage of its shaped reward (PAPER.md step 4,
  `services.algorithm.group_advantages`); samples keep the groups' order;
- `collate` lays each row out as prompt + response, right-padded, so position ids are the plain
  0..L-1 of an unpadded sequence and no query row is fully masked (left padding would leave fully
  masked rows whose NaNs can leak into gradients);
- the loss mask covers every response token (cached prefix + new suffix, the paper's Eq. 5) unless
  `algorithm.loss_on_suffix_only`, and nothing past a response's end.
Dynamic sampling (DAPO) is the caller's choice: `keep_group` is the filter; `build_samples` keeps every
group it is given, and a kept group with all-equal rewards would count in the normalisers with zero
advantage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.algorithm import dynamic_sampling_keep, group_advantages
from services.config import AlgorithmSection
from services.schemas.rollout import RolloutGroup
from trainer.losses import response_loss_mask


@dataclass
class TrainSample:
    """One response to train on: o_i = response_ids (cached prefix of `prefix_len` tokens + new suffix)."""

    prompt_ids: list[int]
    response_ids: list[int]
    prefix_len: int
    advantage: float
    question_id: str

    def loss_tokens(self, suffix_only: bool) -> int:
        """Tokens of this response the loss covers."""
        n = len(self.response_ids)
        return n - min(self.prefix_len, n) if suffix_only else n


def keep_group(group: RolloutGroup) -> bool:
    """DAPO's dynamic-sampling filter: train on a group only when 0 < #correct < G."""
    return dynamic_sampling_keep([s.correct for s in group.samples])


def build_samples(
    groups: Sequence[RolloutGroup], prompts: dict[str, list[int]], cfg: AlgorithmSection
) -> list[TrainSample]:
    """One `TrainSample` per response, advantages per group from the shaped rewards."""
    samples: list[TrainSample] = []
    for group in groups:
        if group.question_id not in prompts:
            raise KeyError(f"no prompt for question {group.question_id!r}: it is not in this run's dataset")
        prompt = list(prompts[group.question_id])
        if not prompt:
            raise ValueError(
                f"question {group.question_id!r} has an empty prompt; the learner needs >= 1 token"
            )
        advantages = group_advantages([s.shaped_reward for s in group.samples], cfg.advantage_eps)
        for sample, advantage in zip(group.samples, advantages, strict=True):
            samples.append(
                TrainSample(
                    prompt_ids=prompt,
                    response_ids=list(sample.response_ids),
                    prefix_len=sample.prefix_len,
                    advantage=float(advantage),
                    question_id=group.question_id,
                )
            )
    return samples


def count_loss_tokens(samples: Sequence[TrainSample], suffix_only: bool) -> int:
    """Loss tokens of a whole batch: DAPO's token-level normaliser."""
    return sum(s.loss_tokens(suffix_only) for s in samples)


@dataclass
class Batch:
    """Padded tensors of a micro-batch (B rows). Row i holds prompt_i + response_i, then padding.

    Response token t of row i sits at column P_i + t of `input_ids` and is predicted by the logits at
    column P_i + t - 1. The model is asked only for the logits from column `first_logit` = min_i(P_i) - 1
    on (`logits_to_keep = L - first_logit`); `logit_index` points into that window.
    """

    input_ids: torch.Tensor  # [B, L] long, L = max_i (P_i + T_i)
    attention_mask: torch.Tensor  # [B, L] long, 1 on real tokens
    response_ids: torch.Tensor  # [B, T] long, T = max_i T_i (at least 1), 0 past a response's end
    logit_index: torch.Tensor  # [B, T] long, window column whose logits predict response_ids[:, t]
    loss_mask: torch.Tensor  # [B, T] float32, 1 on trained tokens
    advantages: torch.Tensor  # [B] float32
    first_logit: int

    @property
    def logits_to_keep(self) -> int:
        return self.input_ids.shape[1] - self.first_logit

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            response_ids=self.response_ids.to(device),
            logit_index=self.logit_index.to(device),
            loss_mask=self.loss_mask.to(device),
            advantages=self.advantages.to(device),
            first_logit=self.first_logit,
        )


def collate(samples: Sequence[TrainSample], suffix_only: bool, pad_id: int = 0) -> Batch:
    """Pad `samples` into a `Batch` (see its docstring for the layout)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    prompt_lens = [len(s.prompt_ids) for s in samples]
    if min(prompt_lens) < 1:
        raise ValueError("every prompt needs at least one token (its last position predicts the response)")
    response_lens = [len(s.response_ids) for s in samples]
    rows = len(samples)
    width = max(p + r for p, r in zip(prompt_lens, response_lens, strict=True))
    resp_width = max(1, max(response_lens))
    first_logit = min(prompt_lens) - 1
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((rows, width), dtype=torch.long)  # [B, L]
    response_ids = torch.zeros((rows, resp_width), dtype=torch.long)  # [B, T]
    logit_index = torch.zeros((rows, resp_width), dtype=torch.long)  # [B, T]
    for i, s in enumerate(samples):
        p, r = prompt_lens[i], response_lens[i]
        input_ids[i, : p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        attention_mask[i, : p + r] = 1
        if r:
            response_ids[i, :r] = torch.tensor(s.response_ids, dtype=torch.long)
            logit_index[i, :r] = torch.arange(p - 1, p - 1 + r) - first_logit
    loss_mask = response_loss_mask(
        torch.tensor([s.prefix_len for s in samples]), torch.tensor(response_lens), resp_width, suffix_only
    )  # [B, T]
    advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)  # [B]
    return Batch(input_ids, attention_mask, response_ids, logit_index, loss_mask, advantages, first_logit)
