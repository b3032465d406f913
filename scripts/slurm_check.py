"""The Slurm check (scripts/slurm_check.sh runs it): a real one-node Slurm cluster on this machine (munge,
slurmctld, slurmd, all in a scratch directory, on free ports), the job `rpo slurm script` writes for the
CPU profile with 2 replicas, and the checks the issue asks of it:

1. the job's parts run as separate job steps (cache, rollout-0, rollout-1, trainer: `squeue --steps`);
2. the job trains 3 steps with tokens saved (reused prefix tokens) above 0;
3. `scancel` mid-step leaves no process of the job behind (scanned in /proc: any process with the job's
   SLURM_JOB_ID in its environment, a slurmstepd of the job, or a command line naming the run directory);
4. `scontrol requeue` of the cancelled job runs it again and the trainer resumes from its last checkpoint
   (the resume record's step equals the last checkpoint's) and trains another step;
5. no cache entry was updated twice (read back from the job's cache server: every entry's update_count
   is at most 1 in this one-epoch run);
6. `scancel --batch --signal=USR1` (what Slurm sends before the time limit) makes the job stop its trainer
   after the step in flight, checkpoint it and requeue itself: the job resumes at that step, and again
   no cache entry was updated twice;
7. a final `scancel` leaves nothing behind either.

It prints one line per check and writes the figures to OUT/slurm_check.json (default runs/slurm-check).
It stops everything it started (the daemons it launched, the job) on its way out. Needs root (slurmd).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.core.clients.cache import SyncCacheClient  # noqa: E402
from services.models.model_path import resolve_model_path  # noqa: E402
from services.reproduction.reproduce import git_commit  # noqa: E402

MID_STEP_SECONDS = 1.0
"""How long after a step's record the check cancels: the step's checkpoint is written, the next one runs
(a step takes several seconds here)."""
QUESTIONS = 256  # one epoch of 16 steps of 16: each entry is updated at most once unless one is applied twice


class CheckFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sh(*args: str, timeout: float = 30, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise CheckFailed(
            f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}"
        )
    return done.stdout


def wait_for(what: str, probe, timeout: float, every: float = 0.5, alive=None):
    """Poll `probe` until it returns something true; `alive` (if given) raises when the job has ended."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if alive is not None:
            alive(what)
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Cluster:
    """munged (unless one answers already), slurmctld and slurmd as root, configured under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.daemons: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> float:
        started = time.monotonic()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=rpocheck",
                    f"SlurmctldHost={host}",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "SlurmUser=root",
                    "AuthType=auth/munge",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "SchedulerType=sched/builtin",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "JobRequeue=1",
                    "KillWait=30",
                    "MinJobAge=600",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
                    f"NodeName={host} CPUs=2 State=UNKNOWN",
                    f"PartitionName=check Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True, timeout=10).returncode != 0:
            Path("/run/munge").mkdir(
                parents=True, exist_ok=True
            )  # munged's socket directory (tmpfs: gone at boot)
            self._daemon(["munged", "--foreground", "--force"])
            wait_for(
                "munged",
                lambda: subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0,
                30,
            )
        self._daemon(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._daemon(["slurmd", "-D", "-f", str(self.conf)])
        wait_for(
            "the node to be idle",
            lambda: "idle" in self.run("sinfo", "--noheader", "--format=%T", check=False),
            60,
        )
        return time.monotonic() - started

    def _daemon(self, argv: list[str]) -> None:
        log = (self.root / "log" / f"{argv[0]}.out").open("w")
        self.daemons.append(
            subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and done.returncode != 0:
            raise CheckFailed(f"{' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def stop(self) -> None:
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def job_processes(job: str, marker: str) -> list[str]:
    """Every process of the job still alive: its environment names the job, it is the job's slurmstepd, or
    its command line names the run directory (`marker`)."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if not cmdline:
            continue
        if (
            f"SLURM_JOB_ID={job}".encode() in environ
            or f"slurmstepd: [{job}." in cmdline
            or marker in cmdline
        ):
            left.append(f"{entry.name} {cmdline[:120]}")
    return left


ENDED = {"CANCELLED", "COMPLETED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def job_state(cluster: Cluster, job: str) -> str:
    match = re.search(r"JobState=(\S+)", cluster.run("scontrol", "show", "job", job, check=False))
    return match.group(1) if match else "GONE"


def records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == kind:
            out.append(rec)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "slurm-check"))
    parser.add_argument("--budget", type=float, default=1500, help="seconds the whole check may take")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    run_dir = out / "run"
    figures: dict = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "commit": git_commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": next(
                (
                    ln.split(":", 1)[1].strip()
                    for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")
                ),
                None,
            ),
            "os": platform.platform(),
            "gpu": False,
        },
        "checks": {},
    }
    results: list[tuple[str, bool, str]] = []
    started = time.monotonic()
    budget_end = started + args.budget

    def left() -> float:
        return max(budget_end - time.monotonic(), 1.0)

    def check(name: str, fn) -> bool:
        try:
            detail = fn()
            results.append((name, True, detail))
            print(f"ok    {name}: {detail}", flush=True)
            return True
        except (CheckFailed, subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
            results.append((name, False, str(exc)))
            print(f"fail  {name}: {exc}", flush=True)
            return False

    cluster = Cluster(out / "cluster")
    job = ""
    try:
        figures["cluster_start_seconds"] = round(cluster.start(), 1)
        figures["slurm_version"] = cluster.run("sinfo", "--version").strip()
        print(
            f"[slurm-check] {figures['slurm_version']}: one-node cluster up in {figures['cluster_start_seconds']} s"
        )

        model = resolve_model_path("builtin:tiny-warm")
        config = yaml.safe_load((REPO / "services/supervisor/presets/tiny-demo.yaml").read_text())
        config["model"]["path"] = str(model)
        config["data"].update(max_questions=QUESTIONS, eval_max_questions=8)
        config["train"].update(
            max_steps=QUESTIONS // 16,
            epochs=1,
            checkpoint_every=1,
            keep_checkpoints=2,
            eval_before=False,
            metrics_port=0,
        )
        config["sampling"]["eval_samples"] = 1
        config_file = out / "run.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        script = out / "job.sbatch"
        token = "slurm-check-token"
        env_file = out / "slurm.env"
        env_file.write_text(f"RPO_API_TOKEN={token}\n")
        env_file.chmod(0o600)
        cache_port = free_port()
        sh(
            sys.executable, "-m", "services.cli", "slurm", "script", "--config", str(config_file),
            "--replicas", "2", "--run-dir", str(run_dir), "--out", str(script), "--job-name", "rpo-check",
            "--env-file", str(env_file), "--cache-port", str(cache_port), "--rollout-port", str(free_port()),
            "--metrics-port", str(free_port()), "--master-port", str(free_port()),
        )  # fmt: skip
        submitted = time.monotonic()
        job = cluster.run("sbatch", "--parsable", str(script)).strip().split(";")[0]
        figures["job_id"] = job
        print(f"[slurm-check] submitted job {job}; logs under {run_dir}", flush=True)

        def running(what: str) -> None:
            state = job_state(cluster, job)
            if state in ENDED or state == "GONE":
                raise CheckFailed(
                    f"the job is {state} while waiting for {what}; its log: {run_dir}/slurm-{job}.out"
                )

        def separate_steps() -> str:
            def steps():
                names = sorted(
                    ln.split()[1]
                    for ln in cluster.run(
                        "squeue", "--noheader", "--steps", "--job", job, "--format=%i %j"
                    ).splitlines()
                    if len(ln.split()) > 1
                )
                return (
                    names
                    if {"rpo-cache", "rpo-rollout-0", "rpo-rollout-1", "rpo-trainer"} <= set(names)
                    else None
                )

            names = wait_for("the job's four steps", steps, min(600, left()), alive=running)
            figures["steps_seen"] = names
            return ", ".join(names)

        def three_steps() -> str:
            recs = wait_for(
                "3 trained steps",
                lambda: records(run_dir, "step")[2:] and records(run_dir, "step"),
                min(900, left()),
            )
            figures["submit_to_step_3_seconds"] = round(time.monotonic() - submitted, 1)
            saved = sum(r["reused_prefix_tokens"] for r in recs)
            decoded = sum(r["generated_tokens"] for r in recs)
            figures["steps_before_cancel"] = len(recs)
            figures["tokens_saved"] = {"reused": saved, "decoded": decoded}
            if saved <= 0:
                raise CheckFailed(f"tokens saved over {len(recs)} steps: {saved}")
            return f"{len(recs)} steps in {figures['submit_to_step_3_seconds']} s from sbatch, {saved} prefix tokens reused, {decoded} decoded"

        def cancel_leaves_nothing(label: str) -> str:
            count = len(records(run_dir, "step"))
            wait_for(
                "a new step to begin", lambda: len(records(run_dir, "step")) > count, min(300, left()), 0.1
            )
            time.sleep(MID_STEP_SECONDS)  # past the step's checkpoint: the next step's rollouts are in flight
            running = job_processes(job, str(run_dir))  # what the scan finds while the job runs
            t = time.monotonic()
            cluster.run("scancel", job)
            wait_for("the job to end", lambda: job_state(cluster, job) in ENDED, min(180, left()))
            seconds = time.monotonic() - t
            time.sleep(2)
            leftovers = job_processes(job, str(run_dir))
            figures["checks"][label] = {
                "cancelled_after_step": count + 1,
                "seconds_into_next_step": MID_STEP_SECONDS,
                "cancel_to_job_end_seconds": round(seconds, 1),
                "processes_while_running": len(running),
                "processes_left": len(leftovers),
                "left": leftovers,
            }
            if leftovers:
                raise CheckFailed(f"{len(leftovers)} process(es) left: " + "; ".join(leftovers))
            return (
                f"cancelled {MID_STEP_SECONDS:.0f} s into step {count + 2}; job ended in {seconds:.1f} s; "
                f"{len(running)} processes of the job before, 0 left"
            )

        def requeue_resumes() -> str:
            checkpoints = sorted(
                int(p.name.split("-")[1])
                for p in (run_dir / "checkpoints").glob("step-*")
                if p.name.split("-")[1].isdigit()
            )
            last = checkpoints[-1] if checkpoints else 0
            steps_before = len(records(run_dir, "step"))
            resumes = len(records(run_dir, "resume"))
            t = time.monotonic()
            cluster.run("scontrol", "requeue", job)
            resume = wait_for(
                "the requeued job's resume record",
                lambda: records(run_dir, "resume")[resumes:],
                min(600, left()),
            )[0]
            figures["requeue_to_resume_seconds"] = round(time.monotonic() - t, 1)
            wait_for(
                "a step after the resume",
                lambda: [r for r in records(run_dir, "step") if r["time"] > resume["time"]],
                min(300, left()),
            )
            figures["requeue_to_next_step_seconds"] = round(time.monotonic() - t, 1)
            figures["last_checkpoint_before_requeue"] = last
            figures["resumed_at_step"] = resume["step"]
            figures["step_records_before_requeue"] = steps_before
            if resume["step"] != last or last == 0:
                raise CheckFailed(f"resumed at step {resume['step']}, the last checkpoint was step {last}")
            return (
                f"requeued; resumed at step {resume['step']} (the last checkpoint) in "
                f"{figures['requeue_to_resume_seconds']} s, next step {figures['requeue_to_next_step_seconds']} s after"
            )

        def no_double_updates() -> str:
            state = json.loads(sorted((run_dir / "checkpoints").glob("step-*/state.json"))[-1].read_text())
            ids = [f"arith-train-{i:05d}" for i in range(QUESTIONS)]
            with SyncCacheClient(f"http://127.0.0.1:{cache_port}", token=token) as cache:
                entries = [e for e in cache.read_entries(state["run_id"], ids) if e is not None]
            counts = [e.update_count for e in entries]
            figures["cache"] = {
                "entries": len(counts),
                "updated_once": sum(c == 1 for c in counts),
                "updated_twice_or_more": sum(c > 1 for c in counts),
            }
            if not counts or max(counts) > 1:
                raise CheckFailed(f"cache: {sum(c > 1 for c in counts)} entries updated more than once")
            return f"{len(counts)} entries, {sum(c == 1 for c in counts)} updated once, none twice"

        def graceful_requeue() -> str:
            count = len(records(run_dir, "step"))
            wait_for(
                "a new step to begin", lambda: len(records(run_dir, "step")) > count, min(300, left()), 0.1
            )
            time.sleep(MID_STEP_SECONDS)
            in_flight = records(run_dir, "step")[-1]["step"] + 1
            resumes = len(records(run_dir, "resume"))
            t = time.monotonic()
            cluster.run("scancel", "--batch", "--signal=USR1", job)
            resume = wait_for(
                "the resume record after USR1", lambda: records(run_dir, "resume")[resumes:], min(600, left())
            )[0]
            figures["graceful_requeue"] = {
                "step_in_flight": in_flight,
                "resumed_at_step": resume["step"],
                "usr1_to_resume_seconds": round(time.monotonic() - t, 1),
            }
            if resume["step"] != in_flight:
                raise CheckFailed(
                    f"step {in_flight} was in flight at USR1; the job resumed at step {resume['step']}"
                )
            return (
                f"step {in_flight} was in flight: it finished, was checkpointed, and the requeued job resumed "
                f"there ({figures['graceful_requeue']['usr1_to_resume_seconds']} s)"
            )

        ok = check("separate job steps", separate_steps)
        ok = ok and check("3 steps, tokens saved > 0", three_steps)
        ok = ok and check("scancel mid-step leaves nothing", lambda: cancel_leaves_nothing("cancel"))
        ok = ok and check("scontrol requeue resumes from the checkpoint", requeue_resumes)
        ok = ok and check("no cache update applied twice", no_double_updates)
        ok = ok and check("USR1 to the batch script: checkpoint, requeue, resume", graceful_requeue)
        ok = ok and check("no cache update applied twice after it", no_double_updates)
        ok = ok and check("final scancel leaves nothing", lambda: cancel_leaves_nothing("final_cancel"))
    except (CheckFailed, subprocess.SubprocessError, OSError) as exc:
        results.append(("setup", False, str(exc)))
        print(f"fail  setup: {exc}", flush=True)
    finally:
        if job:
            cluster.run("scancel", job, check=False)
            time.sleep(1)
        cluster.stop()
        figures["total_seconds"] = round(time.monotonic() - started, 1)
        figures["results"] = [{"check": n, "ok": good, "detail": d} for n, good, d in results]
        figures["ok"] = bool(results) and all(good for _, good, _ in results) and len(results) == 8
        (out / "slurm_check.json").write_text(json.dumps(figures, indent=2) + "\n")
        print(
            f"[slurm-check] {'all checks passed' if figures['ok'] else 'FAILED'} in {figures['total_seconds']} s; record {out / 'slurm_check.json'}"
        )
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
