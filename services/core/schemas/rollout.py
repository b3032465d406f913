"""Wire schemas of the rollout service (`/v1/generate`, `/v1/rollouts`, `/v1/weights`), shared by the
service and its clients (the trainer, `rpo cache init`, `rpo eval`).

Alignment of per-token arrays: in a `RolloutSample`, `response_ids = prefix_ids + suffix_ids`, where the
first `prefix_len` ids came from the experience cache and the rest were decoded now; `suffix_logprobs[i]`
is the sampling log-probability of `response_ids[prefix_len + i]` (after temperature: the distribution
actually sampled from). Cached prefixes have no logprobs. Every payload carries the policy version that
produced it, so a batch never mixes versions silently.

Token ids here are plain lists of ints in both encodings (JSON, and msgpack when the client asks for it).
Bounds that depend on the served model (vocabulary, context length) are checked by the replica and reported
as 422 naming the field, like the bounds below. Importable without torch or vLLM.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from services.core.schemas.common import MAX_INT64, TruncationLimit, Version, Wire

TokenIds = list[Annotated[int, Field(ge=0)]]
MaxTokens = Annotated[int, Field(ge=1)]

WEIGHTS_MEDIA_TYPE = "application/octet-stream"
"""Content-Type of a weight push: one safetensors file as the body."""
CHECKSUM_HEADER = "X-Content-XXH3-128"
"""Header of a weight push: hex XXH3-128 (32 digits) of the whole body, checked before anything changes; a
checksum against corruption and mix-ups (the bearer token is what keeps strangers out), fast enough to cost a
few percent of the transfer."""


class GenerateRequest(Wire):
    """Plain sampling: token-id prompts in, n samples per prompt out."""

    prompts: list[TokenIds] = Field(min_length=1)
    n: int = Field(1, ge=1, le=1024)
    """Samples per prompt."""
    max_tokens: MaxTokens | list[MaxTokens] = 64
    """One cap on new tokens for all prompts, or one per prompt (same length as `prompts`); prompt plus
    max_tokens must fit the replica's context (`model.max_model_len`)."""
    temperature: float = Field(1.0, ge=0.0)
    """0 is greedy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    """Makes sampling reproducible: prompt i is sampled with seed + i (and its n samples with + j)."""
    min_policy_version: Version = 0
    """Refuse (409) if the replica serves an older policy than this."""


class Sample(Wire):
    token_ids: TokenIds
    logprobs: list[float]
    """Log-probability of each sampled token, aligned with token_ids."""
    finish_reason: str
    """`stop` (EOS or stop token, included in token_ids) or `length`."""


class GenerateResponse(Wire):
    policy_version: int
    results: list[list[Sample]]
    """results[i] holds the n samples of prompts[i]."""


JsonValue = Any
"""A dataset column's value as JSON carries it (text, number, bool, null, list, object)."""


class RolloutQuestion(Wire):
    id: str = Field(min_length=1, max_length=512)
    prompt_ids: TokenIds = Field(min_length=1)
    reference: str
    """Reference answer the reward function checks against."""
    prompt: str | list[dict[str, str]] | None = None
    """The prompt as the dataset holds it (the question's text, or a conversation's turns), for reward
    functions that take `prompts`; None: the reward functions get the prompt decoded from `prompt_ids`."""
    columns: dict[str, JsonValue] = Field(default_factory=dict)
    """The row's other fields, each passed by name to batch (TRL-style) reward functions."""


class RewardTerm(Wire):
    """One reward function of a weighted sum (`reward.functions` in the config)."""

    function: str = Field(min_length=1)
    """`math`, `exact`, `format`, `auto` or `package.module:function` (docs/training.md, "Rewards")."""
    weight: float = Field(1.0, allow_inf_nan=False)
    """Its weight in the sum that is the response's reward."""
    name: str | None = Field(None, min_length=1, max_length=128)
    """Its name in the metrics (`reward_functions/<name>`); default: the function's own name."""

    def label(self) -> str:
        """The name the metrics use."""
        return self.name or self.function.rsplit(":", 1)[-1]


def check_distinct_names(terms: list[RewardTerm]) -> list[RewardTerm]:
    """The terms, if no two share a name (their scores are reported by name)."""
    labels = [term.label() for term in terms]
    for label in labels:
        if labels.count(label) > 1:
            raise ValueError(f"two reward functions are named {label!r}; give each a distinct `name`")
    return terms


def check_correctness(
    correctness: str | None, single: str | None, terms: list[RewardTerm] | None
) -> str | None:
    """`correctness`, if it names one of the functions (`terms`, or the single one)."""
    if correctness is None or single is None or terms is None:  # None: those fields failed on their own
        return correctness
    labels = [term.label() for term in terms] or [single]
    if correctness not in labels:
        raise ValueError(f"{correctness!r} is not one of the reward functions: {', '.join(labels)}")
    return correctness


def weighted_terms(single: str, terms: list[RewardTerm]) -> list[RewardTerm]:
    """`terms`, or the single function alone with weight 1 (its score is then the reward, unchanged)."""
    return list(terms) or [RewardTerm(function=single, name=single)]


def correctness_index(terms: list[RewardTerm], correctness: str | None) -> int:
    """Position in `terms` of the function whose score >= 1 makes a response correct (default: the first)."""
    labels = [term.label() for term in terms]
    return labels.index(correctness) if correctness in labels else 0


class RolloutSettings(Wire):
    """How a batch of group rollouts is made, everything but the questions: what a client sets once per
    purpose (training, cache initialisation, evaluation; `services.core.clients.replica_set.RolloutPlans`)."""

    run_id: str = Field("default", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]{1,128}$")
    """The cache namespace of the run."""
    mode: Literal["rpo", "full"] = "rpo"
    """`rpo`: cached prefix + new suffixes; `full`: full-path samples, the cache is not touched."""
    group_size: int = Field(6, ge=1, le=256)
    truncation_limit: TruncationLimit = 300
    suffix_budget: Annotated[int, Field(ge=1)] | Literal["m"] = "m"
    max_response_tokens: int = Field(4096, ge=1)
    """Cap on a whole response (prefix + suffix), tokens; prompt plus this is also capped by the context."""
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    """Keep the k most likely tokens when sampling (vLLM's `top_k`); 0: all."""
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    """Drop tokens less likely than min_p times the most likely one (vLLM's `min_p`); 0: none."""
    repetition_penalty: float = Field(1.0, gt=0.0)
    """vLLM's `repetition_penalty` over the prompt and the response so far; 1: none."""
    seed: int | None = None
    """Makes the truncation draw (and vLLM sampling) reproducible: a question's draws and samples depend
    only on (seed, question id), not on how the batch was split over replicas."""
    reward: str = "auto"
    """Reward function spec (services.core.rewards.resolve_reward); resolved on the replica. Used when
    `rewards` is empty."""
    rewards: list[RewardTerm] = Field(default_factory=list, max_length=32)
    """Several reward functions: a response's reward is their weighted sum (a function's None counts 0)."""
    correctness: str | None = None
    """Name of the term of `rewards` whose score >= 1 makes a response correct (default: the first)."""
    dataset: str = ""
    """Dataset spec, only to resolve reward `auto`."""
    alpha: float = Field(0.01, ge=0.0)
    shaping_low: float = Field(0.5, ge=0.0)
    shaping_high: float = Field(1.0, ge=0.0)
    length_shaping: bool = True
    """Length-aware shaping of correct responses (docs/algorithm.md, step 3); False: rewards as written."""
    overlong_buffer_tokens: int = Field(0, ge=0)
    """DAPO soft overlong punishment (0: off), added to the shaped reward."""
    seed_cache_on_miss: bool = True
    """A cache miss falls back to one full sample that seeds the entry (docs/algorithm.md, step 1)."""

    @field_validator("rewards")
    @classmethod
    def _distinct_names(cls, rewards: list[RewardTerm]) -> list[RewardTerm]:
        return check_distinct_names(rewards)

    @field_validator("correctness")
    @classmethod
    def _names_a_function(cls, correctness: str | None, info: ValidationInfo) -> str | None:
        return check_correctness(correctness, info.data.get("reward"), info.data.get("rewards"))

    @field_validator("shaping_high")
    @classmethod
    def _bounds_in_order(cls, high: float, info: ValidationInfo) -> float:
        low = info.data.get("shaping_low")
        if low is not None and low > high:
            raise ValueError(f"must be >= shaping_low ({low})")
        return high

    def reward_terms(self) -> list[RewardTerm]:
        """The weighted functions to score with."""
        return weighted_terms(self.reward, self.rewards)

    def correctness_index(self) -> int:
        return correctness_index(self.reward_terms(), self.correctness)


class RolloutRequest(RolloutSettings):
    """One batch of group rollouts: for each question, G responses (RPO: cached prefix + new suffix)."""

    questions: list[RolloutQuestion] = Field(min_length=1)
    min_policy_version: Version = 0
    """Refuse (409) if the replica serves an older policy than this."""

    @field_validator("questions")
    @classmethod
    def _unique_ids(cls, questions: list[RolloutQuestion]) -> list[RolloutQuestion]:
        seen: set[str] = set()
        for q in questions:
            if q.id in seen:
                raise ValueError(f"question id {q.id!r} appears twice in one batch")
            seen.add(q.id)
        return questions


class RolloutSample(Wire):
    response_ids: TokenIds
    """Cached prefix followed by the decoded suffix (the EOS token, when produced, is the last id)."""
    prefix_len: int = Field(ge=0)
    suffix_logprobs: list[float]
    """Sampling log-probs of response_ids[prefix_len:], one per decoded token."""
    finish_reason: str
    raw_reward: float
    """The reward of the whole response (prefix + suffix): the weighted sum of the reward functions' scores."""
    shaped_reward: float
    """What the advantage reads: `raw_reward`, with a correct response's correctness contribution scaled by
    length within the group when `length_shaping` is on (docs/algorithm.md), plus the overlong penalty, if
    on."""
    correct: bool
    """The correctness function's score >= 1.0 (binary verifiable correctness)."""
    reward_scores: dict[str, float | None] = Field(default_factory=dict)
    """Each reward function's own score, by name (None: the function said it does not apply)."""


class RolloutGroup(Wire):
    question_id: str
    cache_hit: bool
    """False in full mode, and on a miss (then the group is full-path samples)."""
    m: int = Field(ge=0)
    """Tokens cut from the cached answer (0 on a miss or in full mode)."""
    prefix_len: int = Field(ge=0)
    samples: list[RolloutSample]
    seeded_cache: bool = False
    """True when this group's miss seeded the cache entry (its first non-empty sample, without EOS)."""


class RolloutStats(Wire):
    generated_tokens: int
    """Tokens decoded by the engine for this batch."""
    reused_prefix_tokens: int
    """Response tokens taken from the cache instead of decoded, summed over all G samples."""
    generation_seconds: float
    reward_seconds: float
    cache_seconds: float


class RolloutResponse(Wire):
    policy_version: int
    replica: str
    """The replica's id (host:port or a configured name), for logs and errors."""
    groups: list[RolloutGroup]
    stats: RolloutStats


# ---------------------------------------------------------------------------------------------------------
# Weights


class WeightVersion(Wire):
    """What a replica serves: `GET /v1/weights/version`."""

    policy_version: int
    replica: str
    updating: bool = False
    """A weight update is being received or applied."""
    dtype: str | None = None
    """Dtype of the served weights in safetensors notation (F32, BF16, F16): what a push must send."""
    weight_transfer: Literal["http", "nccl"] = "http"
    """Data planes the replica accepts besides HTTP (`nccl`: vLLM's NCCL engine is configured)."""
    weight_port: int | None = None
    """Port of the replica's weight data plane: HTTP pushes go to `PUT http://<replica host>:<weight_port>
    /v1/weights/{version}` (`rollout.weight_port`; None while the replica starts)."""


class WeightPushResponse(Wire):
    """Reply to a weight push (`PUT /v1/weights/{version}` on the weight port) once the new weights serve."""

    policy_version: int
    replica: str
    tensors: int
    """Tensors received and loaded."""
    bytes: int
    """Body bytes received."""
    receive_seconds: float
    """Reading, hashing and spooling the body (generation goes on meanwhile)."""
    apply_seconds: float
    """Waiting for in-flight generation, loading the weights and resetting the prefix cache."""


class NcclInitRequest(Wire):
    """`POST /v1/weights/nccl/init`: join the trainer's NCCL group (vLLM `init_weight_transfer_engine`)."""

    init_info: dict[str, Any]
    """vLLM's NCCL init info: master_address, master_port, rank_offset, world_size, packed, ..."""


class NcclStartRequest(Wire):
    """`POST /v1/weights/nccl/start`: hold generation and open an update that will serve as `version`."""

    version: Annotated[int, Field(ge=1, le=MAX_INT64)]


class NcclUpdateRequest(Wire):
    """`POST /v1/weights/nccl/update`: receive one broadcast (names, dtype_names, shapes of the tensors)."""

    version: Annotated[int, Field(ge=1, le=MAX_INT64)]
    update_info: dict[str, Any] | list[dict[str, Any]]
    """vLLM's update info (names, dtype_names, shapes), or one per worker rank."""


class NcclFinishRequest(Wire):
    """`POST /v1/weights/nccl/finish`: close the update, reset the prefix cache, serve `version`."""

    version: Annotated[int, Field(ge=1, le=MAX_INT64)]


# ---------------------------------------------------------------------------------------------------------
# Engine sleep (rollout.sleep_mode: vLLM's sleep mode, on GPU)


class SleepRequest(Wire):
    """`POST /v1/engine/sleep`: free the engine's GPU memory while the learner steps."""

    level: Literal[1, 2] = 1
    """vLLM's sleep level. 1: the weights go to host memory and come back on wake, the KV cache is dropped;
    2: the weights are dropped too (only when every weight is pushed after wake, never with LoRA)."""


class EngineState(Wire):
    """`POST /v1/engine/sleep` and `/v1/engine/wake`: the engine's state once the call is done."""

    replica: str
    sleeping: bool
    level: int = Field(ge=0, le=2)
    """The level it sleeps at; 0 when awake."""
    seconds: float = Field(ge=0.0)
    """How long this call took (0 when the engine was already in the state asked for)."""
