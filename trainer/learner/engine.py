"""The DeepSpeed learner: everything that touches the policy's parameters (docs/algorithm.md, step 5).

Guarantees: ONE optimizer step per rollout batch (per update with `train.updates_per_batch` > 1), whose
gradient is that of the whole-batch GRPO/DAPO loss at any micro-batch size, world size and ZeRO stage
(global normalisers, equal micro-batch counts on every rank, loss x world size against DeepSpeed's
averaging; tests/trainer compare world sizes 1 and 2); weights come out under their HF names. No departure
from the paper's objective. The contract for several ranks and the reasons: docs/training.md, "Learner".
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from services.core.config import RunConfig
from trainer import dist
from trainer.learner import lora
from trainer.learner.batch import Batch, TrainSample, count_loss_tokens, make_micro_batch, plan_micro_batches
from trainer.learner.logprobs import token_logprobs
from trainer.learner.losses import policy_loss, truncated_importance_weights
from trainer.learner.lr_schedule import LRSchedule
from trainer.learner.rng_state import capture_rng, restore_rng
from trainer.telemetry.records import LearnerStats

log = logging.getLogger("rpo.learner")

CHECKPOINT_TAG = "state"
"""DeepSpeed tag (sub-directory) of the learner's checkpoint inside the directory it is given."""
_CLIENT_KEY = "rpo_learner"


def resolve_dtype(precision: str) -> torch.dtype:
    """`train.precision` -> the compute dtype: `auto` is bfloat16 on an accelerator, float32 on CPU."""
    # lazy: heavy import (deepspeed), paid only on this path
    from deepspeed.accelerator import get_accelerator

    if precision == "auto":
        return torch.float32 if get_accelerator().device_name() == "cpu" else torch.bfloat16
    return torch.bfloat16 if precision == "bf16" else torch.float32


class Learner:
    """The policy under DeepSpeed, its optimizer and schedule, and the frozen reference when needed.

    Calling contract with several ranks: the constructor, `train_step`, `save_checkpoint` and
    `load_checkpoint` are collective (as are reading the weights out and exporting them,
    trainer/weights/export.py): every rank calls them, in the same order, with the same arguments
    (`train_step`: the same full sample list on every rank).
    """

    def __init__(self, cfg: RunConfig, model_path: str, total_steps: int):
        # lazy: heavy import (deepspeed), paid only on this path
        import deepspeed

        # lazy: heavy import (deepspeed), paid only on this path
        from deepspeed.accelerator import get_accelerator

        # lazy: heavy import (transformers), paid only on this path
        from transformers import AutoConfig

        dist.init_distributed()
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.cfg = cfg
        self.model_path = Path(model_path)
        self.total_steps = max(1, int(total_steps))
        self.policy_version = 0
        self.world = dist.world_size()
        self.stage = cfg.train.zero_stage
        self.dtype = resolve_dtype(cfg.train.precision)
        self.on_cpu = get_accelerator().device_name() == "cpu"
        self.device = torch.device("cpu" if self.on_cpu else get_accelerator().current_device_name())
        self.hf_config = AutoConfig.from_pretrained(
            self.model_path, trust_remote_code=cfg.model.trust_remote_code
        )
        self.ds_config = self._deepspeed_config()

        model = self._load_model()
        model.config.use_cache = False
        self.lora = cfg.train.lora if cfg.train.lora.enabled else None
        if self.lora is not None:
            model = lora.wrap(model, self.lora)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        a = cfg.algorithm
        optimizer_steps = self.total_steps * cfg.train.updates_per_batch
        self.schedule = LRSchedule(
            total=optimizer_steps,
            warmup=math.ceil(cfg.train.warmup_ratio * optimizer_steps),
            kind=cfg.train.lr_scheduler,
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.ds_config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule),
        )
        self.engine.train()
        self.reference = None
        # GRPO's KL term needs the starting model: with LoRA it is the base with the adapter switched off.
        self.reference_is_base = self.lora is not None and a.algorithm == "grpo" and a.beta > 0
        if self.lora is None and a.algorithm == "grpo" and a.beta > 0:
            self.reference = self._load_reference()
        if dist.is_main():
            log.info(
                "learner: %s%s, ZeRO-%d on %d rank(s), %s, micro-batch %d, %d optimizer steps planned "
                "(%d warm-up), reference %s",
                self.model_path,
                "" if self.lora is None else f" with LoRA adapters (rank {self.lora.rank})",
                self.stage,
                self.world,
                str(self.dtype).replace("torch.", ""),
                cfg.train.micro_batch_size,
                optimizer_steps,
                self.schedule.warmup,
                self._reference_kind(),
            )

    # ------------------------------------------------------------------------------------------------ setup
    def _reference_kind(self) -> str:
        if self.reference_is_base:
            return "the base with the adapter off"
        if self.reference is None:
            return "none"
        return "ZeRO-3 engine" if self.stage == 3 else "frozen copy"

    def _deepspeed_config(self) -> dict[str, Any]:
        t = self.cfg.train
        zero: dict[str, Any] = {"stage": self.stage}
        if t.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not self.on_cpu}
        if t.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": not self.on_cpu}
        return {
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            # Accumulation is ours: the boundary is set explicitly on the last micro-batch of a step.
            "gradient_accumulation_steps": 1,
            "train_batch_size": t.micro_batch_size * self.world,
            "gradient_clipping": t.max_grad_norm,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "zero_optimization": zero,
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": t.lr,
                    "betas": [t.adam_beta1, t.adam_beta2],
                    "eps": t.adam_epsilon,
                    "weight_decay": t.weight_decay,
                    # torch's AdamW, fused on GPU: DeepSpeed's FusedAdam compiles a CUDA kernel at start
                    # (nvcc, which the image does not ship). With optimizer offload, DeepSpeed's CPU Adam
                    # (compiled with g++ at first use) runs the update on the host instead.
                    "torch_adam": self.on_cpu or not t.offload_optimizer,
                    **({"fused": True} if not self.on_cpu and not t.offload_optimizer else {}),
                },
            },
            "zero_force_ds_cpu_optimizer": not self.on_cpu,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }

    def _load_model(self) -> Any:
        """The HF model in the compute dtype, on CPU. Under ZeRO-3 `deepspeed.initialize` then partitions
        it, so each rank holds a full copy only until then (transformers' zero.Init loading path needs
        `accelerate`, which this project does not depend on)."""
        # lazy: heavy import (transformers), paid only on this path
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=self.dtype, trust_remote_code=self.cfg.model.trust_remote_code
        )

    def _load_reference(self) -> Any:
        # lazy: heavy import (deepspeed), paid only on this path
        import deepspeed

        model = self._load_model()
        model.config.use_cache = False
        model.requires_grad_(False)
        model.eval()
        if self.stage != 3:
            return model.to(self.device)
        zero = {"stage": 3}
        if self.cfg.train.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": not self.on_cpu}
        engine, *_ = deepspeed.initialize(
            model=model,
            config={
                "train_micro_batch_size_per_gpu": self.cfg.train.micro_batch_size,
                "gradient_accumulation_steps": 1,
                "train_batch_size": self.cfg.train.micro_batch_size * self.world,
                "bf16": {"enabled": self.dtype == torch.bfloat16},
                "zero_optimization": zero,
                "steps_per_print": 2**62,
            },
        )
        engine.eval()
        return engine

    @property
    def module(self) -> Any:
        """The HF model inside the engine (under ZeRO-3 its parameters are partitioned)."""
        return self.engine.module

    # ------------------------------------------------------------------------------------------------- step
    def _micro_batches(self, samples: list[TrainSample]) -> list[Batch]:
        """This rank's micro-batches of `samples`, in the configured layout, on the device.

        Each rank takes a contiguous slice of the samples (sizes differ by at most one) and plans its
        micro-batches in it; every rank plans every slice, so all run the count of the longest plan,
        padding with zero-weight micro-batches (same graph, no gradient). A group that straddles two
        slices is packed twice, once per rank: exact, as any split is.
        """
        t = self.cfg.train
        share, suffix_only = t.share_prefix, self.cfg.algorithm.loss_on_suffix_only
        plans = [
            plan_micro_batches(
                samples[slice(*dist.shard_bounds(len(samples), self.world, r))], t.micro_batch_size, share
            )
            for r in range(self.world)
        ]
        mine = samples[slice(*dist.shard_bounds(len(samples), self.world, dist.rank()))]
        batches = [make_micro_batch(mine, rows, suffix_only, share) for rows in plans[dist.rank()]]
        while len(batches) < max(len(plan) for plan in plans):
            padding = make_micro_batch(samples, [[0]], suffix_only, share)
            padding.loss_mask.zero_()
            padding.fed_tokens = 0
            batches.append(padding)
        return [batch.to(self.device) for batch in batches]

    def train_step(self, samples: list[TrainSample]) -> LearnerStats:
        """One optimizer step (per update) over the whole `samples` list; collective (see class docstring).

        Returns what the step did, aggregated over ranks (`trainer.telemetry.records.LearnerStats`).
        """
        if not samples:
            raise ValueError("train_step needs at least one sample")
        started = time.monotonic()
        self.engine.train()
        a, t = self.cfg.algorithm, self.cfg.train
        suffix_only = a.loss_on_suffix_only
        num_sequences = len(samples)
        num_tokens = max(1, count_loss_tokens(samples, suffix_only))
        batches = self._micro_batches(samples)
        n_micro = len(batches)
        loss_type = a.loss_type if a.loss_type != "auto" else a.algorithm

        refs: list[torch.Tensor | None] = [None] * n_micro
        olds: list[torch.Tensor | None] = [None] * n_micro
        # Lagged samples (train.max_lag > 0): pi_old / pi_behaviour per decoded token, truncated; pi_old at
        # the sampling temperature, as the replica's log-probs are (one more no-grad pass unless T = 1).
        correct = a.off_policy_correction == "tis" and any(b.behaviour_logp is not None for b in batches)
        temperature = self.cfg.sampling.temperature
        tempered: list[torch.Tensor | None] = [None] * n_micro
        with torch.no_grad():
            if self.reference is not None:
                refs = [token_logprobs(self.reference, b, self.dtype) for b in batches]
            elif self.reference_is_base:
                with self.module.disable_adapter():
                    refs = [token_logprobs(self.engine, b, self.dtype) for b in batches]
            if t.updates_per_batch > 1:
                olds = [token_logprobs(self.engine, b, self.dtype) for b in batches]
            if correct and temperature != 1.0:
                tempered = [
                    token_logprobs(self.engine, b, self.dtype, temperature)
                    if b.behaviour_logp is not None
                    else None
                    for b in batches
                ]
        lag_sums = {"weight": 0.0, "truncated": 0.0, "tokens": 0.0}

        sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "tokens": 0.0, "entropy": 0.0}
        grad_norm, lr = 0.0, 0.0
        for _update in range(t.updates_per_batch):
            for i, batch in enumerate(batches):
                self.engine.set_gradient_accumulation_boundary(i == n_micro - 1)
                entropy: list[torch.Tensor] | None = [] if _update == 0 else None
                logp = token_logprobs(self.engine, batch, self.dtype, entropy=entropy)  # [B, T]
                if entropy:
                    sums["entropy"] += float((entropy[0] * batch.loss_mask).sum())
                old = logp.detach() if olds[i] is None else olds[i]
                weights = None
                if correct and batch.behaviour_logp is not None:
                    basis = tempered[i] if tempered[i] is not None else old
                    weights = truncated_importance_weights(
                        basis, batch.behaviour_logp, batch.behaviour_mask, a.tis_cap
                    )
                    if _update == 0:
                        on = batch.behaviour_mask * batch.loss_mask
                        lag_sums["weight"] += float((weights * on).sum())
                        lag_sums["truncated"] += float(((weights >= a.tis_cap) * on).sum())
                        lag_sums["tokens"] += float(on.sum())
                grpo = a.algorithm == "grpo"
                loss, stats = policy_loss(
                    logp,
                    old,
                    batch.advantages,
                    batch.loss_mask,
                    loss_type=loss_type,
                    eps_low=a.clip_eps if grpo else a.clip_eps_low,
                    eps_high=a.clip_eps if grpo else a.clip_eps_high,
                    ref_logp=refs[i],
                    beta=a.beta if grpo else 0.0,
                    num_sequences=num_sequences,
                    num_tokens=num_tokens,
                    max_completion_length=a.max_response_tokens,
                    micro_batches=n_micro * self.world,
                    is_weights=weights,
                )
                # DeepSpeed averages gradients over ranks; scaling by the world size makes the reduced
                # gradient the SUM over ranks, i.e. that of the whole-batch loss.
                self.engine.backward(loss * self.world)
                sums["loss"] += stats.loss
                sums["kl"] += stats.kl * stats.tokens
                sums["clipped"] += stats.clip_fraction * stats.tokens
                sums["tokens"] += stats.tokens
            lr = float(self.engine.get_lr()[0])
            # ZeRO-0 in float32 clips without recording the norm: take it from the reduced gradients.
            own_norm = _grad_norm(self.module) if self.stage == 0 else None
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            grad_norm = float(norm if norm is not None else own_norm)
            self.policy_version += 1

        loss_sum, kl_sum, clipped_sum, token_sum, entropy_sum = dist.sum_over_ranks(
            [sums["loss"], sums["kl"], sums["clipped"], sums["tokens"], sums["entropy"]]
        )
        token_sum = max(token_sum, 1.0)
        lag_stats = {}
        if correct:
            weight_sum, truncated_sum, lagged_sum = dist.sum_over_ranks(
                [lag_sums["weight"], lag_sums["truncated"], lag_sums["tokens"]]
            )
            lag_stats = {
                "is_weight_mean": weight_sum / max(lagged_sum, 1.0),
                "is_truncated": truncated_sum / max(lagged_sum, 1.0),
                "lagged_tokens": int(lagged_sum),
            }
        return LearnerStats(
            loss=loss_sum / t.updates_per_batch,
            kl=kl_sum / token_sum,
            clip_fraction=clipped_sum / token_sum,
            entropy=entropy_sum / max(1.0, token_sum / t.updates_per_batch),
            grad_norm=grad_norm,
            lr=lr,
            tokens=count_loss_tokens(samples, suffix_only),
            sequences=num_sequences,
            micro_batches=n_micro,
            model_tokens=int(dist.sum_over_ranks([sum(b.fed_tokens for b in batches)])[0]),
            seconds=time.monotonic() - started,
            policy_version=self.policy_version,
            **lag_stats,
        )

    # ------------------------------------------------------------------------------------------- checkpoint
    def save_checkpoint(self, directory: str, client_state: dict[str, Any]) -> None:
        """DeepSpeed checkpoint (weights, optimizer, scheduler) of every rank into `directory`, plus
        `client_state`, the policy version and each rank's RNG states (collective). Resume with the same
        world size and ZeRO stage; the reference model is not saved (it is the starting model)."""
        state = {_CLIENT_KEY: {"policy_version": self.policy_version, "client_state": dict(client_state)}}
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state=state)
        torch.save(capture_rng(), Path(directory) / f"rng_rank{dist.rank():05d}.pt")
        dist.barrier()  # every rank's files are on disk before anyone renames or reads the directory

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        """Restore what `save_checkpoint` wrote (collective); returns the caller's `client_state`."""
        if not (Path(directory) / CHECKPOINT_TAG).is_dir():
            raise FileNotFoundError(f"no learner checkpoint under {directory} (no {CHECKPOINT_TAG}/ in it)")
        path, client_state = self.engine.load_checkpoint(
            directory, tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no learner checkpoint under {directory} (tag {CHECKPOINT_TAG!r})")
        own = (client_state or {}).get(_CLIENT_KEY)
        if own is None:
            raise ValueError(f"{directory} is a DeepSpeed checkpoint, but not one a Learner wrote")
        self.policy_version = int(own["policy_version"])
        rng_file = Path(directory) / f"rng_rank{dist.rank():05d}.pt"
        if rng_file.is_file():
            restore_rng(torch.load(rng_file, weights_only=False))
        else:
            log.warning("no RNG state for rank %d in %s; RNG streams start fresh", dist.rank(), directory)
        return dict(own["client_state"])


# ---------------------------------------------------------------------------------------------------- helpers
def _grad_norm(module: Any) -> float:
    """L2 norm of all gradients of a (replicated, not partitioned) module."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    return (
        float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if grads
        else 0.0
    )
