"""The replica's state, as the routes see it: built once by the app's lifespan, read by every route."""

from __future__ import annotations

from dataclasses import dataclass

from services.core.clients.cache import CacheClient
from services.core.config import RunConfig
from services.rollout.engine import RolloutEngine
from services.rollout.generation import Generation
from services.rollout.metrics import RolloutMetrics
from services.rollout.rollouts import GroupRollouts
from services.rollout.scoring import RewardScorer
from services.rollout.weight_plane import WeightPlane
from services.rollout.weight_updater import WeightUpdater


@dataclass
class RolloutService:
    config: RunConfig
    replica: str
    """This replica's name in logs and errors (`rollout.replica_name`, else host:port)."""
    engine: RolloutEngine
    updater: WeightUpdater
    weight_plane: WeightPlane
    generation: Generation
    rollouts: GroupRollouts
    scorer: RewardScorer
    cache: CacheClient | None
    """None when no cache server is configured (full-path requests only)."""
    metrics: RolloutMetrics
