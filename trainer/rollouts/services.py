"""The services as the trainer's rank 0 sees them: the replicas (`replica_set`, the core's client, with the
run's rollout settings in `plans`) and the cache: commit a step's updates, export and restore snapshots.
Weights go to the replicas through trainer/weights/.

Replicas that do not answer their version check before a step sit the step out (named in the log); when
they come back they are pushed the current weights first. Calls go through the shared retry policy
(`services.core.http_client`) and the service clients (`services.core.clients`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.core.algorithm import cached_answer
from services.core.clients.cache import SyncCacheClient
from services.core.clients.replica_set import ReplicaSet, RolloutPlans
from services.core.config import RunConfig
from services.core.schemas.cache import GroupUpdate, UpdateCandidate
from services.core.schemas.rollout import RolloutGroup
from trainer.checkpoint import CACHE_FILE

log = logging.getLogger("rpo.remote")


SIT_OUT_PHASES = frozenset({"connect", "upload", "no answer"})
"""Weight-push failures of the transport (the replica is gone or frozen), as opposed to a refusal."""


class RemoteServices:
    """Rank 0's view of the cache server and the rollout replicas for one run."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_id = cfg.services.run_id
        self.replica_set = ReplicaSet(cfg)
        self.plans = RolloutPlans.from_config(cfg)
        self.policy = self.replica_set.policy
        self.token = self.replica_set.token
        self._cache = None
        self._commit = None
        if cfg.services.cache_url and cfg.algorithm.mode == "rpo":
            self._cache = SyncCacheClient.from_config(cfg)
            # The step's commit keeps trying through a cache server restart (it is idempotent per step and
            # question): giving up would lose the step's updates, waiting costs only time.
            patient = dataclasses.replace(
                self.policy,
                max_attempts=1_000_000,
                max_total_seconds=cfg.train.cache_commit_timeout_seconds,
            )
            self._commit = SyncCacheClient(cfg.services.cache_url, policy=patient, token=self.token)

    @property
    def cache(self) -> SyncCacheClient:
        if self._cache is None:
            raise RuntimeError("no cache server configured: set services.cache_url")
        return self._cache

    def close(self) -> None:
        for client in (self._cache, self._commit):
            if client is not None:
                client.close()

    # ---------------------------------------------------------------------------------------------- cache
    def commit_cache_updates(
        self, step: int, groups: Sequence[RolloutGroup], policy_version: int | Sequence[int]
    ) -> dict[str, int]:
        """The step's epsilon-greedy updates (idempotent per step and question); returns counts by choice.
        `policy_version`: the version that produced the groups, one for all or one per group."""

        a = self.cfg.algorithm
        versions = [policy_version] * len(groups) if isinstance(policy_version, int) else list(policy_version)
        updates = []
        for group, version in zip(groups, versions, strict=True):
            prefix = group.samples[0].response_ids[: group.prefix_len]
            candidates = []
            for s in group.samples:
                suffix = cached_answer(s.response_ids[s.prefix_len :], s.finish_reason)
                if suffix or prefix:
                    candidates.append(
                        UpdateCandidate(suffix_ids=suffix, reward=s.shaped_reward, correct=s.correct)
                    )
            if candidates:
                updates.append(
                    GroupUpdate(
                        question_id=group.question_id,
                        prefix_ids=prefix,
                        candidates=candidates,
                        policy_version=version,
                        min_response_len=min(len(s.response_ids) for s in group.samples),
                    )
                )
        counts = {"best": 0, "other": 0, "none": 0}
        if not updates:
            return counts
        if self._commit is None:
            raise RuntimeError("no cache server configured: set services.cache_url")
        results = self._commit.update(
            self.run_id,
            step,
            updates,
            epsilon=a.epsilon,
            only_correct=a.replace_only_correct,
            seed=self.cfg.train.seed,
        )
        for r in results:
            counts[r.choice] += 1
        return counts

    def cached_question_ids(self, question_ids: Sequence[str], batch: int = 1024) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(question_ids), batch):
            ids = list(question_ids[start : start + batch])
            entries = self.cache.read_entries(self.run_id, ids)
            found.update(q for q, e in zip(ids, entries, strict=True) if e is not None)
        return found

    def put_cache_entries(self, entries: Sequence[Any]) -> int:
        """Write new entries, never overwriting (resumable initialisation); returns how many were written."""
        return self.cache.put_entries(self.run_id, entries, overwrite=False).written

    def export_cache(self, directory: Path) -> int:

        return self.cache.export_run(self.run_id, directory / CACHE_FILE)

    def restore_cache(self, directory: Path) -> int:
        """Replace the run's cache (entries and idempotency markers) with the checkpoint's snapshot."""

        self.cache.delete_run(self.run_id)
        return self.cache.import_file(self.run_id, directory / CACHE_FILE)
