"""The run and the checks of scripts/compose_smoke.sh (which makes the images first): the compose stack with
the CPU profile, on a copy of the compose files under OUT/stack, as project `rpo-smoke`.

One line per check as it passes (or the reason it failed), then a table of the measured times, also written
to OUT/compose_smoke.json. With --surplus it runs instead the scenario of scripts/compose_smoke_surplus.py
(more rollout replicas than GPUs: the surplus one stops, the trainer trains on the others). Exit 1 if a check failed; the stack is taken down (`down -v`) either way unless
--keep. Every wait has a deadline, and a failure names the service and the phase.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import compose_smoke_surplus as surplus  # noqa: E402

from services.core.clients.cache import SyncCacheClient  # noqa: E402

PROJECT = "rpo-smoke"
RUN_NAME = "compose"
QUESTIONS = 960  # configs/compose-tiny.yaml: data.max_questions
PROMETHEUS = "http://127.0.0.1:9090"
CACHE = "http://127.0.0.1:8100"
STACK_FILES = (
    "docker-compose.yml",
    ".env.example",
    "deploy/compose.cpu.yml",
    "deploy/prometheus",
    "deploy/grafana",
    "configs",
)


class SmokeFailure(Exception):
    """A check failed; the message names the service and the phase."""


class Stack:
    """`docker compose` on the copied stack, and what the trainer wrote under ./runs."""

    def __init__(self, compose: str, stack_dir: Path):
        self.compose = compose
        self.dir = stack_dir
        self.run_dir = stack_dir / "runs" / RUN_NAME

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.compose, "-p", PROJECT, *args]
        try:
            done = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SmokeFailure(
                f"`docker compose {' '.join(args)}` did not finish in {timeout:.0f} s"
            ) from None
        if check and done.returncode != 0:
            raise SmokeFailure(f"`docker compose {' '.join(args)}` failed: {done.stderr.strip()[-2000:]}")
        return done

    def up(self, services: list[str]) -> None:
        self.run("up", "-d", "--no-build", "--scale", "rollout=2", *services, timeout=600)

    def containers(self, service: str) -> list[dict]:
        out = self.run("ps", "-a", "--format", "json", service).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        return sorted(rows, key=lambda r: r["Name"])

    def records(self, kind: str | None = "step") -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written
        return [r for r in rows if kind is None or r.get("kind") == kind]

    def logs(self, service: str) -> str:
        return self.run("logs", "--no-color", service, check=False).stdout


def wait_for(what: str, predicate, timeout: float, interval: float = 2.0):
    """Poll `predicate` until it returns something truthy; SmokeFailure naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SmokeFailure(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def prometheus(query: str) -> list[dict]:
    url = f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
    except OSError as exc:
        raise SmokeFailure(f"prometheus: query failed ({exc}): {query}") from None
    if body.get("status") != "success":
        raise SmokeFailure(f"prometheus: {body.get('error')}: {query}")
    return body["data"]["result"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the shipped Grafana dashboard, $__range set to 1h."""
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/rpo.json").read_text())
    return [
        (panel["title"], target["expr"].replace("$__range", "1h"))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def empty_dashboard_queries() -> list[str]:
    return [f"{title}: {expr}" for title, expr in dashboard_queries() if not prometheus(expr)]


def cache_update_counts(run_id: str, token: str) -> list[int]:
    ids = [f"arith-train-{i:05d}" for i in range(QUESTIONS)]
    with SyncCacheClient(CACHE, token=token) as cache:
        entries = cache.read_entries(run_id, ids)
    return [e.update_count for e in entries if e is not None]


def env_value(env_file: Path, key: str) -> str:
    match = re.search(rf"^{key}=(.*)$", env_file.read_text(), re.MULTILINE)
    return match.group(1) if match else ""


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def machine() -> dict:
    """What the figures were measured on: CPUs, memory, the Docker engine."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    memory = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    docker = subprocess.run(
        ["docker", "version", "-f", "{{.Server.Version}}"], capture_output=True, text=True, timeout=30
    )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model.group(1) if model else None,
        "memory_gib": round(int(memory.group(1)) / 2**20, 1) if memory else None,
        "docker_engine": docker.stdout.strip(),
        "gpu": shutil.which("nvidia-smi") is not None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--compose", required=True, help="a Docker Compose v2 binary")
    parser.add_argument("--out", default="runs/compose-smoke")
    parser.add_argument("--build-seconds", type=float, default=None)
    parser.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    parser.add_argument("--surplus", action="store_true", help="more replicas than GPUs, instead of the run")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    stack_dir = out / "stack"
    stack = Stack(str(Path(args.compose).resolve()), stack_dir)
    if stack_dir.exists():
        stack.run("down", "-v", "--remove-orphans", timeout=300, check=False)
        shutil.rmtree(stack_dir)
    for name in STACK_FILES:
        source, target = REPO / name, stack_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)

    figures: dict = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain")),
        "machine": machine(),
        "build_seconds": args.build_seconds,
    }
    failed: list[str] = []

    def check(name: str, fn) -> None:
        started = time.monotonic()
        try:
            detail = fn()
        except SmokeFailure as exc:
            failed.append(name)
            print(f"FAIL  {name}: {exc}", flush=True)
            raise
        print(
            f"ok    {name} ({time.monotonic() - started:.0f} s){': ' + detail if detail else ''}", flush=True
        )

    size = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Size}}", "rpo-rl-cpu:latest"], capture_output=True, text=True
    )
    figures["image_bytes"] = int(size.stdout.strip() or 0)
    init_started = smoke_started = time.monotonic()
    init = subprocess.run(
        [sys.executable, "-m", "services.cli", "compose", "init", "--cpu", "--dir", str(stack_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if init.returncode != 0:
        print(f"FAIL  rpo compose init --cpu: {init.stderr[-2000:]}")
        return 1
    figures["init_seconds"] = time.monotonic() - init_started
    print(
        f"ok    rpo compose init --cpu ({figures['init_seconds']:.0f} s): model, questions, config and .env in place",
        flush=True,
    )
    token = env_value(stack_dir / ".env", "RPO_API_TOKEN")
    services = ["redis", "cache", "rollout", "trainer", "prometheus"]
    if os.environ.get("RPO_GRAFANA_IMAGE"):
        services.append("grafana")

    try:
        if args.surplus:
            surplus.use_override(stack_dir)
            surplus.run(stack, services, check, wait_for, SmokeFailure, figures)
        else:
            t0 = time.monotonic()
            stack.up(services)

            def healthy() -> str:
                def ready() -> bool:
                    rows = stack.containers("cache") + stack.containers("rollout")
                    return len(rows) == 3 and all(r.get("Health") == "healthy" for r in rows)

                wait_for("cache and both rollout replicas to be healthy", ready, 420)
                figures["up_to_healthy_seconds"] = time.monotonic() - t0
                return f"{figures['up_to_healthy_seconds']:.0f} s after up"

            check("cache server and 2 rollout replicas healthy", healthy)

            def first_step() -> str:
                step = wait_for("the trainer's first step (trainer)", lambda: stack.records("step"), 300)[0]
                figures["up_to_first_step_seconds"] = time.monotonic() - t0
                if step["reused_prefix_tokens"] <= 0:
                    raise SmokeFailure(f"trainer: step 1 reused no prefix tokens: {step}")
                figures["step1_reused_prefix_tokens"] = step["reused_prefix_tokens"]
                return (
                    f"{figures['up_to_first_step_seconds']:.0f} s after up; step 1 reused "
                    f"{step['reused_prefix_tokens']} prefix tokens, decoded {step['generated_tokens']}"
                )

            check("first training step, with tokens saved", first_step)

            def both_replicas() -> str:
                def served() -> list:
                    rows = prometheus(
                        'sum by (instance) (rpo_rollout_requests_total{job="rpo-rollout",outcome="ok"}) > 0'
                    )
                    return rows if len(rows) == 2 else []

                rows = wait_for("both replicas to have served rollouts (prometheus)", served, 120)
                return ", ".join(
                    f"{r['metric']['instance']}: {float(r['value'][1]):.0f} requests" for r in rows
                )

            check("both replicas serve rollouts", both_replicas)

            def panels_live() -> str:
                wait_for(
                    "every dashboard query to return data", lambda: not empty_dashboard_queries(), 120, 5
                )
                saved = float(prometheus(dashboard_queries()[0][1])[0]["value"][1])
                figures["tokens_saved_share_panel"] = saved
                return f"{len(dashboard_queries())} queries; tokens saved panel {saved:.2f}"

            check("every Grafana dashboard query returns data (live)", panels_live)

            def kill_replica() -> str:
                victim = stack.containers("rollout")[-1]
                inspect = json.loads(
                    subprocess.run(
                        ["docker", "inspect", victim["Name"]], capture_output=True, text=True
                    ).stdout
                )[0]
                ip = next(iter(inspect["NetworkSettings"]["Networks"].values()))["IPAddress"]
                before = len(stack.records("step"))
                subprocess.run(["kill", "-9", str(inspect["State"]["Pid"])], check=True)
                wait_for(
                    f"the trainer's log to name the killed replica {victim['Name']} ({ip})",
                    lambda: ip in stack.logs("trainer"),
                    240,
                )
                wait_for(
                    "two more steps after the kill", lambda: len(stack.records("step")) >= before + 2, 240
                )
                named = next(line for line in stack.logs("trainer").splitlines() if ip in line)

                def replaced() -> bool:  # Docker's restart policy brings the killed replica back
                    state = json.loads(
                        subprocess.run(
                            ["docker", "inspect", victim["Name"]], capture_output=True, text=True
                        ).stdout
                    )[0]
                    return (
                        state["RestartCount"] >= 1
                        and state["State"].get("Health", {}).get("Status") == "healthy"
                    )

                wait_for(f"{victim['Name']} to be restarted and healthy again", replaced, 300)
                return f"{victim['Name']} ({ip}), restarted by Docker; trainer: {named.strip()[:160]}"

            check("a replica killed mid-run is named and the run goes on", kill_replica)

            def restart_trainer() -> str:
                checkpoint = wait_for(
                    "a checkpoint (trainer)",
                    lambda: [r for r in stack.records("checkpoint") if r.get("step")],
                    300,
                )[-1]["step"]
                resumes = len(stack.records("resume"))
                started = time.monotonic()
                stack.run("restart", "trainer", timeout=300)
                resume = wait_for(
                    "the restarted trainer's resume record",
                    lambda: stack.records("resume")[resumes:],
                    300,
                )[0]
                if resume["step"] < checkpoint or resume["step"] == 0:
                    raise SmokeFailure(
                        f"trainer: resumed at step {resume['step']}, the last checkpoint was {checkpoint}"
                    )
                wait_for(
                    "a step after the resume",
                    lambda: [
                        r
                        for r in stack.records(None)[-50:]
                        if r.get("kind") == "step" and r["step"] == resume["step"] + 1
                    ],
                    300,
                )
                figures["restart_to_next_step_seconds"] = time.monotonic() - started
                return f"resumed at step {resume['step']} (checkpoint {checkpoint}), next step in {figures['restart_to_next_step_seconds']:.0f} s"

            check("docker compose restart trainer resumes from the last checkpoint", restart_trainer)

            def down_up() -> str:
                checkpoint = wait_for(
                    "a checkpoint after the restart",
                    lambda: [
                        r
                        for r in stack.records("checkpoint")
                        if r["step"] > stack.records("resume")[-1]["step"]
                    ],
                    300,
                )[-1]["step"]
                resumes = len(stack.records("resume"))
                stack.run("down", timeout=300)
                started = time.monotonic()
                stack.up(services)
                resume = wait_for(
                    "the resume record after down/up", lambda: stack.records("resume")[resumes:], 420
                )[0]
                if resume["step"] < checkpoint:
                    raise SmokeFailure(
                        f"trainer: resumed at step {resume['step']} after down/up; checkpoint {checkpoint}"
                    )
                wait_for(
                    "a step after down/up",
                    lambda: [r for r in stack.records("step") if r["time"] > resume["time"]],
                    300,
                )
                figures["down_up_to_next_step_seconds"] = time.monotonic() - started
                return f"resumed at step {resume['step']}, next step {figures['down_up_to_next_step_seconds']:.0f} s after up"

            check("down, then up with the same run name, resumes", down_up)

            def no_double_updates() -> str:
                named = re.findall(r"run id (\S+)", stack.logs("trainer"))
                if not named:
                    raise SmokeFailure("trainer: its log names no run id")
                run_id = named[-1]
                counts = cache_update_counts(run_id, token)
                if max(counts) > 1:
                    raise SmokeFailure(
                        f"cache: {sum(c > 1 for c in counts)} entries updated more than once in one epoch"
                    )
                replays = sum(float(r["value"][1]) for r in prometheus("rpo_cache_update_replays_total"))
                return f"{len(counts)} entries, {sum(counts)} updated once, none twice (replays answered since the last up: {replays:.0f})"

            check("no cache update applied twice", no_double_updates)

            def panels_after_exit() -> str:
                stack.run("stop", "trainer", timeout=120)
                time.sleep(15)  # a few scrapes: the trainer's series are marked stale
                empty = empty_dashboard_queries()
                if empty:
                    raise SmokeFailure("prometheus: empty after the trainer stopped: " + "; ".join(empty))
                return "every panel still shows the last values"

            check("dashboard queries after the trainer exits", panels_after_exit)
    except SmokeFailure:
        for service in ("trainer", "rollout", "cache"):
            (out / f"{service}.log").write_text(stack.logs(service))
        print(f"logs of the services: {out}/{{trainer,rollout,cache}}.log", flush=True)
    finally:
        steps = stack.records("step")
        figures["steps"] = len(steps)
        times = [r["step_seconds"] for r in steps if "step_seconds" in r]
        figures["step_seconds_median"] = statistics.median(times) if times else None
        figures["reused_prefix_tokens"] = sum(r["reused_prefix_tokens"] for r in steps)
        figures["generated_tokens"] = sum(r["generated_tokens"] for r in steps)
        (out / "trainer.log").write_text(stack.logs("trainer"))
        if not args.keep:
            stack.run("down", "-v", "--remove-orphans", timeout=300, check=False)
            left = subprocess.run(
                ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                capture_output=True,
                text=True,
            ).stdout.split()
            if left:
                failed.append("nothing left running")
                print(f"FAIL  nothing left running: {len(left)} containers remain")
            else:
                print("ok    down -v: nothing left running", flush=True)
        figures["smoke_seconds"] = time.monotonic() - smoke_started
    figures["failed"] = failed
    (out / "compose_smoke.json").write_text(json.dumps(figures, indent=2) + "\n")
    print_table(figures)
    return 1 if failed else 0


def print_table(f: dict) -> None:
    def fmt(value, unit: str = " s") -> str:
        return "-" if value is None else f"{value:.0f}{unit}"

    saved = f["reused_prefix_tokens"]
    total = saved + f["generated_tokens"]
    rows = [
        ("image build (ENGINE=cpu)", fmt(f.get("build_seconds"))),
        ("image size", f"{f['image_bytes'] / 1e9:.2f} GB"),
        ("rpo compose init --cpu", fmt(f.get("init_seconds"))),
        ("up -> cache + 2 replicas healthy", fmt(f.get("up_to_healthy_seconds"))),
        ("up -> first training step", fmt(f.get("up_to_first_step_seconds"))),
        (
            "step time (median)",
            "-" if f["step_seconds_median"] is None else f"{f['step_seconds_median']:.2f} s",
        ),
        ("steps trained", str(f["steps"])),
        (
            "tokens saved (reused / reused + decoded)",
            f"{saved} / {total}" + (f" ({saved / total:.0%})" if total else ""),
        ),
        ("restart trainer -> next step", fmt(f.get("restart_to_next_step_seconds"))),
        ("down + up -> next step", fmt(f.get("down_up_to_next_step_seconds"))),
        ("whole smoke, build excluded", fmt(f.get("smoke_seconds"))),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
