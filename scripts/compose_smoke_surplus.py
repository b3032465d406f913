"""`scripts/compose_smoke.sh --surplus`: more rollout replicas than GPUs, and a trainer of two ranks, with
real containers on the CPU profile. The GPU claims are switched on with a fake four-GPU box
(`RPO_GPU_DEVICES=0,1,2,3`) and `RPO_TRAINER_GPUS=2` (the trainer keeps 0 and 1 and runs two DeepSpeed
ranks, CPU ranks here; two replicas get 2 and 3), and the stack is started with `--scale rollout=3`, so one
replica is surplus.

Checked: the surplus replica says why in one line and exits with status 0, and Docker does not restart it
(`restart: on-failure`); the other two become healthy on distinct "GPUs"; the trainer, which waits for a
first ready replica rather than for all of them, reaches its first step with two ranks; `up -d` returns.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

OVERRIDE = """\
# compose_smoke.sh --surplus: GPU claims on, on a fake box of four GPUs (RPO_GPU_DEVICES)
services:
  rollout:
    environment:
      RPO_GPUS__CLAIM_DIR: /run/rpo-gpus
      RPO_GPU_DEVICES: "0,1,2,3"
  trainer:
    environment:
      RPO_GPUS__CLAIM_DIR: /run/rpo-gpus
      RPO_GPU_DEVICES: "0,1,2,3"
"""
SURPLUS_LINE = "is not needed and stops"


def use_override(stack_dir: Path) -> None:
    """Write the override next to the copied compose files, add it to COMPOSE_FILE in .env, and give the
    trainer two GPUs there (RPO_TRAINER_GPUS=2: two claimed "GPUs" and two DeepSpeed ranks)."""
    (stack_dir / "surplus.yml").write_text(OVERRIDE)
    env = stack_dir / ".env"
    lines = env.read_text().splitlines()
    files = [line for line in lines if line.startswith("COMPOSE_FILE=")]
    assert files, ".env names no COMPOSE_FILE (rpo compose init --cpu writes it)"
    lines = [line + ":surplus.yml" if line.startswith("COMPOSE_FILE=") else line for line in lines]
    lines = [line for line in lines if not line.startswith("RPO_TRAINER_GPUS=")] + ["RPO_TRAINER_GPUS=2"]
    env.write_text("\n".join(lines) + "\n")


def inspect(name: str) -> dict:
    out = subprocess.run(["docker", "inspect", name], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def container_log(name: str) -> str:
    done = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
    return done.stdout + done.stderr


def run(
    stack: Any, services: list[str], check: Callable, wait_for: Callable, failure: type, figures: dict
) -> None:
    """The scenario, as checks of compose_smoke.py (`check(name, fn)`); `stack` is its Stack."""
    t0 = time.monotonic()

    def up_returns() -> str:
        stack.run("up", "-d", "--no-build", "--scale", "rollout=3", *services, timeout=900)
        figures["surplus_up_seconds"] = time.monotonic() - t0
        return f"`up -d --scale rollout=3` returned after {figures['surplus_up_seconds']:.0f} s"

    check("up with 3 replicas on a box with GPUs for 2 of them returns", up_returns)

    def surplus_stops() -> str:
        def stopped() -> list:
            rows = stack.containers("rollout")
            return [r for r in rows if r.get("State") == "exited"]

        [row] = wait_for("one rollout replica to stop as surplus", stopped, 420)
        time.sleep(20)  # long enough for Docker to have restarted it, were it going to
        state = inspect(row["Name"])
        code, restarts = state["State"]["ExitCode"], state["RestartCount"]
        log = container_log(row["Name"])
        said = [line for line in log.splitlines() if SURPLUS_LINE in line]
        if code != 0 or restarts != 0 or state["State"]["Status"] != "exited":
            raise failure(f"rollout: surplus {row['Name']} exited {code}, restarted {restarts} time(s)")
        if len(said) != 1 or "Traceback" in log:
            raise failure(f"rollout: surplus {row['Name']} said {len(said)} line(s) of why: {log[-1500:]}")
        figures["surplus_line"] = said[0].strip()
        return f"{row['Name']}: status 0, not restarted; {said[0].strip()[-160:]}"

    check("the surplus replica says why once and is not restarted", surplus_stops)

    def two_healthy() -> str:
        def healthy() -> list:
            rows = [r for r in stack.containers("rollout") if r.get("Health") == "healthy"]
            return rows if len(rows) == 2 else []

        rows = wait_for("the two other replicas to be healthy", healthy, 600)
        gpus = []
        for row in rows:
            log = container_log(row["Name"])
            gpus += re.findall(r"rollout uses GPU\(s\) (\S+) of", log)
        if sorted(gpus) != ["2", "3"]:
            raise failure(f"rollout: the healthy replicas claimed {gpus}, not 2 and 3")
        return ", ".join(f"{r['Name']} on GPU {g}" for r, g in zip(rows, gpus, strict=True))

    check("the other two replicas are healthy on distinct GPUs", two_healthy)

    def trains() -> str:
        step = wait_for("the trainer's first step (trainer)", lambda: stack.records("step"), 600)[0]
        figures["surplus_up_to_first_step_seconds"] = time.monotonic() - t0
        log = stack.logs("trainer")
        if "rpo train: 2 ranks under DeepSpeed's launcher" not in log or "num_local_procs=2" not in log:
            raise failure(f"trainer: not two DeepSpeed ranks: {log[-2000:]}")
        return (
            f"step 1 {figures['surplus_up_to_first_step_seconds']:.0f} s after up, two ranks, weights over "
            f"{step.get('weight_transport')}"
        )

    check("the trainer trains with two ranks on the replicas that came up", trains)
