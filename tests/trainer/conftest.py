"""Fixtures of the trainer's end-to-end tests (test_loop_e2e, test_loop_replica_faults, test_resume, test_cache_init, test_evaluate):
two rollout replicas of the warm tiny model that the trainer may push weights to, over the session's cache
server. They are not the session's read-only `rollout_server`: training changes what they serve."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def training_replicas(warm_model_dir: Path, rollout_cache_url: str, rollout_server_factory: Callable) -> list:
    """Two replicas (RolloutServer objects) the trainer tests push weights to, shared by those tests."""
    return [rollout_server_factory(warm_model_dir, cache_url=rollout_cache_url) for _ in range(2)]
