"""`.deepspeed_env` for multi-node trainers: what `write_deepspeed_env` writes is read back by DeepSpeed's
own launcher code (the file loop of `deepspeed/launcher/runner.py`, its PDSH runner's quoting and command)
and arrives unchanged in the shell that starts the remote ranks; the file is private; values the launcher
would mangle are refused with the variable's name and not its value."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.launch_env import write_deepspeed_env

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-t0ken_with.odd/chars:+=@%,"

ENVIRON = {
    "RPO_API_TOKEN": SECRET,
    "RPO_SERVICES__CACHE_URL": "http://10.0.0.2:8100",
    "RPO_SERVICES__ROLLOUT_URLS": "[http://10.0.0.5:8200, http://10.0.0.6:8200]",  # spaces, brackets
    "RPO_TRAIN__RUN_DIR": "/shared/runs/a b",
    "RPO_EMPTY": "",
    "NCCL_SOCKET_IFNAME": "eth0",
    "NCCL_IB_DISABLE": "1",
    "DS_ACCELERATOR": "cuda",
    "HOME": "/home/me",  # not forwarded
    "AWS_SECRET_ACCESS_KEY": "nope",  # not forwarded
    "RPOX": "not a prefix match",
}
FORWARDED = {k: v for k, v in ENVIRON.items() if k.startswith(("RPO_", "NCCL_")) or k == "DS_ACCELERATOR"}


def _remote_environment(env_file_dir: Path) -> dict[str, str]:
    """What the remote shell of a pdsh launch sees: DeepSpeed's runner reads `.deepspeed_env` from its
    working directory exactly as `runner.main` does, its PDSHRunner builds the command, and the export part
    of that command runs in bash."""
    from deepspeed.launcher import runner
    from deepspeed.launcher.multinode_runner import PDSHRunner

    assert "." in runner.DEEPSPEED_ENVIRONMENT_PATHS and runner.DEEPSPEED_ENVIRONMENT_NAME == ".deepspeed_env"
    args = runner.parse_args(["--launcher", "pdsh", "--no_local_rank", "--module", "services.cli", "train"])
    pdsh = PDSHRunner(args, "e30=")
    # runner.main's loop over DEEPSPEED_ENVIRONMENT_PATHS, for the "." entry (run from env_file_dir):
    environ_file = os.path.join(env_file_dir, runner.DEEPSPEED_ENVIRONMENT_NAME)
    with open(environ_file) as fd:
        for var in fd.readlines():
            key, val = var.split("=", maxsplit=1)
            pdsh.add_export(key, val)
    cmd, _, _ = pdsh.get_cmd({}, {"node-a": [0], "node-b": [0]})
    exports = next(part for part in cmd if part.startswith("export "))
    names = json.dumps(sorted(FORWARDED))  # double quotes only: the probe sits in single quotes
    probe = f"import json, os; print(json.dumps({{k: os.environ[k] for k in {names} if k in os.environ}}))"
    out = subprocess.run(
        ["bash", "-c", f"{exports} exec {sys.executable} -c '{probe}'"],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_every_rpo_nccl_and_accelerator_variable_arrives_unchanged_on_the_remote_nodes(tmp_path):
    path = tmp_path / ".deepspeed_env"
    names = write_deepspeed_env(path, ENVIRON)
    assert names == sorted(FORWARDED)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _remote_environment(tmp_path) == FORWARDED


def test_an_existing_file_is_replaced_and_made_private(tmp_path):
    path = tmp_path / ".deepspeed_env"
    path.write_text("RPO_OLD=1\n")
    path.chmod(0o644)
    write_deepspeed_env(path, {"RPO_API_TOKEN": "t"})
    assert path.read_text() == "RPO_API_TOKEN=t\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [".deepspeed_env"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("a\nb", "line break"),
        (" padded", "white space"),
        ('say "hi"', "a double quote"),
        ("$HOME", "a dollar sign"),
        ("`id`", "a backquote"),
        ("C:\\x", "a backslash"),
    ],
)
def test_a_value_the_launcher_would_mangle_is_refused_by_name_without_the_value(tmp_path, value, problem):
    path = tmp_path / ".deepspeed_env"
    with pytest.raises(ValueError, match=f"RPO_API_TOKEN .*{problem}") as err:
        write_deepspeed_env(path, {"RPO_API_TOKEN": value, "RPO_RUN_NAME": "ok"})
    assert value not in str(err.value)
    assert not path.exists()  # nothing half-written


def test_the_command_writes_the_current_environment(tmp_path):
    env = {"PATH": os.environ["PATH"], "RPO_API_TOKEN": SECRET, "NCCL_IB_DISABLE": "1", "OTHER": "x"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "trainer.launch_env"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "NCCL_IB_DISABLE RPO_API_TOKEN" in done.stdout and SECRET not in done.stdout
    assert (tmp_path / ".deepspeed_env").read_text() == f"NCCL_IB_DISABLE=1\nRPO_API_TOKEN={SECRET}\n"
    env["RPO_API_TOKEN"] = "bad$value"
    refused = subprocess.run(
        [sys.executable, "-m", "trainer.launch_env"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert refused.returncode == 1 and "RPO_API_TOKEN contains a dollar sign" in refused.stderr
