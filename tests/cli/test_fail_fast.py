"""Commands fail fast and clearly: each bad input is one message naming it and where it came from, exit 2,
before anything heavy loads (real subprocesses, a real cache server on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cache_server.app import create_app
from services.core.config import load_config
from services.core.server_kit import serve_in_thread

RPO = [sys.executable, "-m", "services.cli"]


def rpo(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RPO_")}
    return subprocess.run(
        [*RPO, *args], capture_output=True, text=True, timeout=timeout, env={**clean, **(env or {})}
    )


@pytest.fixture(scope="module")
def cache_url():
    app = create_app(load_config(None, []), redis_url="redis://127.0.0.1:6379/0")
    with serve_in_thread(app) as url:
        yield url


def assert_one_message(out: subprocess.CompletedProcess, *expected: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    for text in expected:
        assert text in out.stderr, (text, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "[rank0]" not in out.stderr


def test_rpo_train_names_the_missing_or_silent_service_within_seconds(cache_url, tmp_path):
    started = time.monotonic()
    assert_one_message(rpo("train"), "no cache server configured: set services.cache_url")
    assert_one_message(
        rpo("train", "--set", "services.cache_url=http://127.0.0.1:9"),
        "the cache server at http://127.0.0.1:9 (services.cache_url) does not answer",
    )
    assert_one_message(
        rpo("train", "--set", f"services.cache_url={cache_url}"),
        "no rollout replica configured: set services.rollout_urls",
    )
    assert_one_message(
        rpo(
            "train",
            "--set",
            f"services.cache_url={cache_url}",
            "--set",
            'services.rollout_urls=["http://127.0.0.1:9"]',
        ),
        "no rollout replica answers (http://127.0.0.1:9",
    )
    answering = json.dumps([cache_url])  # an HTTP server that answers: the checks past the services run
    assert_one_message(
        rpo("train", "--set", f"services.cache_url={cache_url}", "--set", f"services.rollout_urls={answering}",
            "--set", f"data.dataset={tmp_path / 'missing.jsonl'}"),
        f"dataset not found: {tmp_path / 'missing.jsonl'}",
    )  # fmt: skip
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
    assert_one_message(
        rpo("train", "--set", f"services.cache_url={cache_url}", "--set", f"services.rollout_urls={answering}",
            "--set", f"data.dataset={bad}"),
        f"{bad}, line 2: missing field 'answer'",
    )  # fmt: skip
    assert_one_message(
        rpo("train", "--set", f"services.cache_url={cache_url}", "--set", f"services.rollout_urls={answering}",
            "--set", f"model.path={tmp_path}"),
        f"model.path '{tmp_path}': not an HF model directory",
    )  # fmt: skip
    # seven failed starts, each before any model or DeepSpeed: well under what one model load takes
    assert time.monotonic() - started < 90


def test_rpo_train_refuses_a_context_its_model_lacks_before_loading_it(cache_url, tiny_model_dir):
    """The trainer (as compose starts it) checks the config against the model's own config.json first."""
    from services.core.model_fit import model_context

    positions = model_context(tiny_model_dir)
    answering = json.dumps([cache_url])
    assert_one_message(
        rpo("train", "--set", f"services.cache_url={cache_url}", "--set", f"services.rollout_urls={answering}",
            "--set", f"model.path={tiny_model_dir}", "--set", f"model.max_model_len={positions * 2}"),
        f"model.max_model_len {positions * 2} is longer than the model's context: its config.json says "
        f"{positions} positions",
        f"set model.max_model_len to at most {positions}",
    )  # fmt: skip


def test_a_bad_value_names_its_source_flag_environment_or_file_line(tmp_path):
    assert_one_message(
        rpo("run", "--set", "algorithm.epsilon=2"), "--set algorithm.epsilon=2: algorithm.epsilon"
    )
    out = rpo("config", "show", env={"RPO_ALGORITHM__GROUP_SIZE": "0"})
    assert_one_message(out, "environment variable RPO_ALGORITHM__GROUP_SIZE: algorithm.group_size")
    path = tmp_path / "run.yaml"
    path.write_text("algorithm:\n  mode: rpo\n  epsilon: 3\n")
    assert_one_message(rpo("config", "show", "--config", str(path)), f"{path}, line 3: algorithm.epsilon")
    # the file sets it, --set overrides it: the message names the --set that won
    assert_one_message(
        rpo("config", "show", "--config", str(path), "--set", "algorithm.epsilon=4"),
        "--set algorithm.epsilon=4",
    )


def test_rpo_serve_rollout_with_a_missing_model_is_one_line(tmp_path):
    assert_one_message(
        rpo("serve", "rollout", "--model", str(tmp_path / "nonexistent")),
        f"model.path '{tmp_path / 'nonexistent'}': not an HF model directory",
    )


def test_cache_init_and_eval_check_their_inputs_first(cache_url, tmp_path):
    assert_one_message(
        rpo("cache", "init", "--set", "services.run_id=r1"),
        "no cache server configured: set services.cache_url",
    )
    assert_one_message(
        rpo("cache", "init", "--set", "services.run_id=r1", "--set", f"services.cache_url={cache_url}"),
        "no rollout replica configured",
    )
    assert_one_message(
        rpo("eval", "--dataset", str(tmp_path / "none.jsonl")), f"dataset not found: {tmp_path}"
    )
