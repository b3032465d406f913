"""Per-token log-probs of a padded micro-batch (`trainer.batch.Batch`) under an HF causal LM.

Guarantees: float32 results whatever the model's dtype; backward keeps no float32 copy of the logits (the
log-softmax walks the rows in chunks), so the memory is that of the logits the model makes anyway. The
log-probs are those of the model's own distribution, with no temperature scaling (as in TRL 0.14, which the
release code runs), although rollouts are sampled at `sampling.temperature`.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.batch import Batch


class _SelectedLogProb(torch.autograd.Function):
    """log_softmax(logits)[target] in float32, keeping no float32 copy of the logits for backward.

    Forward and backward walk the rows in chunks of at most `chunk_bytes` of float32; only the logits
    themselves (in their own dtype, bf16 on GPUs) and one float per row (the log-sum-exp) are saved. A
    plain `logits.float().log_softmax()` would keep a [rows, V] float32 copy alive until backward.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])  # [R, V]
        index = targets.reshape(-1, 1)  # [R, 1]
        rows = max(1, chunk_bytes // (4 * flat.shape[1]))
        lse = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)  # [R]
        for start in range(0, flat.shape[0], rows):
            lse[start : start + rows] = torch.logsumexp(flat[start : start + rows].float(), dim=-1)
        chosen = flat.gather(1, index).squeeze(1).float()  # [R]
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return (chosen - lse).view(targets.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, targets, lse = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])  # [R, V]
        index = targets.reshape(-1, 1)  # [R, 1]
        g = grad.reshape(-1, 1).float()  # [R, 1]
        out = torch.empty_like(flat)
        for start in range(0, flat.shape[0], ctx.rows):
            stop = start + ctx.rows
            # d/dx_j (x_target - lse) = [j = target] - softmax_j
            part = torch.exp(flat[start:stop].float() - lse[start:stop, None]) * -g[start:stop]
            part.scatter_add_(1, index[start:stop], g[start:stop])
            out[start:stop] = part.to(out.dtype)
        return out.view_as(logits), None, None


def selected_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, chunk_bytes: int = 256 * 2**20
) -> torch.Tensor:
    """[...] float32 log_softmax(logits)[..., targets] for logits [..., V] and targets [...]."""
    return _SelectedLogProb.apply(logits, targets, chunk_bytes)


def token_logprobs(model: Any, batch: Batch) -> torch.Tensor:
    """[B, T] float32 log pi(response token t | prompt, response[:t]) under `model` (any HF causal LM)."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        logits_to_keep=batch.logits_to_keep,
        use_cache=False,
    )
    logits = out.logits  # [B, K, V]: window columns first_logit .. L-1
    # The token each column predicts; the last column predicts past the end (target 0, never gathered).
    targets = torch.nn.functional.pad(batch.input_ids[:, batch.first_logit + 1 :], (0, 1))  # [B, K]
    window = selected_logprobs(logits, targets)  # [B, K]
    return window.gather(1, batch.logit_index)  # [B, T]
