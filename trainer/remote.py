"""Everything the trainer's rank 0 does over HTTP: find replicas, bring them to a policy version, spread
group rollouts across them, push weights, and commit cache updates, export and restore snapshots.

A batch of questions is split into one contiguous chunk per replica and the chunks are sent concurrently.
A chunk whose replica fails (transport error, timeout, 5xx, or 409 "serves an older policy") is sent to the
next replica; each failure is logged with the replica, the phase and what to check, and the step fails only
when every replica has failed that chunk. Replicas that do not answer their version check before a step
sit the step out (named in the log); when they come back they are pushed the current weights first.
Calls go through the shared retry policy (`services.core.http_client`) and the service clients
(`services.core.clients.rollout`, `services.core.clients.cache`); this module only decides where each call goes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.algorithm import cached_answer
from services.core.clients.cache import SyncCacheClient
from services.core.clients.rollout import RolloutClient, discover_replicas
from services.core.config import RunConfig
from services.core.data import Question
from services.core.http_client import RetryPolicy, ServiceCallError, ServiceHTTPError
from services.core.schemas.cache import GroupUpdate, UpdateCandidate
from services.core.schemas.rollout import RolloutGroup, RolloutQuestion, RolloutRequest, RolloutResponse
from trainer.checkpoint import CACHE_FILE
from trainer.weight_push import WeightPushError, push_to_all

log = logging.getLogger("rpo.remote")


SIT_OUT_PHASES = frozenset({"connect", "upload", "no answer"})
"""Weight-push failures of the transport (the replica is gone or frozen), as opposed to a refusal."""


class RolloutFailed(RuntimeError):
    """Every replica failed a chunk of a rollout batch; the message names them and what to check."""


def what_to_check(phase: str, url: str) -> str:
    return (
        f"check that the replica is up (`curl {url}/readyz`) and its log, that it can reach the cache server, "
        f"and services.request_timeout_seconds if {phase} batches are large"
    )


def split_evenly(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """Contiguous chunks whose sizes differ by at most one (no empty chunk)."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


@dataclass
class RolloutBatch:
    """The groups of one batch (in question order) and what producing them cost."""

    groups: list[RolloutGroup]
    policy_version: int
    generated_tokens: int
    reused_prefix_tokens: int
    rollout_seconds: float
    """Wall time of the batch (requests run concurrently)."""
    reward_seconds: float
    """Scoring time reported by the replicas (the slowest chunk's, since chunks run in parallel)."""
    retries: int
    replicas: list[str]


class RemoteServices:
    """Rank 0's view of the cache server and the rollout replicas for one run."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_id = cfg.services.run_id
        self.policy = RetryPolicy.from_config(cfg.services)
        token = cfg.services.api_token
        self.token = token.get_secret_value() if token is not None else None
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

    # ------------------------------------------------------------------------------------------- replicas
    def replicas(self) -> list[str]:
        """Every replica the config names (static list, DNS name or registry), re-resolved on each call."""

        replicas = [u.rstrip("/") for u in discover_replicas(self.cfg)]
        if not replicas:
            raise RolloutFailed(
                "no rollout replica found: set services.rollout_urls or services.rollout_discovery"
            )
        return replicas

    def versions(self, replicas: Sequence[str]) -> dict[str, int | None]:
        """The version each replica serves (None: it did not answer; named in the log)."""

        def one(url: str) -> int | None:
            with RolloutClient(url, token=self.token, policy=self._short_policy()) as client:
                try:
                    return client.version().policy_version
                except ServiceCallError as exc:
                    log.warning(
                        "replica %s sits this step out: %s; %s",
                        url,
                        exc,
                        what_to_check("rollout", url),
                        extra={"replica": url, "phase": "weight version check"},
                    )
                    return None

        with ThreadPoolExecutor(max_workers=max(1, len(replicas))) as pool:
            return dict(zip(replicas, pool.map(one, replicas), strict=True))

    def check_replicas(self, replicas: list[str], version: int) -> tuple[list[str], int]:
        """Drop (in place) the replicas that do not answer; return those that need the current weights
        pushed, and the version to push them as.

        A replica serving an older version (it joined late or restarted) gets the weights as `version`. A
        replica serving a NEWER version than the learner's (a previous run's pushes, or steps lost to a
        crash before a resume) cannot go back: versions only move forward on a replica. Then every replica
        gets the learner's weights as a new version above all those served, and the learner continues
        counting from there. Raises RolloutFailed when no replica answers."""
        versions = self.versions(replicas)
        alive = [r for r in replicas if versions[r] is not None]
        if not alive:
            raise RolloutFailed(
                f"no rollout replica answers ({', '.join(replicas)}): {what_to_check('rollout', replicas[0])}"
            )
        replicas[:] = alive
        newest = max(versions[r] for r in alive)
        if newest > version:
            log.warning(
                "replica(s) %s serve version %d, newer than this run's %d (a previous run's weights, or steps "
                "lost before a resume): pushing this run's weights to every replica as version %d",
                ", ".join(r for r in alive if versions[r] == newest),
                newest,
                version,
                newest + 1,
                extra={"phase": "weight version check", "policy_version": version},
            )
            return list(alive), newest + 1
        return [r for r in alive if versions[r] != version], version

    def _short_policy(self) -> RetryPolicy:
        p = self.policy
        return dataclasses.replace(
            p, read_timeout_seconds=min(p.read_timeout_seconds, 30.0), max_attempts=2, max_total_seconds=60.0
        )

    # ------------------------------------------------------------------------------------------- rollouts
    def _params(self, **overrides: Any) -> dict[str, Any]:
        cfg = self.cfg
        a = cfg.algorithm
        params = {
            "run_id": self.run_id,
            "mode": a.mode,
            "group_size": a.group_size,
            "truncation_limit": a.truncation_limit,
            "suffix_budget": a.suffix_budget,
            "max_response_tokens": a.max_response_tokens,
            "temperature": cfg.sampling.temperature,
            "top_p": cfg.sampling.top_p,
            **cfg.reward.wire(),
            "dataset": cfg.data.dataset,
            "alpha": a.alpha,
            "shaping_low": a.shaping_low,
            "shaping_high": a.shaping_high,
            "overlong_buffer_tokens": a.overlong_buffer(),
            "seed_cache_on_miss": a.mode == "rpo",
        }
        params.update(overrides)
        return params

    def training_params(self, seed: int) -> dict[str, Any]:
        """Rollout settings of a training step."""
        return self._params(seed=seed)

    def init_params(self, seed: int) -> dict[str, Any]:
        """One full sample per question at the cache-initialisation sampling settings."""
        s = self.cfg.sampling
        return self._params(
            mode="full",
            group_size=1,
            temperature=s.init_temperature,
            top_p=s.init_top_p,
            max_response_tokens=s.init_max_tokens,
            seed=seed,
            seed_cache_on_miss=False,
        )

    def eval_params(self) -> dict[str, Any]:
        """k full samples per held-out question at the evaluation sampling settings (fixed seed)."""
        s = self.cfg.sampling
        return self._params(
            mode="full",
            group_size=s.eval_samples,
            temperature=s.eval_temperature,
            top_p=s.eval_top_p,
            dataset=self.cfg.data.eval_dataset or self.cfg.data.dataset,
            seed=self.cfg.train.seed,
            seed_cache_on_miss=False,
            overlong_buffer_tokens=0,
        )

    def rollouts(
        self,
        replicas: Sequence[str],
        questions: Sequence[Question],
        prompts: dict[str, list[int]],
        *,
        params: dict[str, Any],
        min_policy_version: int,
        phase: str,
    ) -> RolloutBatch:
        """Group rollouts of `questions` spread over `replicas`; groups come back in question order."""
        started = time.monotonic()
        wire = [
            RolloutQuestion(
                id=q.id,
                prompt_ids=prompts[q.id],
                reference=q.answer,
                prompt=q.prompt_as_given(),
                columns=q.columns,
            )
            for q in questions
        ]
        chunks = split_evenly(wire, len(replicas))
        with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
            futures = [
                pool.submit(self._chunk, chunk, _rotate(replicas, i), params, min_policy_version, phase)
                for i, chunk in enumerate(chunks)
            ]
            results = [f.result() for f in futures]
        replies = [reply for reply, _ in results]
        versions = {r.policy_version for r in replies}
        if len(versions) > 1:  # cannot happen with min_policy_version == the pushed version; guard anyway
            raise RolloutFailed(
                f"{phase}: replicas answered with different policy versions {sorted(versions)}"
            )
        return RolloutBatch(
            groups=[g for r in replies for g in r.groups],
            policy_version=versions.pop(),
            generated_tokens=sum(r.stats.generated_tokens for r in replies),
            reused_prefix_tokens=sum(r.stats.reused_prefix_tokens for r in replies),
            rollout_seconds=time.monotonic() - started,
            reward_seconds=max(r.stats.reward_seconds for r in replies),
            retries=sum(retries for _, retries in results),
            replicas=sorted({r.replica for r in replies}),
        )

    def _chunk(
        self,
        questions: list[RolloutQuestion],
        order: list[str],
        params: dict[str, Any],
        min_policy_version: int,
        phase: str,
    ) -> tuple[RolloutResponse, int]:
        """One chunk: its own replica first, then the next ones in turn (each attempt one call, so a failure
        moves on at once); with fewer replicas than `services.max_attempts`, they are tried again after a
        back-off. Returns the reply and how many retries it took."""

        request = RolloutRequest(questions=questions, min_policy_version=min_policy_version, **params)
        single = dataclasses.replace(self.policy, max_attempts=1)
        attempts = max(self.policy.max_attempts, len(order))
        failures = []
        for attempt in range(attempts):
            url = order[attempt % len(order)]
            if attempt >= len(order):
                time.sleep(min(self.policy.backoff_seconds * 2 ** (attempt - len(order)), 10.0))
            client = RolloutClient(url, token=self.token, policy=single)
            try:
                return client.rollouts(request), attempt
            except ServiceCallError as exc:
                if isinstance(exc, ServiceHTTPError) and exc.status not in (409, 429):
                    raise  # the request itself is wrong: another replica would refuse it too
                failures.append(f"{url}: {exc}")
                nxt = order[(attempt + 1) % len(order)] if attempt + 1 < attempts else None
                log.warning(
                    "%s: replica %s failed %d questions (%s); %s; %s",
                    phase,
                    url,
                    len(questions),
                    exc,
                    f"retrying them on {nxt}" if nxt else "no attempt left",
                    what_to_check(phase, url),
                    extra={"replica": url, "phase": phase},
                )
            finally:
                client.close()
        raise RolloutFailed(
            f"{phase}: {len(questions)} questions failed on every replica:\n  " + "\n  ".join(failures)
        )

    # -------------------------------------------------------------------------------------------- weights
    def push_weights(self, replicas: list[str], version: int, weights: Any, reason: str) -> None:
        """Push `weights` as `version` to `replicas`; returns once every one serves it (the rollout client
        confirms each), else raises naming each failed replica and the phase. Replicas that cannot even be
        connected to are left out with a warning when at least one other replica took the version."""

        started = time.monotonic()
        try:
            push_to_all(
                replicas,
                version,
                weights,
                cfg=self.cfg,
                timeout_seconds=self.cfg.train.weight_sync_timeout_seconds,
            )
        except WeightPushError as exc:
            unreachable = [url for url, (phase, _) in exc.failures.items() if phase in SIT_OUT_PHASES]
            if exc.succeeded and len(unreachable) == len(exc.failures):
                # Replicas that cannot be reached, or stop answering (killed, frozen, cut off), sit out: they
                # serve no rollouts of this version, and the next step's version check pushes to them if they
                # come back. A replica that refused or failed to apply the weights fails the step.
                for url in unreachable:
                    log.warning(
                        "replica %s is unreachable and sits out version %d: %s; %s",
                        url,
                        version,
                        exc.failures[url][1],
                        what_to_check("rollout", url),
                        extra={"replica": url, "phase": "weight push", "policy_version": version},
                    )
                return
            raise RolloutFailed(
                f"{exc}\ncheck those replicas' logs (a push needs about one model of free disk in "
                "rollout.spool_dir) and train.weight_sync_timeout_seconds"
            ) from None
        log.debug(
            "pushed version %d to %d replica(s) (%s) in %.2f s",
            version,
            len(replicas),
            reason,
            time.monotonic() - started,
        )

    # ---------------------------------------------------------------------------------------------- cache
    def commit_cache_updates(
        self, step: int, groups: Sequence[RolloutGroup], policy_version: int
    ) -> dict[str, int]:
        """The step's epsilon-greedy updates (idempotent per step and question); returns counts by choice."""

        a = self.cfg.algorithm
        updates = []
        for group in groups:
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
                        policy_version=policy_version,
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


def _rotate(items: Sequence[str], k: int) -> list[str]:
    k %= len(items)
    return [*items[k:], *items[:k]]
