"""`scripts/gpu_check.sh --dry-run`: the GPU box's first-ten-minutes check, planned without a GPU. The plan
follows the GPU count (NCCL with replicas on their own GPUs, HTTP and a shared GPU on one, tensor
parallelism 2 only with 3+ GPUs, said when skipped), every compose layout it would run renders with
Compose v2 and carries the phase's settings, and the JSON record lists every check. Bad arguments exit 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
CHECKS = ["driver", "image", "fork", "up", "step-2", "transport", "tokens", "grafana", "extra", "tp-2", "lora",
          "down"]  # fmt: skip


def dry_run(out: Path, gpus: int) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_")}
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--gpus", str(gpus), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    record = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else {}
    return done, record


def lines(done: subprocess.CompletedProcess) -> list[tuple[str, str]]:
    return [
        m.groups()
        for m in re.finditer(r"^(ok|fail|planned|skip)\s+(\S+?)(?: \(\d+ s\))?:", done.stdout, re.M)
    ]


def test_dry_run_on_four_gpus_plans_nccl_tensor_parallelism_and_lora(tmp_path):
    done, record = dry_run(tmp_path, 4)
    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, report
    assert lines(done) == [("ok", "files"), ("ok", "compose-config")] + [("planned", c) for c in CHECKS], (
        report
    )
    assert "main: 3 replica(s), weights over nccl" in done.stdout, report
    assert "docker compose config renders the layouts of main, tp-2, lora" in done.stdout, report
    assert record["mode"] == "dry-run" and record["gpus"] == 4 and record["failed"] == []
    assert [c["check"] for c in record["checks"]] == ["files", "compose-config", *CHECKS]
    phases = {p["phase"]: p for p in record["plan"]}
    assert phases["main"]["replicas"] == 3 and phases["main"]["transport"] == "nccl"
    assert phases["tp-2"]["env"] == {"RPO_GPUS_PER_REPLICA": "2"} and not phases["tp-2"].get("skip")
    # the overrides the run would use: NCCL for the main phase, LoRA's rank for the LoRA phase
    main = json.loads((tmp_path / "stack" / "override-main.yml").read_text())["services"]
    assert main["rollout"]["environment"]["RPO_ROLLOUT__WEIGHT_TRANSFER"] == "nccl"
    assert main["trainer"]["environment"]["RPO_TRAIN__NCCL_HOST"] == "trainer"
    lora = json.loads((tmp_path / "stack" / "override-lora.yml").read_text())["services"]
    assert lora["trainer"]["environment"]["RPO_TRAIN__LORA__RANK"] == "8"
    assert lora["trainer"]["environment"]["RPO_TRAIN__MAX_STEPS"] == "2"


def test_dry_run_on_one_gpu_shares_it_over_http_and_says_what_it_skips(tmp_path):
    done, record = dry_run(tmp_path, 1)
    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, report
    assert ("skip", "tp-2") in lines(done), report
    assert re.search(
        r"^skip\s+tp-2: needs 3\+ GPUs \(trainer 1 \+ 2\), this box has 1$", done.stdout, re.M
    ), report
    assert "main: 1 replica(s), weights over http" in done.stdout, report
    main = next(p for p in record["plan"] if p["phase"] == "main")
    assert main["env"] == {"RPO_ROLLOUT_GPU_MEMORY": "0.4"}  # the replica's share of the trainer's GPU
    assert "RPO_ROLLOUT__WEIGHT_TRANSFER" not in json.dumps(
        json.loads((tmp_path / "stack" / "override-main.yml").read_text())
    )


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    for args, message in (
        (["--dry-run", "--gpus", "0"], "--gpus 0: a box has at least one GPU"),
        (["--gpus", "2"], "--gpus is for --dry-run"),
        (["--dry-run", "--gpus", "two"], "invalid int value: 'two'"),
        (["--dry-run", "--image", "other:1"], "--image other:1: the compose file runs rpo-rl:TAG"),
    ):
        done = subprocess.run(["bash", str(SCRIPT), *args, "--out", str(tmp_path)], cwd=REPO,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "gpu_check.json").exists()


def test_the_real_run_on_a_machine_without_a_driver_stops_at_the_driver_check(tmp_path):
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # no nvidia-smi on this machine's PATH either way
    done = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.match(r"fail\s+driver: no nvidia-smi: this machine has no NVIDIA driver", done.stdout), (
        done.stdout
    )
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["mode"] == "gpu" and record["failed"] == ["driver"] and len(record["checks"]) == 1
