"""A replica's start-up never starts the CUDA driver before vLLM forks its engine core.

The real `rpo serve rollout` start-up path runs in a subprocess (with a GPU claim, as on a compose box)
under a Python audit hook that writes down the CUDA settings of the process environment at two moments: when
torch is first imported, and when the replica imports vLLM's engine (the step that forks the engine core),
where the hook ends the process: what matters here happens before it. On a GPU box, torch's CUDA check
without `PYTORCH_NVML_BASED_CUDA_CHECK=1` starts the driver in the parent and the forked engine core fails
("CUDA error: initialization error"); without `CUDA_DEVICE_ORDER=PCI_BUS_ID` the claimed GPU index (PCI
order, as nvidia-smi) can name another device. This machine has no GPU, so the test checks the order of
the settings, which is the part our code decides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from services.core.cuda_check import FORK_SAFE_ENV, fork_safe_cuda_env
from tests.fixtures.rollout import REPO_ROOT, free_port

DRIVER = textwrap.dedent(
    """
    import json, os, sys

    KEYS = ("PYTORCH_NVML_BASED_CUDA_CHECK", "CUDA_DEVICE_ORDER", "CUDA_VISIBLE_DEVICES")
    seen = {}
    out = sys.argv[1]

    def hook(event, args):
        if event != "import":
            return
        name = args[0]
        if name == "torch" and "torch_import" not in seen:
            seen["torch_import"] = {k: os.environ.get(k) for k in KEYS}
        if name == "vllm.v1.engine.async_llm" and "engine_start" not in seen:
            seen["engine_start"] = {k: os.environ.get(k) for k in KEYS}
            torch = sys.modules.get("torch")
            seen["torch_cuda_initialized"] = bool(torch and torch.cuda.is_initialized())
            with open(out, "w") as fh:
                json.dump(seen, fh)
            os._exit(0)

    sys.addaudithook(hook)
    from services.cli.main import main

    sys.exit(main(sys.argv[2:]))
    """
)


def test_the_replica_sets_fork_safe_cuda_settings_before_torch_and_the_engine(tmp_path, tiny_model_dir):
    record = tmp_path / "seen.json"
    env = {k: v for k, v in os.environ.items() if k not in FORK_SAFE_ENV}
    env.update(
        RPO_GPU_DEVICES="0,1",  # a two-"GPU" box: the trainer keeps 0, this replica claims 1
        RPO_GPUS__CLAIM_DIR=str(tmp_path / "claims"),
        CUDA_DEVICE_ORDER="FASTEST_FIRST",  # CUDA's default, said out loud: the replica must override it
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            DRIVER,
            str(record),
            "serve",
            "rollout",
            "--model",
            str(tiny_model_dir),
            "--port",
            str(free_port()),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert record.exists(), f"the replica never reached its engine start (rc {out.returncode}):\n{out.stderr}"
    seen = json.loads(record.read_text())
    # torch is imported with torch's CUDA check already on NVML and CUDA's numbering on PCI order ...
    assert seen["torch_import"]["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    assert seen["torch_import"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    # ... and the engine starts with them, on the GPU this replica claimed, CUDA not set up by torch
    assert seen["engine_start"] == {
        "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "1",
    }
    assert seen["torch_cuda_initialized"] is False


def test_fork_safe_settings_are_set_and_say_what_they_replaced():
    environ = {"CUDA_DEVICE_ORDER": "FASTEST_FIRST", "OTHER": "x"}
    changed = fork_safe_cuda_env(environ)
    assert changed == {"CUDA_DEVICE_ORDER": "FASTEST_FIRST", "PYTORCH_NVML_BASED_CUDA_CHECK": ""}
    assert environ == {**FORK_SAFE_ENV, "OTHER": "x"}
    assert fork_safe_cuda_env(environ) == {}  # already safe: nothing changes
