"""The shared layout (`train.share_prefix`) against the per-response layout: the same log-probs, loss, KL and
gradients, for every case the objective distinguishes, and each group's shared part fed to the model once.

World size 2 under ZeRO-3 is in test_learner_distributed.py (case `zero3-shared`)."""

from __future__ import annotations

import os
import random

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from services.core.config import load_config
from trainer.learner.batch import TrainSample, collate, pack, plan_micro_batches, share_groups
from trainer.learner.losses import dapo_loss, grpo_loss
from trainer.weights.export import named_weights


def _groups(seed: int, prefixes: tuple[int, ...] = (0, 4, 9), size: int = 4) -> list[TrainSample]:
    """Groups of `size` responses, one per entry of `prefixes` (the cached prefix's length: 0 is a miss or
    full-path mode, the prompt alone is shared). A prefix of 9 with suffixes of 0-5 tokens gives responses
    that are the whole cached answer (m = 0: nothing decoded)."""
    rng = random.Random(seed)
    samples = []
    for g, n_prefix in enumerate(prefixes):
        prompt = [rng.randrange(3, 131) for _ in range(rng.randint(2, 7))]
        prefix = [rng.randrange(3, 131) for _ in range(n_prefix)]
        for _ in range(size):
            own = [rng.randrange(3, 131) for _ in range(rng.randint(0 if n_prefix else 1, 7))]
            advantage = rng.uniform(-1.5, 1.5)
            samples.append(TrainSample(prompt, prefix + own, len(prefix), advantage, f"q{g}"))
    return samples


def test_pack_layout_by_hand():
    # Prompt [5, 6], cached prefix [7]; suffixes [8, 9] and [10]. Row: 5 6 7 | 8 9 | 10, positions 0 1 2 | 3 4 | 3.
    # Response a = [7, 8, 9]: 7 is predicted at column 1 (P + 0 - 1), 8 by the prefix's last column 2, 9 by
    # column 3 (its own 8). Response b = [7, 10]: columns 1 and 2. first_logit = P - 1 = 1 -> minus 1.
    a = TrainSample([5, 6], [7, 8, 9], 1, 1.0, "q")
    b = TrainSample([5, 6], [7, 10], 1, -1.0, "q")
    batch = pack([[a, b]], suffix_only=False)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]
    assert batch.attention_mask.int().tolist() == [
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],  # 8 sees the shared part and itself
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0, 1],  # 10 sees the shared part and itself, not the other suffix
        ]
    ]
    assert batch.row_index.tolist() == [[0, 0, 0], [0, 0, 0]]
    assert batch.logit_index.tolist() == [[0, 1, 2], [0, 1, 0]]  # b's third entry is padding
    assert batch.loss_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.first_logit == 1 and batch.logits_to_keep == 5
    assert batch.fed_tokens == 6 and collate([a, b], suffix_only=False).fed_tokens == 9
    with pytest.raises(ValueError, match="share the same prompt and cached prefix"):
        pack([[a, TrainSample([5, 6], [8, 8], 1, 0.0, "q")]], suffix_only=False)


def test_plan_keeps_groups_whole_unless_a_group_is_larger_than_a_micro_batch():
    sizes = {"a": 3, "b": 2, "c": 5, "d": 1}
    samples = [TrainSample([1, 2], [ord(q)], 1, 0.0, q) for q, n in sizes.items() for _ in range(n)]
    assert share_groups(samples) == [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9], [10]]
    # Micro-batches of 4: a (3) fits; b (2) does not fit the 1 left, so it starts the next; c (5) must be
    # split: it fills the 2 left beside b, then 3 more; d fits beside them.
    assert plan_micro_batches(samples, 4, share=True) == [[[0, 1, 2]], [[3, 4], [5, 6]], [[7, 8, 9], [10]]]
    assert plan_micro_batches(samples, 4, share=False) == [
        [[0], [1], [2], [3]],
        [[4], [5], [6], [7]],
        [[8], [9], [10]],
    ]


def _objective(
    model, batch, algorithm: str, ref: torch.Tensor | None, old: torch.Tensor | None, n: int, tokens: int
):
    from trainer.learner.logprobs import token_logprobs

    logp = token_logprobs(model, batch)
    old = logp.detach() if old is None else old
    if algorithm == "grpo":
        loss, stats = grpo_loss(
            logp, old, batch.advantages, batch.loss_mask, ref_logp=ref, beta=0.04, num_sequences=n
        )
    else:
        loss, stats = dapo_loss(logp, old, batch.advantages, batch.loss_mask, num_tokens=tokens)
    return logp, loss, stats


@pytest.mark.parametrize("algorithm", ["grpo", "dapo"])
@pytest.mark.parametrize("suffix_only", [False, True])
@pytest.mark.parametrize("micro_batch_size", [3, 16])
def test_log_probs_loss_and_gradients_equal_the_per_response_layout(
    tiny_model_dir, algorithm, suffix_only, micro_batch_size
):
    """Whole-batch objective accumulated over micro-batches (3: groups of 4 are split across micro-batches,
    16: several groups share one), with a shifted 'old' policy so that ratios are clipped and a reference
    that differs from the policy (KL > 0), in float32: loss within 1e-5 and every gradient within 1e-4 of
    the per-response layout's, relative."""
    from transformers import AutoModelForCausalLM

    from trainer.learner.batch import count_loss_tokens, make_micro_batch
    from trainer.learner.logprobs import token_logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    samples = _groups(1)
    n, tokens = len(samples), count_loss_tokens(samples, suffix_only)
    width = max(len(s.response_ids) for s in samples)
    noise_all = torch.randn(n, width, generator=torch.Generator().manual_seed(7))  # [N, T]
    results = {}
    for share in (False, True):
        model.zero_grad()
        total, kl_sum, clip_sum, logps = 0.0, 0.0, 0.0, {}
        for rows in plan_micro_batches(samples, micro_batch_size, share):
            batch = make_micro_batch(samples, rows, suffix_only, share)
            order = [i for row in rows for i in row]
            noise = noise_all[order, : batch.response_ids.shape[1]]  # the same per sample in both layouts
            with torch.no_grad():
                base = token_logprobs(model, batch)
            ref, old = base + 0.3 * noise, base - 0.25 * noise.abs()
            logp, loss, stats = _objective(model, batch, algorithm, ref, old, n, tokens)
            loss.backward()
            total += float(loss.detach())
            kl_sum += stats.kl * stats.tokens
            clip_sum += stats.clip_fraction * stats.tokens
            for b, i in enumerate(order):
                logps[i] = (
                    logp[b][batch.loss_mask[b] > 0].detach()
                    if suffix_only
                    else logp[b, : len(samples[i].response_ids)].detach()
                )
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results[share] = (total, kl_sum, clip_sum, logps, grads)
    (loss_a, kl_a, clip_a, logp_a, grad_a), (loss_b, kl_b, clip_b, logp_b, grad_b) = (
        results[False],
        results[True],
    )
    assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_a)
    assert clip_a > 0 and clip_a == pytest.approx(clip_b, rel=1e-6)
    if algorithm == "grpo":
        assert kl_a > 0 and kl_a == pytest.approx(kl_b, rel=1e-5)
    for i in logp_a:
        torch.testing.assert_close(logp_b[i], logp_a[i], rtol=0, atol=1e-5)
    for name, g in grad_a.items():
        assert (grad_b[name] - g).abs().max() <= 1e-4 * g.abs().max(), name


def test_bf16_shared_layout_is_within_bf16_noise_of_the_per_response_one(tiny_model_dir):
    """bf16 (the GPU dtype) through the additive block mask: finite and as close as bf16 rounding allows."""
    from transformers import AutoModelForCausalLM

    from trainer.learner.logprobs import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    samples = _groups(2)
    groups = share_groups(samples)
    order = [i for g in groups for i in g]
    with torch.no_grad():
        one = token_logprobs(model, collate(samples, False), torch.bfloat16)[order]
        shared = token_logprobs(model, pack([[samples[i] for i in g] for g in groups], False), torch.bfloat16)
    mask = collate(samples, False).loss_mask[order] > 0
    assert torch.isfinite(shared[mask]).all()
    assert (shared[mask] - one[mask]).abs().max() < 0.1  # bf16 keeps 8 bits: log-probs of ~-5 round to 1/32


def _learner(model_dir, *overrides: str):
    from trainer.learner.engine import Learner

    cfg = load_config(None, ["train.warmup_ratio=0", "train.lr=1e-4", *overrides])
    return Learner(cfg, str(model_dir), total_steps=10)


LEARNER_CASES = {
    "grpo-zero2": ["algorithm.beta=0.04", "train.micro_batch_size=3"],
    "grpo-zero3-two-updates": ["train.zero_stage=3", "algorithm.beta=0.04", "train.updates_per_batch=2"],
    "dapo-suffix-only-two-updates": [
        "algorithm.algorithm=dapo", "algorithm.loss_on_suffix_only=true", "train.updates_per_batch=2",
        "train.micro_batch_size=5",
    ],
}  # fmt: skip


@pytest.mark.parametrize("case", list(LEARNER_CASES))
def test_learner_steps_are_the_same_in_both_layouts(tiny_model_dir, case):
    """Two DeepSpeed steps (gradient checkpointing on, the default) in each layout from the same weights:
    the same loss, KL, clip fraction and gradient norm, and the same weights after them; the shared layout
    feeds the model fewer tokens."""
    samples = _groups(3)
    runs = {}
    for share in (False, True):
        torch.manual_seed(0)
        learner = _learner(tiny_model_dir, *LEARNER_CASES[case], f"train.share_prefix={str(share).lower()}")
        steps = [learner.train_step(samples) for _ in range(2)]
        weights = {name: t.float().clone() for name, t in named_weights(learner)}
        runs[share] = (steps, weights)
    (steps_a, weights_a), (steps_b, weights_b) = runs[False], runs[True]
    for a, b in zip(steps_a, steps_b, strict=True):
        for key in ("loss", "kl", "clip_fraction", "grad_norm"):
            assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-5, abs=1e-7), key
        assert a.tokens == b.tokens and b.model_tokens < a.model_tokens
    for name, w in weights_a.items():
        assert (weights_b[name] - w).abs().max() < 0.5e-4, name  # Adam moves each weight ~lr = 1e-4 per step


def test_each_group_shared_part_is_fed_to_the_model_once(tiny_model_dir):
    """Count what the policy and the reference receive: per group its prompt + cached prefix once, then each
    response's own tokens; the per-response layout feeds prompt + response per response."""
    samples = _groups(4, prefixes=(0, 6, 11), size=6)
    groups = share_groups(samples)
    distinct = sum(
        len(samples[g[0]].prompt_ids) + samples[g[0]].prefix_len
        + sum(len(samples[i].response_ids) - samples[i].prefix_len for i in g)
        for g in groups
    )  # fmt: skip
    per_response = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    for share, expected in ((True, distinct), (False, per_response)):
        learner = _learner(
            tiny_model_dir,
            "algorithm.beta=0.04",
            "train.micro_batch_size=12",
            f"train.share_prefix={str(share).lower()}",
        )
        fed: list[torch.Tensor] = []

        def count(_module, args, fed=fed):
            fed.append(args[0].detach().clone())  # input_ids; padding is token 0, never a real token here

        handles = [
            m.get_input_embeddings().register_forward_pre_hook(count)
            for m in (learner.module, learner.reference)
        ]
        stats = learner.train_step(samples)
        for h in handles:
            h.remove()
        assert len(fed) == 2 * 2  # policy + reference, two micro-batches of 12
        assert sum(int((ids != 0).sum()) for ids in fed) == 2 * expected
        assert stats.model_tokens == expected
    assert distinct < 0.6 * per_response


def test_bf16_learner_step_is_the_same_in_both_layouts_within_bf16_noise(tiny_model_dir):
    """DeepSpeed's bf16 mode (the GPU setting; it runs on the CPU accelerator too): the first step's loss and
    gradient norm agree within bf16 rounding (measured: loss equal, norm 0.13% apart)."""
    samples = _groups(3)
    first = {}
    for share in (False, True):
        torch.manual_seed(0)
        learner = _learner(
            tiny_model_dir,
            "train.precision=bf16",
            "algorithm.beta=0.04",
            f"train.share_prefix={str(share).lower()}",
        )
        first[share] = learner.train_step(samples)
    assert first[True].loss == pytest.approx(first[False].loss, rel=1e-2)
    assert first[True].grad_norm == pytest.approx(first[False].grad_norm, rel=2e-2)
    assert first[True].model_tokens < first[False].model_tokens
