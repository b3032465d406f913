"""`rpo train` with `train.num_processes` N > 1 runs N DeepSpeed ranks itself (a compose trainer with
RPO_TRAINER_GPUS=N): on the GPUs it was given, one rank each, or on N CPU ranks. The launch plan is checked
for both cases; the real run takes one RPO step with two CPU ranks against the trainer tests' real replicas
and cache server, under DeepSpeed's real launcher."""

from __future__ import annotations

import sys

import pytest

from trainer.launch_env import local_ranks_command
from trainer.telemetry.progress import read_records


def test_ranks_go_on_the_claimed_gpus_or_on_num_gpus():
    cmd, env = local_ranks_command(
        2, ["train", "--config", "c.yaml"], {"CUDA_VISIBLE_DEVICES": "2,3,5"}, 29511
    )
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert "--num_gpus" not in cmd and env["CUDA_VISIBLE_DEVICES"] == "2,3"  # the launcher places one per GPU
    assert cmd[-5:] == ["--module", "services.cli", "train", "--config", "c.yaml"]
    assert cmd[cmd.index("--master_port") + 1] == "29511"
    cmd, env = local_ranks_command(3, ["train"], {"DS_ACCELERATOR": "cpu"}, 29511)
    assert cmd[cmd.index("--num_gpus") + 1] == "3" and "CUDA_VISIBLE_DEVICES" not in env
    cmd, env = local_ranks_command(
        2, ["train"], {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "0"}, 29511
    )
    assert cmd[cmd.index("--num_gpus") + 1] == "2"  # CPU ranks: a claim's GPUs play no part
    with pytest.raises(ValueError, match=r"train.num_processes is 3, but this trainer was given 2 GPU\(s\)"):
        local_ranks_command(3, ["train"], {"CUDA_VISIBLE_DEVICES": "0,1"}, 29511)


def test_rpo_train_with_two_processes_trains_on_two_cpu_ranks(
    tmp_path, warm_model_dir, rollout_cache_url, training_replicas
):
    from tests.trainer.training_helpers import run_config, run_trainer

    urls = [r.url for r in training_replicas]
    cfg, config_file = run_config(
        tmp_path, warm_model_dir, rollout_cache_url, urls, "train.num_processes=2", "train.max_steps=1"
    )
    output = run_trainer(config_file, log_path=tmp_path / "trainer.log", timeout_seconds=480)
    assert "rpo train: 2 ranks under DeepSpeed's launcher (--num_gpus)" in output
    assert "num_local_procs=2" in output  # DeepSpeed's launcher started two ranks
    records = read_records(cfg.train.run_dir, "step")
    assert [r["step"] for r in records] == [1]
    assert records[0]["learner"]["sequences"] == 32 and records[0]["weight_transport"] == "http"
