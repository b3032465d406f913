"""`scripts/gpu_smoke.sh --cpu`: the GPU check's script, run end to end on CPU (the install check, the
stack, `rpo run` with the HTTP push and with rollout.weight_transfer=nccl, greedy parity after a push, the
figures). Every check line must be `[ok]`, the figures printed, parity passed, and the NCCL run must say,
from its step records, that every push went over HTTP because the trainer runs on CPU. Reuses the cached
warm tiny model; about 2-3 minutes on 2 cores. Also: the transport check fails a run whose records show a
silent fall-back from NCCL (records written by the trainer's own StepRecord), the GPU mode on a machine
without a GPU stops at its first check, and bad arguments are refused with a usage line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from trainer.telemetry.records import StepRecord

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
    assert re.search(
        r"^run-nccl: weights went over HTTP \(the trainer runs on CPU: .*\), on all 2 pushes \(step records\)$",
        done.stdout,
        re.M,
    ), report
    parity = (out / "parity.log").read_text()
    assert re.search(
        r"parity after a push: same greedy tokens on 3 prompts \(float32\), version 1", parity
    ), parity
    assert (out / "run-http" / "final" / "config.json").is_file()


def test_bad_arguments_are_refused_with_the_usage(tmp_path):
    for args, message in (
        (["--steps", "zero"], "'zero' is not a positive count"),
        (["--gpu"], "unknown option --gpu"),
        (["--image"], "usage: bash scripts/gpu_smoke.sh"),
        ([str(tmp_path / "a"), str(tmp_path / "b")], "usage: bash scripts/gpu_smoke.sh"),
    ):
        done = subprocess.run(["bash", str(SCRIPT), "--cpu", *args], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert not (tmp_path / "a").exists()


def _write_run(run_dir: Path, transports: list[str | None]) -> None:
    run_dir.mkdir(parents=True)
    lines = []
    for i, transport in enumerate(transports, 1):
        record = StepRecord(
            step=i,
            policy_version=i,
            epoch=0,
            questions=16,
            trained_groups=16,
            samples=96,
            rounds=1,
            reward_mean=0.5,
            accuracy=0.5,
            response_len_mean=30.0,
            cache_hit_rate=0.5,
            generated_tokens=900,
            reused_prefix_tokens=300,
            decoded_tokens_per_sample=9.0,
            tokens_per_second=500.0,
            rollout_retries=0,
            step_seconds=2.0,
            phases={"rollout": 1.0, "train": 0.8, "weight_sync": 0.1, "cache": 0.1},
            weight_sync_seconds=0.1,
        ).to_json()
        record["weight_transport"] = (
            transport  # the field as the trainer writes it (trainer/telemetry/records.py)
        )
        lines.append(json.dumps({"kind": "step", **record}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_the_transport_check_fails_a_silent_fall_back_from_nccl(tmp_path):
    checker = REPO / "scripts" / "gpu_smoke_records.py"
    cases = (
        (["nccl", "nccl", "nccl"], "gpu", 0, "run-nccl: weights went over NCCL, on all 3 pushes"),
        (
            ["nccl", "http_fallback", "http_fallback"],
            "gpu",
            1,
            "run-nccl: weights went over http_fallback, nccl",
        ),
        ([None, None], "gpu", 1, "weights went over unnamed, expected nccl"),
        (["http", "http"], "cpu", 0, "run-nccl: weights went over HTTP (the trainer runs on CPU"),
    )
    for i, (transports, mode, code, message) in enumerate(cases):
        out = tmp_path / str(i)
        _write_run(out / "run-http", ["http", "http"])
        _write_run(out / "run-nccl", transports)
        done = subprocess.run([sys.executable, str(checker), str(out), mode], capture_output=True, text=True)
        assert done.returncode == code and message in done.stdout, (transports, done.stdout, done.stderr)
    # one GPU: no NCCL run, and none expected
    (tmp_path / "skip").mkdir()
    _write_run(tmp_path / "skip" / "run-http", ["http"])
    done = subprocess.run(
        [sys.executable, str(checker), str(tmp_path / "skip"), "skip"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "run-nccl" not in done.stdout, done.stdout


def test_the_gpu_mode_without_a_gpu_stops_at_its_first_check(tmp_path):
    env = {**_env(), "PATH": "/usr/bin:/bin"}  # nvidia-smi is nowhere here
    done = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("mode: gpu, in the image rpo-rl:latest\n[fail] gpu"), done.stdout
    assert "no GPU or no image" in done.stdout
