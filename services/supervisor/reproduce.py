"""`rpo reproduce [--config FILE] [--steps N] [--smoke] [--sweep]`: the paper's comparison in miniature.

From the same warm model, with the same seeds, questions, G and steps, it trains and evaluates five arms,
each an `rpo run` on fresh services (its own cache server, embedded Redis, replica and trainer):

    GRPO | RPO+GRPO | RPO+GRPO without the length-aware reward | DAPO | RPO+DAPO

at the base config's L (0.5l, the paper's accuracy runs), and a sixth, RPO+GRPO at L = 32 tokens (about a
tenth of an answer, the paper's separate timing runs), for the rollout and step-time comparison.

then writes into the run directory `results.json`, `results.md` (the tables: accuracy before and after
with 95% intervals, decoded and reused tokens per sample with the predicted RPO/full ratio beside the
measured one, step time and its phases, wall time, RPO/full ratios, the targets) and three PNG plots.
`--sweep` adds the RPO+GRPO arm with L, G, epsilon and alpha varied, one small table each.

The default is the long-reasoning task (`services/demo/presets/reproduce.yaml`); `--smoke` runs two steps
per arm on the short task's warm model, which is what the test suite does.

An interrupted reproduction resumes: run the same command again and the arms that finished are kept (each
arm's directory is `arms/<name>/`), the one that stopped starts over, the rest follow. A changed base
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from services.cli.args import UsageError, shortcut_overrides
from services.core.config import ConfigError, RunConfig, load_config
from services.supervisor.main_job import MainJob, fresh_run_dir, preset_path
from services.supervisor.plots import write_plots
from services.supervisor.results import build_results, render_markdown

log = logging.getLogger("rpo.reproduce")

PRESET = "reproduce.yaml"
SMOKE_PRESET = "tiny-demo.yaml"
SMOKE_OVERRIDES = (
    "train.max_steps=2",
    "train.questions_per_step=4",
    "data.max_questions=8",
    "data.eval_max_questions=8",
    "sampling.eval_samples=2",
    "train.run_dir=runs/reproduce-smoke",
)
"""Two steps per arm on a handful of questions: every code path, none of the statistics."""

GPU_ROLLOUT_SHARE = 0.7
"""Assumed share of rollout in a full-path GRPO step on a GPU run, for the projected step-time ratio
(docs/results.md says where the figure comes from)."""


@dataclass(frozen=True)
class Arm:
    """One training run of the comparison: the `--set` items that make it, and its full-path counterpart."""

    name: str
    label: str
    overrides: tuple[str, ...]
    full: str | None = None
    """The full-path arm this RPO arm's tokens and times are compared with."""
    sweep: bool = False


GRPO = ("algorithm.algorithm=grpo",)
DAPO = (
    "algorithm.algorithm=dapo",
    # Clip-higher only acts when the ratio can leave 1: with one update per batch pi_old = pi_theta.
    "train.updates_per_batch=2",
    # Keep all-correct groups whose lengths differ: the length-aware reward's point is to rescue them.
    "algorithm.dynamic_sampling_filter=reward",
)
FULL, RPO = ("algorithm.mode=full",), ("algorithm.mode=rpo",)
NO_LENGTH_REWARD = ("algorithm.alpha=0",)

TIMING_LIMIT = 32
"""L of the timing arm, in tokens: about a tenth of the built-in long task's answers (the paper's timing runs
cut 800 of about 2,700 tokens; its accuracy runs use 0.5l). `--timing-limit` changes it for another task."""


def main_arms(timing_limit: int = TIMING_LIMIT) -> tuple[Arm, ...]:
    """The five arms of the paper's comparison at the base config's L, and RPO+GRPO again at a short L
    (the paper's separate timing configuration)."""
    return (
        Arm("grpo", "GRPO", (*GRPO, *FULL)),
        Arm("rpo-grpo", "RPO+GRPO", (*GRPO, *RPO), full="grpo"),
        Arm(
            "rpo-grpo-no-length", "RPO+GRPO, no length reward", (*GRPO, *RPO, *NO_LENGTH_REWARD), full="grpo"
        ),
        Arm("dapo", "DAPO", (*DAPO, *FULL)),
        Arm("rpo-dapo", "RPO+DAPO", (*DAPO, *RPO), full="dapo"),
        Arm(
            "rpo-grpo-timing",
            f"RPO+GRPO, L={timing_limit} (timing)",
            (*GRPO, *RPO, f"algorithm.truncation_limit={timing_limit}"),
            full="grpo",
        ),
    )


MAIN_ARMS = main_arms()
REFERENCE = "grpo"
HEADLINE_ACCURACY = ("rpo-grpo", "grpo")
"""The accuracy targets compare these two (RPO+GRPO with the length reward at the base L, and GRPO)."""
HEADLINE_TIMING = ("rpo-grpo-timing", "grpo")
"""The rollout and step-time targets compare these two (L about a tenth of the answer)."""


@dataclass(frozen=True)
class Sweep:
    """RPO+GRPO with one setting varied, compared with full-path GRPO."""

    key: str
    values: tuple[Any, ...]
    full_varies: bool = False
    """The setting applies to full-path GRPO too, so each point gets its own GRPO arm (G)."""
    revisits: bool = False
    """The points train on a third of the questions, each visited three times, with a GRPO arm on the same
    questions: a cache update is only ever read when its question comes back (epsilon)."""


SWEEPS: dict[str, Sweep] = {
    "L": Sweep("algorithm.truncation_limit", (16, 32, 64, "0.5l")),
    "G": Sweep("algorithm.group_size", (4, 6, 8), full_varies=True),
    "epsilon": Sweep("algorithm.epsilon", (0.1, 0.5, 1.0), revisits=True),
    "alpha": Sweep("algorithm.alpha", (0.0, 0.01, 0.1)),
}
"""The sweeps of `--sweep`; a point equal to an existing arm's settings reuses that arm."""
VISITS = 3
"""How often each question comes back in a `revisits` sweep."""


def settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings that tell arms apart (what the tables print and what de-duplicates sweep points)."""
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
        "max_steps": t.max_steps,
        "max_questions": cfg.data.max_questions,
        "epochs": t.epochs,
    }


class Reproduction:
    """The arms of one reproduction, their run directories, and the results built from them."""

    def __init__(
        self,
        base_path: Path,
        overrides: list[str],
        *,
        sweep: bool,
        smoke: bool,
        command: str,
        timing_limit: int = TIMING_LIMIT,
    ):
        self.base_path = base_path
        self.arms = main_arms(timing_limit)
        self.overrides = overrides
        self.smoke = smoke
        self.command = command
        self.base = self._config(())
        self.out = Path(self.base.train.run_dir)
        self.plan = self._plan(sweep)

    def _config(self, arm_overrides: tuple[str, ...]) -> RunConfig:
        return load_config(self.base_path, [*self.overrides, *arm_overrides])

    def _plan(self, sweep: bool) -> dict[str, Any]:
        arms = list(self.arms)
        points: dict[str, list[dict[str, Any]]] = {}
        if sweep:
            arms, points = self._with_sweeps(arms)
        return {
            "base": self._base_identity(),
            "arms": [
                {
                    "name": arm.name,
                    "label": arm.label,
                    "overrides": list(arm.overrides),
                    "full": arm.full,
                    "sweep": arm.sweep,
                    "settings": {**settings(self._config(arm.overrides)), "sweep": arm.sweep},
                }
                for arm in arms
            ],
            "reference": REFERENCE,
            "headline_accuracy": list(HEADLINE_ACCURACY),
            "headline_timing": list(HEADLINE_TIMING),
            "main_rpo_arms": [a.name for a in self.arms if a.full],
            "sweeps": points,
            "smoke": self.smoke,
        }

    def _with_sweeps(self, arms: list[Arm]) -> tuple[list[Arm], dict[str, list[dict[str, Any]]]]:
        """Add one arm per sweep point unless an arm with the same settings exists already."""
        by_settings = {json.dumps(settings(self._config(a.overrides)), sort_keys=True): a for a in arms}
        rpo_grpo = next(a for a in self.arms if a.name == HEADLINE_ACCURACY[0])
        grpo = next(a for a in self.arms if a.name == REFERENCE)
        points: dict[str, list[dict[str, Any]]] = {}

        def arm_for(name: str, label: str, overrides: tuple[str, ...], full: str | None) -> Arm:
            key = json.dumps(settings(self._config(overrides)), sort_keys=True)
            if key not in by_settings:
                by_settings[key] = Arm(name, label, overrides, full, sweep=True)
                arms.append(by_settings[key])
            return by_settings[key]

        steps, per_step = self.base.train.max_steps, self.base.train.questions_per_step
        questions = max(per_step, (steps or 1) * per_step // VISITS)
        revisit = (f"data.max_questions={questions}", f"train.epochs={VISITS}")
        for parameter, sweep in SWEEPS.items():
            points[parameter] = []
            context = revisit if sweep.revisits else ()
            suffix = f" ({questions} questions x {VISITS} visits)" if sweep.revisits else ""
            for value in sweep.values:
                item = f"{sweep.key}={value}"
                full = grpo
                if sweep.full_varies:
                    full = arm_for(
                        f"sweep-{parameter}-{value}-grpo",
                        f"GRPO, {parameter}={value}{suffix}",
                        (*grpo.overrides, *context, item),
                        None,
                    )
                elif context:
                    full = arm_for(
                        f"sweep-{parameter}-grpo", f"GRPO{suffix}", (*grpo.overrides, *context), None
                    )
                arm = arm_for(
                    f"sweep-{parameter}-{value}",
                    f"RPO+GRPO, {parameter}={value}{suffix}",
                    (*rpo_grpo.overrides, *context, item),
                    full.name,
                )
                points[parameter].append({"value": value, "arm": arm.name})
        return arms, points

    def _base_identity(self) -> dict[str, Any]:
        data = self.base.model_dump(mode="json")
        data["train"].pop("run_dir", None)
        return data

    # ------------------------------------------------------------------------------------------- running
    def prepare(self) -> list[str]:
        """Create (or resume in) the run directory; returns the names of the arms already finished."""
        plan_file = self.out / "plan.json"
        planned_before: dict[str, list[str]] = {}
        if plan_file.exists():
            previous = json.loads(plan_file.read_text())
            planned_before = {a["name"]: a["overrides"] for a in previous.get("arms", [])}
            if previous.get("base") != self.plan["base"]:
                log.info(
                    "the base configuration changed since %s was planned: starting a new reproduction",
                    self.out,
                )
                fresh_run_dir(self.out)
        else:
            fresh_run_dir(self.out)
        (self.out / "arms").mkdir(parents=True, exist_ok=True)
        plan_file.write_text(json.dumps(self.plan, indent=2) + "\n")
        done = []
        for arm in self.plan["arms"]:
            summary = self.out / "arms" / arm["name"] / "summary.json"
            # An arm of the same name planned with other settings (another --timing-limit, a changed
            # sweep) is run again.
            same = planned_before.get(arm["name"]) == arm["overrides"]
            if same and summary.exists() and json.loads(summary.read_text()).get("ok"):
                done.append(arm["name"])
        return done

    def run(self, gpu_rollout_share: float = GPU_ROLLOUT_SHARE) -> dict[str, Any]:
        """Run every arm not finished yet, in order; then build and write the results."""
        started = time.monotonic()
        done = self.prepare()
        arms = self.plan["arms"]
        if done:
            log.info(
                "resuming %s: %d of %d arms finished (%s)", self.out, len(done), len(arms), ", ".join(done)
            )
        with tqdm(total=len(arms), initial=len(done), desc="reproduce", unit="arm", disable=None) as bar:
            for index, arm in enumerate(arms):
                if arm["name"] in done:
                    continue
                self._run_arm(index, arm, evaluate_before=not self._has_before(arms))
                bar.update(1)
        results = self.write_results(gpu_rollout_share)
        log.info(
            "reproduction finished in %.0f s (this invocation); results in %s",
            time.monotonic() - started,
            self.out,
        )
        return results

    def _has_before(self, arms: list[dict[str, Any]]) -> bool:
        """Whether a finished arm evaluated the starting model already (it is the same in every arm)."""
        for arm in arms:
            metrics = self.out / "arms" / arm["name"] / "metrics.jsonl"
            if metrics.exists() and '"label": "before"' in metrics.read_text():
                return True
        return False

    def _run_arm(self, index: int, arm: dict[str, Any], evaluate_before: bool) -> None:
        arm_dir = self.out / "arms" / arm["name"]
        count = len(self.plan["arms"])
        log.info("arm %d/%d %s (%s): starting", index + 1, count, arm["name"], arm["label"])
        cfg = self._config(
            (
                *arm["overrides"],
                f"train.run_dir={arm_dir}",
                f"train.eval_before={str(evaluate_before).lower()}",
            )
        )
        summary = MainJob(cfg).run()
        if summary.get("error") == "interrupted":
            raise KeyboardInterrupt
        if not summary.get("ok"):
            raise ArmFailed(
                f"arm {arm['name']} failed: {summary.get('error')} (its logs: {arm_dir / 'logs'}); "
                "run the same command again to resume at this arm"
            )
        after = summary.get("eval_after") or {}
        log.info(
            "arm %d/%d %s: done in %.0f s, %d steps of %.2f s, %.1f decoded tokens/sample, pass@1 after %s",
            index + 1,
            count,
            arm["name"],
            summary["wall_seconds"],
            summary["steps"],
            summary["mean_step_seconds"],
            summary["decoded_tokens_per_sample"],
            f"{100 * after['pass_at_1']:.1f}%" if "pass_at_1" in after else "n/a",
        )

    def write_results(self, gpu_rollout_share: float) -> dict[str, Any]:
        """`results.json`, `results.md` and the plots, from whatever arms have finished."""
        cfg = self.base
        meta = {
            "task": f"{cfg.data.dataset} on {cfg.model.path}",
            "command": self.command,
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "learner": "shared-prefix (train.share_prefix: true)"
            if cfg.train.share_prefix
            else "one row per response (train.share_prefix: false)",
            "gpu_rollout_share": gpu_rollout_share,
        }
        results = build_results(self.out, self.plan, meta)
        results["wall_seconds"] = sum((row["wall_seconds"] or 0.0) for row in results["arms"].values())
        (self.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (self.out / "results.md").write_text(render_markdown(results))
        results["plots"] = [str(p) for p in write_plots(results, self.out)]
        return results


class ArmFailed(RuntimeError):
    """One arm's `rpo run` did not finish; the message names the arm and its logs."""


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


def reproduce_main(args: Any) -> int:
    """The `rpo reproduce` command."""
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.timing_limit < 1:
        raise UsageError(f"--timing-limit must be >= 1 token, got {args.timing_limit}")
    if not 0.0 <= args.gpu_rollout_share <= 1.0:
        raise UsageError(f"--gpu-rollout-share must be in [0, 1], got {args.gpu_rollout_share}")
    base_path = Path(args.config) if args.config else preset_path(SMOKE_PRESET if args.smoke else PRESET)
    overrides = [*(SMOKE_OVERRIDES if args.smoke else ())]
    if args.steps is not None:
        first = load_config(base_path, [*overrides, *args.overrides])
        overrides += [
            f"train.max_steps={args.steps}",
            f"data.max_questions={args.steps * first.train.questions_per_step}",
        ]
    overrides += [*shortcut_overrides(args), *args.overrides]
    try:
        reproduction = Reproduction(
            base_path,
            overrides,
            sweep=args.sweep,
            smoke=args.smoke,
            command=shlex.join(["rpo", *sys.argv[1:]]) if sys.argv[1:2] == ["reproduce"] else "rpo reproduce",
            timing_limit=args.timing_limit,
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        results = reproduction.run(args.gpu_rollout_share)
    except KeyboardInterrupt:
        log.warning("reproduction interrupted; run the same command again to resume at the arm it stopped in")
        return 130
    except ArmFailed as exc:
        log.error("%s", exc)
        return 1
    print(render_markdown(results))
    print(f"results: {reproduction.out / 'results.json'}; plots: {', '.join(results['plots'])}")
    return 0
