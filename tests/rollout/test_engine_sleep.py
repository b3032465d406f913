"""`rollout.sleep_mode` (vLLM's sleep mode) on this machine, which has no GPU: what runs only on CUDA (the
engine really sleeping) is left to a GPU machine; here, on real processes and real HTTP servers:
- a CPU replica refuses `rollout.sleep_mode` at start, in one line (vLLM's CPU platform has no sleep mode);
- a real replica's sleep and wake routes validate their input (422 naming `level`) and answer 409 naming
  `rollout.sleep_mode` when it is off, and the trainer's side of the call names the replica and the phase;
- the trainer's loop (`TrainingRecipe.engines_asleep`, through services/core/clients/engine_sleep.py) puts
  every replica to sleep before the learner step and wakes each after it, in that order, even when the step
  fails, against real HTTP servers that answer as a sleeping replica does and record what they are asked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from services.core.clients.engine_sleep import EngineSleep
from services.core.config import load_config
from services.core.http_client import ServiceHTTPError
from services.core.schemas.rollout import EngineState
from tests.fixtures.rollout import TEST_OVERRIDES, free_port


def test_a_cpu_replica_refuses_sleep_mode_at_start_in_one_line(tiny_model_dir):
    sets = [x for item in (*TEST_OVERRIDES, "rollout.sleep_mode=true") for x in ("--set", item)]
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "rollout", "--model", str(tiny_model_dir)]
        + ["--port", str(free_port()), *sets],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    refusal = [line for line in out.stderr.splitlines() if line.startswith("rpo serve:")]
    assert len(refusal) == 1 and "rollout.sleep_mode" in refusal[0] and "CPU" in refusal[0]


def test_the_sleep_routes_validate_and_refuse_without_sleep_mode(tiny_model_dir, rollout_server_factory):
    replica = rollout_server_factory(tiny_model_dir)
    bad = httpx.post(replica.url + "/v1/engine/sleep", json={"level": 3}, timeout=30)
    assert bad.status_code == 422 and "level" in bad.text
    for path in ("/v1/engine/sleep", "/v1/engine/wake"):
        off = httpx.post(replica.url + path, json={}, timeout=30)
        assert off.status_code == 409 and off.json()["error"]["field"] == "rollout.sleep_mode"
    # The trainer's side: one failure naming the replica and the phase; the block never runs.
    ran = []
    with pytest.raises(ServiceHTTPError) as failed:
        with EngineSleep(load_config(None, ["rollout.sleep_mode=true"])).asleep([replica.url]):
            ran.append("learner step")
    assert ran == [] and failed.value.status == 409 and failed.value.phase == "engine sleep"
    assert replica.url in str(failed.value)
    # The replica did not go to sleep: it still generates.
    reply = httpx.post(
        replica.url + "/v1/generate", json={"prompts": [[5, 6, 7]], "max_tokens": 2}, timeout=60
    )
    assert reply.status_code == 200


class _SleepingReplica(BaseHTTPRequestHandler):
    """Answers /v1/engine/sleep and /wake as a replica with sleep mode does, recording each call."""

    events: list[str]
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        asleep = self.path.endswith("/sleep")
        state = EngineState(
            replica=str(self.server.server_port), sleeping=asleep, level=body.get("level", 0), seconds=0.0
        )
        with self.lock:
            self.events.append(f"{'sleep' if asleep else 'wake'} {self.server.server_port}")
        payload = state.model_dump_json().encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def sleeping_replicas():
    events: list[str] = []
    handler = type("Handler", (_SleepingReplica,), {"events": events})
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{s.server_port}" for s in servers], [s.server_port for s in servers], events
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_loop_sleeps_every_engine_for_the_learner_step_and_wakes_them_after(sleeping_replicas):
    from trainer.loop import TrainingRecipe

    urls, ports, events = sleeping_replicas
    recipe = object.__new__(TrainingRecipe)  # only what engines_asleep reads: the config and the rank
    recipe.cfg, recipe.main = load_config(None, ["rollout.sleep_mode=true"]), True
    with recipe.engines_asleep(urls):
        events.append("learner step")
    sleeps, wakes = {f"sleep {p}" for p in ports}, {f"wake {p}" for p in ports}
    assert set(events[:2]) == sleeps and events[2] == "learner step" and set(events[3:]) == wakes
    events.clear()
    with pytest.raises(RuntimeError, match="out of memory"):  # a failed step leaves no engine asleep
        with recipe.engines_asleep(urls):
            raise RuntimeError("out of memory")
    assert set(events[:2]) == sleeps and set(events[2:]) == wakes
    events.clear()
    recipe.cfg = load_config(None, [])  # sleep mode off: not a single call
    with recipe.engines_asleep(urls):
        events.append("learner step")
    recipe.cfg, recipe.main = load_config(None, ["rollout.sleep_mode=true"]), False  # other ranks never call
    with recipe.engines_asleep(urls):
        events.append("learner step")
    assert events == ["learner step", "learner step"]


def test_sleep_mode_and_rollouts_one_step_ahead_are_refused_together():
    from services.core.cli_args import UsageError
    from trainer.preflight import check_before_training

    with pytest.raises(UsageError, match="rollout.sleep_mode.*train.max_lag"):
        check_before_training(load_config(None, ["rollout.sleep_mode=true", "train.max_lag=1"]))
