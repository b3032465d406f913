"""`rpo slurm script`: the layouts it places, the refusals it makes (exit 2, one message), and the script it
writes: valid bash (`bash -n`), and its dry run (`RPO_SLURM_DRY_RUN=1`, no Slurm needed) starts every
part as its own job step on the right host and GPUs, passes the trainer the replicas from the node list,
and carries the token in the environment, never on a command line. The job on a real one-node Slurm
cluster is scripts/slurm_check.sh (too long for the suite); its committed record is checked here."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from services.cli.main import main as rpo_main
from services.cluster.slurm import EXAMPLE, example_script, plan_layout
from services.core.cli_args import UsageError

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "services" / "supervisor" / "presets" / "tiny-demo.yaml"


def write_script(tmp_path: Path, *flags: str) -> Path:
    out = tmp_path / "job.sbatch"
    code = rpo_main(
        [
            "slurm",
            "script",
            "--config",
            str(CONFIG),
            "--run-dir",
            str(tmp_path / "run"),
            "--out",
            str(out),
            *flags,
        ]
    )
    assert code == 0
    return out


def dry_run(script: Path, nodes: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPO_", "SLURM_"))}
    done = subprocess.run(
        ["bash", str(script)],
        env={**clean, "RPO_SLURM_DRY_RUN": "1", "RPO_SLURM_NODES": nodes, "HOME": str(script.parent), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def steps(lines: list[str]) -> dict[str, str]:
    return {m.group(1): m.group(2) for line in lines if (m := re.match(r"step (\S+): (.*)", line))}


def envs(lines: list[str]) -> dict[str, str]:
    return dict(line[len("env: ") :].split("=", 1) for line in lines if line.startswith("env: "))


def test_the_cpu_script_runs_each_part_as_its_own_step_and_the_trainer_resumes(tmp_path):
    script = write_script(tmp_path, "--replicas", "2")
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    text = script.read_text()
    for directive in (
        "--requeue",
        "--nodes=1",
        "--signal=B:USR1@300",
        f"--output={tmp_path}/run/slurm-%j.out",
    ):
        assert f"#SBATCH {directive}" in text
    assert (
        f"#   rpo slurm script --config {CONFIG} --replicas 2 --run-dir {tmp_path}/run --out {script}\n"
        in text
    )
    assert (tmp_path / "run" / "logs").is_dir()  # Slurm opens the job's output there at start
    lines = dry_run(script, "node-a")
    found = steps(lines)
    assert list(found) == ["cache", "rollout-0", "rollout-1", "trainer"]
    for name, command in found.items():
        assert command.startswith("srun --overlap --nodes=1 ") and "--nodelist=node-a" in command
        assert f"--job-name=rpo-{name}" in command and "--kill-on-bad-exit=1" in command
        assert "CUDA_VISIBLE_DEVICES" not in command
    assert found["cache"].endswith(f"serve cache --config {CONFIG} --host 0.0.0.0 --port 8100")
    assert "RPO_ROLLOUT__WEIGHT_PORT=8201" in found["rollout-0"] and found["rollout-0"].endswith(
        "--port 8200"
    )
    assert "RPO_ROLLOUT__WEIGHT_PORT=8203" in found["rollout-1"] and found["rollout-1"].endswith(
        "--port 8202"
    )
    assert found["trainer"].endswith(f"train --config {CONFIG} --resume")
    assert "RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS" in found["trainer"]
    env = envs(lines)
    assert json.loads(env["RPO_SERVICES__ROLLOUT_URLS"]) == ["http://node-a:8200", "http://node-a:8202"]
    assert env["RPO_SERVICES__CACHE_URL"] == "http://node-a:8100"
    assert env["RPO_TRAIN__RUN_DIR"] == str(tmp_path / "run")
    assert env["RPO_CACHE_SERVER__DATA_DIR"] == str(tmp_path / "run" / "redis")
    assert env["DS_ACCELERATOR"] == "cpu"
    (targets,) = [
        json.loads(line.split(": ", 1)[1]) for line in lines if line.startswith("prometheus targets: ")
    ]
    assert targets == [
        {"targets": ["node-a:8100"], "labels": {"job": "rpo-cache"}},
        {"targets": ["node-a:8200", "node-a:8202"], "labels": {"job": "rpo-rollout"}},
        {"targets": ["node-a:9100"], "labels": {"job": "rpo-trainer"}},
    ]
    compose = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())[
        "scrape_configs"
    ]
    assert [t["labels"]["job"] for t in targets] == [j["job_name"] for j in compose]  # the dashboard's jobs


def test_the_token_comes_from_the_env_file_or_the_shell_and_is_on_no_command_line(tmp_path):
    env_file = tmp_path / "secrets.env"
    env_file.write_text("RPO_API_TOKEN=from-the-file-123\nRPO_SERVICES__RUN_ID=my-run\n")
    script = write_script(tmp_path, "--env-file", str(env_file))
    lines = dry_run(script, "n1")
    assert f"token: RPO_API_TOKEN from {env_file} (every step inherits it; it is on no command line)" in lines
    assert envs(lines)["RPO_SERVICES__RUN_ID"] == "my-run"
    assert not any("from-the-file-123" in line for line in lines)
    lines = dry_run(script, "n1", RPO_ENV_FILE=str(tmp_path / "none"), RPO_API_TOKEN="shell-token")
    assert lines[1].startswith("token: RPO_API_TOKEN from the submitting environment")
    assert not any("shell-token" in line for line in lines)
    lines = dry_run(script, "n1", RPO_ENV_FILE=str(tmp_path / "none"))
    assert lines[1].startswith("token: RPO_API_TOKEN made for this job")


def test_a_gpu_layout_gives_each_replica_its_own_gpus_and_the_trainer_its_ranks(tmp_path):
    script = write_script(tmp_path, "--nodes", "2", "--gpus-per-node", "4", "--trainer-ranks", "2")
    assert "#SBATCH --gres=gpu:4" in script.read_text()
    lines = dry_run(script, "g1 g2")
    found = steps(lines)
    assert "--ntasks=2 --ntasks-per-node=2 --nodelist=g1" in found["trainer"]
    assert "CUDA_VISIBLE_DEVICES=0,1 " in found["trainer"]
    placed = {
        name: (
            re.search(r"--nodelist=(\S+)", c).group(1),
            re.search(r"CUDA_VISIBLE_DEVICES=(\S+)", c).group(1),
        )
        for name, c in found.items()
        if name.startswith("rollout-")
    }
    assert placed == {
        "rollout-0": ("g1", "2"),
        "rollout-1": ("g1", "3"),
        "rollout-2": ("g2", "0"),
        "rollout-3": ("g2", "1"),
        "rollout-4": ("g2", "2"),
        "rollout-5": ("g2", "3"),
    }
    urls = json.loads(envs(lines)["RPO_SERVICES__ROLLOUT_URLS"])
    assert urls == [f"http://g1:{p}" for p in (8200, 8202)] + [
        f"http://g2:{p}" for p in (8200, 8202, 8204, 8206)
    ]
    assert "DS_ACCELERATOR" not in envs(lines)


def test_layouts_place_whole_nodes_for_a_large_trainer_and_tensor_parallel_replicas():
    layout = plan_layout(3, 8, trainer_ranks=16, gpus_per_replica=2)
    assert layout.trainer_nodes == 2
    assert [(r.node, r.gpus) for r in layout.replicas] == [(2, (0, 1)), (2, (2, 3)), (2, (4, 5)), (2, (6, 7))]
    assert [r.port for r in layout.replicas] == [8200, 8202, 8204, 8206]
    cpu = plan_layout(3, 0, replicas=4)
    assert [r.node for r in cpu.replicas] == [1, 2, 1, 2] and cpu.trainer_nodes == 1
    assert len(plan_layout(1, 8).replicas) == 7


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nodes", "1", "--gpus-per-node", "4", "--replicas", "4"], "--replicas 4 x 1 GPU(s) do not fit"),
        (["--nodes", "2", "--gpus-per-node", "4", "--trainer-ranks", "6"], "must fill whole nodes"),
        (["--nodes", "1", "--gpus-per-node", "4", "--trainer-ranks", "8"], "needs 2 nodes; the layout has 1"),
        (["--replicas", "0"], "at least one rollout replica"),
        (["--cache-port", "80"], "ports must be within 1024-65000"),
    ],
)
def test_a_layout_that_does_not_fit_is_refused_with_one_message(tmp_path, capsys, flags, message):
    code = rpo_main(["slurm", "script", "--config", str(CONFIG), "--run-dir", str(tmp_path), *flags])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_run_config_is_required_and_checked_before_anything_is_written(tmp_path, capsys):
    assert rpo_main(["slurm", "script", "--out", str(tmp_path / "x")]) == 2
    assert "--config: name the run configuration" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  checkpoint_evry: 5\n")
    assert rpo_main(["slurm", "script", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint_evry" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(UsageError, match="at least 1"):
        plan_layout(0, 4)


def test_the_committed_example_is_what_the_generator_writes():
    assert EXAMPLE.read_text() == example_script(), "stale: python -m services.cluster.slurm example"
    assert subprocess.run(["bash", "-n", str(EXAMPLE)], timeout=30).returncode == 0


def test_the_slurm_command_in_the_docs_is_accepted_and_its_layout_fits():
    import shlex

    from services.cli.main import build_parser

    text = (REPO / "docs" / "deploy.md").read_text().replace("\\\n", " ")
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("rpo slurm script ")]
    assert commands, "docs/deploy.md shows the rpo slurm script command"
    for command in commands:
        args = build_parser().parse_args(shlex.split(command, comments=True)[1:])
        layout = plan_layout(
            args.nodes, args.gpus_per_node, args.trainer_ranks, args.replicas, args.gpus_per_replica
        )
        assert len(layout.replicas) >= 1


def test_the_committed_slurm_check_record_passed_every_check():
    records = sorted((REPO / "docs" / "records").glob("slurm-check-*.json"))
    assert records, "scripts/slurm_check.sh --out ... writes the record; commit it under docs/records"
    record = json.loads(records[-1].read_text())
    assert record["ok"] is True
    assert [r["check"] for r in record["results"]] == [
        "separate job steps",
        "3 steps, tokens saved > 0",
        "scancel mid-step leaves nothing",
        "scontrol requeue resumes from the checkpoint",
        "no cache update applied twice",
        "USR1 to the batch script: checkpoint, requeue, resume",
        "no cache update applied twice after it",
        "final scancel leaves nothing",
    ]
    for cancel in ("cancel", "final_cancel"):
        assert record["checks"][cancel]["processes_while_running"] > 0  # the scan sees the job while it runs
        assert record["checks"][cancel]["processes_left"] == 0
    assert record["resumed_at_step"] == record["last_checkpoint_before_requeue"] > 0
    assert record["tokens_saved"]["reused"] > 0
    assert record["cache"]["updated_twice_or_more"] == 0
    assert record["graceful_requeue"]["resumed_at_step"] == record["graceful_requeue"]["step_in_flight"]
