"""Evaluation through the rollout service: pass@1 and pass@k of the policy a replica serves.

Used three ways: `rpo eval --model PATH --dataset FILE` (services/supervisor/eval_job.py), the periodic
held-out evaluation during training, and the before/after numbers of `rpo run`. Every question gets k = `sampling.eval_samples` full-path samples at
`sampling.eval_temperature` / `eval_top_p` (paper: 0.6 / 0.95), scored by the replica with the run's reward,
so training and evaluation judge answers the same way. pass@1 is the mean share of correct samples per
question; pass@k the unbiased estimator of Chen et al. (2021) with n = k samples, i.e. the share of
questions with at least one correct sample. Requests use a fixed seed, so two evaluations of the same
weights sample the same way.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from services.core.config import RunConfig
from services.core.schemas.rollout import RolloutSettings
from trainer.rollouts.services import RemoteServices

log = logging.getLogger("rpo.eval")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class EvalResult:
    questions: int
    k: int
    """Samples per question."""
    pass_at_1: float
    pass_at_k: float
    mean_response_tokens: float
    generated_tokens: int
    seconds: float
    policy_version: int
    correct_per_question: dict[str, list[int]] = field(default_factory=dict)
    """Question id -> [samples, correct]: what confidence intervals and paired comparisons need."""

    def describe(self) -> str:
        at_k = f", pass@{self.k} {100 * self.pass_at_k:.1f}%" if self.k > 1 else ""
        return (
            f"pass@1 {100 * self.pass_at_1:.1f}%{at_k} on "
            f"{self.questions} questions (policy v{self.policy_version}, mean response "
            f"{self.mean_response_tokens:.1f} tokens, {self.seconds:.1f} s)"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_questions(
    remote: RemoteServices,
    cfg: RunConfig,
    questions: list,
    prompts: dict[str, list[int]],
    replicas: list[str] | None = None,
    min_policy_version: int = 0,
    settings: RolloutSettings | None = None,
) -> EvalResult:
    """Sample k full responses per question through the replicas (default: all configured) and score
    them; rank 0 of the trainer, or the CLI. `settings` default to the run's evaluation settings."""
    started = time.monotonic()
    batch = remote.replica_set.rollouts(
        replicas or remote.replica_set.replicas(),
        questions,
        prompts,
        settings=settings or remote.plans.evaluation,
        min_policy_version=min_policy_version,
        phase="evaluation",
    )
    k = cfg.sampling.eval_samples
    p1, pk, lengths = [], [], []
    per_question: dict[str, list[int]] = {}
    for group in batch.groups:
        n = len(group.samples)
        c = sum(1 for s in group.samples if s.correct)
        per_question[group.question_id] = [n, c]
        p1.append(pass_at_k(n, c, 1))
        pk.append(pass_at_k(n, c, min(k, n)))
        lengths.extend(len(s.response_ids) for s in group.samples)
    return EvalResult(
        questions=len(batch.groups),
        k=k,
        pass_at_1=sum(p1) / max(1, len(p1)),
        pass_at_k=sum(pk) / max(1, len(pk)),
        mean_response_tokens=sum(lengths) / max(1, len(lengths)),
        generated_tokens=batch.generated_tokens,
        seconds=time.monotonic() - started,
        policy_version=batch.policy_version,
        correct_per_question=per_question,
    )
