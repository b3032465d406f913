"""Fixtures of the rollout tests: test-private replicas of the random tiny models (weights may be pushed to
them; `Replica` tracks what they serve). The shared, read-only `rollout_server` comes from
tests/fixtures/rollout.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from rollout_helpers import Replica, load_weights


@pytest.fixture(scope="session")
def tied_replica(tiny_model_dir, rollout_server_factory) -> Replica:
    """Random tied-embedding model; the weight, parity and two-replica tests push to it in turn."""
    server = rollout_server_factory(tiny_model_dir)
    return Replica(server, tied=True, weights=load_weights(tiny_model_dir))


@pytest.fixture(scope="module")
def untied_replica(tiny_model_untied_dir, rollout_server_factory) -> Iterator[Replica]:
    """Random model with a separate LM head (only the parity tests need it: stopped after them)."""
    server = rollout_server_factory(tiny_model_untied_dir)
    yield Replica(server, tied=False, weights=load_weights(tiny_model_untied_dir))
    server.stop()
