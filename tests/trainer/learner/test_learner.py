"""The DeepSpeed learner in this process (world size 1, CPU, gloo): the step against plain PyTorch, learning
direction, weights for a push, checkpoint resume, HF export. World size 2 is in test_learner_distributed.py."""

from __future__ import annotations

import math
import os
import random

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from services.core.config import load_config
from trainer.learner.batch import TrainSample, collate
from trainer.learner.losses import dapo_loss, grpo_loss
from trainer.weights.export import export_hf, named_weights


def _samples(n: int, seed: int = 0) -> list[TrainSample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        response = [rng.randrange(3, 131) for _ in range(rng.randint(1, 10))]
        out.append(
            TrainSample(
                prompt_ids=[rng.randrange(3, 131) for _ in range(rng.randint(2, 7))],
                response_ids=response,
                prefix_len=rng.randint(0, len(response)),
                advantage=(1.0 if i % 2 == 0 else -1.0) * rng.uniform(0.5, 1.5),
                question_id=f"q{i // 2}",
            )
        )
    return out


def _learner(model_dir, *overrides: str, total_steps: int = 10):
    from trainer.learner.engine import Learner

    cfg = load_config(None, ["train.micro_batch_size=2", "train.warmup_ratio=0", *overrides])
    return Learner(cfg, str(model_dir), total_steps)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 40, 41, 42, 60, 61, 2, 7]])


def test_lr_schedule_by_hand():
    from trainer.learner.lr_schedule import LRSchedule

    cosine = LRSchedule(total=10, warmup=1, kind="cosine")
    # Warm-up step 0 at 1/(w+1) = 0.5 (never 0), then 1 at step w, then cos down: step 6 is 5/9 of the way.
    assert [cosine(0), cosine(1)] == [0.5, 1.0]
    assert cosine(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 9)))
    assert cosine(10) == pytest.approx(0.0) and cosine(12) == pytest.approx(0.0)
    constant = LRSchedule(total=10, warmup=2, kind="constant")
    assert [constant(0), constant(1), constant(2), constant(9)] == pytest.approx([1 / 3, 2 / 3, 1, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selected_logprobs_match_log_softmax_in_value_and_gradient(dtype):
    """The chunked custom autograd function equals log_softmax + gather, forward and backward (3 rows per
    chunk over 2 x 5 rows, so chunks split a row of the batch)."""
    from trainer.learner.logprobs import selected_logprobs

    gen = torch.Generator().manual_seed(0)
    base = (3 * torch.randn(2, 5, 11, generator=gen)).to(dtype)
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    upstream = torch.randn(2, 5, generator=gen)
    mine_in, ref_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    mine = selected_logprobs(mine_in, targets, chunk_bytes=3 * 11 * 4)
    ref = torch.log_softmax(ref_in.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
    (mine * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert mine_in.grad.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2  # bf16 rounds the gradient itself
    torch.testing.assert_close(mine_in.grad.float(), ref_in.grad.float(), rtol=0, atol=tolerance)


@pytest.mark.parametrize("algorithm", ["grpo", "dapo"])
def test_one_step_is_adamw_on_the_whole_batch_gradient(tiny_model_dir, algorithm):
    """7 samples in micro-batches of 2 (4 backward passes, the last one short) make ONE AdamW step on the
    gradient of the whole-batch loss, clipped to max_grad_norm: the same step plain PyTorch takes."""
    from transformers import AutoModelForCausalLM

    from trainer.learner.logprobs import token_logprobs

    samples = _samples(7)
    lr, clip = 1e-3, 1.0
    learner = _learner(
        tiny_model_dir,
        f"algorithm.algorithm={algorithm}",
        "algorithm.beta=0.04",
        f"train.lr={lr}",
        f"train.max_grad_norm={clip}",
    )
    stats = learner.train_step(samples)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = collate(samples, suffix_only=False)
    logp = token_logprobs(model, batch)
    if algorithm == "grpo":  # reference = the starting model = pi_theta now: KL 0, and its gradient 0
        loss, _ = grpo_loss(logp, logp.detach(), batch.advantages, batch.loss_mask, ref_logp=logp.detach())
    else:
        loss, _ = dapo_loss(logp, logp.detach(), batch.advantages, batch.loss_mask)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0).step()

    assert stats.loss == pytest.approx(loss.item(), abs=1e-6)
    assert stats.grad_norm == pytest.approx(norm.item(), rel=1e-5)
    assert stats.lr == pytest.approx(lr) and stats.policy_version == learner.policy_version == 1
    assert stats.micro_batches == 4 and stats.sequences == 7 and stats.kl == 0.0
    # AdamW's first update is lr * g / (|g| + 1e-8): where |g| is near 1e-8, float noise in g (a different
    # summation order) moves it by a fraction of lr. Everywhere else the two steps agree to 1e-6.
    expected = dict(model.named_parameters())
    off = total = 0
    for name, tensor in named_weights(learner):
        diff = (tensor - expected[name].detach()).abs()
        assert diff.max().item() < 0.5 * lr, name  # no element moved the other way
        off, total = off + int((diff > 1e-6).sum()), total + diff.numel()
    assert off / total < 1e-3


def test_steps_move_log_probs_with_the_advantage_sign(tiny_model_dir):
    """GRPO (beta 0): responses with A > 0 become likelier, A < 0 less likely, and the surrogate objective
    with pi_old = the starting policy falls."""
    from trainer.learner.logprobs import token_logprobs

    samples = _samples(8, seed=1)
    learner = _learner(tiny_model_dir, "algorithm.beta=0", "train.lr=3e-4")
    batch = collate(samples, suffix_only=False)
    adv = batch.advantages

    def measure():
        with torch.no_grad():
            logp = token_logprobs(learner.module, batch)
        per_seq = (logp * batch.loss_mask).sum(1) / batch.loss_mask.sum(1).clamp(min=1)  # [B]
        return logp, per_seq

    start_logp, start = measure()
    for _ in range(3):
        learner.train_step(samples)
    end_logp, end = measure()
    assert bool(((end - start)[adv > 0] > 0).all()) and bool(((end - start)[adv < 0] < 0).all())
    before, _ = grpo_loss(start_logp, start_logp, adv, batch.loss_mask, beta=0.0)
    after, _ = grpo_loss(end_logp, start_logp, adv, batch.loss_mask, beta=0.0)
    assert after.item() < before.item() - 0.05
    assert learner.policy_version == 3


def test_kl_to_the_frozen_reference_grows_from_zero(tiny_model_dir):
    learner = _learner(tiny_model_dir, "algorithm.beta=0.04", "train.lr=1e-3")
    first, second = learner.train_step(_samples(6)), learner.train_step(_samples(6))
    assert first.kl == 0.0 and second.kl > 0.0


def test_several_updates_per_batch_clip_against_the_pre_update_policy(tiny_model_dir):
    learner = _learner(tiny_model_dir, "train.updates_per_batch=3", "train.lr=3e-3", "algorithm.beta=0")
    stats = learner.train_step(_samples(6))
    assert learner.policy_version == stats.policy_version == 3  # one version per optimizer step
    assert stats.clip_fraction > 0.0  # updates 2 and 3 see ratios != 1, and some leave [0.8, 1.2]


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_named_weights_load_into_a_fresh_transformers_model(
    tiny_model_dir, tiny_model_untied_dir, stage, kind
):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir if kind == "tied" else tiny_model_untied_dir
    learner = _learner(model_dir, f"train.zero_stage={stage}", "train.lr=1e-3")
    learner.train_step(_samples(4))
    weights = dict(named_weights(learner, bucket_bytes=64 * 1024))  # several gather buckets under ZeRO-3
    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = set(fresh.state_dict())
    if kind == "tied":
        assert "lm_head.weight" not in weights and expected - set(weights) == {"lm_head.weight"}
    else:
        assert set(weights) == expected and "lm_head.weight" in weights
    before = _logits(fresh, IDS)
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr() or kind == "untied"
    after = _logits(fresh, IDS)
    assert not torch.allclose(before, after)  # the step changed the policy
    learner.engine.eval()
    torch.testing.assert_close(after, _logits(learner.engine, IDS), rtol=0, atol=1e-5)


def test_checkpoint_resume_continues_with_the_same_steps(tiny_model_dir, tmp_path):
    samples = _samples(5)
    overrides = ("train.lr=1e-3", "algorithm.beta=0.04", "train.warmup_ratio=0.2")
    a = _learner(tiny_model_dir, *overrides)
    a.train_step(samples)
    a.save_checkpoint(str(tmp_path / "learner"), {"cursor": {"epoch": 0, "position": 3}})
    torch.manual_seed(1234)  # whatever the RNG does after the save, the resumed learner gets the saved one
    expected = [a.train_step(samples), a.train_step(samples)]
    expected_weights = dict(named_weights(a))

    b = _learner(tiny_model_dir, *overrides)
    client = b.load_checkpoint(str(tmp_path / "learner"))
    assert client == {"cursor": {"epoch": 0, "position": 3}}
    assert b.policy_version == 1
    got = [b.train_step(samples), b.train_step(samples)]
    for want, have in zip(expected, got, strict=True):
        for key in ("loss", "kl", "grad_norm", "lr", "policy_version"):
            assert getattr(have, key) == pytest.approx(getattr(want, key), rel=1e-7, abs=1e-9), key
    for name, tensor in named_weights(b):
        torch.testing.assert_close(tensor, expected_weights[name], rtol=0, atol=1e-7)
    with pytest.raises(FileNotFoundError):
        b.load_checkpoint(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 300_000])
def test_export_hf_is_a_normal_model_directory(tiny_model_dir, tmp_path, max_shard_bytes):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learner = _learner(tiny_model_dir, "train.lr=1e-3")
    learner.train_step(_samples(4))
    out = tmp_path / "export"
    export_hf(learner, str(out), max_shard_bytes=max_shard_bytes)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    if max_shard_bytes < 2**20:
        assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    else:
        assert shards == ["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    learner.engine.eval()
    torch.testing.assert_close(_logits(model, IDS), _logits(learner.engine, IDS), rtol=0, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("1+2=3")["input_ids"]) == "1+2=3"
    assert (out / "generation_config.json").is_file()
    # readable by a replica running as another uid (safetensors writes its files 0600)
    assert all(f.stat().st_mode & 0o444 == 0o444 for f in out.iterdir())
