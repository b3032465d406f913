"""`rpo compose init [--cpu] [--model DIR] [--dataset FILE --eval-dataset FILE]`: everything the compose
stack (docker-compose.yml) reads from the host, in place, in one command.

- `./models/policy`: the policy. By default the tiny model warm-started on the synthetic task (built here,
  nothing downloaded); `--model` copies your HF model directory. Files are made readable by every user,
  since the containers run under a uid of their own.
- `./data/train.jsonl`, `./data/eval.jsonl`: the synthetic task by default, or copies of your files.
- `./runs`: created, and writable by the uid the containers run as (RPO_UID).
- `.env`: made from `.env.example` if missing. Secrets left empty get fresh random values; RPO_UID/RPO_GID
  name the owner of ./runs (the invoking user; uid 1000 when run as root, which then owns ./runs); RPO_CONFIG
  names the run config (configs/compose-tiny.yaml for the tiny model, configs/compose.yaml for yours); `--cpu`
  adds COMPOSE_FILE so plain `docker compose` commands use the CPU profile (deploy/compose.cpu.yml).
Guarantees: re-running is safe: an existing model or data file is kept unless `--force`, and .env keeps every
value it has except the ones this command owns (RPO_UID, RPO_GID, RPO_CONFIG, COMPOSE_FILE).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

from services.cli.args import UsageError
from services.core.config import DataSection
from services.core.file_modes import make_readable
from services.core.synthetic import make_dataset_files
from services.demo.make import task_config
from services.demo.model_path import not_a_model_directory, resolve_model_path

log = logging.getLogger("rpo.compose")

CPU_COMPOSE_FILES = "docker-compose.yml:deploy/compose.cpu.yml"
TINY_CONFIG = "compose-tiny.yaml"
OWN_CONFIG = "compose.yaml"
DEFAULT_UID = 1000
"""The image's own user: what containers run as when `rpo compose init` is run by root."""
SECRETS = ("RPO_API_TOKEN", "GRAFANA_ADMIN_PASSWORD")


def compose_init_main(args: argparse.Namespace) -> int:

    root = Path(args.dir).resolve()
    if not (root / "docker-compose.yml").is_file():
        raise UsageError(f"--dir {args.dir}: no docker-compose.yml there (run it in the repository's root)")
    if bool(args.dataset) != bool(args.eval_dataset):
        raise UsageError("--dataset and --eval-dataset go together: the trainer reads both")
    uid, gid = container_user()
    model = place_model(root / "models" / "policy", args.model, args.force)
    data = place_data(root / "data", args.dataset, args.eval_dataset, args.force)
    runs = prepare_runs(root / "runs", uid, gid)
    values = {
        "RPO_UID": str(uid),
        "RPO_GID": str(gid),
        "RPO_CONFIG": OWN_CONFIG if args.model else TINY_CONFIG,
    }
    if args.cpu:
        values["COMPOSE_FILE"] = CPU_COMPOSE_FILES
    env_file = write_env(root / ".env", root / ".env.example", values)
    print(f"model:  {model}")
    print(f"data:   {', '.join(str(p) for p in data)}")
    print(f"runs:   {runs} (writable by uid {uid})")
    print(f"config: configs/{values['RPO_CONFIG']}; settings in {env_file}")
    scale = "docker compose up -d --scale rollout=2"
    print(f"next:   docker compose build && {scale}" if not args.cpu else f"next:   {scale}")
    return 0


def container_user() -> tuple[int, int]:
    """The uid:gid the containers run as: the invoking user's, or the image's own user when that is root."""
    if os.getuid() == 0:
        return DEFAULT_UID, DEFAULT_UID
    return os.getuid(), os.getgid()


def place_model(target: Path, source: str | None, force: bool) -> Path:
    """Copy the policy to `target` (the built-in tiny warm model when `source` is None), readable by all."""
    if target.exists() and any(target.iterdir()) and not force:
        log.info("keeping the model already at %s (--force replaces it)", target)
        make_readable(target)
        return target
    if source is None:
        source_dir = resolve_model_path("builtin:tiny-warm")
    else:
        source_dir = Path(source)
        if not (source_dir / "config.json").is_file():
            raise UsageError(not_a_model_directory(f"--model {source}", source))
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source_dir, target)
    make_readable(target)
    return target


def place_data(out: Path, train: str | None, eval_: str | None, force: bool) -> list[Path]:
    """`out/train.jsonl` and `out/eval.jsonl`: copies of the given files, or the synthetic task."""
    files = [out / "train.jsonl", out / "eval.jsonl"]
    if all(f.exists() for f in files) and not force:
        log.info("keeping the data already in %s (--force replaces it)", out)
        return files
    out.mkdir(parents=True, exist_ok=True)
    if train is None:
        made = make_dataset_files(task_config(DataSection()), out)
        files = [made["train"], made["eval"]]
    else:
        for source, target in zip((train, eval_), files, strict=True):
            if not Path(source).is_file():
                raise UsageError(f"--dataset/--eval-dataset {source}: no such file")
            shutil.copyfile(source, target)
    for f in files:
        make_readable(f)
    make_readable(out)
    return files


def prepare_runs(runs: Path, uid: int, gid: int) -> Path:
    """`./runs`, writable by the containers' uid: owned by it when this runs as root."""
    runs.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0:
        os.chown(runs, uid, gid)
    elif runs.stat().st_uid != uid:
        raise UsageError(
            f"{runs} belongs to uid {runs.stat().st_uid}, not to you: chown it, or run as its owner"
        )
    return runs


_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def write_env(env_file: Path, example: Path, values: dict[str, str]) -> Path:
    """Set `values` in `env_file` (created from `example`), fill empty secrets, keep everything else."""
    if env_file.exists():
        lines = env_file.read_text().splitlines()
    elif example.exists():
        lines = example.read_text().splitlines()
    else:
        lines = []
    pending = dict(values)
    out = []
    for line in lines:
        match = _LINE.match(line)
        if match:
            key, value = match.groups()
            if key in pending:
                line = f"{key}={pending.pop(key)}"
            elif key in SECRETS and not value.strip():
                line = f"{key}={secrets.token_urlsafe(24)}"
        out.append(line)
    present = {m.group(1) for m in map(_LINE.match, out) if m}
    for key in SECRETS:
        if key not in present:
            out.append(f"{key}={secrets.token_urlsafe(24)}")
    out.extend(f"{key}={value}" for key, value in pending.items())
    env_file.write_text("\n".join(out) + "\n")
    env_file.chmod(0o600)
    return env_file
