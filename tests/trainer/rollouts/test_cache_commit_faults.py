"""The trainer's cache commit when the cache server is killed between a step's rollouts and its commit, on real
processes (a cache server and Redis): the commit retries until the server is back, lands once, and a repeat of
it changes nothing. Every wait is on a condition with a bound, never on a sleep being long enough."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from cache_server.embedded import free_port
from services.core.clients.cache import SyncCacheClient
from services.core.config import load_config
from services.core.schemas.cache import PutEntry
from services.core.schemas.rollout import RolloutGroup, RolloutSample
from trainer.rollouts.services import RemoteServices

REPO = Path(__file__).resolve().parents[3]


def _start_cache(port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_")}
    cmd = [sys.executable, "-m", "services.cli", "serve", "cache", "--port", str(port)]
    cmd += ["--redis-url", "redis://127.0.0.1:6379/0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None, "the cache server exited at start"
        time.sleep(0.1)
    raise AssertionError("the cache server did not become ready in 60 s")


def _group(qid: str) -> RolloutGroup:
    sample = RolloutSample(
        response_ids=[7, 8, 9, 2],
        prefix_len=1,
        suffix_logprobs=[-0.1, -0.2, -0.3],
        finish_reason="stop",
        raw_reward=1.0,
        shaped_reward=1.0,
        correct=True,
    )
    return RolloutGroup(question_id=qid, cache_hit=True, m=3, prefix_len=1, samples=[sample, sample])


def test_a_commit_made_while_the_cache_server_is_down_lands_once_after_it_restarts():
    port = free_port()
    run_id = f"fault-{os.getpid()}"
    cfg = load_config(
        None,
        [
            f"services.cache_url=http://127.0.0.1:{port}",
            f"services.run_id={run_id}",
            "services.retry_backoff_seconds=0.1",
            "services.api_token=",
            "algorithm.epsilon=1.0",
        ],
    )
    qids = ["a", "b", "c"]
    server = _start_cache(port)
    remote = RemoteServices(cfg)
    try:
        remote.put_cache_entries([PutEntry(question_id=q, token_ids=[7, 1, 1, 1]) for q in qids])
        os.killpg(server.pid, signal.SIGKILL)  # between the step's rollouts and its commit
        server.wait(timeout=30)
        outcome: dict = {}

        def commit() -> None:
            try:
                outcome["counts"] = remote.commit_cache_updates(
                    4, [_group(q) for q in qids], policy_version=4
                )
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = exc

        thread = threading.Thread(target=commit)
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive(), f"the commit gave up while the server was down: {outcome}"
        server = _start_cache(port)  # restarted on the same address
        thread.join(timeout=120)
        assert not thread.is_alive() and "error" not in outcome, outcome
        assert sum(outcome["counts"].values()) == len(qids)
        # The trainer cannot tell whether a cut-off attempt landed, so a retry of the same step may follow:
        again = remote.commit_cache_updates(4, [_group(q) for q in qids], policy_version=4)
        assert sum(again.values()) == len(qids)
        with SyncCacheClient(cfg.services.cache_url) as cache:
            entries = cache.read_entries(run_id, qids)
            assert [e.update_count for e in entries] == [1, 1, 1]  # applied exactly once
            assert all(e.last_step == 4 and e.policy_version == 4 for e in entries)
            cache.delete_run(run_id)
    finally:
        remote.close()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
