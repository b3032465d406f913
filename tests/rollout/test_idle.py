"""An idle replica leaves the cores to the learner: vLLM's engine processes park within milliseconds of the
last request instead of busy-waiting for a second (`rollout.engine_busy_wait_seconds`, applied in every vLLM
process by the project's vLLM plugin), and a CPU replica's worker is bound as configured."""

from __future__ import annotations

import os
import time

import psutil
import pytest
from rollout_helpers import PROMPTS, generate

from services.core.config import ConfigError, load_config
from services.core.schemas.rollout import GenerateRequest
from services.rollout.engine import engine_environment


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def test_a_replica_sleeps_between_requests(rollout_server):
    """After a request, the replica's processes (API server, engine core, worker) use little CPU over the
    next second. With vLLM's own 1 s busy-wait, the engine core and the worker each spin a core for that
    second (about 1.5-2 CPU-seconds in all on 2 cores, measured with py-spy under `rpo run`)."""
    replica = psutil.Process(rollout_server.process.pid)
    processes = [replica, *replica.children(recursive=True)]
    assert len(processes) >= 3, [p.name() for p in processes]  # the server, the engine core, its worker
    generate(
        rollout_server.url, GenerateRequest(prompts=PROMPTS, n=4, max_tokens=16, temperature=1.0, seed=1)
    )
    time.sleep(0.1)  # replies are sent; the engine's last step is done
    before = _cpu_seconds(processes)
    time.sleep(1.0)
    used = _cpu_seconds(processes) - before
    assert used < 0.4, f"an idle replica used {used:.2f} CPU-seconds in 1 s"


def test_engine_environment_sets_the_busy_wait_and_the_binding():
    cfg = load_config(None, ["rollout.engine_busy_wait_seconds=0.005"])
    env = engine_environment(cfg, on_cpu=True)
    assert float(env["RPO_VLLM_BUSY_WAIT_SECONDS"]) == 0.005
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "auto" and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env
    every = engine_environment(load_config(None, ["rollout.cpu_threads_bind=all"]), on_cpu=True)
    assert every["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, sorted(os.sched_getaffinity(0))))
    assert every["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    gpu = engine_environment(cfg, on_cpu=False)
    assert set(gpu) == {"RPO_VLLM_BUSY_WAIT_SECONDS"}


def test_a_bad_binding_is_refused_with_the_setting_named():
    assert load_config(None, ["rollout.cpu_threads_bind=0-3,6"]).rollout.cpu_threads_bind == "0-3,6"
    with pytest.raises(ConfigError, match="rollout.cpu_threads_bind"):
        load_config(None, ["rollout.cpu_threads_bind=every-core"])
