"""Wire schemas of the rollout service (`/v1/generate`, `/v1/rollouts`, `/v1/weights`), shared by the
service and its clients (the trainer, `rpo cache init`, `rpo eval`).

Alignment of per-token arrays: in a `RolloutSample`, `response_ids = prefix_ids + suffix_ids`, where the
first `prefix_len` ids came from the experience cache and the rest were decoded now; `suffix_logprobs[i]`
is the sampling log-probability of `response_ids[prefix_len + i]` (after temperature: the distribution
actually sampled from). Cached prefixes have no logprobs. Every payload carries the policy version that
produced it, so a batch never mixes versions silently.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


TokenIds = list[int]


class GenerateRequest(_Wire):
    """Plain sampling: token-id prompts in, n samples per prompt out."""

    prompts: list[TokenIds] = Field(min_length=1)
    n: int = Field(1, ge=1, le=1024)
    max_tokens: int | list[int] = Field(64)
    """One cap for all prompts, or one per prompt (same length as `prompts`)."""
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    min_policy_version: int = Field(0, ge=0)
    """Refuse (409) if the replica serves an older policy than this."""


class Sample(_Wire):
    token_ids: TokenIds
    logprobs: list[float]
    """Log-probability of each sampled token, aligned with token_ids."""
    finish_reason: str
    """`stop` (EOS or stop token, included in token_ids) or `length`."""


class GenerateResponse(_Wire):
    policy_version: int
    results: list[list[Sample]]
    """results[i] holds the n samples of prompts[i]."""


class RolloutQuestion(_Wire):
    id: str = Field(min_length=1, max_length=512)
    prompt_ids: TokenIds = Field(min_length=1)
    reference: str
    """Reference answer the reward function checks against."""


class RolloutRequest(_Wire):
    """One batch of group rollouts: for each question, G responses (RPO: cached prefix + new suffix)."""

    run_id: str = Field("default", min_length=1, max_length=128)
    questions: list[RolloutQuestion] = Field(min_length=1)
    mode: Literal["rpo", "full"] = "rpo"
    group_size: int = Field(6, ge=1, le=256)
    truncation_limit: int | Literal["0.5l", "l"] = 300
    suffix_budget: int | Literal["m"] = "m"
    max_response_tokens: int = Field(4096, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    """Makes the truncation draw (and vLLM sampling) reproducible."""
    reward: str = "auto"
    """Reward function spec (services.rewards.resolve_reward); resolved on the replica."""
    dataset: str = ""
    """Dataset spec, only to resolve reward `auto`."""
    alpha: float = Field(0.01, ge=0.0)
    shaping_low: float = Field(0.5, ge=0.0)
    shaping_high: float = Field(1.0, ge=0.0)
    overlong_buffer_tokens: int = Field(0, ge=0)
    """DAPO soft overlong punishment (0: off), added to the shaped reward."""
    seed_cache_on_miss: bool = True
    """A cache miss falls back to one full sample that seeds the entry (PAPER.md step 1)."""
    min_policy_version: int = Field(0, ge=0)


class RolloutSample(_Wire):
    response_ids: TokenIds
    """Cached prefix followed by the decoded suffix (the EOS token, when produced, is the last id)."""
    prefix_len: int = Field(ge=0)
    suffix_logprobs: list[float]
    """Sampling log-probs of response_ids[prefix_len:], one per decoded token."""
    finish_reason: str
    raw_reward: float
    """The reward function's score of the whole response (prefix + suffix)."""
    shaped_reward: float
    """After length-aware shaping within the group (and the overlong penalty, if on)."""
    correct: bool
    """raw_reward >= 1.0 (binary verifiable correctness)."""


class RolloutGroup(_Wire):
    question_id: str
    cache_hit: bool
    """False in full mode, and on a miss (then the group is full-path samples)."""
    m: int = Field(ge=0)
    """Tokens cut from the cached answer (0 on a miss or in full mode)."""
    prefix_len: int = Field(ge=0)
    samples: list[RolloutSample]


class RolloutStats(_Wire):
    generated_tokens: int
    """Tokens decoded by the engine for this batch."""
    reused_prefix_tokens: int
    """Response tokens taken from the cache instead of decoded, summed over all G samples."""
    generation_seconds: float
    reward_seconds: float
    cache_seconds: float


class RolloutResponse(_Wire):
    policy_version: int
    replica: str
    """The replica's id (host:port or a configured name), for logs and errors."""
    groups: list[RolloutGroup]
    stats: RolloutStats


class WeightVersion(_Wire):
    """What a replica serves: `GET /v1/weights/version`."""

    policy_version: int
    replica: str
    updating: bool = False
