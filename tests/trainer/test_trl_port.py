"""docs/training.md, "Moving a TRL GRPO script over": the reward file, the conversational dataset and the config
shown there, taken from the page as written, train two real steps (`rpo train` on the warm tiny model, over
the shared replicas and cache server), and each TRL-style function's score reaches the step records."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

from services.core.config import load_config
from services.core.synthetic import SyntheticTaskConfig, make_split
from services.supervisor.processes import write_run_config

REPO = Path(__file__).resolve().parents[2]


def _block(page: str, title: str) -> str:
    match = re.search(rf'```\w+ title="{re.escape(title)}"\n(.*?)```', page, re.DOTALL)
    assert match, f'docs/training.md has no block titled "{title}"'
    return match.group(1)


def test_a_trl_scripts_reward_functions_and_dataset_train_as_they_are(
    tmp_path, monkeypatch, warm_model_dir, rollout_cache_url, training_replicas
):
    from tests.trainer.training_helpers import SMALL, run_trainer
    from trainer.telemetry.progress import read_records

    page = (REPO / "docs" / "training.md").read_text()
    (tmp_path / "my_rewards.py").write_text(_block(page, "my_rewards.py"))
    (tmp_path / "config.yaml").write_text(_block(page, "config.yaml"))
    shown = json.loads(_block(page, "train.jsonl"))
    # The row the page shows, then more in its shape: the built-in task's questions as conversations.
    system = shown["prompt"][0]
    rows = [shown] + [
        {"prompt": [system, {"role": "user", "content": r["question"]}], "solution": r["answer"]}
        for r in make_split(SyntheticTaskConfig(train_size=40), "train")
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    monkeypatch.chdir(tmp_path)  # the page's config names its files relative to where it runs
    cfg = load_config(
        tmp_path / "config.yaml",
        [
            *SMALL,
            "train.max_steps=2",
            f"model.path={warm_model_dir}",
            f"train.run_dir={tmp_path / 'run'}",
            f"services.run_id=t-{uuid.uuid4().hex[:10]}",
            f"services.cache_url={rollout_cache_url}",
            f"services.rollout_urls={json.dumps([r.url for r in training_replicas])}",
        ],
    )
    assert [t.label() for t in cfg.reward.reward_terms()] == ["accuracy_reward", "format_reward"]
    config_file, _ = write_run_config(cfg, tmp_path / "run-config.yaml")
    run_trainer(config_file, log_path=tmp_path / "trainer.log", cwd=tmp_path)

    records = read_records(cfg.train.run_dir, "step")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        scores = r["reward_functions"]
        assert set(scores) == {"accuracy_reward", "format_reward"}
        # correctness is the first function's: its mean over the step's samples is the step's accuracy
        assert scores["accuracy_reward"] == r["accuracy"]
        assert 0.0 <= scores["format_reward"] <= 1.0
    # the warm model answers with a \boxed{} at the end: the format function saw real completions
    assert max(r["reward_functions"]["format_reward"] for r in records) > 0.5
