"""What the GPU box check's two halves share (scripts/gpu_check.py plans and dry-runs, scripts/gpu_check_run.py
runs the phases on a GPU): the in-image tests, the failure type, the shell and HTTP helpers and `docker compose`
on the copied stack. Standard library only, like the rest of the check."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

PROJECT = "rpo-gpu-check"
MAIN_STEPS = 6  # the main phase's run: still training when the extra replica is tried
FORK_TEST = """
import os
from services.core.cuda_check import fork_safe_cuda_env
fork_safe_cuda_env()  # what `rpo serve rollout` does before torch is imported
import torch
assert torch.cuda.is_available(), "torch sees no GPU"
pid = os.fork()
if pid == 0:  # vLLM's engine core is such a child
    try:
        ok = torch.ones(4, device="cuda").sum().item() == 4
    except Exception as exc:
        print("child:", exc)
        ok = False
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, "a child forked after the CUDA check could not use CUDA"
print("the forked child ran a CUDA kernel")
"""
STACK_TEST = (
    "import torch, vllm, deepspeed, peft; print(torch.__version__, 'cuda', torch.version.cuda, 'nccl', "
    "'.'.join(map(str, torch.cuda.nccl.version())), 'vllm', vllm.__version__, 'deepspeed', "
    "deepspeed.__version__, 'gpus', torch.cuda.device_count())"
)


class CheckFailed(Exception):
    """A check failed; the message names the service and the phase."""


def sh(cmd: list[str], timeout: float, cwd: Path | None = None, env: dict | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"`{' '.join(cmd[:4])} ...` did not finish in {timeout:.0f} s") from None
    except FileNotFoundError:
        raise CheckFailed(f"{cmd[0]} is not installed") from None
    if done.returncode != 0:
        raise CheckFailed(f"`{' '.join(cmd[:6])}` failed: {(done.stderr or done.stdout).strip()[-1500:]}")
    return done.stdout


def wait_for(what: str, predicate, timeout: float, interval: float = 3.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def http_json(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def push_transports(record: dict) -> list[str]:
    """The transport a step record says its weight push used (trainer/telemetry/records.py, `weight_transport`: nccl,
    http, or http_fallback when NCCL was configured and failed); [] for a step without a push."""
    return [record["weight_transport"]] if record.get("weight_transport") else []


def override(phase: dict, max_steps: int) -> dict:
    """The compose override a phase runs with (JSON is YAML): settings every RPO container reads."""
    env = {"RPO_TRAIN__MAX_STEPS": str(max_steps), "RPO_TRAIN__CHECKPOINT_EVERY": "100"}
    if phase["transport"] == "nccl":
        env |= {"RPO_ROLLOUT__WEIGHT_TRANSFER": "nccl", "RPO_TRAIN__NCCL_HOST": "trainer"}
    if phase.get("lora_rank"):
        env["RPO_TRAIN__LORA__RANK"] = str(phase["lora_rank"])
    return {"services": {s: {"environment": env} for s in ("cache", "rollout", "trainer")}}


class Stack:
    """`docker compose` on the copied stack, one phase at a time."""

    def __init__(self, compose: list[str], dir_: Path):
        self.compose, self.dir = compose, dir_
        self.env: dict[str, str] = {}
        self.base_env: dict[str, str] = {}  # every phase's (the image tag)
        self.files = ["docker-compose.yml"]

    def run(self, *args: str, timeout: float = 300) -> str:
        cmd = [*self.compose, "-p", PROJECT]
        for f in self.files:
            cmd += ["-f", f]
        return sh([*cmd, *args], timeout, cwd=self.dir, env={**os.environ, **self.env})

    def phase(self, phase: dict) -> None:
        max_steps = 2 if phase.get("lora_rank") else MAIN_STEPS
        name = f"override-{phase['phase']}.yml"
        (self.dir / name).write_text(json.dumps(override(phase, max_steps), indent=2) + "\n")
        self.files = ["docker-compose.yml", name]
        self.env = {**self.base_env, "RPO_RUN_NAME": f"gpu-check-{phase['phase']}", **phase["env"]}
        self.run_dir = self.dir / "runs" / self.env["RPO_RUN_NAME"]

    def containers(self, service: str) -> list[dict]:
        rows = [json.loads(x) for x in self.run("ps", "-a", "--format", "json", service).splitlines() if x]
        return sorted(rows, key=lambda r: r["Name"])

    def logs(self, service: str) -> str:
        return self.run("logs", "--no-color", service)

    def steps(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        rows = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written
        return [r for r in rows if r.get("kind") == "step"]
