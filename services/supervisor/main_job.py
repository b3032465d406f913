"""`rpo run [--config FILE]`: the whole system on one machine, one command.

It starts, as child processes on free localhost ports: the cache server (which starts the embedded Redis,
data under the run directory, unless `services.redis_url` names one), one rollout replica and the trainer; waits for each to be ready; seeds the cache
(`rpo cache init`, in this process), measures what full-path rollouts decode for the first step's questions,
lets the trainer evaluate, train and evaluate again; then prints a summary table (accuracy before and
after, decoded tokens per sample of RPO against full-path, wall time) and writes it to the run directory.
Without `--config` it runs the built-in default, `services/supervisor/presets/tiny-demo.yaml` (the tiny model,
warm-started on the synthetic task); given a model or dataset of the user's (`--model`, `--dataset`, a Hub
id or a path) and no `--config`, it runs on the library's defaults instead, and says so. A Hub id is
resolved once, and every process gets that snapshot and the context fitted to the model
(`services.core.model_fit`).

Guarantees: every process it started is stopped when it returns, fails, or gets Ctrl-C/SIGTERM (the
trainer first gets SIGTERM, so it saves a checkpoint); a part that dies is named, with its log's tail;
an existing run directory is moved aside (`<dir>.<time>`), never overwritten.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from services.core.cli_args import UsageError, config_from_args, shortcut_overrides
from services.core.clients.replica_set import RolloutFailed
from services.core.config import RunConfig, fresh_run_id, load_config
from services.core.data import DatasetError, encode_prompt
from services.core.data_roles import choose_dataset, training_questions
from services.core.http_client import ServiceCallError
from services.core.model_fit import check_fit, fitted_context
from services.models.model_path import resolve_model_path
from services.supervisor.gpu_split import fit_to_gpus
from services.supervisor.processes import PartFailed, Supervisor, free_port, rpo_command, write_run_config
from trainer.checkpoint import Checkpointer
from trainer.rollouts.cache_init import seed_cache
from trainer.rollouts.data_order import DataCursor, request_seed
from trainer.rollouts.services import RemoteServices
from trainer.telemetry.progress import read_records, read_step_records

log = logging.getLogger("rpo.run")

PRESET = "tiny-demo.yaml"
TRAINER_STOP_SECONDS = 300.0
"""After Ctrl-C, how long the trainer may take to finish its step and save a checkpoint."""


def preset_path(name: str = PRESET) -> Path:
    return Path(str(resources.files("services.supervisor").joinpath("presets", name)))


def run_config(args: Any) -> RunConfig:
    """The configuration `rpo run` uses: --config when given; else the built-in preset, unless the model or
    the dataset is the user's, which then runs on the library defaults (the preset's tiny sizes would not
    fit it); then the environment, the shortcut flags and --set. `rpo config show --run` prints it."""
    if getattr(args, "config", None):
        return config_from_args(args)
    overrides = [*shortcut_overrides(args), *getattr(args, "overrides", [])]
    preset = load_config(preset_path(), overrides)
    users = [
        f"{what} {value!r}"
        for what, value in (("model", preset.model.path), ("dataset", preset.data.dataset))
        if not value.startswith("builtin:")
    ]
    if not users:
        return preset
    log.info(
        "rpo run: your %s and no --config: the library defaults (the paper's settings), not the tiny "
        "demo's preset; `rpo config show` prints them, --config FILE or --set changes them",
        " and ".join(users),
    )
    return load_config(None, overrides)


def run_main(args: Any) -> int:
    cfg = run_config(args)
    check_inputs(cfg)
    cfg = fit_to_gpus(cfg)  # on a GPU: the memory plan fits, and splits a GPU the trainer shares
    summary = MainJob(cfg, resume=getattr(args, "resume", False)).run()
    print(render_summary(summary))
    if summary.get("ok"):
        return 0
    return 130 if summary.get("error") == "interrupted" else 1


def check_inputs(cfg: RunConfig) -> None:
    """What can be refused before any process starts (a ConfigError or DatasetError: one line, exit 2): a
    user's model that is missing or shorter than the configured context, and nothing to evaluate on."""
    choose_dataset("eval", cfg.data)
    if not cfg.model.path.startswith("builtin:"):  # a built-in one is built later, once
        check_fit(cfg, resolve_model_path(cfg.model.path, cfg.model.revision))


def fresh_run_dir(path: Path) -> Path:
    """Create `path`; an existing non-empty one is renamed to `<path>.<YYYYmmdd-HHMMSS>` first."""
    if path.exists() and any(path.iterdir()):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        aside = path.with_name(f"{path.name}.{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.{stamp}-{n}")
        path.rename(aside)
        log.info("moved the previous run directory aside: %s", aside)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every `finally` (stopping the children) runs."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class MainJob:
    """One `rpo run`: the steps of the module docstring, in order. `resume`: continue the interrupted run in
    `train.run_dir` from its last checkpoint (same run id, the cache restored from the checkpoint, no cache
    initialisation) instead of moving that directory aside and starting over."""

    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg = cfg
        self.resume = resume

    def run(self) -> dict[str, Any]:

        started = time.monotonic()
        cfg = self.cfg
        if self.resume:
            run_dir = Path(cfg.train.run_dir)
            self.cfg = cfg = resumed_config(cfg, run_dir)
        else:
            run_dir = fresh_run_dir(Path(cfg.train.run_dir))
        summary: dict[str, Any] = {"run_dir": str(run_dir), "ok": False}
        try:
            with sigterm_as_interrupt(), Supervisor(run_dir / "logs") as supervisor:
                summary.update(self._run(supervisor, run_dir))
                summary["ok"] = True
        except PartFailed as exc:
            summary["error"] = str(exc)
            log.error("rpo run failed: %s", exc)
        except (RolloutFailed, ServiceCallError, DatasetError, ValueError, RuntimeError, OSError) as exc:
            summary["error"] = f"{type(exc).__name__}: {exc}"
            log.error("rpo run failed: %s (the services' logs are in %s)", summary["error"], run_dir / "logs")
        except KeyboardInterrupt:
            summary["error"] = "interrupted"
            log.warning("rpo run interrupted: every process it started has been stopped")
        finally:
            summary["wall_seconds"] = time.monotonic() - started
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return summary

    def _run(self, supervisor: Supervisor, run_dir: Path) -> dict[str, Any]:

        t = time.monotonic()
        # builds (and warm-starts) the tiny model once; a Hub id resolves to one snapshot, which every process gets
        model_path = resolve_model_path(self.cfg.model.path, self.cfg.model.revision)
        setup_seconds = {"model": time.monotonic() - t}
        t = time.monotonic()
        cfg, config_file, env = start_services(supervisor, self.cfg, run_dir, model_path)
        self.cfg = cfg
        setup_seconds["services"] = time.monotonic() - t

        # Cache initialisation and the full-path reference, in this process, through the services.

        remote = RemoteServices(cfg)
        try:
            t = time.monotonic()
            # a resumed run's cache comes back from its checkpoint (the trainer restores it)
            init_stats = seed_cache(cfg, remote) if cfg.algorithm.mode == "rpo" and not self.resume else None
            setup_seconds["cache_init"] = time.monotonic() - t
            supervisor.check_alive()
            reference = full_path_reference(cfg, remote)
        finally:
            remote.close()

        # The trainer: evaluation before, training, evaluation after (all in its own process).
        t = time.monotonic()
        trainer = supervisor.start("trainer", self._trainer_argv(config_file), env=env, log_to_file=False)
        log.info("trainer metrics on http://127.0.0.1:%s/metrics", cfg.train.metrics_port)
        try:
            code = supervisor.wait(trainer)
        except KeyboardInterrupt:
            log.warning("stopping the trainer (it saves a checkpoint first; `rpo run --resume` continues)")
            supervisor.stop(trainer, signal.SIGTERM, timeout_seconds=TRAINER_STOP_SECONDS)
            raise
        if code != 0:
            raise PartFailed(f"the trainer exited {code} (its output is above; run directory {run_dir})")
        train_seconds = time.monotonic() - t
        return collect_summary(run_dir, cfg, init_stats, reference, setup_seconds, train_seconds)

    def _trainer_argv(self, config_file: Path) -> list[str]:

        n = self.cfg.train.num_processes
        resume = ["--resume"] if self.resume else []
        if n == 1:
            return rpo_command("train", "--config", str(config_file), *resume)
        return [
            sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_gpus", str(n),
            "--master_port", str(free_port()), "--module", "services.cli", "train", "--config", str(config_file),
            *resume,
        ]  # fmt: skip


def resumed_config(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """`rpo run --resume`: the config with the interrupted run's id (from its last checkpoint); a
    UsageError naming the directory when there is nothing to resume."""
    latest = Checkpointer(run_dir / "checkpoints", cfg.train.keep_checkpoints).latest()
    if latest is None:
        raise UsageError(
            f"--resume: no checkpoint under {run_dir / 'checkpoints'} (train.run_dir); run without --resume "
            "to start, or give the interrupted run's --run-dir/--config"
        )
    state = Checkpointer.read_state(latest)
    if cfg.services.run_id not in ("auto", state.run_id):
        raise UsageError(
            f"--resume: {latest} belongs to run {state.run_id!r}, the config names {cfg.services.run_id!r}"
        )
    cfg = cfg.model_copy(deep=True)
    cfg.services.run_id = state.run_id
    log.info("resuming run %s from %s (step %d)", state.run_id, latest, state.step)
    return cfg


def start_services(
    supervisor: Supervisor, cfg: RunConfig, run_dir: Path, model_path: Path, replicas: int = 1
) -> tuple[RunConfig, Path, dict[str, str]]:
    """Start the cache server and `replicas` rollout replicas on free localhost ports and wait until all
    are ready. Returns the resolved config every process shares (concrete model path, URLs, a fresh run
    id unless one is configured), its file `run_dir/config.yaml`, and the children's environment."""

    cache_url = f"http://127.0.0.1:{free_port()}"
    ports = [free_port() for _ in range(replicas)]
    cfg = cfg.model_copy(deep=True)
    context, how = fitted_context(cfg, model_path)
    check_fit(cfg, model_path)
    log.info("context: %s", how)
    cfg.model.path = str(model_path)
    cfg.model.max_model_len = context
    cfg.train.run_dir = str(run_dir)
    cfg.train.metrics_host = "127.0.0.1"
    if cfg.train.metrics_port == 0:
        cfg.train.metrics_port = free_port()
    if cfg.services.run_id == "auto":
        cfg.services.run_id = fresh_run_id()
    if cfg.services.redis_url is None:  # the cache server starts the embedded Redis, data in the run dir
        cfg.cache_server.data_dir = str(run_dir / "redis")
    cfg.services.cache_url = cache_url
    cfg.services.rollout_urls = [f"http://127.0.0.1:{p}" for p in ports]
    cfg.services.rollout_discovery = None
    cfg.cache_server.host = cfg.rollout.host = "127.0.0.1"
    cfg.cache_server.port = int(cache_url.rsplit(":", 1)[1])
    config_file, env = write_run_config(cfg, run_dir / "config.yaml")
    children = [
        supervisor.start(
            "cache", rpo_command("serve", "cache", "--config", str(config_file)), env=env, url=cache_url
        )
    ]
    for n, port in enumerate(ports):
        children.append(
            supervisor.start(
                "rollout" if replicas == 1 else f"rollout-{n}",
                rpo_command("serve", "rollout", "--config", str(config_file), "--port", str(port)),
                env=env,
                url=f"http://127.0.0.1:{port}",
            )
        )
    for child in children:
        supervisor.wait_ready(child, cfg.services.startup_timeout_seconds)
    log.info(
        "cache server %s and rollout replicas %s are ready", cache_url, ", ".join(cfg.services.rollout_urls)
    )
    return cfg, config_file, env


def full_path_reference(cfg: RunConfig, remote: RemoteServices) -> dict[str, Any]:
    """Decoded tokens per sample of full-path rollouts (cache off) for the first step's questions, at the
    starting policy: what RPO's first step is compared against, question for question."""

    questions = training_questions(cfg.data)
    indices = DataCursor(len(questions), cfg.train.seed).take(cfg.train.questions_per_step)
    chosen = [questions[i] for i in indices]
    # lazy: heavy import (transformers), paid only on this path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    prompts = {q.id: encode_prompt(tokenizer, q, cfg.data) for q in chosen}
    settings = remote.plans.train(seed=request_seed(cfg.train.seed, 1, 0))
    settings = settings.model_copy(update={"mode": "full", "seed_cache_on_miss": False})
    t = time.monotonic()
    replica_set = remote.replica_set
    batch = replica_set.rollouts(
        replica_set.replicas(),
        chosen,
        prompts,
        settings=settings,
        min_policy_version=0,
        phase="full-path reference",
    )
    samples = sum(len(g.samples) for g in batch.groups)
    return {
        "questions": len(chosen),
        "samples": samples,
        "generated_tokens": batch.generated_tokens,
        "decoded_tokens_per_sample": batch.generated_tokens / max(1, samples),
        "accuracy": sum(s.correct for g in batch.groups for s in g.samples) / max(1, samples),
        "rollout_seconds": time.monotonic() - t,
    }


def collect_summary(
    run_dir: Path,
    cfg: RunConfig,
    init_stats: dict[str, Any] | None,
    reference: dict[str, Any],
    setup_seconds: dict[str, float],
    train_seconds: float,
) -> dict[str, Any]:
    """The numbers of the summary table, read back from the trainer's metrics.jsonl."""

    steps = read_step_records(run_dir)
    evals = {r["label"]: r for r in read_records(run_dir, "eval")}
    samples = sum(r.samples for r in steps)
    decoded = sum(r.generated_tokens for r in steps)
    return {
        "mode": cfg.algorithm.mode,
        "algorithm": cfg.algorithm.algorithm,
        "model": cfg.model.path,
        "steps": len(steps),
        "eval_before": evals.get("before"),
        "eval_after": evals.get("after"),
        "decoded_tokens_per_sample": decoded / max(1, samples),
        "first_step_decoded_tokens_per_sample": steps[0].decoded_tokens_per_sample if steps else None,
        "reused_prefix_tokens": sum(r.reused_prefix_tokens for r in steps),
        "generated_tokens": decoded,
        "full_path_reference": reference,
        "cache_init": init_stats,
        "mean_step_seconds": sum(r.step_seconds for r in steps) / max(1, len(steps)),
        "setup_seconds": setup_seconds,
        "train_seconds": train_seconds,
    }


def render_summary(summary: dict[str, Any]) -> str:
    """The summary table as text (rich), for the terminal."""

    console = Console(record=True, width=110, file=io.StringIO())  # rendered here, printed by the caller
    if not summary.get("ok"):
        console.print(f"[bold red]rpo run did not finish:[/] {summary.get('error')}")
        console.print(f"run directory: {summary.get('run_dir')}")
        return console.export_text()
    table = Table(
        title=f"rpo run: {summary['algorithm']} + {summary['mode']} on {Path(summary['model']).name}"
    )
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}

    def pct(d: dict, key: str) -> str:
        return f"{100 * d[key]:.1f}%" if key in d else "n/a"

    k = after.get("k") or before.get("k") or 1
    table.add_row("held-out accuracy (pass@1)", pct(before, "pass_at_1"), pct(after, "pass_at_1"))
    if k > 1:
        table.add_row(f"held-out pass@{k}", pct(before, "pass_at_k"), pct(after, "pass_at_k"))
    ref = summary["full_path_reference"]
    rpo_first = summary.get("first_step_decoded_tokens_per_sample")
    table.add_section()
    table.add_row(
        "decoded tokens / sample, first step's questions",
        f"full-path {ref['decoded_tokens_per_sample']:.1f}",
        f"{summary['mode']} {rpo_first:.1f}" if rpo_first is not None else "n/a",
    )
    saved = 1 - summary["decoded_tokens_per_sample"] / max(1e-9, ref["decoded_tokens_per_sample"])
    table.add_row(
        "decoded tokens / sample, all steps",
        "",
        f"{summary['decoded_tokens_per_sample']:.1f} ({100 * saved:.0f}% fewer)",
    )
    table.add_row("response tokens reused from the cache", "", f"{summary['reused_prefix_tokens']:,}")
    table.add_section()
    table.add_row("steps (mean step time)", "", f"{summary['steps']} ({summary['mean_step_seconds']:.2f} s)")
    table.add_row("wall time", "", f"{summary['wall_seconds']:.0f} s")
    console.print(table)
    if evaluated_on := after.get("dataset") or before.get("dataset"):
        console.print(f"evaluated on: {evaluated_on}")
    console.print(f"run directory: {summary['run_dir']}")
    return console.export_text()
