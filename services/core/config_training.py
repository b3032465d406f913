"""The sections of a run's configuration that say how it trains: the algorithm, sampling, LoRA and the
trainer. Every field's docstring is its documentation (`docs/configuration.md` is rendered from them).
Validators check; they never rewrite a value. Importable without torch or vLLM.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    field_validator,
    model_validator,
)

from services.core.config_base import ConfigSection, wire_default
from services.core.schemas.common import TruncationLimit


class AlgorithmSection(ConfigSection):
    """RPO and its base algorithm (docs/algorithm.md, steps 2-6)."""

    algorithm: Literal["grpo", "dapo"] = "grpo"
    """Base algorithm whose objective RPO keeps unchanged."""
    mode: Literal["rpo", "full"] = wire_default("mode")
    """`rpo`: decode suffixes of cached answers; `full`: full-path rollouts, the baseline."""
    group_size: int = Field(wire_default("group_size"), ge=2)
    """G, responses per question (at least 2: advantages are relative to the group's mean). Paper: 6."""
    truncation_limit: TruncationLimit = wire_default("truncation_limit")
    """L: max tokens cut from a cached answer, m ~ U{0..L}. Paper: 300, 500, 800, 0.5l or l."""
    suffix_budget: int | Literal["m"] = wire_default("suffix_budget")
    """Max new tokens per suffix: `m` (release code, paper-faithful) or a fixed cap."""
    max_response_tokens: int = Field(wire_default("max_response_tokens"), ge=1)
    """Max response length (prefix + suffix) in tokens. Paper: 4096."""
    alpha: float = Field(wire_default("alpha"), ge=0.0)
    """Length-aware shaping steepness; 0 turns shaping off (correct responses then get 0.5). Paper: 0.01."""
    shaping_low: float = Field(wire_default("shaping_low"), ge=0.0)
    """Lower clip of the shaped reward of a correct response. Paper: 0.5."""
    shaping_high: float = Field(wire_default("shaping_high"), ge=0.0)
    """Upper clip of the shaped reward. Paper: 1.0."""
    length_shaping: bool = wire_default("length_shaping")
    """Length-aware shaping: a correct response's correctness term is scaled by its length factor in [low, high];
    others keep their reward as written (docs/algorithm.md, step 3). False: the weighted sum as TRL uses it."""
    loss_type: Literal["auto", "grpo", "dr_grpo", "bnpo", "dapo"] = "auto"
    """TRL's loss normaliser: `grpo` 1/|o_i| then mean over sequences; `dr_grpo` 1/(N x max_response_tokens);
    `bnpo` mean over a micro-batch's tokens; `dapo` mean over the batch's tokens; `auto`: the algorithm's own."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """TRL's advantage scale: (R - group mean) / (std + advantage_eps) with the group's std (`group`, the
    paper's) or the whole batch's (`batch`); `none`: R - group mean (Dr. GRPO)."""
    mask_truncated_completions: bool = False
    """TRL's: responses cut at max_response_tokens (finish `length`) add nothing to the loss (they still
    count in their group's advantages and in the normalisers' sequence count)."""
    epsilon: float = Field(0.5, ge=0.0, le=1.0)
    """Probability of storing the BEST response of a group in the cache. Release code: 0.5."""
    replace_only_correct: bool = False
    """Restrict cache replacements to correct responses (paper: replace regardless)."""
    loss_on_suffix_only: bool = False
    """Ablation: train on the new suffix only (paper: prefix + suffix)."""
    clip_eps: float = Field(0.2, gt=0.0)
    """GRPO clip range. Paper: 0.2."""
    clip_eps_low: float = Field(0.2, gt=0.0)
    """DAPO lower clip. Paper: 0.2."""
    clip_eps_high: float = Field(0.28, gt=0.0)
    """DAPO clip-higher. Paper: 0.28."""
    beta: float = Field(0.04, ge=0.0)
    """GRPO KL coefficient (k3 estimator); DAPO uses none. Release code: 0.04."""
    advantage_eps: float = Field(1e-4, gt=0.0)
    """Added to the group std in the advantage denominator. Paper: 1e-4."""
    overlong_buffer_tokens: int | None = Field(None, ge=0)
    """DAPO soft overlong punishment buffer L_cache in tokens; 0 turns the soft ramp off (a response over
    max_response_tokens still gets -1). Default (unset): on for DAPO, max_response_tokens // 8; GRPO uses none."""
    dynamic_sampling_filter: Literal["correctness", "reward"] = "correctness"
    """DAPO's dynamic sampling keeps a group when `correctness`: 0 < #correct < G (DAPO's rule); `reward`: its
    shaped rewards differ, so all-correct groups of different lengths stay (length-aware shaping's point)."""
    dynamic_sampling_max_rounds: int = Field(3, ge=1)
    """DAPO: extra rollout rounds allowed to refill a batch after filtering."""
    off_policy_correction: Literal["tis", "none"] = "tis"
    """For samples of an older policy than the learner's (`train.max_lag` > 0): `tis` weights each decoded
    token's loss by the truncated importance ratio min(pi_old / pi_behaviour, `tis_cap`), pi_old being the
    learner at the step's start (at the sampling temperature) and pi_behaviour the replica's sampling
    log-probs; `none` trains on them as if on-policy (docs/algorithm.md, "Rollouts one step ahead")."""
    tis_cap: float = Field(2.0, ge=1.0)
    """Truncation of the importance ratio (`off_policy_correction: tis`)."""

    def overlong_buffer(self) -> int:
        """The overlong punishment buffer in effect: DAPO only; unset means max_response_tokens // 8."""
        if self.algorithm != "dapo":
            return 0
        if self.overlong_buffer_tokens is None:
            return self.max_response_tokens // 8
        return self.overlong_buffer_tokens

    @field_validator("truncation_limit", mode="before")
    @classmethod
    def _limit_from_text(cls, value: Any) -> Any:
        """An environment variable is text: `RPO_ALGORITHM__TRUNCATION_LIMIT=300` means 300 tokens."""
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        return value

    @field_validator("suffix_budget")
    @classmethod
    def _positive_budget(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be >= 1 token or 'm'")
        return value

    @model_validator(mode="after")
    def _check_bounds(self) -> AlgorithmSection:
        if self.shaping_low > self.shaping_high:
            raise ValueError(
                f"shaping_low ({self.shaping_low}) must be <= shaping_high ({self.shaping_high})"
            )
        return self


class SamplingSection(ConfigSection):
    """Sampling for rollouts, cache initialisation and evaluation."""

    temperature: float = Field(wire_default("temperature"), ge=0.0)
    """Rollout temperature. Paper: 0.7."""
    top_p: float = Field(wire_default("top_p"), gt=0.0, le=1.0)
    """Rollout nucleus sampling."""
    top_k: int = Field(wire_default("top_k"), ge=0)
    """Training rollouts keep the k most likely tokens (TRL's `top_k`, vLLM's); 0: all."""
    min_p: float = Field(wire_default("min_p"), ge=0.0, le=1.0)
    """Training rollouts drop tokens below min_p x the most likely one's probability (TRL's `min_p`); 0: none."""
    repetition_penalty: float = Field(wire_default("repetition_penalty"), gt=0.0)
    """Training rollouts' repetition penalty (TRL's, vLLM's); 1: none. The learner's log-probs are the
    model's own, not penalised or truncated (docs/training.md, "TRL's options, and what they mean here")."""
    init_temperature: float = Field(0.9, ge=0.0)
    """Cache initialisation temperature. Release code: 0.9."""
    init_top_p: float = Field(0.9, gt=0.0, le=1.0)
    """Cache initialisation top_p. Release code: 0.9."""
    init_max_tokens: int = Field(2048, ge=1)
    """Cache initialisation max tokens. Release code: 2048."""
    eval_temperature: float = Field(0.6, ge=0.0)
    """Evaluation temperature. Paper: 0.6."""
    eval_top_p: float = Field(0.95, gt=0.0, le=1.0)
    """Evaluation top_p. Paper: 0.95."""
    eval_samples: int = Field(1, ge=1)
    """k for pass@k during evaluation."""
    eval_extra_temperatures: list[NonNegativeFloat] = Field(default_factory=list)
    """The evaluations before and after training run again at each of these temperatures (e.g. the training
    temperature beside the paper's 0.6), each recorded with its temperature."""


class LoraSection(ConfigSection):
    """LoRA adapters (PEFT) instead of full fine-tuning: the learner trains only the adapters, its reference is
    the base with the adapter switched off, and each step pushes only the adapter to the replicas, which
    load the base once (docs/training.md, "LoRA")."""

    rank: int = Field(0, ge=0, le=256)
    """Adapter rank r; 0: off (full fine-tuning)."""
    alpha: float = Field(16.0, gt=0.0)
    """Scaling numerator: the adapter's update is (alpha / rank) * B A."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input while training (the replicas serve without it)."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )
    """Names of the linear layers that get an adapter (the last part of each module's name)."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class TrainSection(ConfigSection):
    """The DeepSpeed learner and the training loop."""

    questions_per_step: int = Field(96, ge=1)
    """Questions per optimizer step; the batch holds questions_per_step * G responses (paper: 576 / 6)."""
    micro_batch_size: int = Field(8, ge=1)
    """Responses per forward/backward on one rank; gradient accumulation covers the rest."""
    share_prefix: bool = True
    """Feed each group's shared prompt and cached prefix to the learner's model once, its G suffixes behind
    a block attention mask; off: one row per response. Same loss and gradients either way
    (docs/training.md, "Shared layout")."""
    lr: float = Field(1e-6, gt=0.0)
    """Peak learning rate. Paper: 1e-6."""
    lr_scheduler: Literal["cosine", "constant", "linear"] = "cosine"
    """Learning-rate schedule after warm-up (`linear`: down to 0 at the last step, TRL's default). Paper: cosine."""
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """AdamW's beta1 (TRL's name)."""
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    """AdamW's beta2 (TRL's name)."""
    adam_epsilon: float = Field(1e-8, gt=0.0)
    """AdamW's epsilon (TRL's name)."""
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Fraction of the planned steps spent warming up. Paper: 0.1."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0.0)
    """Gradient clipping norm."""
    epochs: int = Field(4, ge=1)
    """Passes over the training questions. Paper: 4."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many steps (overrides epochs when smaller)."""
    updates_per_batch: int = Field(1, ge=1)
    """Optimizer updates per rollout batch (mu); 1 makes pi_old = pi_theta at the first update."""
    max_lag: int = Field(0, ge=0, le=1)
    """0: each step's rollouts are made after the previous step's weights reach the replicas (synchronous).
    1: the replicas roll out step k+1 while step k trains, on the weights they hold, one version behind
    (docs/training.md, "Rollouts one step ahead")."""
    lora: LoraSection = Field(default_factory=LoraSection)
    """LoRA adapters instead of full fine-tuning (off unless `train.lora.rank` > 0)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage. Paper: 2."""
    offload_optimizer: bool = False
    """ZeRO: keep optimizer states in CPU memory."""
    offload_params: bool = False
    """ZeRO-3: keep parameters in CPU memory."""
    precision: Literal["auto", "float32", "bf16"] = "auto"
    """`auto`: bf16 on GPU, float32 on CPU."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward to save memory. Paper: on."""
    seed: int = 0
    """Seed for data order, truncation draws, sampling and the cache updates."""
    run_dir: str = "runs/latest"
    """Where logs, metrics JSONL, checkpoints and the final model go."""
    checkpoint_every: int = Field(50, ge=1)
    """Save a checkpoint every N steps (and on Ctrl-C / SIGTERM)."""
    overwrite_cache: bool = False
    """Start over on a run id whose cache other training steps have updated (deletes it); without it such a
    start is refused (`--resume` continues the run instead)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many recent checkpoints to keep."""
    checkpoint_hf: bool = True
    """Each checkpoint also holds `hf/`, its policy as an HF model directory (readable by every user) that
    transformers loads and `rpo serve rollout --model` serves; off saves its disk (one model copy each)."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on the held-out split every N steps; 0 only before and after training."""
    eval_before: bool = True
    """Evaluate before the first step (`rpo reproduce` does it once for all arms: same starting model)."""
    log_every: int = Field(1, ge=1)
    """One log line every N steps."""
    log_completions: bool = False
    """Write a sample of each step's prompts, completions and rewards to `<run_dir>/completions.jsonl` and as a
    table to each tracker (TRL's `log_completions`)."""
    num_completions_to_log: int | None = Field(8, ge=1)
    """How many of a step's responses `log_completions` keeps (the first groups' in order); null: all."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    """Experiment trackers that get every step's figures, the evaluations and the config (trainer/telemetry/tracking.py),
    e.g. `tensorboard,mlflow`; none by default. Needs the tracking extra: `pip install "rpo-rl[tracking]"`."""
    num_processes: int = Field(1, ge=1)
    """Trainer processes `rpo run` starts: 1 is a plain process; more run under DeepSpeed's launcher (one per
    GPU on a GPU box; CPU ranks with DS_ACCELERATOR=cpu)."""
    metrics_host: str = "127.0.0.1"
    """Bind address of the trainer's Prometheus `/metrics` (rank 0)."""
    metrics_port: int | None = Field(9100, ge=0, le=65535)
    """Port of the trainer's `/metrics`; 0 picks a free port, None serves none."""
    weight_sync_timeout_seconds: float = Field(600.0, gt=0)
    """Most seconds a weight push to the replicas may take, until every one serves the new version."""
    cache_commit_timeout_seconds: float = Field(300.0, gt=0)
    """How long a step's cache commit keeps retrying (through a cache server restart, say) before the step
    fails; the commit is idempotent, so retrying never applies it twice."""
    nccl_host: str | None = None
    """rollout.weight_transfer=nccl: the address the replicas reach the trainer's NCCL rendezvous on (compose:
    `trainer`); None: this machine's host name."""
    nccl_port: int = Field(29600, ge=1, le=65535)
    """rollout.weight_transfer=nccl: the first port of the trainer's NCCL rendezvous; each set-up of the group
    (the first push, and again whenever the replicas change) takes the first free port from here on that
    the group before did not use, within 64 ports."""
    cache_init_batch_questions: int = Field(256, ge=1)
    """`rpo cache init`: questions sampled and written to the cache per batch."""
    seed_cache: bool = True
    """RPO: before step 1 of a fresh (not resumed) run, the trainer samples one answer for every training
    question the cache has none for, as `rpo cache init` does (`rpo run` seeds first, leaving it nothing to
    do). Off: a question is a miss at its first visit, decoded in full, and that sample seeds its entry."""

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> TrainSection:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"offload_params needs zero_stage 3 (got {self.zero_stage}): only ZeRO-3 partitions parameters"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError(
                "offload_optimizer needs zero_stage 1, 2 or 3: ZeRO-0 keeps no optimizer partition to offload"
            )
        return self
