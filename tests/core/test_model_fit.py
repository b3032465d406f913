"""The run's lengths fitted to the model (services/core/model_fit.py): the context sized from the model's own
config when unset, a context the model lacks refused in one line by every process before an engine starts
(`rpo serve rollout`, `rpo run`), and a response budget the context cuts said with its numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from services.core.config import ConfigError, load_config
from services.core.model_fit import check_fit, fitted_context, model_context, response_budget_note
from tests.fixtures.cli import run_rpo

REPO = Path(__file__).resolve().parents[2]


def model_with_positions(tmp_path: Path, source: Path, positions: int) -> Path:
    """A copy of a real model whose config.json says `positions`."""
    target = tmp_path / f"model-{positions}"
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_an_unset_context_is_the_models_own_at_most_the_response_budget_and_room_for_a_prompt(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 32768}))
    cfg = load_config(None, ["algorithm.max_response_tokens=1024"])
    assert fitted_context(cfg, tmp_path)[0] == 1024 + 512  # 32768 positions is far more than needed
    cfg = load_config(None, ["algorithm.max_response_tokens=4096"])
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 2048}}))
    context, how = fitted_context(cfg, tmp_path)
    assert context == 2048 and "the model's 2048 positions" in how
    set_ = load_config(None, ["model.max_model_len=700"])
    assert fitted_context(set_, tmp_path) == (700, "model.max_model_len 700 (set)")


def test_a_context_longer_than_the_model_has_is_refused_naming_both(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    assert model_context(tmp_path) == 1024
    with pytest.raises(ConfigError, match=r"model.max_model_len 4608 is longer .* 1024 positions"):
        check_fit(load_config(None, ["model.max_model_len=4608"]), tmp_path)
    assert check_fit(load_config(None, ["model.max_model_len=1024"]), tmp_path) == 1024


def test_a_response_budget_cut_by_the_context_is_said_with_the_numbers():
    cfg = load_config(None, ["algorithm.max_response_tokens=4096"])
    note = response_budget_note(cfg, context=2048, longest_prompt=300)
    assert (
        note
        and "max_response_tokens is 4096" in note
        and "leaves 1748 tokens" in note
        and "(300 tokens)" in note
    )
    assert response_budget_note(cfg, context=8192, longest_prompt=300) is None


def test_a_replica_and_rpo_run_refuse_a_context_the_model_lacks_before_any_engine_starts(
    tmp_path, tiny_model_dir
):
    short = model_with_positions(tmp_path, tiny_model_dir, 1024)
    for command in (
        ("serve", "rollout", "--model", str(short), "--port", "0"),
        ("run", "--model", str(short), "--set", f"train.run_dir={tmp_path / 'run'}"),
    ):
        done = run_rpo(*command, "--set", "model.max_model_len=4608", "--set", "data.eval_dataset=none")
        assert done.returncode == 2, done.stderr[-3000:]
        assert "model.max_model_len 4608 is longer than the model's context" in done.stderr
        assert "1024 positions" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was started or written
    # under compose (RPO_REFUSAL_EXIT_STATUS=0, docker-compose.yml) the same refusal ends the replica with 0,
    # which `restart: on-failure` leaves stopped instead of restarting it forever
    done = run_rpo(
        "serve", "rollout", "--model", str(short), "--port", "0", "--set", "model.max_model_len=4608",
        env_extra={"RPO_REFUSAL_EXIT_STATUS": "0"},
    )  # fmt: skip
    assert done.returncode == 0 and "model.max_model_len 4608 is longer" in done.stderr
