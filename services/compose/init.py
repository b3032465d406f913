"""`rpo compose init [--cpu] [--model ID|DIR] [--dataset ID|FILE [--subset S] [--eval-dataset ID|FILE]]`:
everything the compose stack (docker-compose.yml) reads from the host, in place, in one command.

- `./models/policy`: the policy. By default the tiny model warm-started on the synthetic task (built here,
  nothing downloaded); `--model` copies your HF model directory, or the snapshot of a Hub id (downloaded
  into the Hugging Face cache first unless HF_HUB_OFFLINE=1). Files are made readable by every user, since
  the containers run under a uid of their own.
- `./configs/compose-local.yaml` with `--model`: configs/compose.yaml sized for that model, from its own
  config.json (the context, and the response budget the context leaves); what was chosen is printed.
- `./data/train.jsonl`, `./data/eval.jsonl`: the synthetic task by default, or your questions read as
  training reads them (any source `data.dataset` takes, a Hub id with `--subset` included) and written
  with the field names the configs use; the evaluation set follows `data.eval_dataset: auto` (the
  dataset's test split) unless `--eval-dataset` names one.
- `./runs`: created, and writable by the uid the containers run as (RPO_UID).
- `.env`: made from `.env.example` if missing. Secrets left empty get fresh random values; RPO_UID/RPO_GID
  name the owner of ./runs (the invoking user; uid 1000 when run as root, which then owns ./runs); RPO_CONFIG
  names the run config (configs/compose-tiny.yaml for the tiny model, configs/compose-local.yaml for yours); `--cpu`
  adds COMPOSE_FILE so plain `docker compose` commands use the CPU profile (deploy/compose.cpu.yml).
Guarantees: re-running is safe: an existing model or data file is kept unless `--force`, and .env keeps every
value it has except the ones this command owns (RPO_UID, RPO_GID, RPO_CONFIG, COMPOSE_FILE).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

import yaml

from services.core.cli_args import UsageError
from services.core.config import DataSection, load_config
from services.core.data import Question
from services.core.data_roles import load_role
from services.core.file_modes import make_readable
from services.core.model_fit import PROMPT_ROOM_TOKENS, model_context
from services.core.synthetic import make_dataset_files
from services.models.make import task_config
from services.models.model_path import resolve_model_path

log = logging.getLogger("rpo.compose")

CPU_COMPOSE_FILES = "docker-compose.yml:deploy/compose.cpu.yml"
TINY_CONFIG = "compose-tiny.yaml"
OWN_CONFIG = "compose.yaml"
"""The committed run config for a user's model; `rpo compose init --model` sizes a copy of it."""
SIZED_CONFIG = "compose-local.yaml"
"""The copy of OWN_CONFIG sized for the user's model (written by this command, not committed)."""
DEFAULT_UID = 1000
"""The image's own user: what containers run as when `rpo compose init` is run by root."""
SECRETS = ("RPO_API_TOKEN", "GRAFANA_ADMIN_PASSWORD")


def compose_init_main(args: argparse.Namespace) -> int:

    root = Path(args.dir).resolve()
    if not (root / "docker-compose.yml").is_file():
        raise UsageError(f"--dir {args.dir}: no docker-compose.yml there (run it in the repository's root)")
    if args.eval_dataset and not args.dataset:
        raise UsageError("--eval-dataset needs --dataset: the trainer reads both")
    uid, gid = container_user()
    settings = dataset_settings(args)
    keep_data = data_in_place(root / "data", args.force)
    questions = (
        None if keep_data or settings is None else read_questions(settings)
    )  # refused before any write
    model = place_model(root / "models" / "policy", args.model, args.force)
    data = place_data(root / "data", questions, keep_data)
    config = TINY_CONFIG
    if args.model:
        config = SIZED_CONFIG
        for line in write_sized_config(root / "configs", model, args.model):
            print(f"sized:  {line}")
    runs = prepare_runs(root / "runs", uid, gid)
    values = {"RPO_UID": str(uid), "RPO_GID": str(gid), "RPO_CONFIG": config}
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
    try:
        source_dir = resolve_model_path(source or "builtin:tiny-warm")
    except ValueError as exc:
        raise UsageError(f"--model {source}: {exc}") from None
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source_dir, target)
    make_readable(target)
    return target


def dataset_settings(args: argparse.Namespace) -> DataSection | None:
    """The `data` settings the flags name (None: the synthetic task)."""
    if not args.dataset:
        return None
    return DataSection(dataset=args.dataset, subset=args.subset, eval_dataset=args.eval_dataset or "auto")


DATA_FILES = ("train.jsonl", "eval.jsonl")


def data_in_place(out: Path, force: bool) -> bool:
    """Whether the data already in `out` stays (both files there and no --force)."""
    if all((out / name).exists() for name in DATA_FILES) and not force:
        log.info("keeping the data already in %s (--force replaces it)", out)
        return True
    return False


def read_questions(data: DataSection) -> tuple[list[Question], list[Question]]:
    """The training and evaluation questions `data` names, read whole (a UsageError naming the problem)."""
    try:
        train, _ = load_role("train", data) or ([], None)
        evaluation, choice = load_role("eval", data) or ([], None)
    except ValueError as exc:  # DatasetError, ConfigError
        raise UsageError(f"--dataset/--eval-dataset: {exc}") from None
    print(
        f"data:   {len(train)} training questions from {data.dataset}; {len(evaluation)} to evaluate on, "
        f"from {choice.describe() if choice else 'none'}"
    )
    return train, evaluation


def place_data(out: Path, questions: tuple[list[Question], list[Question]] | None, keep: bool) -> list[Path]:
    """`out/train.jsonl` and `out/eval.jsonl`: the given questions, or the synthetic task."""
    files = [out / name for name in DATA_FILES]
    if keep:
        return files
    out.mkdir(parents=True, exist_ok=True)
    if questions is None:
        made = make_dataset_files(task_config(DataSection()), out)
        files = [made["train"], made["eval"]]
    else:
        for rows, target in zip(questions, files, strict=True):
            target.write_text("".join(json.dumps(question_row(q), ensure_ascii=False) + "\n" for q in rows))
    for f in files:
        make_readable(f)
    make_readable(out)
    return files


def question_row(question: Question) -> dict:
    """A question as a row of the configs' default field names (id, question or messages, answer), with the
    row's other columns kept for reward functions that read them."""
    prompt = (
        {"messages": [{"role": r, "content": c} for r, c in question.messages]}
        if question.messages
        else {"question": question.question}
    )
    return {**question.columns, "id": question.id, **prompt, "answer": question.answer}


def write_sized_config(configs: Path, model_dir: Path, source: str) -> list[str]:
    """`configs/compose-local.yaml`: configs/compose.yaml with the context and the response budget fitted to
    the model in `model_dir` (`services.core.model_fit`); returns what was chosen, one line each."""
    base = yaml.safe_load((configs / OWN_CONFIG).read_text())
    cfg = load_config(configs / OWN_CONFIG)
    positions = model_context(model_dir)
    lines = []
    if positions is not None and cfg.model.max_model_len and cfg.model.max_model_len > positions:
        context = positions
        response = max(
            16, min(cfg.algorithm.max_response_tokens, positions - PROMPT_ROOM_TOKENS, positions // 2)
        )
        lines.append(
            f"model.max_model_len {context} (the model's {positions} positions; configs/{OWN_CONFIG} asks "
            f"{cfg.model.max_model_len})"
        )
        lines.append(
            f"algorithm.max_response_tokens {response} (configs/{OWN_CONFIG} asks "
            f"{cfg.algorithm.max_response_tokens}; the prompt keeps {context - response})"
        )
        base["model"]["max_model_len"] = context
        base.setdefault("algorithm", {})["max_response_tokens"] = response
        base.setdefault("sampling", {})["init_max_tokens"] = response
    else:
        lines.append(
            f"model.max_model_len {cfg.model.max_model_len} and algorithm.max_response_tokens "
            f"{cfg.algorithm.max_response_tokens} as configs/{OWN_CONFIG} sets them (the model has "
            f"{positions or 'unstated'} positions)"
        )
    header = (
        f"# Written by `rpo compose init --model {source}`: configs/{OWN_CONFIG}, sized for that model's "
        "config.json.\n# Edit it freely; `rpo compose init --model ...` writes it again.\n"
    )
    draft = configs / f".{SIZED_CONFIG}.draft"
    draft.write_text(header + yaml.safe_dump(base, sort_keys=False))
    sized = load_config(draft)  # what the containers will load, checked before it replaces anything
    draft.replace(configs / SIZED_CONFIG)
    make_readable(configs / SIZED_CONFIG)
    lines.append(
        f"train.questions_per_step {sized.train.questions_per_step}, group size {sized.algorithm.group_size}"
    )
    return lines


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
