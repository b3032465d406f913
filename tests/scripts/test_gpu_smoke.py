"""`scripts/gpu_smoke.sh --cpu`: the GPU check's script, run end to end on CPU (the install check, the
stack, `rpo run` with the HTTP push and with rollout.weight_transfer=nccl, greedy parity after a push, the
figures). Every check line must be `[ok]`, the figures printed, parity passed, and the NCCL run must say it
went over HTTP because the trainer runs on CPU. Reuses the cached warm tiny model; about 2-3 minutes on 2
cores. Also: the script's bad arguments are refused with a usage line."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_smoke.sh"
CHECKS = ["install", "stack", "run-http", "run-nccl", "parity"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_")}  # the script's own settings only
    env["DS_ACCELERATOR"] = "cpu"
    return env


def test_the_smoke_script_passes_every_check_on_cpu(tmp_path):
    out = tmp_path / "smoke"
    done = subprocess.run(
        ["bash", str(SCRIPT), "--cpu", "--steps", "2", "--eval-questions", "4", str(out)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=540,
    )
    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    lines = done.stdout.splitlines()
    check_lines = [line for line in lines if line.startswith("[")]
    assert [re.match(r"\[(\w+)\]\s+(\S+)", line).groups() for line in check_lines] == [
        ("ok", name) for name in CHECKS
    ], report
    assert done.returncode == 0, report
    assert lines[0].startswith("mode: cpu"), report
    for run in ("run-http", "run-nccl"):  # the figures line of each run, from its step records
        assert any(
            re.match(rf"{run}: step [0-9.]+ s, .* decode [0-9,]+ tokens/s$", line) for line in lines
        ), report
    assert "run-nccl: weights went over HTTP (the trainer runs on CPU" in done.stdout, report
    parity = (out / "parity.log").read_text()
    assert re.search(r"parity after a push: same greedy tokens on 3 prompts, version 1", parity), parity
    assert (out / "run-http" / "final" / "config.json").is_file()


def test_bad_arguments_are_refused_with_the_usage(tmp_path):
    for args, message in (
        (["--steps", "zero"], "'zero' is not a positive count"),
        (["--gpu"], "unknown option --gpu"),
        ([str(tmp_path / "a"), str(tmp_path / "b")], "usage: bash scripts/gpu_smoke.sh"),
    ):
        done = subprocess.run(["bash", str(SCRIPT), "--cpu", *args], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert not (tmp_path / "a").exists()
