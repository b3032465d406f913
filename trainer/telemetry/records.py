"""The typed record of one training step: what the log line, the progress bar, `metrics.jsonl`, the
Prometheus metrics, `rpo run`'s summary and the benchmarks all read. Rank 0 builds one per step from the
step's rollouts (`CollectedGroups.record`) and the loop's timings; on disk it is one JSON object per line
(`kind: step`), and `StepRecord.from_json` reads it back (keys it does not know, from a newer writer, are
ignored)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trainer.weights.transport import Transport


@dataclass(frozen=True)
class LearnerStats:
    """What one learner step reports (`Learner.train_step`), aggregated over ranks."""

    loss: float
    """The whole-batch objective, mean over the batch's updates."""
    kl: float
    """Mean over loss tokens (GRPO's k3 estimate against the reference; 0 without one)."""
    clip_fraction: float
    """Share of loss tokens whose ratio was clipped."""
    entropy: float
    """Mean entropy (nats) of the policy's next-token distribution over the loss tokens, first update."""
    grad_norm: float
    """Before clipping, of the last update."""
    lr: float
    tokens: int
    """Loss tokens of the batch."""
    sequences: int
    micro_batches: int
    """Per rank."""
    model_tokens: int
    """Tokens fed through the model (a shared prefix counted once), summed over ranks."""
    seconds: float
    policy_version: int
    """The learner's version after the step."""
    is_weight_mean: float | None = None
    """Mean truncated importance weight over the lagged samples' decoded tokens (None: none were lagged)."""
    is_truncated: float | None = None
    """Share of those tokens whose weight hit `algorithm.tis_cap`."""
    lagged_tokens: int = 0
    """Decoded tokens of samples from an older policy, which the weights cover."""

    def as_dict(self) -> dict[str, float]:
        """The numbers (a figure that does not apply, None, left out): the record's `learner` on disk."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearnerStats | None:
        """Read back from `as_dict` (None for a step without a learner update, written as {}). Keys a newer
        writer added are ignored; a figure an older writer did not record (the entropy, say) reads as 0."""
        if not data:
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = {n: 0 for n, f in fields.items() if f.default is dataclasses.MISSING}
        return cls(**{**required, **{k: v for k, v in data.items() if k in fields}})


@dataclass
class StepRecord:
    step: int
    policy_version: int
    """The version the step's update produced (what the replicas serve after the push)."""
    epoch: int
    questions: int
    """Questions rolled out (DAPO's refill rounds included)."""
    trained_groups: int
    samples: int
    rounds: int
    reward_mean: float
    """Mean shaped reward of every sample (what the advantages read; `raw_reward_mean` is before shaping)."""
    accuracy: float
    response_len_mean: float
    """Mean response length in tokens, the reused prefix included."""
    cache_hit_rate: float
    generated_tokens: int
    """Tokens the replicas decoded for this step."""
    reused_prefix_tokens: int
    """Response tokens taken from the cache instead of decoded."""
    decoded_tokens_per_sample: float
    tokens_per_second: float
    rollout_retries: int
    lag: int = 0
    """Policy versions between the learner and the step's rollouts (0: synchronous; `train.max_lag`)."""
    step_seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    """Wall time per phase: rollout, reward (inside rollout), train, weight_sync, cache."""
    weight_sync_seconds: float | None = None
    """None when the step had nothing to train on (no push)."""
    weight_transport: Transport | None = None
    """What carried the step's push: "nccl", "http", or "http_fallback" (NCCL configured and failed, the cause
    in the log); None when there was no push."""
    cache_updates: dict[str, int] = field(default_factory=dict)
    """Cache entries replaced, per epsilon-greedy choice."""
    reward_functions: dict[str, float] = field(default_factory=dict)
    """Mean score of each reward function (`reward.functions`), by name, over the samples it scored."""
    reward_functions_std: dict[str, float] = field(default_factory=dict)
    """Standard deviation (population) of each reward function's scores over the samples it scored."""
    raw_reward_mean: float = 0.0
    """Mean reward as written (the weighted sum of the functions' scores), before shaping and penalties."""
    raw_reward_std: float = 0.0
    """Its standard deviation (population) over every sample."""
    reward_std: float = 0.0
    """Mean over groups of the standard deviation (sample) of a group's shaped rewards (TRL's `reward_std`)."""
    zero_std_groups_ratio: float = 0.0
    """Share of groups whose shaped rewards are all equal: they give zero advantages (TRL's
    `frac_reward_zero_std`)."""
    response_len_min: int = 0
    response_len_max: int = 0
    truncated_ratio: float = 0.0
    """Share of responses cut at their token budget, max_response_tokens or RPO's suffix budget (finish
    `length`)."""
    all_correct_groups_ratio: float = 0.0
    """Share of groups whose every response is correct."""
    correct_length_groups: int = 0
    """Groups with two or more correct responses: what the next two fields are over."""
    correct_length_varied_ratio: float = 0.0
    """Share of those groups whose correct responses differ in length (room for the length-aware reward)."""
    correct_length_spread: float = 0.0
    """Mean over those groups of the longest minus the shortest correct response, in tokens."""
    correct_below_group_mean: int = 0
    """Correct responses shorter than their group's mean length: the ones the length-aware reward lifts above
    its floor (0.5) when alpha > 0."""
    learner: LearnerStats | None = None
    """The learner's statistics (loss, KL, clip fraction, grad norm, tokens, ...); None when the step had no
    sample to learn from. On disk: `LearnerStats.as_dict()`, {} for None."""

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["learner"] = self.learner.as_dict() if self.learner is not None else {}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["learner"] = LearnerStats.from_dict(values.get("learner") or {})
        return cls(**values)
