"""`train.max_lag: 0` (the default) trains exactly as the learner did before rollouts one step ahead existed.

tests/trainer/learner/data/learner_steps_before_max_lag.json holds three learner steps on a fixed batch (GRPO and DAPO
losses) as the learner computed them before that change (its `commit`): each step's loss, gradient norm, KL
and clip fraction, and a digest of the weights after the steps. The same script on today's learner must give
the same bits on the CPU model that made the record; on another CPU model, whose kernels may round
differently, the figures must agree to a relative 1e-5 (each weight tensor by its sum and sum of squares).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
RECORD = json.loads((HERE / "data" / "learner_steps_before_max_lag.json").read_text())


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


@pytest.mark.parametrize("algorithm", ["grpo", "dapo"])
def test_max_lag_zero_gives_the_losses_and_weights_of_the_learner_before_lag_existed(
    tiny_model_dir, tmp_path, algorithm
):
    from safetensors.torch import load_file

    out, weights_file = tmp_path / "steps.json", tmp_path / "weights.safetensors"
    command = [sys.executable, str(HERE / "scripts" / "learner_steps.py"), "--model", str(tiny_model_dir)]
    command += ["--out", str(out), "--weights", str(weights_file), "--steps", "3"]
    command += ["--set", f"algorithm.algorithm={algorithm}", "--set", "train.max_lag=0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    expected = RECORD["runs"][algorithm]
    steps = json.loads(out.read_text())["steps"]
    got = [{k: s[k] for k in expected["steps"][0]} for s in steps]
    weights = load_file(weights_file)
    if _cpu_model() == RECORD["cpu"]:
        assert got == expected["steps"]  # bit for bit: floats compare exactly
        digest = hashlib.sha256()
        for name in sorted(weights):
            digest.update(name.encode())
            digest.update(weights[name].float().contiguous().numpy().tobytes())
        assert digest.hexdigest() == expected["weights_sha256"]
    else:
        # Another CPU's kernels round float32 differently. The KL at these steps is about 6.5e-6, a
        # difference of nearly equal log-probabilities, so its relative error on an AMD EPYC is 1e-3 while
        # its absolute error is 8e-9: the absolute floor keeps that from failing a learner that is the same.
        for step, want in zip(got, expected["steps"], strict=True):
            assert step == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert sorted(weights) == sorted(expected["weight_sums"])
    for name, (total, squares) in expected["weight_sums"].items():
        tensor = weights[name].double()
        assert tensor.sum().item() == pytest.approx(total, rel=1e-5, abs=1e-6), name
        assert (tensor**2).sum().item() == pytest.approx(squares, rel=1e-5), name
