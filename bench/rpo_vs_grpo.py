"""RPO against full-path GRPO, side by side in one run on the tiny model: decoded tokens per sample and
step time, through the real services (cache server over the embedded Redis, one vLLM rollout replica, the
DeepSpeed trainer on CPU).

Both arms start from the same warm-started policy, train the same number of steps on the same questions in
the same order (same seed), with the same G and sampling; the only difference is `algorithm.mode` (the
cache on or off). Each arm gets fresh services (a fresh replica at policy version 0), and runs after the
other, never concurrently, so their step times do not share the CPU.

    .venv/bin/python bench/rpo_vs_grpo.py --steps 15            # prints a markdown table
    .venv/bin/python bench/rpo_vs_grpo.py --steps 15 --write-docs  # and updates docs/benchmarks.md
    .venv/bin/python bench/rpo_vs_grpo.py --set rollout.max_num_seqs=16   # a preset setting changed, both arms
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.core.config import load_config  # noqa: E402
from services.core.logs import setup_logging  # noqa: E402
from services.models.model_path import resolve_model_path  # noqa: E402
from services.reproduction.reproduce import machine as describe_machine  # noqa: E402
from services.supervisor.main_job import PRESET, preset_path, start_services  # noqa: E402
from services.supervisor.processes import PartFailed, Supervisor, rpo_command  # noqa: E402
from trainer.telemetry.progress import read_records  # noqa: E402

SECTION = "## Training"


def run_arm(mode: str, args: argparse.Namespace, work: Path, model_path: Path) -> dict:
    """One arm: fresh services, cache init (RPO only), `rpo train` for `args.steps` steps."""
    from trainer.rollouts.cache_init import seed_cache
    from trainer.rollouts.services import RemoteServices

    overrides = [
        f"algorithm.mode={mode}",
        f"train.max_steps={args.steps}",
        f"train.questions_per_step={args.questions_per_step}",
        f"train.checkpoint_every={args.steps}",
        "data.eval_dataset=null",
        f"services.run_id=bench-{mode}-{int(time.time())}",
        *args.set,
    ]
    cfg = load_config(preset_path(getattr(args, "preset", None) or PRESET), overrides)
    run_dir = work / mode
    run_dir.mkdir(parents=True)
    with Supervisor(run_dir / "logs") as supervisor:
        cfg, config_file, env = start_services(supervisor, cfg, run_dir, model_path)
        if mode == "rpo":
            remote = RemoteServices(cfg)
            try:
                seed_cache(cfg, remote)
            finally:
                remote.close()
        trainer = supervisor.start("trainer", rpo_command("train", "--config", str(config_file)), env=env)
        code = supervisor.wait(trainer)
        if code != 0:
            raise PartFailed(trainer.describe_exit())
    return summarize(read_records(run_dir, "step"))


def run_main_job(run_dir: Path, sets: list[str]) -> dict:
    """`rpo run --run-dir run_dir --set ...` in a subprocess (its log beside run_dir); its summary.json."""
    command = [sys.executable, "-m", "services.cli", "run", "--run-dir", str(run_dir)]
    for item in sets:
        command += ["--set", item]
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"rpo run {' '.join(sets)} failed; see {log.name}")
    return json.loads((run_dir / "summary.json").read_text())


def summarize(steps: list[dict]) -> dict:
    """Means over steps; step 1 is reported apart (it includes the engine's and the learner's warm-up)."""
    later = steps[1:] or steps
    samples = sum(r["samples"] for r in steps)
    return {
        "steps": len(steps),
        "decoded_tokens_per_sample": sum(r["generated_tokens"] for r in steps) / max(1, samples),
        "response_len_mean": statistics.fmean(r["response_len_mean"] for r in steps),
        "accuracy": statistics.fmean(r["accuracy"] for r in steps),
        "first_step_seconds": steps[0]["step_seconds"],
        "step_seconds": statistics.fmean(r["step_seconds"] for r in later),
        "phases": {p: statistics.fmean(r["phases"][p] for r in later) for p in steps[0]["phases"]},
    }


def machine() -> str:
    """The machine and the versions that produced a benchmark's figures, for its header."""
    host = describe_machine()
    import deepspeed
    import torch
    import vllm

    return (
        f"{host['cores']} cores ({host['cpu']}), {host['gpu']}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, vLLM {vllm.__version__}, DeepSpeed {deepspeed.__version__}"
    )


def render(results: dict[str, dict], args: argparse.Namespace, wall: float) -> str:
    rpo, full = results["rpo"], results["full"]
    algo = load_config(preset_path(), args.set).algorithm
    rows = [
        ("decoded tokens / sample", "decoded_tokens_per_sample", "{:.1f}"),
        ("response length (tokens)", "response_len_mean", "{:.1f}"),
        ("rollout accuracy", "accuracy", "{:.1%}"),
        ("step time, s (steps 2..)", "step_seconds", "{:.2f}"),
        ("first step, s", "first_step_seconds", "{:.2f}"),
    ]
    lines = [
        "| | RPO (GRPO + cache) | full-path GRPO | RPO / full |",
        "|---|---|---|---|",
    ]
    for label, key, fmt in rows:
        ratio = rpo[key] / full[key] if full[key] else float("nan")
        lines.append(f"| {label} | {fmt.format(rpo[key])} | {fmt.format(full[key])} | {ratio:.2f} |")
    for phase in rpo["phases"]:
        r, f = rpo["phases"][phase], full["phases"][phase]
        ratio = f"{r / f:.2f}" if f else "-"  # the cache phase of the full-path arm is zero
        lines.append(f"| {phase} phase, s | {r:.3f} | {f:.3f} | {ratio} |")
    command = " ".join(
        [
            f".venv/bin/python bench/rpo_vs_grpo.py --steps {args.steps}",
            f"--questions-per-step {args.questions_per_step}",
            *(f"--set {override}" for override in args.set),
        ]
    )
    return "\n".join(
        [
            SECTION,
            "",
            "`bench/rpo_vs_grpo.py` trains the tiny model (`builtin:tiny-warm`, the `tiny-demo` preset: "
            f"G = {algo.group_size},",
            f"L = {algo.truncation_limit}, suffix budget {algo.suffix_budget}, responses of about "
            f"{full['response_len_mean']:.0f} tokens) on the synthetic task with RPO and with",
            "full-path GRPO, one after the other in one run, each with fresh services (cache server, one vLLM",
            f"replica, the DeepSpeed trainer on CPU): {args.steps} steps of {args.questions_per_step} questions x G each, same",
            "seed and question order. Step time is the mean over steps 2 onwards; the phases are those of the",
            "trainer's step log (reward is the replicas' scoring time inside the rollout phase).",
            "",
            f"Command: `{command}` ({wall / 60:.1f} min in all), on {machine()}.",
            "",
            *lines,
            "",
        ]
    )


def write_docs(section: str) -> None:
    """Replace (or append) the Training section of docs/benchmarks.md, leaving the other sections alone."""
    path = REPO / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    try:
        start = lines.index(SECTION)
    except ValueError:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        # Up to the next heading of any level: a hand-written "###" subsection after the table survives.
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
        new = (
            "\n".join(
                [
                    *lines[:start],
                    *section.rstrip("\n").splitlines(),
                    *([""] if end < len(lines) else []),
                    *lines[end:],
                ]
            )
            + "\n"
        )
    path.write_text(new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--questions-per-step", type=int, default=32)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for both arms, as `rpo train --set` takes it (repeatable)",
    )
    parser.add_argument(
        "--write-docs", action="store_true", help="update the Training section of docs/benchmarks.md"
    )
    args = parser.parse_args()
    setup_logging("INFO")
    started = time.monotonic()
    model_path = resolve_model_path("builtin:tiny-warm")
    results = {}
    with tempfile.TemporaryDirectory(prefix="rpo-bench-") as tmp:
        for mode in ("rpo", "full"):
            results[mode] = run_arm(mode, args, Path(tmp), model_path)
    section = render(results, args, time.monotonic() - started)
    print(section)
    print(json.dumps(results, indent=2))
    if args.write_docs:
        write_docs(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
