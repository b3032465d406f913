"""Where the loop takes each step's rollouts from: the step's questions from the data cursor, rolled out
over the replica set, DAPO's refills included, and turned into the learner's samples.

`RolloutSource` is synchronous: a step's batch is rolled out when the loop asks for it, by the replicas
serving the learner's current version (every request carries it as `min_policy_version`), so a batch never
mixes versions.
"""

from __future__ import annotations

import functools
import logging

from services.core.config import RunConfig
from services.core.data import Question
from trainer.batch import build_samples, keep_group
from trainer.remote import RemoteServices
from trainer.schedule import DataCursor, request_seed
from trainer.step_rollouts import CollectedGroups

log = logging.getLogger("rpo.train")


class RolloutSource:
    """A step's rollouts and samples, made when asked (rank 0)."""

    def __init__(
        self,
        remote: RemoteServices,
        cursor: DataCursor,
        questions: list[Question],
        prompts: dict[str, list[int]],
        cfg: RunConfig,
    ):
        self.remote, self.cursor, self.questions, self.prompts, self.cfg = (
            remote,
            cursor,
            questions,
            prompts,
            cfg,
        )

    def take(self, step: int, replicas: list[str], version: int) -> CollectedGroups:
        """Step `step`'s groups, rolled out now by `replicas` serving `version`, with the learner's samples."""
        collected = collect_groups(
            self.remote, self.cursor, self.questions, self.prompts, self.cfg, step, replicas, version
        )
        groups = collected.train_groups
        collected.samples = build_samples(groups, self.prompts, self.cfg.algorithm) if groups else []
        return collected


def collect_groups(
    remote: RemoteServices,
    cursor: DataCursor,
    questions: list,
    prompts: dict[str, list[int]],
    cfg: RunConfig,
    step: int,
    replicas: list[str],
    version: int,
) -> CollectedGroups:
    """Rank 0: the step's rollouts. DAPO keeps groups with 0 < #correct < G (or, with
    `algorithm.dynamic_sampling_filter: reward`, whose shaped rewards differ) and refills the batch from the
    cursor for at most `algorithm.dynamic_sampling_max_rounds` extra rounds; GRPO keeps every group."""

    want = cfg.train.questions_per_step
    dynamic = cfg.algorithm.algorithm == "dapo"
    rounds = 1 + (cfg.algorithm.dynamic_sampling_max_rounds if dynamic else 0)
    collected = CollectedGroups()
    used: set[int] = set()
    for round_index in range(rounds):
        need = want - len(collected.train_groups)
        if need <= 0:
            break
        indices = cursor.take(need, exclude=used)
        if not indices:
            break
        used.update(indices)
        batch = remote.replica_set.rollouts(
            replicas,
            [questions[i] for i in indices],
            prompts,
            settings=remote.plans.train(seed=request_seed(cfg.train.seed, step, round_index)),
            min_policy_version=version,
            phase=f"rollout (step {step}, round {round_index + 1})",
        )
        keep = (
            functools.partial(keep_group, signal=cfg.algorithm.dynamic_sampling_filter) if dynamic else None
        )
        collected.add(batch, keep=keep, limit=want)
    if dynamic and len(collected.train_groups) < want:
        log.warning(
            "step %d: dynamic sampling kept %d of %d groups after %d rounds (the others had all-equal "
            "%s); training on what it kept",
            step,
            len(collected.train_groups),
            want,
            collected.rounds,
            "rewards" if cfg.algorithm.dynamic_sampling_filter == "reward" else "correctness",
            extra={"step": step},
        )
    return collected
