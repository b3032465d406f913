"""A training step's rollouts, gathered over its rounds (DAPO refills): every group, for the cache's
update; the groups it trains on; what producing them cost; and the step's record built from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.core.clients.replica_set import RolloutBatch, RolloutFailed
from services.core.schemas.rollout import RolloutGroup
from trainer.telemetry.records import StepRecord


@dataclass
class CollectedGroups:
    """A step's rollouts over all its rounds: every group (for the cache) and the ones it trains on."""

    all_groups: list[RolloutGroup] = field(default_factory=list)
    train_groups: list[RolloutGroup] = field(default_factory=list)
    all_versions: list[int] = field(default_factory=list)
    """The policy version that produced each of `all_groups` (each sample carries its group's)."""
    train_versions: list[int] = field(default_factory=list)
    """The same for `train_groups`."""
    policy_versions: set[int] = field(default_factory=set)
    generated_tokens: int = 0
    reused_prefix_tokens: int = 0
    rollout_seconds: float = 0.0
    reward_seconds: float = 0.0
    retries: int = 0
    rounds: int = 0
    samples: list = field(default_factory=list)
    """The learner's samples built from `train_groups` (trainer.learner.batch.build_samples)."""
    epoch: int = 0
    """The data cursor's epoch once the step's questions were taken."""
    lag: int = 0
    """Versions between the learner and the oldest training group when the step trained on them."""

    @property
    def policy_version(self) -> int:
        """The one version every group of the step was produced by (synchronous steps)."""
        if len(self.policy_versions) != 1:
            raise RolloutFailed(f"a step's rollouts came from policy versions {sorted(self.policy_versions)}")
        return next(iter(self.policy_versions))

    def lags(self, learner_version: int) -> list[int]:
        """How many versions each training group is behind `learner_version` (0: on-policy)."""
        return [learner_version - v for v in self.train_versions]

    def add(self, batch: RolloutBatch, keep: Callable[[RolloutGroup], bool] | None, limit: int) -> None:
        self.rounds += 1
        self.all_groups.extend(batch.groups)
        versions = batch.versions()
        self.all_versions.extend(versions)
        for group, version in zip(batch.groups, versions, strict=True):
            if len(self.train_groups) < limit and (keep is None or keep(group)):
                self.train_groups.append(group)
                self.train_versions.append(version)
        self.policy_versions.update(versions)
        self.generated_tokens += batch.generated_tokens
        self.reused_prefix_tokens += batch.reused_prefix_tokens
        self.rollout_seconds += batch.rollout_seconds
        self.reward_seconds += batch.reward_seconds
        self.retries += batch.retries

    def record(self, step: int, policy_version: int, epoch: int) -> StepRecord:
        """The step's record, without the loop's timings (set by the loop)."""
        samples = [s for g in self.all_groups for s in g.samples]
        n = max(1, len(samples))
        return StepRecord(
            step=step,
            policy_version=policy_version,
            epoch=epoch,
            questions=len(self.all_groups),
            trained_groups=len(self.train_groups),
            samples=len(samples),
            rounds=self.rounds,
            reward_mean=sum(s.shaped_reward for s in samples) / n,
            reward_functions=reward_function_means(samples),
            **reward_spread(self.all_groups),
            **length_room(self.all_groups),
            accuracy=sum(1 for s in samples if s.correct) / n,
            response_len_mean=sum(len(s.response_ids) for s in samples) / n,
            cache_hit_rate=sum(1 for g in self.all_groups if g.cache_hit) / max(1, len(self.all_groups)),
            generated_tokens=self.generated_tokens,
            reused_prefix_tokens=self.reused_prefix_tokens,
            decoded_tokens_per_sample=self.generated_tokens / n,
            tokens_per_second=self.generated_tokens / max(1e-9, self.rollout_seconds),
            rollout_retries=self.retries,
        )


def reward_function_means(samples: Sequence[Any]) -> dict[str, float]:
    """Each reward function's mean score over the samples it scored (a None score is left out)."""
    scored: dict[str, list[float]] = {}
    for sample in samples:
        for name, score in sample.reward_scores.items():
            if score is not None:
                scored.setdefault(name, []).append(score)
    return {name: sum(values) / len(values) for name, values in scored.items()}


def _std(values: Sequence[float], ddof: int = 0) -> float:
    n = len(values)
    if n <= ddof:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - ddof))


def reward_spread(groups: Sequence[RolloutGroup]) -> dict[str, Any]:
    """The step record's reward and length spread: raw (as written) and shaped rewards apart, each function's
    std, TRL's `reward_std` (mean of the groups' sample std) and share of zero-std groups, response lengths."""
    samples = [s for g in groups for s in g.samples]
    if not samples:
        return {}
    raw = [s.raw_reward for s in samples]
    scored: dict[str, list[float]] = {}
    for sample in samples:
        for name, score in sample.reward_scores.items():
            if score is not None:
                scored.setdefault(name, []).append(score)
    group_stds = [_std([s.shaped_reward for s in g.samples], ddof=1) for g in groups]
    lengths = [len(s.response_ids) for s in samples]
    return {
        "raw_reward_mean": sum(raw) / len(raw),
        "raw_reward_std": _std(raw),
        "reward_functions_std": {name: _std(values) for name, values in scored.items()},
        "reward_std": sum(group_stds) / len(group_stds),
        "zero_std_groups_ratio": sum(1 for g in groups if _all_equal(g)) / len(groups),
        "response_len_min": min(lengths),
        "response_len_max": max(lengths),
        "truncated_ratio": sum(1 for s in samples if s.finish_reason == "length") / len(samples),
    }


def length_room(groups: Sequence[RolloutGroup]) -> dict[str, Any]:
    """How much room the step gave the length-aware reward (docs/algorithm.md, step 3): all-correct groups,
    and among groups with two or more correct responses, how often and by how much their lengths differ.

    The shaping lifts a correct response above its floor (0.5) exactly when it is shorter than its group's
    mean length and alpha > 0 (sigmoid(alpha * (l_ref - len)) > 0.5), so the count of such responses is what
    it acted on."""
    if not groups:
        return {}
    spreads = []
    below_mean = 0
    for group in groups:
        lengths = [len(s.response_ids) for s in group.samples]
        mean = sum(lengths) / len(lengths)
        correct = [n for n, s in zip(lengths, group.samples, strict=True) if s.correct]
        below_mean += sum(1 for n in correct if n < mean)
        if len(correct) >= 2:
            spreads.append(max(correct) - min(correct))
    return {
        "all_correct_groups_ratio": sum(1 for g in groups if all(s.correct for s in g.samples)) / len(groups),
        "correct_length_groups": len(spreads),
        "correct_length_varied_ratio": sum(1 for d in spreads if d > 0) / len(spreads) if spreads else 0.0,
        "correct_length_spread": sum(spreads) / len(spreads) if spreads else 0.0,
        "correct_below_group_mean": below_mean,
    }


def _all_equal(group: RolloutGroup) -> bool:
    rewards = [s.shaped_reward for s in group.samples]
    return max(rewards) - min(rewards) <= 1e-9
