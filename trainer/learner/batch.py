"""Rollout groups -> training samples -> micro-batches of tensors for the learner.

Guarantees:
- every sample of a group gets the group-relative advantage of its shaped reward (the paper's Eq. 3,
  `services.core.algorithm.batch_advantages`, scaled as `algorithm.scale_rewards` says); samples keep the
  groups' order;
- two layouts give the same per-token log-probs, so the same loss and gradients: `collate` lays each row
  out as prompt + response, right-padded (positions 0..L-1 as unpadded, no fully masked query row);
  `pack` (`train.share_prefix`) feeds a group's shared prompt and cached prefix to the model once, then
  each response's own tokens behind a block attention mask (docs/training.md, "Shared layout");
- the loss mask covers every response token (cached prefix + new suffix, the paper's Eq. 5) unless
  `algorithm.loss_on_suffix_only`, and nothing past a response's end; in both layouts it is per response,
  so a shared prefix counts in every normaliser once per response, as the objective says.
Dynamic sampling (DAPO) is the caller's choice: `keep_group` is the filter; `build_samples` keeps every
group it is given, and a kept group with all-equal rewards would count in the normalisers with zero
advantage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.core.algorithm import batch_advantages, dynamic_sampling_keep, dynamic_sampling_keep_rewards
from services.core.config import AlgorithmSection
from services.core.schemas.rollout import RolloutGroup
from trainer.learner.losses import response_loss_mask


@dataclass
class TrainSample:
    """One response to train on: o_i = response_ids (cached prefix of `prefix_len` tokens + new suffix)."""

    prompt_ids: list[int]
    response_ids: list[int]
    prefix_len: int
    advantage: float
    question_id: str
    behaviour_logprobs: list[float] | None = None
    """For a sample of an older policy than the learner's: the replica's sampling log-prob of each decoded
    token (response_ids[prefix_len:]); None for an on-policy sample (no importance weight)."""
    masked: bool = False
    """The loss covers none of its tokens (`algorithm.mask_truncated_completions` and the response was cut
    at max_response_tokens); it still counts as a sequence in the normalisers, as in TRL."""

    def loss_tokens(self, suffix_only: bool) -> int:
        """Tokens of this response the loss covers."""
        if self.masked:
            return 0
        n = len(self.response_ids)
        return n - min(self.prefix_len, n) if suffix_only else n


def keep_group(group: RolloutGroup, signal: str = "correctness") -> bool:
    """DAPO's dynamic-sampling filter (`algorithm.dynamic_sampling_filter`): train on a group only when
    0 < #correct < G (`correctness`), or when its shaped rewards differ (`reward`)."""
    if signal == "reward":
        return dynamic_sampling_keep_rewards([s.shaped_reward for s in group.samples])
    return dynamic_sampling_keep([s.correct for s in group.samples])


def build_samples(
    groups: Sequence[RolloutGroup],
    prompts: dict[str, list[int]],
    cfg: AlgorithmSection,
    lagged: Sequence[bool] | None = None,
) -> list[TrainSample]:
    """One `TrainSample` per response, advantages per group from the shaped rewards. `lagged[g]`: group g
    came from an older policy than the learner's, so its samples carry their behaviour log-probs."""
    samples: list[TrainSample] = []
    all_advantages = batch_advantages(
        [[s.shaped_reward for s in g.samples] for g in groups], cfg.scale_rewards, cfg.advantage_eps
    )
    mask_truncated = cfg.mask_truncated_completions
    for index, group in enumerate(groups):
        behind = bool(lagged[index]) if lagged is not None else False
        if group.question_id not in prompts:
            raise KeyError(f"no prompt for question {group.question_id!r}: it is not in this run's dataset")
        prompt = list(prompts[group.question_id])
        if not prompt:
            raise ValueError(
                f"question {group.question_id!r} has an empty prompt; the learner needs >= 1 token"
            )
        advantages = all_advantages[index]
        for sample, advantage in zip(group.samples, advantages, strict=True):
            samples.append(
                TrainSample(
                    prompt_ids=prompt,
                    response_ids=list(sample.response_ids),
                    prefix_len=sample.prefix_len,
                    advantage=float(advantage),
                    question_id=group.question_id,
                    behaviour_logprobs=list(sample.suffix_logprobs) if behind else None,
                    masked=mask_truncated and sample.finish_reason == "length",
                )
            )
    return samples


def count_loss_tokens(samples: Sequence[TrainSample], suffix_only: bool) -> int:
    """Loss tokens of a whole batch: DAPO's token-level normaliser."""
    return sum(s.loss_tokens(suffix_only) for s in samples)


@dataclass
class Batch:
    """Tensors of one micro-batch of B responses, laid out in R rows (R = B unless the layout shares).

    Per-response layout (`collate`): row i holds prompt_i + response_i, right-padded; `attention_mask` is the
    [R, L] padding mask and positions are the plain 0..L-1. Shared layout (`pack`): a row holds the shared
    part of some responses (prompt + cached prefix) once, then each one's own tokens; `attention_mask` is an
    [R, L, L] bool block mask (query attends key) and `position_ids` restart at the shared part's end for
    every response, so each response sees exactly the context it has in the per-response layout.

    Response token t of response b is predicted by the logits of row `row_index[b, t]` at window column
    `logit_index[b, t]`; the model is asked only for the logits from column `first_logit` on
    (`logits_to_keep = L - first_logit`).
    """

    input_ids: torch.Tensor  # [R, L] long
    attention_mask: torch.Tensor  # [R, L] long padding mask, or [R, L, L] bool block mask
    response_ids: torch.Tensor  # [B, T] long, T = max_b T_b (at least 1), 0 past a response's end
    row_index: torch.Tensor  # [B, T] long, row whose logits predict response_ids[b, t]
    logit_index: torch.Tensor  # [B, T] long, window column whose logits predict response_ids[b, t]
    loss_mask: torch.Tensor  # [B, T] float32, 1 on trained tokens
    advantages: torch.Tensor  # [B] float32
    first_logit: int
    position_ids: torch.Tensor | None = None  # [R, L] long (shared layout only)
    fed_tokens: int = 0
    """Real (non-padding) tokens the model is fed: what the layout costs."""
    behaviour_logp: torch.Tensor | None = None  # [B, T] float32, the replica's log-probs (lagged samples)
    behaviour_mask: torch.Tensor | None = None  # [B, T] float32, 1 on the tokens behaviour_logp covers

    @property
    def logits_to_keep(self) -> int:
        return self.input_ids.shape[1] - self.first_logit

    @property
    def shared(self) -> bool:
        return self.attention_mask.dim() == 3

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            response_ids=self.response_ids.to(device),
            row_index=self.row_index.to(device),
            logit_index=self.logit_index.to(device),
            loss_mask=self.loss_mask.to(device),
            advantages=self.advantages.to(device),
            first_logit=self.first_logit,
            position_ids=None if self.position_ids is None else self.position_ids.to(device),
            fed_tokens=self.fed_tokens,
            behaviour_logp=None if self.behaviour_logp is None else self.behaviour_logp.to(device),
            behaviour_mask=None if self.behaviour_mask is None else self.behaviour_mask.to(device),
        )


def _check_prompts(samples: Sequence[TrainSample]) -> None:
    if not samples:
        raise ValueError("a micro-batch needs at least one sample")
    if min(len(s.prompt_ids) for s in samples) < 1:
        raise ValueError("every prompt needs at least one token (its last position predicts the response)")


def _response_tensors(
    samples: Sequence[TrainSample], suffix_only: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """response_ids [B, T], loss_mask [B, T], advantages [B] and T, the same in both layouts."""
    response_lens = [len(s.response_ids) for s in samples]
    width = max(1, max(response_lens))
    response_ids = torch.zeros((len(samples), width), dtype=torch.long)  # [B, T]
    for b, s in enumerate(samples):
        response_ids[b, : len(s.response_ids)] = torch.tensor(s.response_ids, dtype=torch.long)
    loss_mask = response_loss_mask(
        torch.tensor([s.prefix_len for s in samples]), torch.tensor(response_lens), width, suffix_only
    )  # [B, T]
    for b, s in enumerate(samples):
        if s.masked:
            loss_mask[b].zero_()
    advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)  # [B]
    return response_ids, loss_mask, advantages, width


def _behaviour_tensors(
    samples: Sequence[TrainSample], width: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """behaviour_logp and behaviour_mask [B, T] (the decoded tokens of lagged samples), or None, None when
    every sample is on-policy (the loss then has no importance weight at all)."""
    if all(s.behaviour_logprobs is None for s in samples):
        return None, None
    logp = torch.zeros((len(samples), width), dtype=torch.float32)
    mask = torch.zeros((len(samples), width), dtype=torch.float32)
    for b, s in enumerate(samples):
        if s.behaviour_logprobs is None:
            continue
        decoded = s.behaviour_logprobs[: max(0, len(s.response_ids) - s.prefix_len)]
        start = s.prefix_len
        logp[b, start : start + len(decoded)] = torch.tensor(decoded, dtype=torch.float32)
        mask[b, start : start + len(decoded)] = 1.0
    return logp, mask


def collate(samples: Sequence[TrainSample], suffix_only: bool, pad_id: int = 0) -> Batch:
    """The per-response layout: one right-padded row per sample (see `Batch`)."""
    _check_prompts(samples)
    prompt_lens = [len(s.prompt_ids) for s in samples]
    response_lens = [len(s.response_ids) for s in samples]
    rows = len(samples)
    width = max(p + r for p, r in zip(prompt_lens, response_lens, strict=True))
    first_logit = min(prompt_lens) - 1
    response_ids, loss_mask, advantages, resp_width = _response_tensors(samples, suffix_only)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((rows, width), dtype=torch.long)  # [B, L]
    logit_index = torch.zeros((rows, resp_width), dtype=torch.long)  # [B, T]
    for i, s in enumerate(samples):
        p, r = prompt_lens[i], response_lens[i]
        input_ids[i, : p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        attention_mask[i, : p + r] = 1
        logit_index[i, :r] = torch.arange(p - 1, p - 1 + r) - first_logit
    row_index = torch.arange(rows).unsqueeze(1).expand(rows, resp_width).clone()  # [B, T]
    behaviour_logp, behaviour_mask = _behaviour_tensors(samples, resp_width)
    return Batch(
        input_ids,
        attention_mask,
        response_ids,
        row_index,
        logit_index,
        loss_mask,
        advantages,
        first_logit,
        fed_tokens=sum(prompt_lens) + sum(response_lens),
        behaviour_logp=behaviour_logp,
        behaviour_mask=behaviour_mask,
    )


def shared_tokens(sample: TrainSample) -> list[int]:
    """What a response shares with the rest of its group: its prompt and its cached prefix."""
    return sample.prompt_ids + sample.response_ids[: sample.prefix_len]


def share_groups(samples: Sequence[TrainSample]) -> list[list[int]]:
    """Indices of `samples` grouped by identical shared part, in order of first appearance.

    A rollout group is one such set (one prompt, one cached prefix); the key is the tokens themselves, so
    samples are only ever packed together when their contexts are the same token for token.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(shared_tokens(s)), []).append(i)
    return list(groups.values())


def plan_micro_batches(
    samples: Sequence[TrainSample], micro_batch_size: int, share: bool
) -> list[list[list[int]]]:
    """Micro-batches of at most `micro_batch_size` responses, each a list of rows of sample indices.

    Per-response layout: consecutive chunks, one sample per row. Shared layout: one row per group; a group
    starts a new micro-batch rather than be split, unless it holds more than `micro_batch_size` responses,
    and then its rows each repeat the shared part (still exact).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    n = len(samples)
    if not share:
        return [[[i] for i in range(k, min(k + micro_batch_size, n))] for k in range(0, n, micro_batch_size)]
    plan: list[list[list[int]]] = []
    micro: list[list[int]] = []
    used = 0
    for members in share_groups(samples):
        if micro and len(members) > micro_batch_size - used and len(members) <= micro_batch_size:
            plan.append(micro)
            micro, used = [], 0
        while members:
            take, members = members[: micro_batch_size - used], members[micro_batch_size - used :]
            micro.append(take)
            used += len(take)
            if used == micro_batch_size:
                plan.append(micro)
                micro, used = [], 0
    if micro:
        plan.append(micro)
    return plan


def pack(rows: Sequence[Sequence[TrainSample]], suffix_only: bool, pad_id: int = 0) -> Batch:
    """The shared layout: one row per list of samples with the same shared part (see `Batch`).

    Row r is S + o_1 + ... + o_k, S = prompt + cached prefix and o_j = response_j without that prefix.
    S is causal in itself; o_j attends to S and causally to itself, at positions |S|, |S| + 1, ...; padding
    attends only to itself (a fully masked query row would give NaNs). Response b's token t sits in S when
    t < c (its prefix length) and is predicted at S's column P + t - 1; its first own token is predicted by
    S's last column, the others by their own segment's previous column.
    """
    samples = [s for row in rows for s in row]
    _check_prompts(samples)
    response_ids, loss_mask, advantages, resp_width = _response_tensors(samples, suffix_only)
    first_logit = min(len(row[0].prompt_ids) for row in rows) - 1
    tokens: list[list[int]] = []  # per row
    positions: list[list[int]] = []
    segments: list[list[int]] = []  # 0: shared part, j: the j-th response's own tokens
    columns: list[list[int]] = []  # per response: window column predicting each of its tokens
    for row in rows:
        shared = shared_tokens(row[0])
        if any(shared_tokens(s) != shared for s in row):
            raise ValueError("pack: the samples of a row must share the same prompt and cached prefix")
        n_shared = len(shared)
        row_tokens, row_positions, row_segments = list(shared), list(range(n_shared)), [0] * n_shared
        for j, sample in enumerate(row, start=1):
            tail = sample.response_ids[sample.prefix_len :]
            start = len(row_tokens)
            p, c = len(sample.prompt_ids), len(sample.response_ids) - len(tail)
            own = [n_shared - 1, *range(start, start + len(tail) - 1)] if tail else []
            columns.append([col - first_logit for col in (*range(p - 1, p - 1 + c), *own)])
            row_tokens += tail
            row_positions += range(n_shared, n_shared + len(tail))
            row_segments += [j] * len(tail)
        tokens.append(row_tokens)
        positions.append(row_positions)
        segments.append(row_segments)
    width = max(len(t) for t in tokens)
    input_ids = _padded(tokens, width, pad_id)  # [R, L]
    position_ids = _padded(positions, width, 0)  # [R, L]
    segment = _padded(segments, width, -1)  # [R, L], -1 on padding
    # Query q attends key k <= q of the shared part or of its own segment; padding attends only to itself.
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # [L, L]
    seg_q, seg_k = segment.unsqueeze(2), segment.unsqueeze(1)  # [R, L, 1], [R, 1, L]
    allowed = causal & (seg_q >= 0) & ((seg_k == 0) | (seg_k == seg_q))  # [R, L, L]
    allowed |= torch.eye(width, dtype=torch.bool) & (seg_q < 0)
    logit_index = _padded(columns, resp_width, 0)  # [B, T]
    row_of = [r for r, row in enumerate(rows) for _ in row]
    row_index = torch.tensor(row_of, dtype=torch.long).unsqueeze(1).expand(-1, resp_width).clone()  # [B, T]
    behaviour_logp, behaviour_mask = _behaviour_tensors(samples, resp_width)
    return Batch(
        input_ids,
        allowed,
        response_ids,
        row_index,
        logit_index,
        loss_mask,
        advantages,
        first_logit,
        position_ids=position_ids,
        fed_tokens=sum(len(t) for t in tokens),
        behaviour_logp=behaviour_logp,
        behaviour_mask=behaviour_mask,
    )


def _padded(rows: Sequence[Sequence[int]], width: int, fill: int) -> torch.Tensor:
    """[len(rows), width] long tensor of `rows`, each right-padded with `fill`."""
    return torch.tensor([[*row, *([fill] * (width - len(row)))] for row in rows], dtype=torch.long)


def make_micro_batch(
    samples: Sequence[TrainSample], rows: Sequence[Sequence[int]], suffix_only: bool, share: bool
) -> Batch:
    """The micro-batch of `rows` (indices into `samples`) in the chosen layout."""
    if share:
        return pack([[samples[i] for i in row] for row in rows], suffix_only)
    return collate([samples[i] for row in rows for i in row], suffix_only)
