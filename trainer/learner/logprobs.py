"""Per-token log-probs of a micro-batch (`trainer.learner.batch.Batch`, either layout) under an HF causal LM.

Guarantees: float32 results whatever the model's dtype; backward keeps no float32 copy of the logits (the
log-softmax walks the rows in chunks), so the memory is that of the logits the model makes anyway. One
logits row may predict several responses' tokens (the shared layout's last prefix column predicts every
suffix's first token): its log-sum-exp is computed once and its gradient sums theirs. The log-probs are
those of the model's own distribution, with no temperature scaling (as in TRL 0.14, which the paper's
release code runs), although rollouts are sampled at `sampling.temperature`.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.learner.batch import Batch


class _SelectedLogProb(torch.autograd.Function):
    """out[n] = log_softmax(logits[rows[n]])[targets[n]] in float32, keeping no float32 copy of the logits.

    Forward and backward walk the logits rows in chunks of at most `chunk_bytes` of float32; only the
    logits themselves (in their own dtype, bf16 on GPUs) and one float per row (the log-sum-exp) are
    saved. A plain `logits.float().log_softmax()` would keep an [R, V] float32 copy alive until backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        flat: torch.Tensor,
        rows: torch.Tensor,
        targets: torch.Tensor,
        chunk_bytes: int,
        with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        step = max(1, chunk_bytes // (4 * flat.shape[1]))
        lse = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)  # [R]
        entropy = torch.zeros(flat.shape[0] if with_entropy else 0, dtype=torch.float32, device=flat.device)
        for start in range(0, flat.shape[0], step):
            chunk = flat[start : start + step].float()
            lse[start : start + step] = torch.logsumexp(chunk, dim=-1)
            if with_entropy:  # H = lse - sum_j p_j x_j, same pass over the chunk (p made in place)
                p = torch.sub(chunk, lse[start : start + step, None]).exp_()
                entropy[start : start + step] = lse[start : start + step] - torch.linalg.vecdot(p, chunk)
        chosen = flat[rows, targets].float()  # [N]
        ctx.save_for_backward(flat, rows, targets, lse)
        ctx.step = step
        ctx.mark_non_differentiable(entropy)
        return chosen - lse[rows], entropy[rows] if with_entropy else entropy

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _entropy_grad: Any = None) -> tuple[Any, ...]:
        flat, rows, targets, lse = ctx.saved_tensors
        g = grad.float()  # [N]
        # d out[n] / d x[r, j] = [r = rows[n]] ([j = targets[n]] - softmax(x[r])_j)
        row_grad = torch.zeros(flat.shape[0], dtype=torch.float32, device=flat.device).index_add_(0, rows, g)
        out = torch.empty_like(flat)
        for start in range(0, flat.shape[0], ctx.step):
            stop = start + ctx.step
            part = torch.exp(flat[start:stop].float() - lse[start:stop, None]) * -row_grad[start:stop, None]
            inside = (rows >= start) & (rows < stop)
            part.index_put_((rows[inside] - start, targets[inside]), g[inside], accumulate=True)
            out[start:stop] = part.to(out.dtype)
        return out, None, None, None, None


def selected_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor | None = None,
    chunk_bytes: int = 256 * 2**20,
    entropy: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """float32 log_softmax(logits)[..., targets], shaped like `targets`. With `entropy` (a list), the entropy
    of each target's distribution (nats, no gradient, same shape) is appended to it, computed in the same
    pass over the logits.

    Without `rows`, logits are [..., V] and targets [...] (one target per logits row). With `rows` (same
    shape as targets), logits are read as [R, V] rows (all leading dimensions flattened) and target n is
    scored under row rows[n].
    """
    flat = logits.reshape(-1, logits.shape[-1])  # [R, V]
    if rows is None:
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
        rows = torch.arange(flat.shape[0], device=flat.device)
    out, ent = _SelectedLogProb.apply(
        flat, rows.reshape(-1), targets.reshape(-1), chunk_bytes, entropy is not None
    )
    if entropy is not None:
        entropy.append(ent.detach().view(targets.shape))
    return out.view(targets.shape)


def block_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, L, L] bool (query attends key) -> the [R, 1, L, L] additive mask HF models take as is."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def token_logprobs(
    model: Any,
    batch: Batch,
    dtype: torch.dtype = torch.float32,
    temperature: float = 1.0,
    entropy: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """[B, T] float32 log pi(response token t | prompt, response[:t]) under `model` (any HF causal LM).

    `dtype` is the model's compute dtype, that of the shared layout's additive attention mask. `temperature`
    != 1 scores under the tempered distribution (logits / T), the one a replica samples from: only for the
    importance weights of lagged samples, computed without gradients. `entropy`: as in `selected_logprobs`.
    """
    if batch.shared:
        extra = {
            "attention_mask": block_mask(batch.attention_mask, dtype),
            "position_ids": batch.position_ids,
        }
    else:
        extra = {"attention_mask": batch.attention_mask}
    out = model(input_ids=batch.input_ids, logits_to_keep=batch.logits_to_keep, use_cache=False, **extra)
    logits = out.logits  # [R, K, V]: window columns first_logit .. L-1
    if temperature != 1.0:
        logits = logits / temperature
    rows = batch.row_index * logits.shape[1] + batch.logit_index  # [B, T] into the [R * K] flattened rows
    return selected_logprobs(logits, batch.response_ids, rows, entropy=entropy)
