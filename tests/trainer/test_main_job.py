"""`rpo run`: process supervision (stop everything, name what died), the run directory, the summary table;
and end to end, the real command with a shortened config."""

from __future__ import annotations

import os
import sys
import time

import pytest

from services.config import load_config
from trainer.main_job import fresh_run_dir, preset_path, render_summary
from trainer.processes import PartFailed, Supervisor, free_port, write_run_config

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_all_stops_children_and_their_workers(tmp_path):
    # The child starts a grandchild (like vLLM's engine core) and then ignores SIGTERM.
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"p = subprocess.Popen({SLEEPER!r})\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    with Supervisor(tmp_path, stop_timeout_seconds=1.0) as sup:
        child = sup.start("stubborn", [sys.executable, "-c", code])
        deadline = time.monotonic() + 10
        while not child.log_path.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = int(child.log_path.read_text().split()[0])
        assert _alive(grandchild)
    assert child.popen.returncode is not None
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:  # SIGKILL is delivered asynchronously
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_a_part_that_dies_is_named_with_its_log(tmp_path):
    with Supervisor(tmp_path) as sup:
        child = sup.start(
            "cache",
            [sys.executable, "-c", "import sys; print('redis unreachable at 10.0.0.1'); sys.exit(3)"],
            url=f"http://127.0.0.1:{free_port()}",
        )
        with pytest.raises(PartFailed, match=r"(?s)cache exited 3.*redis unreachable"):
            sup.wait_ready(child, timeout_seconds=30)
        other = sup.start("trainer", SLEEPER)
        with pytest.raises(PartFailed, match="cache exited 3"):
            sup.wait(other, timeout_seconds=5)


def test_a_child_waited_for_to_the_end_is_not_a_failure(tmp_path):
    with Supervisor(tmp_path) as sup:
        first = sup.start("cache-init", [sys.executable, "-c", "pass"])
        assert sup.wait(first, timeout_seconds=30) == 0
        second = sup.start("trainer", [sys.executable, "-c", "import time; time.sleep(0.5)"])
        assert sup.wait(second, timeout_seconds=30) == 0  # the first one's exit is not held against it


def test_readiness_wait_has_a_timeout(tmp_path):
    with Supervisor(tmp_path) as sup:
        child = sup.start("rollout", SLEEPER, url=f"http://127.0.0.1:{free_port()}")
        started = time.monotonic()
        with pytest.raises(PartFailed, match="not ready after 1 s"):
            sup.wait_ready(child, timeout_seconds=1)
        assert time.monotonic() - started < 5


def test_an_existing_run_directory_is_moved_aside(tmp_path):
    run = tmp_path / "runs" / "demo"
    fresh_run_dir(run)
    (run / "metrics.jsonl").write_text("{}\n")
    fresh_run_dir(run)
    assert run.is_dir() and not any(run.iterdir())
    aside = [p for p in run.parent.iterdir() if p.name.startswith("demo.")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").is_file()


def test_children_get_the_resolved_config_and_the_token_only_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RPO_API_TOKEN", "s3cret")
    monkeypatch.setenv("RPO_ALGORITHM__GROUP_SIZE", "3")
    cfg = load_config(preset_path(), ["services.rollout_urls=[http://127.0.0.1:9]"])
    path, env = write_run_config(cfg, tmp_path / "config.yaml")
    assert "s3cret" not in path.read_text()
    assert env["RPO_API_TOKEN"] == "s3cret" and "RPO_ALGORITHM__GROUP_SIZE" not in env
    monkeypatch.delenv("RPO_ALGORITHM__GROUP_SIZE")
    again = load_config(path)  # the file alone reproduces the resolved config
    assert again.algorithm.group_size == 3 and again.services.rollout_urls == ["http://127.0.0.1:9"]
    assert again.model_dump(exclude={"services": {"api_token"}}) == cfg.model_dump(
        exclude={"services": {"api_token"}}
    )


def test_summary_table():
    summary = {
        "ok": True,
        "run_dir": "runs/x",
        "algorithm": "grpo",
        "mode": "rpo",
        "model": "/m/tiny",
        "eval_before": {"pass_at_1": 0.3, "pass_at_k": 0.5, "k": 4},
        "eval_after": {"pass_at_1": 0.45, "pass_at_k": 0.6, "k": 4},
        "full_path_reference": {"decoded_tokens_per_sample": 40.0},
        "first_step_decoded_tokens_per_sample": 10.0,
        "decoded_tokens_per_sample": 12.0,
        "reused_prefix_tokens": 12345,
        "steps": 20,
        "mean_step_seconds": 2.5,
        "wall_seconds": 300.0,
    }
    text = render_summary(summary)
    for expected in (
        "30.0%",
        "45.0%",
        "pass@4",
        "full-path 40.0",
        "rpo 10.0",
        "70% fewer",
        "12,345",
        "300 s",
    ):
        assert expected in text, expected
    assert "did not finish" in render_summary({"ok": False, "error": "cache exited 3", "run_dir": "r"})
