"""`rpo reproduce [--task T] [--seeds N] [--arms A,B] [--smoke]`: the paper's comparison in miniature.

From the same warm model it trains and evaluates a protocol's arms (`services.reproduction.protocols`; below,
the default task's), each an `rpo run` on fresh services (its own cache server, embedded Redis, replica and
trainer), once per training seed:

- the headline pairs, each RPO arm paired with its own kind: GRPO / RPO+GRPO (the length-aware reward on)
  and GRPO / RPO+GRPO without the length reward, at the base config's L (0.5l, the paper's accuracy runs);
- RPO+GRPO at L = 0.1l, for decoded tokens and step time at a short cut (the paper's timing runs);
- the epsilon sweep: RPO+GRPO at epsilon 0 and 1 beside the headline's 0.5. The base config trains several
  epochs over a small question set, so every question comes back and its cache update is read;
- DAPO and RPO+DAPO at the first seed only (DAPO updates twice per batch: its rows say so).

Each run evaluates the test set before (once, in the first run: the same model in every arm) and after
training, at the paper's temperature and at the training temperature, and the validation set every
`train.eval_every` steps (the curves "equal time" is read from). `services.reproduction.results` turns the
runs into results.json and results.md (intervals over seeds and questions, the targets) and the plots.

Runs go seed by seed, so an interrupted or partial reproduction holds whole seeds first. Running the same
command again keeps every run that finished (`arms/<arm>/seed-<s>/`), starts the one that stopped over,
and runs the rest; `--arms` runs a subset, so the protocol can be run in parts. A changed base
configuration starts a new reproduction (the old directory is moved aside, never overwritten).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from services.core.cli_args import UsageError, shortcut_overrides
from services.core.config import ConfigError, RunConfig, load_config
from services.reproduction.plots import write_plots
from services.reproduction.protocols import DEFAULT_TASK, PROTOCOLS, Protocol
from services.reproduction.results import build_results
from services.reproduction.results_tables import render_markdown
from services.supervisor.main_job import MainJob, fresh_run_dir, preset_path

log = logging.getLogger("rpo.reproduce")

PRESET = PROTOCOLS[DEFAULT_TASK].preset
SMOKE_PRESET = "tiny-demo.yaml"
SMOKE_OVERRIDES = (
    "train.max_steps=2",
    "train.questions_per_step=4",
    "train.eval_every=1",
    "data.max_questions=4",
    "train.epochs=2",
    "data.eval_max_questions=8",
    "data.val_dataset=builtin:arith-eval",
    "data.val_max_questions=4",
    "sampling.eval_samples=2",
    "sampling.eval_extra_temperatures=[1.0]",
    "train.run_dir=runs/reproduce-smoke",
)
"""Two steps per arm on a handful of questions, each visited twice: every code path, none of the statistics.
(The short task has no validation split: the smoke validates on the first test questions.)"""


def settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings that tell arms apart (what the tables print)."""
    a, t = cfg.algorithm, cfg.train
    return {
        "algorithm": a.algorithm,
        "mode": a.mode,
        "alpha": a.alpha,
        "truncation_limit": a.truncation_limit,
        "group_size": a.group_size,
        "epsilon": a.epsilon,
        "updates_per_batch": t.updates_per_batch,
        "dynamic_sampling_filter": a.dynamic_sampling_filter if a.algorithm == "dapo" else None,
        "suffix_budget": a.suffix_budget,
        "loss_on_suffix_only": a.loss_on_suffix_only,
        "max_steps": t.max_steps,
        "max_questions": cfg.data.max_questions,
        "epochs": t.epochs,
        "seed": t.seed,
    }


class Reproduction:
    """The runs (arm x seed) of one reproduction, their directories, and the results built from them."""

    def __init__(
        self,
        base_path: Path,
        overrides: list[str],
        *,
        seeds: int = 1,
        arms: tuple[str, ...] | None = None,
        smoke: bool,
        command: str,
        protocol: Protocol = PROTOCOLS[DEFAULT_TASK],
    ):
        self.protocol = protocol
        self.base_path = base_path
        self.overrides = overrides
        self.smoke = smoke
        self.command = command
        self.base = self._config(())
        self.out = Path(self.base.train.run_dir)
        self.seeds = list(range(self.base.train.seed, self.base.train.seed + seeds))
        self.plan = self._plan(arms or protocol.arm_names)

    def _config(self, arm_overrides: tuple[str, ...]) -> RunConfig:
        return load_config(self.base_path, [*self.overrides, *arm_overrides])

    def _plan(self, chosen: tuple[str, ...]) -> dict[str, Any]:
        arms = [a for a in self.protocol.arms if a.name in chosen]
        runs = [
            {
                "arm": arm.name,
                "seed": seed,
                "dir": f"arms/{arm.name}/seed-{seed}",
                "overrides": [*arm.overrides, f"train.seed={seed}"],
            }
            for seed in self.seeds
            for arm in arms
            if seed == self.seeds[0] or not arm.first_seed_only
        ]
        return {
            "base": self._base_identity(),
            "seeds": self.seeds,
            "arms": [
                {
                    "name": arm.name,
                    "label": arm.label,
                    "overrides": list(arm.overrides),
                    "full": arm.full,
                    "group": arm.group,
                    "settings": settings(self._config(arm.overrides)),
                }
                for arm in arms
            ],
            "runs": runs,
            "task": self.protocol.task,
            "headline_pairs": [list(p) for p in self.protocol.headline_pairs],
            "epsilon_base": self.protocol.epsilon_base,
            "length_target": self.protocol.length_target,
            "protocol_minutes": self.protocol.minutes,
            "smoke": self.smoke,
        }

    def _base_identity(self) -> dict[str, Any]:
        data = self.base.model_dump(mode="json")
        data["train"].pop("run_dir", None)
        data["train"].pop("seed", None)  # the seeds are the plan's
        return data

    # ------------------------------------------------------------------------------------------- running
    def prepare(self) -> list[str]:
        """Create (or resume in) the run directory; returns the directories of the runs already finished."""
        plan_file = self.out / "plan.json"
        planned_before: dict[str, list[str]] = {}
        if plan_file.exists():
            previous = json.loads(plan_file.read_text())
            planned_before = {r["dir"]: r["overrides"] for r in previous.get("runs", [])}
            if previous.get("base") != self.plan["base"]:
                log.info(
                    "the base configuration changed since %s was planned: starting a new reproduction",
                    self.out,
                )
                planned_before = {}
                fresh_run_dir(self.out)
        else:
            fresh_run_dir(self.out)
        (self.out / "arms").mkdir(parents=True, exist_ok=True)
        # A partial invocation (--arms, fewer --seeds) keeps the runs planned before, so that results are
        # built from everything finished in this directory.
        merged = {r["dir"]: r for r in self._previous_runs(plan_file)}
        merged.update({r["dir"]: r for r in self.plan["runs"]})
        arms = {a["name"]: a for a in self._previous_arms(plan_file)}
        arms.update({a["name"]: a for a in self.plan["arms"]})
        recorded = {
            **self.plan,
            "arms": [arms[n] for n in self.protocol.arm_names if n in arms],
            "runs": sorted(
                merged.values(), key=lambda r: (r["seed"], self.protocol.arm_names.index(r["arm"]))
            ),
            "seeds": sorted({r["seed"] for r in merged.values()}),
        }
        plan_file.write_text(json.dumps(recorded, indent=2) + "\n")
        self.recorded_plan = recorded
        done = []
        for run in self.plan["runs"]:
            summary = self.out / run["dir"] / "summary.json"
            # A run planned with other settings (a changed arm) is run again.
            same = planned_before.get(run["dir"]) == run["overrides"]
            if same and summary.exists() and json.loads(summary.read_text()).get("ok"):
                done.append(run["dir"])
        return done

    @staticmethod
    def _previous_runs(plan_file: Path) -> list[dict[str, Any]]:
        return json.loads(plan_file.read_text()).get("runs", []) if plan_file.exists() else []

    @staticmethod
    def _previous_arms(plan_file: Path) -> list[dict[str, Any]]:
        return json.loads(plan_file.read_text()).get("arms", []) if plan_file.exists() else []

    def run(self) -> dict[str, Any]:
        """Run every run not finished yet, in order; then build and write the results."""
        started = time.monotonic()
        done = self.prepare()
        runs = self.plan["runs"]
        if done:
            log.info(
                "resuming %s: %d of %d runs finished (%s)", self.out, len(done), len(runs), ", ".join(done)
            )
        with tqdm(total=len(runs), initial=len(done), desc="reproduce", unit="run", disable=None) as bar:
            for index, run in enumerate(runs):
                if run["dir"] in done:
                    continue
                self._run_one(index, run, evaluate_before=not self._has_before())
                bar.update(1)
        results = self.write_results()
        log.info(
            "reproduction finished in %.0f s (this invocation); results in %s",
            time.monotonic() - started,
            self.out,
        )
        return results

    def _has_before(self) -> bool:
        """Whether a finished run evaluated the starting model already (it is the same in every arm)."""
        for run in self.recorded_plan["runs"]:
            metrics = self.out / run["dir"] / "metrics.jsonl"
            summary = self.out / run["dir"] / "summary.json"
            if summary.exists() and metrics.exists() and '"label": "before"' in metrics.read_text():
                return True
        return False

    def _run_one(self, index: int, run: dict[str, Any], evaluate_before: bool) -> None:
        run_dir = self.out / run["dir"]
        count = len(self.plan["runs"])
        name = f"{run['arm']} seed {run['seed']}"
        log.info("run %d/%d %s: starting", index + 1, count, name)
        cfg = self._config(
            (
                *run["overrides"],
                f"train.run_dir={run_dir}",
                f"train.eval_before={str(evaluate_before).lower()}",
            )
        )
        summary = MainJob(cfg).run()
        if summary.get("error") == "interrupted":
            raise KeyboardInterrupt
        if not summary.get("ok"):
            raise ArmFailed(
                f"run {name} failed: {summary.get('error')} (its logs: {run_dir / 'logs'}); "
                "run the same command again to resume at this run"
            )
        after = summary.get("eval_after") or {}
        log.info(
            "run %d/%d %s: done in %.0f s, %d steps of %.2f s, %.1f decoded tokens/sample, pass@1 after %s",
            index + 1,
            count,
            name,
            summary["wall_seconds"],
            summary["steps"],
            summary["mean_step_seconds"],
            summary["decoded_tokens_per_sample"],
            f"{100 * after['pass_at_1']:.1f}%" if "pass_at_1" in after else "n/a",
        )

    def write_results(self) -> dict[str, Any]:
        """`results.json`, `results.md` and the plots, from whatever runs have finished."""
        cfg = self.base
        meta = {
            "task": f"{cfg.data.dataset} on {cfg.model.path}",
            "command": self.command,
            "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "learner": "shared-prefix (train.share_prefix: true)"
            if cfg.train.share_prefix
            else "one row per response (train.share_prefix: false)",
            "base_config": self.plan["base"],
        }
        results = build_results(self.out, self.recorded_plan, meta)
        (self.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (self.out / "results.md").write_text(render_markdown(results))
        results["plots"] = [str(p) for p in write_plots(results, self.out)]
        return results


class ArmFailed(RuntimeError):
    """One run's `rpo run` did not finish; the message names the arm, the seed and the logs."""


def git_commit() -> str | None:
    """The commit the code ran at (with `+dirty` when the work tree differs), or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def machine() -> dict[str, Any]:
    """CPU model, cores and GPU of this machine, for the results' header."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    if shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
            gpu = "; ".join(line.split(" (")[0] for line in listed.splitlines() if line) or gpu
        except (OSError, subprocess.TimeoutExpired):
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform()}


def chosen_arms(spec: str | None, protocol: Protocol = PROTOCOLS[DEFAULT_TASK]) -> tuple[str, ...]:
    """`--arms a,b`: the named arms, in protocol order; unknown names are a usage error."""
    known = protocol.arm_names
    if not spec:
        return known
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(
            f"--arms: unknown arm {', '.join(unknown) or repr(spec)} for --task {protocol.task}; "
            f"choose from {', '.join(known)}"
        )
    return tuple(n for n in known if n in names)


def reproduce_overrides(args: Any, protocol: Protocol) -> list[str]:
    """The `--set` items every run gets, in order of precedence (later wins): the smoke settings, the
    protocol's own run directory (its preset's own run directory, or `--config`'s, is another protocol's
    or the user's), `--steps`, the flag shortcuts (`--run-dir`), then `--set`."""
    overrides = [*(SMOKE_OVERRIDES if args.smoke else ())]
    if protocol.run_dir and not args.smoke and not args.config:
        overrides.append(f"train.run_dir={protocol.run_dir}")
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    return [*overrides, *shortcut_overrides(args), *args.overrides]


def reproduce_main(args: Any) -> int:
    """The `rpo reproduce` command."""
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    task = getattr(args, "task", None) or DEFAULT_TASK
    if task not in PROTOCOLS:
        raise UsageError(f"--task: unknown task {task!r}; choose from {', '.join(PROTOCOLS)}")
    protocol = PROTOCOLS[task]
    arms = chosen_arms(args.arms, protocol)
    preset = SMOKE_PRESET if args.smoke else protocol.preset
    base_path = Path(args.config) if args.config else preset_path(preset)
    overrides = reproduce_overrides(args, protocol)
    try:
        reproduction = Reproduction(
            base_path,
            overrides,
            seeds=args.seeds,
            arms=arms,
            smoke=args.smoke,
            protocol=protocol,
            command=shlex.join(["rpo", *sys.argv[1:]]) if sys.argv[1:2] == ["reproduce"] else "rpo reproduce",
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        results = reproduction.run()
    except KeyboardInterrupt:
        log.warning("reproduction interrupted; run the same command again to resume at the run it stopped in")
        return 130
    except ArmFailed as exc:
        log.error("%s", exc)
        return 1
    print(render_markdown(results))
    print(f"results: {reproduction.out / 'results.json'}; plots: {', '.join(results['plots'])}")
    return 0
