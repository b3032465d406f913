"""The GPU part of scripts/gpu_check.py: the image's checks and the compose phases, on a box with a GPU.

Each phase brings the stack up with its own compose override and run name, checks what the plan lists,
then takes it down (`down -v`), whatever happened. A failed check skips the rest of its phase, saying so.
Deadlines are sized for the tiny model on a datacenter GPU: the whole run is designed for under 10 minutes
on a 4-GPU box with the image built (an estimate until measured on one).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from gpu_check_stack import (
    FORK_TEST,
    STACK_TEST,
    CheckFailed,
    Stack,
    http_json,
    push_transports,
    sh,
    wait_for,
)

PROMETHEUS = "http://127.0.0.1:9090"
GRAFANA = "http://127.0.0.1:3000"
HEALTHY_S = 300  # vLLM's start with CUDA graphs on the tiny model, per phase
STEP_S = 240  # cache seeding and two steps
SCALE_HINT = re.compile(r"[Ss]cale rollout")


def docker_run(image: str, *cmd: str, timeout: float = 300) -> str:
    return sh(
        ["docker", "run", "--rm", "--gpus", "all", "--ipc=host", "--entrypoint", "python", image, *cmd],
        timeout,
    )


def run_phases(record, phases, image: str, stack: Stack, out: Path, line, check, copy_stack) -> None:
    def image_check() -> str:
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
            raise CheckFailed(f"no image {image}: build it first (`docker compose build`, docs/deploy.md)")
        versions = docker_run(image, "-c", STACK_TEST).strip()
        record["image_versions"] = versions
        return f"{image}: torch {versions}"

    if not check("image", image_check):
        return skip_rest(phases, line, "the image is not usable")
    check("fork", lambda: docker_run(image, "-c", FORK_TEST).strip())

    copy_stack(stack.dir)
    stack.base_env["RPO_IMAGE_TAG"] = image.split(":", 1)[1]  # the services run the image checked above
    uid, gid = os.getuid(), os.getgid()
    cache = out / "cache"
    cache.mkdir(exist_ok=True)
    # `rpo compose init` from the image itself: the tiny warm model (cached in OUT/cache), data, config, .env
    sh(["docker", "run", "--rm", "--user", f"{uid}:{gid}", "-v", f"{stack.dir}:/stack", "-v",
        f"{cache}:/var/cache/rpo", image, "compose", "init", "--dir", "/stack"], 1200)  # fmt: skip
    for phase in phases:
        if phase.get("skip"):
            for name in phase["checks"]:
                line(name, "skip", phase["skip"])
            continue
        stack.phase(phase)
        try:
            run_phase(record, phase, stack, line, check)
        finally:
            t0 = time.monotonic()
            try:
                logs = stack.run("logs", "--no-color", timeout=120)
                (out / f"{phase['phase']}.log").write_text(logs)
                stack.run("down", "-v", "--remove-orphans", timeout=300)
                left = stack.run("ps", "-a", "-q").split()
                record.setdefault("down", []).append({"phase": phase["phase"], "left": len(left)})
            except CheckFailed as exc:
                line("down", "fail", f"{phase['phase']}: {exc}", time.monotonic() - t0)
    downs = record.get("down", [])
    if downs and all(d["left"] == 0 for d in downs):
        line("down", "ok", f"`docker compose down -v` after each of {len(downs)} phases left no container")
    elif downs:
        line("down", "fail", f"containers left after down: {downs}")


def skip_rest(phases, line, why: str) -> None:
    for p in phases:
        for name in p["checks"]:
            line(name, "skip", why)
    line("down", "skip", why)


def run_phase(record, phase: dict, stack: Stack, line, check) -> None:
    replicas = phase["replicas"]
    todo = list(phase["checks"])

    def ran(name: str, fn) -> bool:
        todo.remove(name)
        if check(name, fn):
            return True
        for rest in todo:
            line(rest, "skip", f"phase {phase['phase']} stopped at {name}")
        todo.clear()
        return False

    def up() -> str:
        services = ["redis", "cache", "rollout", "trainer", "prometheus", "grafana"]
        stack.run("up", "-d", "--no-build", "--scale", f"rollout={replicas}", *services, timeout=600)

        def healthy() -> bool:
            rows = stack.containers("rollout")
            return len(rows) == replicas and all(r.get("Health") == "healthy" for r in rows)

        wait_for(f"{replicas} rollout replica(s) healthy (rollout, start)", healthy, HEALTHY_S)
        claims = re.findall(r"^(\S+)\s+\|.* uses GPU\(s\) ([0-9,]+) of", stack.logs("rollout"), re.M)
        devices = [d for _, d in claims]
        if len(devices) != replicas or len(set(devices)) != replicas:
            raise CheckFailed(f"rollout: the replicas' GPUs are not {replicas} distinct claims: {claims}")
        return ", ".join(f"{who} on GPU {d}" for who, d in claims)

    def step(n: int):
        def reached() -> str:
            steps = wait_for(
                f"step {n} (trainer, {phase['phase']})",
                lambda: len(stack.steps()) >= n and stack.steps(),
                STEP_S,
            )
            return f"step {n} reached; step {n}: {steps[n - 1].get('step_seconds', 0):.1f} s"

        return reached

    def transport() -> str:
        seen = {tuple(push_transports(r)) for r in stack.steps() if r.get("weight_sync_seconds") is not None}
        if not seen or () in seen:
            raise CheckFailed(f"trainer: a step record names no weight transport ({sorted(seen)})")
        used = {t for ts in seen for t in ts}
        if used != {phase["transport"]}:
            raise CheckFailed(f"trainer: weights went over {sorted(used)}, configured {phase['transport']}")
        return f"every push went over {phase['transport']}, as configured"

    if phase["phase"] == "main":
        if not ran("up", up) or not ran("step-2", step(2)) or not ran("transport", transport):
            return

        def tokens() -> str:
            def saved() -> float:
                body = http_json(f"{PROMETHEUS}/api/v1/query?query=sum(rpo_train_reused_prefix_tokens_total)")
                rows = body["data"]["result"]
                return float(rows[0]["value"][1]) if rows else 0.0

            return f"{wait_for('tokens saved > 0 in Prometheus (prometheus)', saved, 90):.0f} tokens saved"

        def grafana() -> str:
            health = wait_for(
                "Grafana's /api/health (grafana)", lambda: try_json(f"{GRAFANA}/api/health"), 90
            )
            if health.get("database") != "ok":
                raise CheckFailed(f"grafana: /api/health says {health}")
            return f"Grafana {health.get('version', '?')}: database ok"

        def extra() -> str:
            before = len(stack.steps())
            stack.run(
                "up", "-d", "--no-build", "--no-recreate", "--scale", f"rollout={replicas + 1}", "rollout"
            )

            def refused() -> str:
                text = stack.logs("rollout")
                return "\n".join(x for x in text.splitlines() if SCALE_HINT.search(x))

            said = wait_for("the extra replica to say why it stops (rollout)", refused, 180)
            time.sleep(30)  # long enough for a restart loop to show
            states = [(r["Name"], r["State"]) for r in stack.containers("rollout")]
            repeats = len(refused().splitlines())
            if repeats > 2 or any(s == "restarting" for _, s in states):
                raise CheckFailed(f"rollout: the extra replica restarts ({repeats} refusals): {states}")
            wait_for(
                "training to go on after the extra replica (trainer)",
                lambda: len(stack.steps()) > before,
                STEP_S,
            )
            return f"{said.splitlines()[0].strip()[-160:]}; training went on"

        for name, fn in (("tokens", tokens), ("grafana", grafana), ("extra", extra)):
            if not ran(name, fn):
                return
        record.setdefault("steps", {})["main"] = stack.steps()
    elif phase["phase"] == "tp-2":

        def tp2() -> str:
            detail = up()
            step(2)()
            transport()
            return f"{detail}; 2 steps"

        ran("tp-2", tp2)
    else:

        def lora() -> str:
            up()
            step(2)()
            transport()
            steps = stack.steps()
            return f"2 LoRA steps (rank {phase['lora_rank']}): {', '.join(str(s.get('step')) for s in steps)}"

        ran("lora", lora)


def try_json(url: str):
    try:
        return http_json(url)
    except (OSError, json.JSONDecodeError):
        return None
