"""Reward scoring off the event loop: a request's groups in one batch per worker process.

math-verify bounds its own time with signal.alarm, which only works in a process's main thread, so batches are
scored in a pool of spawned processes where it does (`rollout.reward_workers`; 0 scores in a thread, without
that bound). A request's groups are split into one contiguous batch per worker, so a TRL-style reward function
sees many responses per call (services.core.reward_terms). Guarantees: scoring never raises into a request for
a bad response or reward function (it scores 0); a batch that takes longer than `reward_timeout_seconds`
scores 0 with a warning and its stuck worker is replaced; a crashed pool is rebuilt once, then 503.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from services.core.errors import Unavailable
from services.core.reward_terms import SampleScore, ScoringGroup, score_groups
from services.core.schemas.rollout import RewardTerm

log = logging.getLogger("rpo.rollout.rewards")


def _warm() -> int:
    return 0


def _zero(terms: Sequence[RewardTerm], group: ScoringGroup) -> list[SampleScore]:
    return [SampleScore(0.0, False, {t.label(): 0.0 for t in terms}) for _ in group.texts]


class RewardScorer:
    def __init__(self, workers: int, timeout_seconds: float):
        self.workers = workers
        self.timeout_seconds = timeout_seconds
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        if self.workers > 0:
            self._pool = self._new_pool()
            for future in [self._pool.submit(_warm) for _ in range(self.workers)]:
                future.result(timeout=120)

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))

    def _replace_pool(self) -> None:
        old, self._pool = self._pool, self._new_pool()
        if old is not None:
            # A stuck reward function never returns: end its processes (the executor has no public way).
            for process in list(getattr(old, "_processes", {}).values()):
                process.kill()
            old.shutdown(wait=False, cancel_futures=True)

    async def score(
        self, terms: Sequence[RewardTerm], correctness: int, dataset: str, groups: Sequence[ScoringGroup]
    ) -> list[list[SampleScore]]:
        """Every group's scores, in order; the groups are split into one batch per worker."""
        terms = list(terms)
        if self._pool is None:
            return await asyncio.to_thread(score_groups, terms, correctness, dataset, list(groups))
        size = -(-len(groups) // self.workers)
        batches = [list(groups[i : i + size]) for i in range(0, len(groups), size)]
        results = await asyncio.gather(*(self._score_batch(terms, correctness, dataset, b) for b in batches))
        return [scored for batch in results for scored in batch]

    async def _score_batch(
        self, terms: list[RewardTerm], correctness: int, dataset: str, batch: list[ScoringGroup]
    ) -> list[list[SampleScore]]:
        where = ", ".join(g.question_id for g in batch[:3]) + (" ..." if len(batch) > 3 else "")
        for attempt in (1, 2):
            future = self._pool.submit(score_groups, terms, correctness, dataset, batch)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_seconds)
            except asyncio.TimeoutError:
                log.warning(
                    "scoring questions %s took over %.0f s (rollout.reward_timeout_seconds); their %d "
                    "responses score 0 and the reward workers are restarted",
                    where,
                    self.timeout_seconds,
                    sum(len(g.texts) for g in batch),
                )
                self._replace_pool()
                return [_zero(terms, g) for g in batch]
            except BrokenProcessPool:
                log.error("the reward worker pool crashed scoring questions %s; restarting it", where)
                self._replace_pool()
                if attempt == 2:
                    raise Unavailable(
                        "reward workers crash (twice in a row); check the reward function",
                        retry_after_seconds=5,
                    ) from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
