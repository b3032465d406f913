"""Evaluation through the rollout service: pass@1 and pass@k of the policy a replica serves.

Used three ways: `rpo eval --model PATH --dataset FILE` (against configured replicas, or a replica it starts
on localhost for PATH and stops afterwards), the periodic held-out evaluation during training, and the
before/after numbers of `rpo run`. Every question gets k = `sampling.eval_samples` full-path samples at
`sampling.eval_temperature` / `eval_top_p` (paper: 0.6 / 0.95), scored by the replica with the run's reward,
so training and evaluation judge answers the same way. pass@1 is the mean share of correct samples per
question; pass@k the unbiased estimator of Chen et al. (2021) with n = k samples, i.e. the share of
questions with at least one correct sample. Requests use a fixed seed, so two evaluations of the same
weights sample the same way.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("rpo.eval")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class EvalResult:
    questions: int
    k: int
    """Samples per question."""
    pass_at_1: float
    pass_at_k: float
    mean_response_tokens: float
    generated_tokens: int
    seconds: float
    policy_version: int

    def describe(self) -> str:
        at_k = f", pass@{self.k} {100 * self.pass_at_k:.1f}%" if self.k > 1 else ""
        return (
            f"pass@1 {100 * self.pass_at_1:.1f}%{at_k} on "
            f"{self.questions} questions (policy v{self.policy_version}, mean response "
            f"{self.mean_response_tokens:.1f} tokens, {self.seconds:.1f} s)"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_questions(
    remote: Any,
    cfg: Any,
    questions: list,
    prompts: dict[str, list[int]],
    replicas: list[str] | None = None,
    min_policy_version: int = 0,
) -> EvalResult:
    """Sample k full responses per question through the replicas (default: all configured) and score
    them; rank 0 of the trainer, or the CLI."""
    started = time.monotonic()
    batch = remote.rollouts(
        replicas or remote.replicas(),
        questions,
        prompts,
        params=remote.eval_params(),
        min_policy_version=min_policy_version,
        phase="evaluation",
    )
    k = cfg.sampling.eval_samples
    p1, pk, lengths = [], [], []
    for group in batch.groups:
        n = len(group.samples)
        c = sum(1 for s in group.samples if s.correct)
        p1.append(pass_at_k(n, c, 1))
        pk.append(pass_at_k(n, c, min(k, n)))
        lengths.extend(len(s.response_ids) for s in group.samples)
    return EvalResult(
        questions=len(batch.groups),
        k=k,
        pass_at_1=sum(p1) / max(1, len(p1)),
        pass_at_k=sum(pk) / max(1, len(pk)),
        mean_response_tokens=sum(lengths) / max(1, len(lengths)),
        generated_tokens=batch.generated_tokens,
        seconds=time.monotonic() - started,
        policy_version=batch.policy_version,
    )


def eval_main(args: Any) -> int:
    """`rpo eval --model PATH --dataset FILE`: print pass@1 / pass@k (and write them with --set train.run_dir)."""
    from services.commands import UsageError, config_from_args
    from services.data import encode_prompt, load_questions
    from services.model_path import resolve_model_path
    from trainer.remote import RemoteServices

    cfg = config_from_args(args)
    if not cfg.data.eval_dataset:
        raise UsageError("no dataset to evaluate on: pass --dataset FILE (or set data.eval_dataset)")
    questions = load_questions(cfg.data.eval_dataset, cfg.data, cfg.data.eval_max_questions)
    model_path = resolve_model_path(cfg.model.path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = {q.id: encode_prompt(tokenizer, q.question, cfg.data) for q in questions}
    with local_replicas_if_none(cfg, model_path) as cfg:
        remote = RemoteServices(cfg)
        try:
            result = evaluate_questions(remote, cfg, questions, prompts)
        finally:
            remote.close()
    print(f"{cfg.data.eval_dataset}: {result.describe()}")
    out = Path(cfg.train.run_dir) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"model": str(model_path), "dataset": cfg.data.eval_dataset, **result.as_dict()}) + "\n"
    )
    return 0


class local_replicas_if_none:  # noqa: N801 - used as a context manager, reads like one
    """With no replica configured, start one on localhost for `model_path` (stopped on exit)."""

    def __init__(self, cfg: Any, model_path: Path):
        self.cfg = cfg
        self.model_path = model_path
        self.supervisor = None

    def __enter__(self) -> Any:
        cfg = self.cfg
        if cfg.services.rollout_urls or cfg.services.rollout_discovery:
            return cfg
        import tempfile

        from trainer.processes import Supervisor, free_port, rpo_command, write_run_config

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        work = Path(tempfile.mkdtemp(prefix="rpo-eval-"))
        child_cfg = cfg.model_copy(deep=True)
        child_cfg.model.path = str(self.model_path)
        child_cfg.rollout.host, child_cfg.rollout.port = "127.0.0.1", port
        config_file, env = write_run_config(child_cfg, work / "config.yaml")
        self.supervisor = Supervisor(work)
        log.info("no rollout replica configured: starting one for %s on %s", self.model_path, url)
        child = self.supervisor.start(
            "rollout", rpo_command("serve", "rollout", "--config", str(config_file)), env=env, url=url
        )
        try:
            self.supervisor.wait_ready(child, cfg.services.startup_timeout_seconds)
        except BaseException:
            self.supervisor.stop_all()
            raise
        child_cfg.services.rollout_urls = [url]
        return child_cfg

    def __exit__(self, *exc: Any) -> None:
        if self.supervisor is not None:
            self.supervisor.stop_all()
