"""The replicas' engines asleep while the learner steps (`rollout.sleep_mode`, vLLM's sleep mode on a GPU
the trainer shares): `EngineSleep.asleep(replicas)` puts every engine to sleep, runs the block (the learner
step), then wakes them all, so the step's weights are pushed to awake engines.

Guarantees: every replica is asleep before the block starts and awake before it returns, in that order;
the engines are woken even when the block raises (a failed step leaves no replica asleep); the calls to the
replicas run concurrently, each through the shared retry policy, and a failure names the replica and the
phase (`engine sleep`, `engine wake`). Off (`rollout.sleep_mode: false`): no call at all.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from services.core.clients.rollout import RolloutClient, policy_for, token_for
from services.core.config import RunConfig
from services.core.schemas.rollout import EngineState

log = logging.getLogger("rpo.replicas")

SLEEP_LEVEL = 1
"""vLLM's level: the weights go to host memory and come back on wake (a LoRA base survives it)."""


class EngineSleep:
    """Sleep and wake for a set of replicas, as `rollout.sleep_mode` asks."""

    def __init__(self, cfg: RunConfig):
        self.enabled = cfg.rollout.sleep_mode
        self.token = token_for(cfg, None)
        self.policy = policy_for(cfg, None)

    def _each(
        self, replicas: Sequence[str], call: Callable[[RolloutClient], EngineState]
    ) -> list[EngineState]:
        def one(url: str) -> EngineState:
            with RolloutClient(url, token=self.token, policy=self.policy) as client:
                return call(client)

        with ThreadPoolExecutor(max_workers=max(1, len(replicas))) as pool:
            return list(pool.map(one, replicas))

    def sleep(self, replicas: Sequence[str]) -> list[EngineState]:
        return self._each(replicas, lambda client: client.sleep(SLEEP_LEVEL))

    def wake(self, replicas: Sequence[str]) -> list[EngineState]:
        return self._each(replicas, lambda client: client.wake())

    @contextlib.contextmanager
    def asleep(
        self, replicas: Sequence[str], before_wake: Callable[[], None] = lambda: None
    ) -> Iterator[None]:
        """Every engine asleep for the block; `before_wake` runs after it (the trainer gives its cached GPU
        memory back there, for the engines to take)."""
        if not self.enabled or not replicas:
            yield
            return
        t = time.monotonic()
        self.sleep(replicas)
        log.debug("%d engine(s) asleep in %.2f s", len(replicas), time.monotonic() - t)
        try:
            yield
        finally:
            before_wake()
            t = time.monotonic()
            self.wake(replicas)
            log.debug("%d engine(s) awake in %.2f s", len(replicas), time.monotonic() - t)
