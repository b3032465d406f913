"""The RPO training recipe, top to bottom: setup, train (one step at a time), checkpoint, cleanup.

One step (docs/architecture.md, synchronous mode):
 1. take the next questions from the data cursor (seeded shuffle per epoch, resumable);
 2. rank 0 finds the replicas and pushes the current weights to any replica not serving them (a replica
    that joined late or restarted; replicas serving a NEWER version, from a previous run or from steps lost
    before a resume, get them as a new version, since a replica's version only moves forward), then asks
    the replicas for group rollouts, the batch split across them
    (concurrent requests; a failed request is retried on another replica); DAPO's dynamic sampling keeps
    only groups with 0 < #correct < G and refills the batch from the cursor for a bounded number of rounds;
 3. rank 0 turns the groups into training samples and broadcasts them; every rank takes the learner step
    (with `rollout.sleep_mode` the replicas' engines sleep meanwhile and wake before step 4);
 4. the new weights are pushed to every replica, and the step waits until all serve the new version;
 5. only then are the step's epsilon-greedy cache updates committed (idempotent per step and question).
`algorithm.mode: full` is the same loop with the cache off: no cache call is made at all. With
`train.max_lag: 1`, steps 1-2 of the next step run in the background during 3-4 of this one
(trainer/rollouts/source.py); 4 and 5 stay in order.

Guarantees (synchronous mode; with max_lag 1 a batch may hold groups one version behind, each weighted,
never more): a batch never mixes policy versions (every rollout request carries the learner's version as
`min_policy_version`, and replicas are brought to it first); the cache never holds an answer from a step
whose weights did not reach every replica; a checkpoint is consistent (weights, optimizer, cache snapshot,
cursor and version after the same step). Departures from the paper: the cache updates of DAPO groups that
dynamic sampling drops are committed too (the update rule needs rewards, not gradients, and an all-correct
group still has a best, shortest answer to keep); the paper leaves this open.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.core.clients.engine_sleep import EngineSleep
from services.core.config import RunConfig, fresh_run_id
from services.core.data import encode_prompt
from services.core.data_roles import DatasetChoice, eval_dataset_spec, load_role, training_questions
from services.core.model_fit import fitted_context, response_budget_note
from services.core.reward_terms import shaping_note
from services.models.model_path import resolve_model_path
from trainer import dist
from trainer.checkpoint import HF_DIR, LEARNER_DIR, Checkpointer, StopRequest, TrainerState
from trainer.learner.engine import Learner
from trainer.rollouts.cache_init import seed_cache, trainer_seeds_cache
from trainer.rollouts.collected import CollectedGroups
from trainer.rollouts.data_order import DataCursor, planned_steps
from trainer.rollouts.evaluate import evaluate_questions
from trainer.rollouts.services import RemoteServices
from trainer.rollouts.source import RolloutSource
from trainer.telemetry.completions import StepCompletions
from trainer.telemetry.metrics import TrainerMetrics
from trainer.telemetry.progress import StepProgress
from trainer.telemetry.records import StepRecord
from trainer.telemetry.tracking import Tracker
from trainer.weights.export import export_hf
from trainer.weights.sender import PushKind, WeightSender

log = logging.getLogger("rpo.train")


# ----------------------------------------------------------------------------------------------------------
# The recipe


class RunCollision(ValueError):
    """A fresh start found a cache that another run's training steps have updated under the same run id."""


class TrainingRecipe:
    """Setup, the step loop, checkpoints and cleanup of one training process (any rank).

    Rank 0 does all HTTP work; every collective (weight gathers, sample broadcast, learner step, checkpoint)
    is entered by every rank in the same order. A failure on rank 0 is broadcast, so the other ranks raise
    too instead of waiting for a collective that never comes.
    """

    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.remote = self.progress = self.metrics = self.stop_request = self.weight_sender = None
        self.completions: StepCompletions | None = None
        self.rollout_source: RolloutSource | None = None

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:

        cfg = self.cfg
        self.dist = dist
        self.run_dir = Path(cfg.train.run_dir)
        self.model_path = resolve_model_path(cfg.model.path, cfg.model.revision)
        # Every rank reads the question list: the step count must agree before the learner exists.
        self.questions = training_questions(cfg.data)
        self.total_steps = planned_steps(
            len(self.questions), cfg.train.questions_per_step, cfg.train.epochs, cfg.train.max_steps
        )
        self.learner = Learner(cfg, str(self.model_path), self.total_steps)
        self.main = dist.is_main()
        self.cursor = DataCursor(len(self.questions), cfg.train.seed)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.train.keep_checkpoints)
        self.step = 0
        self.stop_request = StopRequest()
        self.prompts: dict[str, list[int]] = {}
        self.eval_questions: list = []
        self.eval_prompts: dict[str, list[int]] = {}
        self.val_questions: list = []
        self.val_prompts: dict[str, list[int]] = {}
        self.eval_choice: DatasetChoice | None = None
        self.val_choice: DatasetChoice | None = None
        if cfg.services.run_id == "auto":  # rank 0 picks it, every rank uses it
            _, cfg.services.run_id = self.on_main(self._pick_run_id, share=lambda run_id: run_id)
        if self.main:
            # lazy: heavy import (transformers), paid only on this path
            from transformers import AutoTokenizer

            self.run_dir.mkdir(parents=True, exist_ok=True)
            tokenizer = AutoTokenizer.from_pretrained(
                self.model_path, trust_remote_code=cfg.model.trust_remote_code
            )
            self.prompts = {q.id: encode_prompt(tokenizer, q, cfg.data) for q in self.questions}
            if loaded := load_role("eval", cfg.data):
                self.eval_questions, self.eval_choice = loaded
                self.eval_prompts = {q.id: encode_prompt(tokenizer, q, cfg.data) for q in self.eval_questions}
            if loaded := load_role("val", cfg.data):
                self.val_questions, self.val_choice = loaded
                self.val_prompts = {q.id: encode_prompt(tokenizer, q, cfg.data) for q in self.val_questions}
            every_prompt = [*self.prompts.values(), *self.eval_prompts.values(), *self.val_prompts.values()]
            context, _ = fitted_context(cfg, self.model_path)
            if note := response_budget_note(cfg, context, max(map(len, every_prompt), default=0)):
                log.warning(note)
            self.remote = RemoteServices(cfg)
            self.rollout_source = RolloutSource(
                self.remote, self.cursor, self.questions, self.prompts, cfg, self.total_steps
            )
            self.metrics = TrainerMetrics()
            if cfg.train.metrics_port is not None:
                self.metrics.serve(cfg.train.metrics_host, cfg.train.metrics_port)
        self.weight_sender = WeightSender.for_learner(cfg, self.learner)
        resumed = self.load_checkpoint() if self.resume else False
        if not resumed and cfg.algorithm.mode == "rpo":
            self.on_main(self._check_run_is_new)
        self.seed_first = trainer_seeds_cache(cfg, resumed)
        if self.main:
            tracker = None
            if cfg.train.report_to:
                tracker = Tracker(cfg.train.report_to, self.run_dir, cfg.services.run_id, cfg.public_dict())
            self.progress = StepProgress(
                self.run_dir, self.total_steps, self.step, cfg.train.log_every, tracker=tracker
            )
            if cfg.train.log_completions:
                self.completions = StepCompletions(
                    self.run_dir, tokenizer, self.questions, cfg.train.num_completions_to_log, tracker
                )
            self.metrics.policy_version.set(self.learner.policy_version)
            if self.resume:
                self.progress.event("resume", step=self.step, policy_version=self.learner.policy_version)
            a, r = cfg.algorithm, cfg.reward
            if note := shaping_note(r.reward_terms(), r.correctness_index(), a.length_shaping, a.alpha):
                log.info(note)
            log.info(
                "training %s (%s + %s) on %d questions: %d steps of %d questions x G=%d, from step %d",
                self.model_path,
                cfg.algorithm.algorithm,
                cfg.algorithm.mode,
                len(self.questions),
                self.total_steps,
                cfg.train.questions_per_step,
                cfg.algorithm.group_size,
                self.step,
            )

    # ---------------------------------------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        """Run the remaining steps; returns what happened (steps done, stopped early or not)."""
        cfg = self.cfg
        if self.seed_first:
            self.seed_cache()
        if self.step == 0 and cfg.train.eval_before:
            self.evaluate("before")
        stopped = False
        while self.step < self.total_steps:
            record, stopped = self.train_step(self.step + 1)
            self.step += 1
            if record is not None:
                self.progress.step(record)
                self.metrics.observe_step(record)
            if stopped or self.step % cfg.train.checkpoint_every == 0 or self.step == self.total_steps:
                self.save_checkpoint()
            if stopped:
                log.warning("stopped after step %d (%s)", self.step, self.stop_request.signal_name)
                break
            if (
                cfg.train.eval_every
                and self.step % cfg.train.eval_every == 0
                and self.step < self.total_steps
            ):
                self.evaluate(f"step {self.step}")
        if not stopped:
            final = self.run_dir / "final"
            export_hf(self.learner, str(final))
            if self.main:
                log.info("final policy (version %d) written to %s", self.learner.policy_version, final)
            self.evaluate("after")
        return {"steps": self.step, "total_steps": self.total_steps, "stopped": stopped}

    def train_step(self, step: int) -> tuple[StepRecord | None, bool]:
        """One synchronous step (module docstring, 1-5); returns the record (rank 0; None elsewhere) and
        whether to stop."""
        started = time.monotonic()
        phases = dict.fromkeys(("rollout", "reward", "train", "weight_sync", "cache"), 0.0)
        version = self.learner.policy_version

        # 1-2. The replicas, brought to the learner's weights first; the step's group rollouts.
        replicas = self.sync_replicas()
        version = self.learner.policy_version
        collected, samples = self.on_main(
            lambda: self._rollouts(step, replicas, version), share=lambda c: c.samples
        )
        if self.main:
            phases["rollout"], phases["reward"] = collected.rollout_seconds, collected.reward_seconds

        # 3. The learner step, on every rank with the same samples (the engines asleep meanwhile, if asked).
        t = time.monotonic()
        with self.engines_asleep(replicas if samples else []):
            learner_stats = self.learner.train_step(samples) if samples else None
        phases["train"] = time.monotonic() - t

        # 4. The new weights to every replica; wait until all serve them.
        transport = None
        if samples:
            t = time.monotonic()
            transport = self.weight_sender.push(
                replicas, self.learner.policy_version, PushKind.STEP, f"step {step}"
            )
            phases["weight_sync"] = time.monotonic() - t

        # 5. Only now the step's cache updates (none in full mode).
        cache_updates, stop = self.on_main(
            lambda: self._commit_cache(step, collected, phases), share=lambda _: self.stop_request.requested
        )
        record = None
        if self.main:
            record = collected.record(step, self.learner.policy_version, collected.epoch)
            record.lag = collected.lag
            record.step_seconds = time.monotonic() - started
            record.phases = phases
            record.weight_sync_seconds = phases["weight_sync"] if samples else None
            record.weight_transport = transport
            record.cache_updates = cache_updates
            record.learner = learner_stats
            if self.completions is not None:
                self.completions.step(step, collected)
        return record, bool(stop)

    def sync_replicas(self) -> list[str]:
        """The replicas that answer, each serving the learner's weights (pushed to those that did not);
        collective. The learner's version moves only when a replica already served a newer one."""

        def check() -> tuple[list[str], list[str], int]:
            replicas = self.remote.replica_set.replicas()
            behind, version = self.remote.replica_set.check_replicas(replicas, self.learner.policy_version)
            return replicas, behind, version

        found, (behind, version) = self.on_main(check, share=lambda r: (r[1], r[2]))
        self.learner.policy_version = version
        if behind:
            self.weight_sender.push(behind, version, PushKind.CATCH_UP)
        return found[0] if found else []

    def engines_asleep(self, replicas: list[str]) -> contextlib.AbstractContextManager:
        """`rollout.sleep_mode`: the replicas' engines asleep for the block (rank 0 asks them), awake after."""
        if not self.main:
            return contextlib.nullcontext()
        return EngineSleep(self.cfg).asleep(replicas, before_wake=release_cached_gpu_memory)

    def _rollouts(self, step: int, replicas: list[str], version: int) -> CollectedGroups:
        return self.rollout_source.take(step, replicas, version)

    def _commit_cache(self, step: int, collected: Any, phases: dict[str, float]) -> dict[str, int]:
        if self.cfg.algorithm.mode != "rpo":
            return {}
        t = time.monotonic()
        counts = self.remote.commit_cache_updates(step, collected.all_groups, collected.all_versions)
        phases["cache"] = time.monotonic() - t
        return counts

    def evaluate(self, label: str) -> None:
        """Held-out pass@1 / pass@k through the replicas (rank 0; the others wait at the next collective).

        `before` and `after` evaluate the test set at `sampling.eval_temperature` and again at each of
        `sampling.eval_extra_temperatures` (labelled `after T=1`), and the validation set when there is one
        (`val after`); a periodic evaluation (`step N`) uses the validation set when there is one, so the
        test set is touched only before and after training."""
        runs = self._evaluations(label)
        if not runs:
            return
        replicas = (
            self.sync_replicas()
        )  # e.g. before the first step: replicas may serve another run's weights

        def run() -> None:
            for name, split, dataset, temperature in runs:
                questions, prompts = (
                    (self.val_questions, self.val_prompts)
                    if split == "val"
                    else (self.eval_questions, self.eval_prompts)
                )
                result = evaluate_questions(
                    self.remote,
                    self.cfg,
                    questions,
                    prompts,
                    replicas=replicas,
                    min_policy_version=self.learner.policy_version,
                    settings=self.remote.plans.evaluation_on(dataset, temperature),
                )
                choice = self.val_choice if split == "val" else self.eval_choice
                on = choice.describe() if choice else dataset
                log.info("evaluation %s on %s: %s", name, on, result.describe(), extra={"step": self.step})
                self.progress.event(
                    "eval",
                    label=name,
                    step=self.step,
                    split=split,
                    dataset=on,
                    temperature=temperature,
                    **result.as_dict(),
                )
                if split == "test" and temperature == self.cfg.sampling.eval_temperature:
                    self.metrics.eval_accuracy.set(result.pass_at_1)

        self.on_main(run)

    def _evaluations(self, label: str) -> list[tuple[str, str, str, float]]:
        """(label, split, dataset, temperature) of each evaluation `evaluate(label)` runs."""
        data, sampling = self.cfg.data, self.cfg.sampling
        test = eval_dataset_spec(data)
        val = (
            [(f"val {label}", "val", data.val_dataset, sampling.eval_temperature)] if data.val_dataset else []
        )
        if label not in ("before", "after"):
            return val or ([(label, "test", test, sampling.eval_temperature)] if test else [])
        if not test:
            return val
        extra = [(f"{label} T={t:g}", "test", test, t) for t in sampling.eval_extra_temperatures]
        return [(label, "test", test, sampling.eval_temperature), *extra, *val]

    def seed_cache(self) -> None:
        """One answer for every training question the cache lacks, from the policy the replicas serve
        (trainer/rollouts/cache_init.py); a cache that is already full costs one lookup."""
        self.sync_replicas()  # collective; e.g. replicas still serving another run's weights

        def run() -> None:
            stats = seed_cache(
                self.cfg, self.remote, self.questions, self.prompts, self.learner.policy_version
            )
            self.progress.event("cache_init", **{k: v for k, v in stats.items() if k != "questions"})

        self.on_main(run)

    def on_main(self, fn: Callable[[], Any], share: Callable[[Any], Any] = lambda _: None) -> tuple[Any, Any]:
        """`trainer.dist.on_main`: `fn` on rank 0, `share(result)` broadcast, a failure raised on every rank."""
        return dist.on_main(fn, share)

    # ----------------------------------------------------------------------------------------- checkpoint
    def save_checkpoint(self) -> None:
        """Learner state from every rank, then rank 0 adds the cache snapshot and the loop state and
        renames the directory into place (trainer/checkpoint.py)."""

        _, partial = self.on_main(lambda: self.checkpointer.begin(self.step), share=str)
        self.learner.save_checkpoint(str(Path(partial) / LEARNER_DIR), {"step": self.step})
        if self.cfg.train.checkpoint_hf:  # collective, like the save above
            export_hf(self.learner, str(Path(partial) / HF_DIR))

        def finish() -> None:
            if self.cfg.algorithm.mode == "rpo":
                self.remote.export_cache(Path(partial))
            state = TrainerState(
                step=self.step,
                policy_version=self.learner.policy_version,
                cursor=self.rollout_source.cursor_state(),
                run_id=self.cfg.services.run_id,
                mode=self.cfg.algorithm.mode,
            )
            final = self.checkpointer.commit(Path(partial), state)
            self.progress.event(
                "checkpoint", step=self.step, policy_version=state.policy_version, path=str(final)
            )
            log.info("checkpoint after step %d: %s", self.step, final, extra={"step": self.step})

        self.on_main(finish)

    def _pick_run_id(self) -> str:
        """`services.run_id: auto`: the checkpoint's when resuming, else a fresh one."""
        latest = self.checkpointer.latest() if self.resume else None
        run_id = Checkpointer.read_state(latest).run_id if latest is not None else fresh_run_id()
        log.info("run id %s (services.run_id=auto)", run_id)
        return run_id

    def _check_run_is_new(self) -> None:
        """A fresh start must not train on top of another run's cache (a reused run id)."""
        run_id = self.cfg.services.run_id
        trained = self.remote.cache.stats(run_id).trained_steps
        if not trained:
            return
        if self.cfg.train.overwrite_cache:
            log.warning(
                "run %s: deleting a cache %d training steps have updated (train.overwrite_cache)",
                run_id,
                trained,
            )
            self.remote.cache.delete_run(run_id)
            return
        raise RunCollision(
            f"run id {run_id!r} already holds a cache that {trained} training step(s) have updated (another run's, "
            "or this one's before a restart): pass --resume to continue from its checkpoint, give a new "
            "services.run_id (or leave it auto), or --set train.overwrite_cache=true to start over"
        )

    def load_checkpoint(self) -> bool:
        """Continue from the newest complete checkpoint: learner, version, cursor, RNG, cache snapshot.
        Returns False when there is none (the run starts at step 0)."""

        _, path = self.on_main(lambda: self.checkpointer.latest(), share=lambda p: str(p) if p else None)
        if path is None:
            if self.main:
                log.warning("--resume: no checkpoint under %s; starting at step 0", self.checkpointer.root)
            return False
        state = Checkpointer.read_state(Path(path))
        if state.mode != self.cfg.algorithm.mode or state.run_id != self.cfg.services.run_id:
            raise ValueError(
                f"checkpoint {path} is of run {state.run_id!r} in mode {state.mode!r}; this config is run "
                f"{self.cfg.services.run_id!r} in mode {self.cfg.algorithm.mode!r}: resume with the same config"
            )
        self.learner.load_checkpoint(str(Path(path) / LEARNER_DIR))  # weights, optimizer, version, RNG
        if self.learner.policy_version != state.policy_version:
            raise ValueError(
                f"checkpoint {path}: the learner holds policy version {self.learner.policy_version}, "
                f"state.json says {state.policy_version}; the checkpoint is inconsistent"
            )
        self.cursor.load_state_dict(state.cursor)
        self.step = state.step
        if state.mode == "rpo":
            self.on_main(lambda: self.remote.restore_cache(Path(path)))
        if self.main:
            log.info(
                "resumed from %s: step %d, policy version %d",
                path,
                state.step,
                state.policy_version,
                extra={"step": state.step, "policy_version": state.policy_version},
            )
        return True

    # -------------------------------------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        for closer in (
            self.rollout_source,
            self.weight_sender,
            self.stop_request,
            self.progress,
            self.completions,
            self.metrics,
            self.remote,
        ):
            if closer is not None:
                closer.close()


def release_cached_gpu_memory() -> None:
    """The learner's cached, unused GPU memory back to the driver, for the waking engines to take."""
    # lazy: heavy import (torch), paid only with rollout.sleep_mode on
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_training(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Set up, train, clean up; returns what `TrainingRecipe.train` reports."""
    recipe = TrainingRecipe(cfg, resume=resume)
    try:
        recipe.setup()
        with recipe.progress.logging_above_bar() if recipe.progress else contextlib.nullcontext():
            return recipe.train()
    finally:
        recipe.cleanup()
