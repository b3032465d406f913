"""Group rollouts over a set of rollout replicas, as every caller needs them (the trainer, `rpo cache
init`, `rpo eval`, `rpo run`, the benchmarks): find the replicas, check the version each serves, and spread
a batch over them. `RolloutPlans` holds the typed rollout settings of each purpose, made once from the config.

A batch of questions is split into one contiguous chunk per replica and the chunks are sent concurrently.
A chunk whose replica fails (transport error, timeout, 5xx, or 409 "serves an older policy") is sent to the
next replica; each failure is logged with the replica, the phase and what to check, and the batch fails only
when every replica has failed that chunk (`RolloutFailed`). Replicas that do not answer their version check
sit the step out (named in the log). Calls go through the shared retry policy (`services.core.http_client`)
and `RolloutClient`; this module only decides where each call goes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from services.core.clients.rollout import RolloutClient, discover_replicas
from services.core.config import RunConfig
from services.core.data import Question
from services.core.data_roles import eval_dataset_spec
from services.core.http_client import RetryPolicy, ServiceCallError, ServiceHTTPError
from services.core.schemas.rollout import (
    RolloutGroup,
    RolloutQuestion,
    RolloutRequest,
    RolloutResponse,
    RolloutSettings,
)

log = logging.getLogger("rpo.replicas")


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
    group_versions: list[int] | None = None
    """The version each group was made by, where the replicas answered with different ones (a chunk
    retried on a replica that had meanwhile taken a newer push: rollouts one step ahead); None: all
    `policy_version`, which is otherwise the oldest."""

    def versions(self) -> list[int]:
        """The version that produced each group."""
        return (
            self.group_versions
            if self.group_versions is not None
            else [self.policy_version] * len(self.groups)
        )


@dataclass(frozen=True)
class RolloutPlans:
    """The rollout settings of each purpose, made once from the config: a training step's (`train`, given
    the step's seed), the cache initialisation's (one full sample per question at `sampling.init_*`) and
    the evaluation's (k full samples at `sampling.eval_*`, a fixed seed)."""

    training: RolloutSettings
    initialisation: RolloutSettings
    evaluation: RolloutSettings

    @classmethod
    def from_config(cls, cfg: RunConfig) -> RolloutPlans:
        a, s = cfg.algorithm, cfg.sampling
        training = RolloutSettings(
            run_id=cfg.services.run_id,
            mode=a.mode,
            group_size=a.group_size,
            truncation_limit=a.truncation_limit,
            suffix_budget=a.suffix_budget,
            max_response_tokens=a.max_response_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            repetition_penalty=s.repetition_penalty,
            **cfg.reward.wire(),
            dataset=cfg.data.dataset,
            alpha=a.alpha,
            shaping_low=a.shaping_low,
            shaping_high=a.shaping_high,
            length_shaping=a.length_shaping,
            overlong_buffer_tokens=a.overlong_buffer(),
            seed_cache_on_miss=a.mode == "rpo",
        )
        full = {
            "mode": "full",
            "seed_cache_on_miss": False,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
        }
        initialisation = training.model_copy(
            update={
                **full,
                "group_size": 1,
                "temperature": s.init_temperature,
                "top_p": s.init_top_p,
                "max_response_tokens": s.init_max_tokens,
            }
        )
        evaluation = training.model_copy(
            update={
                **full,
                "group_size": s.eval_samples,
                "temperature": s.eval_temperature,
                "top_p": s.eval_top_p,
                "dataset": eval_dataset_spec(cfg.data) or cfg.data.dataset,
                "seed": cfg.train.seed,
                "overlong_buffer_tokens": 0,
            }
        )
        return cls(training, initialisation, evaluation)

    def evaluation_on(self, dataset: str, temperature: float) -> RolloutSettings:
        """The evaluation's settings on another held-out set (the validation split) or at another temperature."""
        return self.evaluation.model_copy(update={"dataset": dataset, "temperature": temperature})

    def train(self, seed: int) -> RolloutSettings:
        """A training step's settings (its seed: `trainer.rollouts.data_order.request_seed`)."""
        return self.training.model_copy(update={"seed": seed})

    def init(self, seed: int) -> RolloutSettings:
        return self.initialisation.model_copy(update={"seed": seed})


class ReplicaSet:
    """The configured rollout replicas (a static list, or a DNS name re-resolved on each call)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.policy = RetryPolicy.from_config(cfg.services)
        token = cfg.services.api_token
        self.token = token.get_secret_value() if token is not None else None

    def _short_policy(self) -> RetryPolicy:
        p = self.policy
        return dataclasses.replace(
            p, read_timeout_seconds=min(p.read_timeout_seconds, 30.0), max_attempts=2, max_total_seconds=60.0
        )

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

    def rollouts(
        self,
        replicas: Sequence[str],
        questions: Sequence[Question],
        prompts: dict[str, list[int]],
        *,
        settings: RolloutSettings,
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
                pool.submit(self._chunk, chunk, _rotate(replicas, i), settings, min_policy_version, phase)
                for i, chunk in enumerate(chunks)
            ]
            results = [f.result() for f in futures]
        replies = [reply for reply, _ in results]
        versions = {r.policy_version for r in replies}
        # Every reply is at least min_policy_version; a newer one comes from a chunk that was retried after a
        # push (rollouts one step ahead). Each group keeps its own version then.
        per_group = [r.policy_version for r in replies for _ in r.groups] if len(versions) > 1 else None
        return RolloutBatch(
            groups=[g for r in replies for g in r.groups],
            policy_version=min(versions),
            group_versions=per_group,
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
        settings: RolloutSettings,
        min_policy_version: int,
        phase: str,
    ) -> tuple[RolloutResponse, int]:
        """One chunk: its own replica first, then the next ones in turn (each attempt one call, so a failure
        moves on at once); with fewer replicas than `services.max_attempts`, they are tried again after a
        back-off. Returns the reply and how many retries it took."""

        request = RolloutRequest(
            **settings.model_dump(), questions=questions, min_policy_version=min_policy_version
        )
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


def _rotate(items: Sequence[str], k: int) -> list[str]:
    k %= len(items)
    return [*items[k:], *items[:k]]
