"""The memory plan: what each process of a run (the trainer's ranks, the rollout replicas) holds on each GPU,
from the model's shape and the run's own settings, and whether it fits the box (docs/training.md, "Memory
plan"). Pure Python: `rpo plan`, `rpo run` and `rpo train` run the same plan, before anything loads a model.

Guarantees:
- the static figures (weights, gradients, optimizer state) are the bytes the learner's DeepSpeed engine holds,
  as trainer/learner/engine.py configures it (ZeRO stage, bf16 or float32, AdamW, offload, LoRA); on CPU they equal
  the engine's own tensor bytes within 1% (tests/core/test_memory_plan.py);
- activations, the runtime overhead (CUDA context, vLLM's graphs and profile peak) are estimates, flagged so;
- the vLLM share is chosen, not assumed: on a GPU of its own a replica gets `rollout.gpu_memory_utilization`;
  on a GPU it shares with the trainer it gets what the trainer's peak and the headroom leave, at most what its
  KV cache can use; with `rollout.sleep_mode` the learner steps while the engine sleeps;
- a plan that does not fit says why and which settings would make it fit (each checked by planning again).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.core.config import RunConfig
from services.core.model_shape import DTYPE_BYTES, ModelShape

GiB = 2**30
MiB = 2**20
CUDA_CONTEXT_BYTES = 512 * MiB
"""Estimate: a process's CUDA context, cuBLAS workspace and allocator slack (outside torch's tensor count)."""
VLLM_GRAPH_BYTES = 512 * MiB
"""Estimate: vLLM's captured CUDA graphs (none with `rollout.enforce_eager`)."""
VLLM_PROFILE_TOKENS = 8192
"""Estimate: tokens of vLLM's profiling forward pass, whose activation peak it keeps out of the KV cache."""
VLLM_SLEEP_RESIDUAL_BYTES = CUDA_CONTEXT_BYTES
"""Estimate: what a sleeping vLLM engine (level 1: weights to host memory, KV cache dropped) keeps on the GPU."""
LORA_SUGGESTED_RANK = 16
PROMPT_ROOM_TOKENS = 512
"""Room for the prompt when the context is sized from the response budget (as services/core/model_fit.py)."""

ROWS = ("weights", "gradients", "optimizer", "reference", "activations", "kv_cache", "runtime")
"""Figures of a process, in the order they print. `activations` and `runtime` are estimates."""
ESTIMATES = frozenset({"activations", "runtime"})


@dataclass(frozen=True)
class Box:
    """The GPUs the plan is for: how many and each one's memory in bytes."""

    gpus: int
    memory_bytes: int


@dataclass
class ProcessPlan:
    """One process's figures on each of its GPUs (bytes), and what it keeps in host memory instead."""

    name: str
    gpus: list[int]
    gpu: dict[str, int]
    host_bytes: int = 0
    resident_bytes: int = 0
    """What stays on the GPU between steps (the trainer: without gradients and activations)."""

    @property
    def total(self) -> int:
        return sum(self.gpu.values())


@dataclass
class GpuUse:
    index: int
    capacity: int
    processes: list[str]
    used: int
    headroom: int

    @property
    def fits(self) -> bool:
        return self.used + self.headroom <= self.capacity


@dataclass
class MemoryPlan:
    shape: ModelShape
    box: Box
    params: int
    trainable: int
    processes: list[ProcessPlan]
    gpus: list[GpuUse]
    shared: bool
    """One replica shares the trainer's first GPU."""
    rollout_memory_utilization: float | None
    """vLLM's gpu_memory_utilization this plan gives the replica(s); None when no replica has a GPU."""
    trainer_memory_fraction: float | None
    """The trainer's allocator cap on a shared GPU (without sleep mode); None otherwise."""
    kv_sequences: float
    """Full-length sequences (model.max_model_len) the replica's KV cache holds at that share."""
    problems: list[str] = field(default_factory=list)
    context: int = 0
    """Tokens of the context the plan is for (model.max_model_len as the run sizes it)."""
    notes: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems


def dtype_bytes(cfg: RunConfig, on_gpu: bool) -> tuple[int, int]:
    """Bytes per element of the learner's compute dtype (`train.precision`) and vLLM's (`model.dtype`)."""
    train = {"bf16": 2, "float32": 4}.get(cfg.train.precision, 2 if on_gpu else 4)
    serve = DTYPE_BYTES[cfg.model.dtype] if cfg.model.dtype != "auto" else (2 if on_gpu else 4)
    return train, serve


def context_tokens(cfg: RunConfig, shape: ModelShape) -> int:
    """`model.max_model_len`, or when unset what the run sizes it to (services/core/model_fit.py): the
    response budget plus `PROMPT_ROOM_TOKENS`, at most the model's positions."""
    if cfg.model.max_model_len is not None:
        return cfg.model.max_model_len
    wanted = cfg.algorithm.max_response_tokens + PROMPT_ROOM_TOKENS
    return min(wanted, shape.max_positions) if shape.max_positions else wanted


def sequence_tokens(cfg: RunConfig, context: int, prompt_tokens: int | None) -> int:
    """Tokens of one training row: prompt + response, at most the context (the default prompt is what the
    context leaves the response, so a row is the whole context)."""
    response = cfg.algorithm.max_response_tokens
    prompt = max(0, context - response) if prompt_tokens is None else prompt_tokens
    return max(1, min(context, prompt + response))


def activation_bytes(shape: ModelShape, cfg: RunConfig, w: int, tokens: int, response_tokens: int) -> int:
    """Estimate of the learner's activations for one micro-batch of `tokens` tokens, `response_tokens` of
    them responses (bytes):
    - what one layer keeps for backward, per token: 4 x hidden (norm inputs and outputs), q, k and v after
      RoPE and before it (3 x q + 4 x kv widths), 4 x intermediate (gate, up, the activation, the product);
      attention probabilities are not kept (SDPA / flash attention);
    - with gradient checkpointing: each layer's input (hidden per token) plus one layer recomputed;
    - the logits of the response tokens only (the learner asks for no others, trainer/learner/logprobs.py) and one
      more vocab-wide tensor of them (their gradient, or the tempered copy), in the compute dtype.
    """
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_layer = (4 * shape.hidden + 3 * q + 4 * kv + 4 * shape.intermediate) * w
    if cfg.train.gradient_checkpointing:
        layers = tokens * (shape.layers * shape.hidden * w + per_layer)
    else:
        layers = tokens * shape.layers * per_layer
    return layers + response_tokens * 2 * shape.vocab * w


def trainer_rank(
    shape: ModelShape, cfg: RunConfig, on_gpu: bool, tokens: int
) -> tuple[dict[str, int], int, int]:
    """(GPU figures, host bytes, trainable params) of one trainer rank, as trainer/learner/engine.py sets DeepSpeed up:
    ZeRO-1/2/3 keep a float32 master copy of each rank's partition (even in float32) beside AdamW's two
    float32 moments; stage 0 in float32 uses plain torch AdamW (moments only), in bf16 DeepSpeed's BF16 optimizer
    (master copy, moments and float32 gradients). Gradients are in the compute dtype, partitioned from stage 2;
    with bf16 the update also makes a float32 copy of the rank's gradient partition."""
    t = cfg.train
    w, _ = dtype_bytes(cfg, on_gpu)
    world, stage = t.num_processes, t.zero_stage
    params = shape.params()
    lora = t.lora.rank if t.lora.enabled else 0
    adapter = shape.lora_params(lora, list(t.lora.target_modules)) if lora else 0
    trainable = adapter if lora else params
    held = params + adapter  # every tensor of the (wrapped) model
    gpu = dict.fromkeys(ROWS, 0)
    host = 0

    share = world if stage == 3 else 1
    weights = held * w // share
    if stage == 3 and t.offload_params:
        host += weights
        weights = 0
    gpu["weights"] = weights

    mixed = w != 4
    grad_share = world if stage >= 2 else 1
    grads = trainable * w // grad_share
    fp32_grads = trainable * 4 // (world if stage >= 1 else 1) if mixed else 0
    if stage == 0:
        moments = trainable * (12 if mixed else 8)  # BF16 optimizer: master + moments; fp32: moments only
    else:
        moments = (
            trainable * 12 // world
        )  # master copy + exp_avg + exp_avg_sq, float32, this rank's partition
    if t.offload_optimizer and stage >= 1:
        host += moments + fp32_grads
        moments = fp32_grads = 0
    gpu["gradients"] = grads + fp32_grads
    gpu["optimizer"] = moments

    a = cfg.algorithm
    if not lora and a.algorithm == "grpo" and a.beta > 0:  # a frozen copy of the starting model
        reference = params * w // share
        if stage == 3 and t.offload_params:
            host += reference
            reference = 0
        gpu["reference"] = reference
    rows = t.micro_batch_size
    response = min(tokens, cfg.algorithm.max_response_tokens)
    gpu["activations"] = activation_bytes(shape, cfg, w, tokens * rows, response * rows)
    gpu["runtime"] = CUDA_CONTEXT_BYTES if on_gpu else 0
    if stage == 3:  # ZeRO-3's gathered working set: the largest module (embeddings / LM head) and two layers
        gpu["runtime"] += (shape.vocab * shape.hidden + 2 * shape.layer_params()) * w
    return gpu, host, trainable


def replica_figures(
    shape: ModelShape, cfg: RunConfig, tp: int, budget: int, context: int
) -> tuple[dict[str, int], int, int, int]:
    """(GPU figures, minimum bytes, wanted bytes, KV bytes per full sequence) of one GPU of a replica
    spanning `tp` GPUs (tensor parallel), given a `budget` of bytes on it: weights in vLLM's dtype, the KV cache
    vLLM makes of what the budget leaves, and its runtime (estimate). Minimum: one full-length sequence of KV;
    wanted: rollout.max_num_seqs of them."""
    r = cfg.rollout
    _, wv = dtype_bytes(cfg, True)
    weights = shape.params() * wv // tp
    if cfg.train.lora.enabled:  # the adapter slot vLLM serves the pushed LoRA from
        weights += shape.lora_params(cfg.train.lora.rank, list(cfg.train.lora.target_modules)) * wv // tp
    profile = VLLM_PROFILE_TOKENS * (4 * shape.hidden + 2 * shape.intermediate) * wv // tp
    logits = r.max_num_seqs * shape.vocab * 4
    runtime = CUDA_CONTEXT_BYTES + (0 if r.enforce_eager else VLLM_GRAPH_BYTES) + profile + logits
    per_sequence = shape.kv_bytes_per_token(wv) * context // tp
    fixed = weights + runtime
    kv = max(0, min(budget - fixed, per_sequence * r.max_num_seqs))
    figures = dict.fromkeys(ROWS, 0) | {"weights": weights, "kv_cache": kv, "runtime": runtime}
    return figures, fixed + per_sequence, fixed + per_sequence * r.max_num_seqs, per_sequence


def plan_memory(
    shape: ModelShape, cfg: RunConfig, box: Box, replicas: int = 1, prompt_tokens: int | None = None
) -> MemoryPlan:
    """The plan of a run of `cfg` on `box`: its trainer ranks (one GPU each, `train.num_processes`) and
    `replicas` rollout replicas (`gpus.per_replica` GPUs each, after the trainer's; one replica on the
    trainer's first GPU when the box has too few, as services/core/gpu_claims.py places it)."""
    cap = box.memory_bytes
    context = context_tokens(cfg, shape)
    tokens = sequence_tokens(cfg, context, prompt_tokens)
    ranks = cfg.train.num_processes
    rank_gpu, host, trainable = trainer_rank(shape, cfg, True, tokens)
    problems: list[str] = []
    notes: list[str] = []
    processes = [
        ProcessPlan(
            f"trainer rank {n}",
            [n],
            dict(rank_gpu),
            host,
            rank_gpu["weights"] + rank_gpu["optimizer"] + rank_gpu["reference"] + rank_gpu["runtime"],
        )
        for n in range(ranks)
    ]
    if box.gpus < ranks:
        problems.append(
            f"the trainer runs {ranks} rank(s) (train.num_processes), one per GPU; the box has {box.gpus}"
        )
    per = cfg.gpus.per_replica
    own = box.gpus >= ranks + replicas * per
    shared = not own and replicas == 1 and cfg.gpus.share_with_trainer and box.gpus >= 1 and per == 1
    if not own and not shared and box.gpus >= ranks:
        problems.append(
            f"{replicas} replica(s) of {per} GPU(s) (gpus.per_replica) beside {ranks} trainer GPU(s) need "
            f"{ranks + replicas * per} GPUs; the box has {box.gpus}"
        )
    headroom = int(cfg.gpus.shared_headroom_fraction * cap) if shared else 0
    sleep = cfg.rollout.sleep_mode
    util: float | None = None
    trainer_fraction: float | None = None
    kv_sequences = 0.0
    if shared:
        trainer = processes[0]
        # Without sleep mode the replica gets what the trainer's peak leaves; with it, what the trainer keeps
        # between steps leaves (the engine sleeps while the learner steps).
        trainer_need = trainer.resident_bytes if sleep else trainer.total
        budget = cap - headroom - trainer_need
        figures, least, wanted, per_sequence = replica_figures(shape, cfg, 1, min(budget, cap), context)
        util = round(max(0.0, min(budget, wanted)) / cap, 3)
        kv_sequences = figures["kv_cache"] / per_sequence
        replica = ProcessPlan("rollout replica 0", [0], figures, resident_bytes=VLLM_SLEEP_RESIDUAL_BYTES)
        processes.append(replica)
        if budget < least:
            problems.append(
                f"GPU 0 is shared: the trainer needs {gib(trainer_need)}"
                + (" between steps" if sleep else " at its peak")
                + f" and vLLM at least {gib(least)} (weights, runtime and one {context}-token "
                f"sequence of KV cache), with {gib(headroom)} headroom (gpus.shared_headroom_fraction) of {gib(cap)}"
            )
        if sleep and trainer.total + VLLM_SLEEP_RESIDUAL_BYTES + headroom > cap:
            problems.append(
                f"GPU 0: the learner's peak ({gib(trainer.total)}) does not fit even while vLLM sleeps "
                f"({gib(cap - headroom - VLLM_SLEEP_RESIDUAL_BYTES)} left)"
            )
        if not sleep:
            trainer_fraction = round(max(0.0, 1.0 - util - cfg.gpus.shared_headroom_fraction), 3)
        gpus = [
            GpuUse(
                0,
                cap,
                [trainer.name, replica.name + (" (sleeps while the learner steps)" if sleep else "")],
                (max(trainer.total + VLLM_SLEEP_RESIDUAL_BYTES, trainer.resident_bytes + replica.total))
                if sleep
                else trainer.total + replica.total,
                headroom,
            )
        ]
        gpus += [GpuUse(p.gpus[0], cap, [p.name], p.total, 0) for p in processes[1:ranks]]
    else:
        gpus = [GpuUse(p.gpus[0], cap, [p.name], p.total, 0) for p in processes[:ranks]]
        if own:
            util = cfg.rollout.gpu_memory_utilization
            budget = int(util * cap)
            for n in range(replicas):
                first = ranks + n * per
                figures, least, _, per_sequence = replica_figures(shape, cfg, per, budget, context)
                kv_sequences = figures["kv_cache"] / per_sequence
                name = f"rollout replica {n}"
                processes.append(ProcessPlan(name, list(range(first, first + per)), figures))
                gpus += [GpuUse(g, cap, [name], budget, 0) for g in range(first, first + per)]
                if budget < least:
                    problems.append(
                        f"{name}: vLLM's share ({util} of {gib(cap)}, rollout.gpu_memory_utilization) is below "
                        f"the {gib(least)} it needs (weights, runtime, one {context}-token "
                        "sequence of KV cache)"
                    )
    for gpu in gpus:
        if not gpu.fits and not any(f"GPU {gpu.index}" in p for p in problems):
            problems.append(
                f"GPU {gpu.index} ({', '.join(gpu.processes)}) needs {gib(gpu.used + gpu.headroom)} of {gib(cap)}"
            )
    if 0 < kv_sequences < cfg.rollout.max_num_seqs:
        notes.append(
            f"vLLM's KV cache holds {kv_sequences:.0f} full-length sequences at once (rollout.max_num_seqs: "
            f"{cfg.rollout.max_num_seqs}); shorter ones share it"
        )
    if not shape.exact:
        notes.append(f"model_type {shape.model_type!r}: parameters counted as for Llama/Qwen (approximate)")
    unknown = (
        shape.unknown_lora_targets(list(cfg.train.lora.target_modules)) if cfg.train.lora.enabled else []
    )
    if unknown:
        notes.append(f"train.lora.target_modules {unknown} match no linear layer the plan knows")
    return MemoryPlan(
        shape, box, shape.params(), trainable, processes, gpus, shared, util, trainer_fraction, kv_sequences,
        problems, context, notes,
    )  # fmt: skip


CANDIDATE_FIXES: tuple[tuple[str, ...], ...] = (
    ("rollout.sleep_mode=true",),
    ("train.gradient_checkpointing=true",),
    ("train.offload_optimizer=true",),
    ("train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true"),
    (f"train.lora.rank={LORA_SUGGESTED_RANK}",),
    (f"train.lora.rank={LORA_SUGGESTED_RANK}", "rollout.sleep_mode=true"),
    (f"train.lora.rank={LORA_SUGGESTED_RANK}", "train.offload_optimizer=true"),
    (f"train.lora.rank={LORA_SUGGESTED_RANK}", "train.zero_stage=3", "train.offload_params=true"),
    (f"train.lora.rank={LORA_SUGGESTED_RANK}", "train.zero_stage=3", "train.offload_params=true", "rollout.sleep_mode=true"),
    ("train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true", "rollout.sleep_mode=true"),
)  # fmt: skip
"""Settings tried, in order, when a plan does not fit; each is planned again and kept only if it fits."""


def _apply(cfg: RunConfig, items: tuple[str, ...]) -> RunConfig | None:
    """`cfg` with `items` (KEY=VALUE) set; None when they change nothing or give an invalid config."""
    data = cfg.model_dump()
    for item in items:
        key, value = item.split("=", 1)
        *path, last = key.split(".")
        node = data
        for part in path:
            node = node[part]
        parsed: object = {"true": True, "false": False}.get(value, value)
        if isinstance(parsed, str) and parsed.isdigit():
            parsed = int(parsed)
        if node.get(last) == parsed:
            return None
        node[last] = parsed
    try:
        return RunConfig.model_validate(data)
    except ValueError:
        return None


def with_fixes(
    plan: MemoryPlan, cfg: RunConfig, replicas: int = 1, prompt_tokens: int | None = None
) -> MemoryPlan:
    """`plan`, with the settings that would make it fit in `plan.fixes` when it does not: a smaller
    micro-batch alone, then each candidate of `CANDIDATE_FIXES` at the largest micro-batch (halving) that
    fits with it; at most five, the fewest settings first."""
    if plan.fits:
        return plan
    found: list[tuple[str, ...]] = []
    for items in ((), *CANDIDATE_FIXES):
        if not plan.shared and "rollout.sleep_mode=true" in items:
            continue
        size = cfg.train.micro_batch_size
        while size >= 1:
            extra = (f"train.micro_batch_size={size}",) if size < cfg.train.micro_batch_size else ()
            fixed = _apply(cfg, items + extra) if items + extra else None
            if fixed is not None and plan_memory(plan.shape, fixed, plan.box, replicas, prompt_tokens).fits:
                found.append(items + extra)
                break
            size //= 2
    found.sort(key=len)
    plan.fixes = [" ".join(f"--set {i}" for i in items) for items in found[:5]]
    return plan


def gib(n: float) -> str:
    """Bytes as GiB with one decimal, as the plan prints them."""
    return f"{n / GiB:.1f} GiB"
