"""Evaluation: the pass@k estimator, and `rpo eval` through a real rollout replica."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.trainer.training_helpers import REPO
from trainer.rollouts.evaluate import pass_at_k


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == 0.25  # c / n for k = 1
    assert pass_at_k(4, 1, 4) == 1.0  # any correct sample among all n
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every k-subset holds a correct one
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)


def test_rpo_eval_through_a_configured_replica(tmp_path, warm_model_dir, rollout_server):
    """`rpo eval --model PATH --dataset FILE` on held-out questions, through the session's replica."""
    from services.core.synthetic import SyntheticTaskConfig, make_dataset_files

    files = make_dataset_files(SyntheticTaskConfig(eval_size=24), tmp_path / "data")
    done = subprocess.run(
        [
            sys.executable, "-m", "services.cli", "eval", "--model", str(warm_model_dir), "--dataset", str(files["eval"]),
            "--set", f"services.rollout_urls=[{rollout_server.url}]", "--set", "sampling.eval_samples=3",
            "--set", f"train.run_dir={tmp_path / 'run'}",
        ],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["questions"] == 24 and result["k"] == 3 and result["policy_version"] == 0
    assert 0.2 < result["pass_at_1"] <= result["pass_at_k"] <= 1.0  # the warm model solves some, not all
    assert f"pass@1 {100 * result['pass_at_1']:.1f}%" in done.stdout


def test_rpo_eval_without_a_dataset_is_a_usage_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "eval", "--set", "data.eval_dataset=null"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2 and "--dataset" in done.stderr
