"""The first ten minutes on a GPU box (run by scripts/gpu_check.sh): the stack as a user runs it, the image
and `docker compose`, checked one line at a time, with a JSON record of every check.

On a copy of the compose files under OUT/stack (project `rpo-gpu-check`, the tiny warm model that `rpo
compose init` puts in place, run inside the image), with G the GPUs `nvidia-smi` lists:
  driver      driver and CUDA versions; torch 2.13's CUDA 13.0 wants driver 580 or newer
  image       the image exists (`docker compose build` made it) and its stack sees the GPUs
  fork        a child forked after the replica's CUDA check still uses CUDA (vLLM forks its engine core)
  up          one replica per free GPU (G-1, or 1 sharing the GPU on a one-GPU box), each on its own GPU
  step-2      the trainer reaches step 2
  transport   every push went the configured way (NCCL with 2+ GPUs, HTTP on one), from the step records
  tokens      tokens saved > 0, read from Prometheus
  grafana     Grafana's health endpoint answers
  extra       one replica more than the GPUs allow: it exits saying why, and training goes on (no hang)
  tp-2        a replica on 2 GPUs (tensor parallelism 2), 2 steps (3+ GPUs; skipped, saying so, otherwise)
  lora        two LoRA steps
  down        `docker compose down -v` leaves nothing running
Every wait has a deadline; a failed check names the service and the phase and the later checks of that
phase are skipped. `--dry-run` needs no GPU and no Docker engine: it prints the plan for G GPUs
(`--gpus`, default: nvidia-smi's count, else 4), checks the files the run reads, renders every compose
layout the run uses (`docker compose config`, when a Compose v2 binary is at hand) and writes the record
with every GPU check marked as planned. Uses only Python's standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gpu_check_stack import CheckFailed, Stack, sh

REPO = Path(__file__).resolve().parents[1]
MIN_DRIVER = 580  # torch 2.13.0's wheels: CUDA 13.0 (deploy/constraints-gpu.txt)
STACK_FILES = ("docker-compose.yml", ".env.example", "deploy/prometheus", "deploy/grafana", "configs")
NEEDED = (*STACK_FILES, "deploy/Dockerfile", "deploy/constraints-gpu.txt", "configs/compose-tiny.yaml")
CHECKS = ("driver", "image", "fork", "up", "step-2", "transport", "tokens", "grafana", "extra", "tp-2", "lora",
          "down")  # fmt: skip
RECORD_KEYS = ("date", "mode", "gpus", "plan", "checks", "seconds", "failed")


def plan(gpus: int) -> list[dict]:
    """The phases for a box with `gpus` GPUs: trainer on GPU 0, one replica on each other GPU."""
    shared = gpus == 1
    replicas = 1 if shared else gpus - 1
    phases = [
        {
            "phase": "main",
            "replicas": replicas,
            "transport": "http" if shared else "nccl",
            "env": {"RPO_ROLLOUT_GPU_MEMORY": "0.4"} if shared else {},
            "checks": ["up", "step-2", "transport", "tokens", "grafana", "extra"],
        }
    ]
    phases.append(
        {"phase": "tp-2", "replicas": 1, "transport": "http", "env": {"RPO_GPUS_PER_REPLICA": "2"},
         "checks": ["tp-2"], "skip": None if gpus >= 3 else f"needs 3+ GPUs (trainer 1 + 2), this box has {gpus}"}
    )  # fmt: skip
    phases.append(
        {"phase": "lora", "replicas": 1, "transport": "http", "env": phases[0]["env"] if shared else {},
         "checks": ["lora"], "lora_rank": 8}
    )  # fmt: skip
    return phases


def compose_command() -> list[str] | None:
    if os.environ.get("RPO_COMPOSE"):
        return [os.environ["RPO_COMPOSE"]]
    for cmd in (["docker", "compose"], ["docker-compose"]):
        try:
            if subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0:
                return cmd
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def copy_stack(stack_dir: Path) -> None:
    for name in STACK_FILES:
        source, target = REPO / name, stack_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(source, target)


def nvidia_smi() -> tuple[list[dict], str]:
    rows = sh(
        ["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader"], 60
    )
    gpus = [dict(zip(("index", "name", "driver", "memory"), (c.strip() for c in line.split(",")), strict=False))
            for line in rows.splitlines() if line.strip()]  # fmt: skip
    cuda = re.search(r"CUDA Version:\s*([0-9.]+)", sh(["nvidia-smi"], 60))
    return gpus, cuda.group(1) if cuda else "?"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan; run only what needs no GPU")
    parser.add_argument("--gpus", type=int, default=None, help="plan for this many GPUs (--dry-run)")
    parser.add_argument("--out", default="runs/gpu-check", help="where the stack, logs and record go")
    parser.add_argument(
        "--image", default=None, help="the RPO image, rpo-rl:TAG (default rpo-rl:${RPO_IMAGE_TAG:-latest})"
    )
    args = parser.parse_args()
    if args.gpus is not None and args.gpus < 1:
        parser.error(f"--gpus {args.gpus}: a box has at least one GPU")
    if args.gpus is not None and not args.dry_run:
        parser.error("--gpus is for --dry-run; a real run counts the GPUs with nvidia-smi")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    image = args.image or f"rpo-rl:{os.environ.get('RPO_IMAGE_TAG') or 'latest'}"
    if not re.fullmatch(r"rpo-rl:[\w][\w.-]*", image):
        parser.error(f"--image {image}: the compose file runs rpo-rl:TAG (RPO_IMAGE_TAG); tag yours so")
    started = time.monotonic()
    record: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "image": image,
                    "mode": "dry-run" if args.dry_run else "gpu", "checks": []}  # fmt: skip

    def line(name: str, status: str, detail: str, seconds: float = 0.0) -> None:
        record["checks"].append(
            {"check": name, "status": status, "detail": detail, "seconds": round(seconds, 1)}
        )
        print(f"{status:<8}{name}{f' ({seconds:.0f} s)' if seconds >= 1 else ''}: {detail}", flush=True)

    def check(name: str, fn) -> bool:
        t0 = time.monotonic()
        try:
            line(name, "ok", fn() or "", time.monotonic() - t0)
            return True
        except CheckFailed as exc:
            line(name, "fail", str(exc), time.monotonic() - t0)
            return False

    if args.dry_run:
        try:
            count = args.gpus or len(nvidia_smi()[0])
        except CheckFailed:
            count = 4
    else:
        if not check("driver", lambda: driver(record)):
            return finish(record, out, started)
        count = len(record["gpus_found"])
    record["gpus"] = count
    phases = plan(count)
    record["plan"] = phases
    print(f"plan for {count} GPU(s) (trainer on GPU 0):")
    for p in phases:
        how = f"skipped: {p['skip']}" if p.get("skip") else ", ".join(p["checks"])
        print(f"  {p['phase']}: {p['replicas']} replica(s), weights over {p['transport']}: {how}")
    compose = compose_command()
    if args.dry_run:
        return dry_run(record, phases, compose, out, line, check, started)
    if compose is None:
        line("up", "fail", "no Docker Compose v2 (`docker compose version`)")
        return finish(record, out, started)
    from gpu_check_run import run_phases  # noqa: PLC0415  (the GPU part; beside this file)

    run_phases(record, phases, image, Stack(compose, out / "stack"), out, line, check, copy_stack)
    return finish(record, out, started)


def driver(record: dict) -> str:
    if shutil.which("nvidia-smi") is None:
        raise CheckFailed("no nvidia-smi: this machine has no NVIDIA driver (install driver 580 or newer)")
    gpus, cuda = nvidia_smi()
    if not gpus:
        raise CheckFailed("nvidia-smi lists no GPU")
    record["gpus_found"], record["driver_cuda"] = gpus, cuda
    major = int(gpus[0]["driver"].split(".")[0])
    if major < MIN_DRIVER:
        raise CheckFailed(
            f"driver {gpus[0]['driver']} (CUDA {cuda}) is too old: the image's torch needs CUDA 13.0, "
            f"driver {MIN_DRIVER} or newer"
        )
    return f"{len(gpus)} GPU(s) ({gpus[0]['name']}), driver {gpus[0]['driver']}, CUDA {cuda}"


def dry_run(record, phases, compose, out: Path, line, check, started) -> int:
    def files() -> str:
        missing = [n for n in NEEDED if not (REPO / n).exists()]
        if missing:
            raise CheckFailed(f"missing in the repo: {', '.join(missing)}")
        return f"{len(NEEDED)} files and folders in place"

    check("files", files)
    stack_dir = out / "stack"
    copy_stack(stack_dir)

    def render() -> str:
        if compose is None:
            raise CheckFailed("no Docker Compose v2 binary (`docker compose version`; or RPO_COMPOSE=...)")
        stack = Stack(compose, stack_dir)
        stack.env = {"RPO_API_TOKEN": "dry-run", "GRAFANA_ADMIN_PASSWORD": "dry-run"}
        shown = []
        for p in phases:
            stack.phase(p)
            stack.env |= {"RPO_API_TOKEN": "dry-run", "GRAFANA_ADMIN_PASSWORD": "dry-run"}
            rendered = stack.run("config", "--format", "json", timeout=60)
            services = json.loads(rendered)["services"]
            env = services["trainer"]["environment"]
            if p["transport"] == "nccl" and env.get("RPO_ROLLOUT__WEIGHT_TRANSFER") != "nccl":
                raise CheckFailed(f"{p['phase']}: the trainer's environment does not set NCCL: {env}")
            if env.get("RPO_TRAIN__RUN_DIR") != f"/runs/gpu-check-{p['phase']}":
                raise CheckFailed(f"{p['phase']}: run dir {env.get('RPO_TRAIN__RUN_DIR')}")
            shown.append(p["phase"])
        return f"docker compose config renders the layouts of {', '.join(shown)}"

    check("compose-config", render)
    for name in CHECKS:
        skipped = next((p["skip"] for p in phases if name in p["checks"] and p.get("skip")), None)
        line(name, "skip" if skipped else "planned", skipped or "needs a GPU (not run in --dry-run)")
    return finish(record, out, started)


def finish(record: dict, out: Path, started: float) -> int:
    record["seconds"] = round(time.monotonic() - started, 1)
    record["failed"] = [c["check"] for c in record["checks"] if c["status"] == "fail"]
    record.setdefault("gpus", 0)
    record.setdefault("plan", [])
    missing = [k for k in RECORD_KEYS if k not in record]
    path = out / "gpu_check.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    skipped = sum(c["status"] == "skip" for c in record["checks"])
    print(f"record: {path} ({len(record['checks'])} checks, {len(record['failed'])} failed, {skipped} skipped, "
          f"{record['seconds']:.0f} s){' (missing: ' + ', '.join(missing) + ')' if missing else ''}")  # fmt: skip
    return 1 if record["failed"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
