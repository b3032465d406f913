"""`rpo eval --model PATH --dataset FILE`: pass@1 / pass@k of a model through the rollout service, against
the configured replicas or, with none configured, a replica started on localhost for PATH and stopped
afterwards. The evaluation itself is the trainer's (`trainer.rollouts.evaluate.evaluate_questions`), so `rpo eval`,
the held-out evaluation during training and `rpo run`'s before/after numbers judge answers the same way.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from services.core.cli_args import UsageError, config_from_args
from services.core.config import RunConfig
from services.core.data import encode_prompt
from services.core.data_roles import load_role
from services.models.model_path import resolve_model_path
from services.supervisor.processes import Supervisor, free_port, rpo_command, write_run_config
from trainer.rollouts.evaluate import evaluate_questions
from trainer.rollouts.services import RemoteServices

log = logging.getLogger("rpo.eval")


def eval_main(args: Any) -> int:
    """`rpo eval --model PATH --dataset FILE`: print pass@1 / pass@k (and write them with --set train.run_dir)."""

    cfg = config_from_args(args)
    loaded = load_role("eval", cfg.data)
    if loaded is None:
        raise UsageError(
            "no dataset to evaluate on: pass --dataset (a file, folder or Hub id; or set data.eval_dataset)"
        )
    questions, choice = loaded
    model_path = resolve_model_path(cfg.model.path, cfg.model.revision)
    # lazy: heavy import (transformers), paid only on this path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    prompts = {q.id: encode_prompt(tokenizer, q, cfg.data) for q in questions}
    with local_replicas_if_none(cfg, model_path) as cfg:
        remote = RemoteServices(cfg)
        try:
            result = evaluate_questions(remote, cfg, questions, prompts)
        finally:
            remote.close()
    print(f"{choice.describe()}: {result.describe()}")
    out = Path(cfg.train.run_dir) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"model": str(model_path), "dataset": choice.describe(), **result.as_dict()}) + "\n"
    )
    return 0


class local_replicas_if_none:  # noqa: N801 - used as a context manager, reads like one
    """With no replica configured, start one on localhost for `model_path` (stopped on exit)."""

    def __init__(self, cfg: RunConfig, model_path: Path):
        self.cfg = cfg
        self.model_path = model_path
        self.supervisor = None

    def __enter__(self) -> RunConfig:
        cfg = self.cfg
        if cfg.services.rollout_urls or cfg.services.rollout_discovery:
            return cfg

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
