"""A compose trainer starts with its replicas (`depends_on: service_started`): it waits for the first one
found by `services.rollout_discovery` to be ready, not for all, and never past
`services.startup_timeout_seconds`. Checked against a real HTTP server on loopback that answers /readyz 503
(loading) and then 200."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.core.config import load_config
from trainer.train import wait_for_a_replica


@pytest.fixture
def replica():
    """A loopback server whose /readyz answers 503 until `ready_at` (monotonic), then 200."""
    state = {"ready_at": float("inf"), "asked": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            state["asked"] += 1
            ready = self.path == "/readyz" and time.monotonic() >= state["ready_at"]
            self.send_response(200 if ready else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_trainer_waits_for_a_first_replica_to_be_ready(replica):
    state, port = replica
    state["ready_at"] = time.monotonic() + 3.0
    cfg = load_config(None, [f"services.rollout_discovery=dns://127.0.0.1:{port}"])
    started = time.monotonic()
    wait_for_a_replica(cfg)
    assert time.monotonic() - started >= 3.0 and state["asked"] >= 2


def test_the_wait_ends_at_the_startup_timeout_and_static_urls_are_not_waited_for(replica):
    state, port = replica  # never ready
    cfg = load_config(
        None, [f"services.rollout_discovery=dns://127.0.0.1:{port}", "services.startup_timeout_seconds=1"]
    )
    started = time.monotonic()
    wait_for_a_replica(cfg)
    assert 1.0 <= time.monotonic() - started < 10.0
    asked = state["asked"]
    started = time.monotonic()
    wait_for_a_replica(load_config(None, [f"services.rollout_urls=[http://127.0.0.1:{port}]"]))
    assert time.monotonic() - started < 1.0 and state["asked"] == asked
