"""Reward scoring off the event loop: one group's responses per task, in worker processes.

math-verify bounds its own time with signal.alarm, which only works in a process's main thread, so groups are
scored in a pool of spawned processes where it does (`rollout.reward_workers`; 0 scores in a thread, without
that bound). Guarantees: scoring never raises into a request for a bad response or reward function (it
scores 0, `services.core.rewards.score_safely`); a group that takes longer than `reward_timeout_seconds` scores
0 with a warning and its stuck worker is replaced; a crashed pool is rebuilt once, then 503.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from services.core.errors import Unavailable
from services.core.rewards import RewardFn, resolve_reward, score_safely

log = logging.getLogger("rpo.rollout.rewards")

_RESOLVED: dict[tuple[str, str], RewardFn] = {}


def score_group(spec: str, dataset: str, texts: list[str], reference: str, question_id: str) -> list[float]:
    """Score every response of one group (runs in a worker process, or a thread when there is no pool)."""
    key = (spec, dataset)
    fn = _RESOLVED.get(key)
    if fn is None:
        fn = _RESOLVED[key] = resolve_reward(spec, dataset)
    return [score_safely(fn, text, reference, question_id) for text in texts]


def _warm() -> int:

    return 0


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
        self, spec: str, dataset: str, texts: list[str], reference: str, question_id: str
    ) -> list[float]:
        if self._pool is None:
            return await asyncio.to_thread(score_group, spec, dataset, texts, reference, question_id)
        for attempt in (1, 2):
            future = self._pool.submit(score_group, spec, dataset, texts, reference, question_id)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_seconds)
            except asyncio.TimeoutError:
                log.warning(
                    "scoring question %s took over %.0f s (rollout.reward_timeout_seconds); its %d responses "
                    "score 0 and the reward workers are restarted",
                    question_id,
                    self.timeout_seconds,
                    len(texts),
                )
                self._replace_pool()
                return [0.0] * len(texts)
            except BrokenProcessPool:
                log.error("the reward worker pool crashed scoring question %s; restarting it", question_id)
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
