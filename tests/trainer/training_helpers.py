"""Helpers of the trainer's tests: a run config over real services, the cache seeded through them, `rpo train`
as a real subprocess (its own process group, output to a file, a timeout), and a rollout group made by hand
(for the loop's tests that stand in for a replica)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from services.core.config import RunConfig, load_config
from services.core.schemas.rollout import RolloutGroup, RolloutSample
from services.supervisor.main_job import preset_path
from services.supervisor.processes import write_run_config

REPO = Path(__file__).resolve().parents[2]

SMALL = (
    "data.max_questions=48",
    "data.eval_dataset=null",
    "algorithm.group_size=4",
    "algorithm.max_response_tokens=64",
    "train.questions_per_step=8",
    "train.micro_batch_size=32",
    "train.max_steps=3",
    "train.checkpoint_every=100",
    "train.metrics_port=null",
)
"""A few cheap steps: 8 questions x G=4 on the warm tiny model (the tiny-demo preset otherwise)."""


def run_config(
    tmp_path: Path, model_dir: Path, cache_url: str, replicas: Sequence[str], *overrides: str
) -> tuple[RunConfig, Path]:
    """The preset shrunk by SMALL, pointed at the given services, with a fresh run id; written to a file."""
    run_id = f"t-{uuid.uuid4().hex[:10]}"
    cfg = load_config(
        preset_path(),
        [
            *SMALL,
            f"model.path={model_dir}",
            f"train.run_dir={tmp_path / 'run'}",
            f"services.run_id={run_id}",
            f"services.cache_url={cache_url}",
            f"services.rollout_urls={json.dumps(list(replicas))}",
            *overrides,
        ],
    )
    path, _ = write_run_config(cfg, tmp_path / f"config-{run_id}.yaml")
    return cfg, path


def seed(cfg: RunConfig) -> dict:
    """`rpo cache init` in this process, through the configured replicas and cache server."""
    from trainer.rollouts.cache_init import seed_cache
    from trainer.rollouts.services import RemoteServices

    remote = RemoteServices(cfg)
    try:
        return seed_cache(cfg, remote)
    finally:
        remote.close()


class Trainer:
    """`rpo train --config FILE [args]` as a subprocess in its own process group."""

    def __init__(self, config_file: Path, *args: str, log_path: Path, cwd: Path = REPO):
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not (k.startswith("RPO_") and "__" in k)}
        env.setdefault("DS_ACCELERATOR", "cpu")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        with log_path.open("ab") as fh:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "train", "--config", str(config_file), *args],
                cwd=cwd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_seconds: float = 300.0) -> int:
        try:
            return self.process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"rpo train ran past {timeout_seconds} s:\n{self.output()[-4000:]}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the trainer's whole process group (no chance to save anything)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


def run_trainer(
    config_file: Path, *args: str, log_path: Path, timeout_seconds: float = 300.0, cwd: Path = REPO
) -> str:
    """Run `rpo train` to the end; returns its output; fails the test (with the output) on a non-zero exit."""
    trainer = Trainer(config_file, *args, log_path=log_path, cwd=cwd)
    code = trainer.wait(timeout_seconds)
    assert code == 0, f"rpo train exited {code}:\n{trainer.output()[-6000:]}"
    return trainer.output()


def wait_for_step(run_dir: Path, step: int, trainer: Trainer, timeout_seconds: float = 300.0) -> None:
    """Until metrics.jsonl holds the record of `step` (the trainer must stay alive meanwhile)."""
    from trainer.telemetry.progress import read_records

    deadline = time.monotonic() + timeout_seconds
    while not any(r["step"] >= step for r in read_records(run_dir, "step")):
        assert trainer.process.poll() is None, f"rpo train exited early:\n{trainer.output()[-6000:]}"
        assert time.monotonic() < deadline, (
            f"no step {step} after {timeout_seconds} s:\n{trainer.output()[-4000:]}"
        )
        time.sleep(0.1)


def replica_version(url: str) -> int:
    from services.core.clients.rollout import RolloutClient

    with RolloutClient(url) as client:
        return client.version().policy_version


def rollout_group(qid: str, correct: list[bool], prefix: int = 2) -> RolloutGroup:
    """A group of one sample per entry of `correct` (right: raw reward 1, shaped 0.5), each a 3-token suffix
    after a `prefix`-token cached prefix."""
    samples = [
        RolloutSample(
            response_ids=[5] * (prefix + 3),
            prefix_len=prefix,
            suffix_logprobs=[-0.5] * 3,
            finish_reason="stop",
            raw_reward=float(c),
            shaped_reward=0.5 * c,
            correct=c,
            reward_scores={"exact": float(c), "format": None if c else 1.0},
        )
        for c in correct
    ]
    return RolloutGroup(question_id=qid, cache_hit=True, m=3, prefix_len=prefix, samples=samples)
