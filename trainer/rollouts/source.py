"""Where the loop takes each step's rollouts from: the step's questions from the data cursor, rolled out
over the replica set, DAPO's refills included, and turned into the learner's samples.

`train.max_lag: 0` (synchronous): a step's batch is rolled out when the loop asks for it, by replicas serving
the learner's current version (every request carries it as `min_policy_version`).

`train.max_lag: 1` (one step ahead): as soon as step k has its batch, step k+1's is started in a background
thread on the replicas as they are (serving the version step k trains from), so the replicas decode while
the learner trains; step k's weight push waits on the replicas for that decoding (a replica applies new
weights between requests), then step k+1 takes the batch, one version behind the learner. Each group keeps
the version that produced it; a batch more than `max_lag` versions behind is refused, never trained on
(`min_policy_version` keeps a lagging replica from serving it at all). The cache's updates are still
committed by the loop, once per step and in step order. A checkpoint taken while a batch is in flight
records the cursor from before that batch, so a resumed run rolls it out again: nothing lost or repeated.
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from services.core.clients.replica_set import RolloutFailed
from services.core.config import RunConfig
from services.core.data import Question
from trainer.learner.batch import build_samples, keep_group
from trainer.rollouts.collected import CollectedGroups
from trainer.rollouts.data_order import DataCursor, request_seed
from trainer.rollouts.services import RemoteServices

log = logging.getLogger("rpo.train")


@dataclass
class _Ahead:
    """A batch being rolled out for a later step."""

    step: int
    future: Future
    cursor_before: dict[str, Any]


class RolloutSource:
    """A step's rollouts and samples (rank 0), made when asked or one step ahead (`train.max_lag`)."""

    def __init__(
        self,
        remote: RemoteServices,
        cursor: DataCursor,
        questions: list[Question],
        prompts: dict[str, list[int]],
        cfg: RunConfig,
        total_steps: int,
    ):
        self.remote, self.cursor, self.questions, self.prompts, self.cfg = (
            remote,
            cursor,
            questions,
            prompts,
            cfg,
        )
        self.total_steps = total_steps
        self.max_lag = cfg.train.max_lag
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts-ahead") if self.max_lag else None
        )
        self._ahead: _Ahead | None = None

    def take(self, step: int, replicas: list[str], version: int) -> CollectedGroups:
        """Step `step`'s groups (rolled out ahead, or now by `replicas` serving `version`), with the learner's
        samples; then, with `max_lag` 1, starts the next step's."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.step == step:
            collected = ahead.future.result()
        else:
            if ahead is not None:  # not the step it was made for (cannot happen in the loop): drop it
                ahead.future.result()
                self.cursor.load_state_dict(ahead.cursor_before)
            collected = self._collect(step, replicas, version)
        lags = collected.lags(version)
        if lags and (max(lags) > self.max_lag or min(lags) < 0):
            raise RolloutFailed(
                f"step {step}: rollouts of policy versions {sorted(set(collected.train_versions))} for a "
                f"learner at version {version} (train.max_lag {self.max_lag}); refusing to train on them"
            )
        groups = collected.train_groups
        lagged = [lag > 0 for lag in lags]
        collected.samples = build_samples(groups, self.prompts, self.cfg.algorithm, lagged) if groups else []
        collected.lag = max(lags, default=0)
        if self._pool is not None and step < self.total_steps:
            before = self.cursor.state_dict()
            future = self._pool.submit(self._collect, step + 1, list(replicas), version)
            self._ahead = _Ahead(step + 1, future, before)
        return collected

    def _collect(self, step: int, replicas: list[str], version: int) -> CollectedGroups:
        collected = collect_groups(
            self.remote, self.cursor, self.questions, self.prompts, self.cfg, step, replicas, version
        )
        collected.epoch = self.cursor.epoch
        return collected

    def cursor_state(self) -> dict[str, Any]:
        """The cursor a checkpoint keeps: from before the batch in flight, if one is (it is rolled out again
        on resume); else the cursor as it is."""
        return self._ahead.cursor_before if self._ahead is not None else self.cursor.state_dict()

    def close(self) -> None:
        """Waits for a batch in flight (its requests have timeouts), then stops the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._ahead = None


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
