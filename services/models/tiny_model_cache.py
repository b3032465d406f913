"""The tiny models kept on disk: `cached_tiny_model(kind)` builds each kind once per build recipe (its
parameters, the source of services/models/tiny_model.py and of the task, the torch and transformers versions)
and is safe when several processes ask at the same time: a lock, a build in a temporary directory, an
atomic rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from services.core import synthetic, synthetic_long
from services.core.synthetic import SyntheticTaskConfig
from services.core.synthetic_long import LongTaskConfig
from services.models import tiny_model
from services.models.tiny_model import (
    KINDS,
    RANDOM_INIT_STD,
    WARM_BATCH_SIZE,
    WARM_LAYERS,
    WARM_LONG_STEPS,
    WARM_LONG_VAR_STEPS,
    WARM_LR,
    WARM_STEPS,
    build_tiny_model,
    warm_start,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no lock, the atomic rename still protects
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


def _recipe(kind: str) -> dict[str, Any]:
    """Everything that determines a cached model of `kind`, as plain data (hashed into its directory name)."""
    if kind == "random-tied":
        return {
            "build": {"tie_word_embeddings": True, "num_layers": 2, "seed": 0, "init_std": RANDOM_INIT_STD}
        }
    if kind == "random-untied":
        return {
            "build": {"tie_word_embeddings": False, "num_layers": 2, "seed": 0, "init_std": RANDOM_INIT_STD}
        }
    if kind == "warm":
        task = SyntheticTaskConfig()
        return {
            "build": {"tie_word_embeddings": True, "num_layers": WARM_LAYERS, "seed": 0},
            "warm": {
                "task": asdict(task),
                "steps": WARM_STEPS,
                "batch_size": WARM_BATCH_SIZE,
                "lr": WARM_LR,
                "seed": 0,
            },
        }
    if kind in ("warm-long", "warm-long-var"):
        varied = kind == "warm-long-var"
        return {
            "build": {"tie_word_embeddings": True, "num_layers": WARM_LAYERS, "seed": 0},
            "warm": {
                "task": asdict(LongTaskConfig(wording="varied" if varied else "full")),
                "task_kind": "long",
                "steps": WARM_LONG_VAR_STEPS if varied else WARM_LONG_STEPS,
                "batch_size": WARM_BATCH_SIZE,
                "lr": WARM_LR,
                "seed": 0,
                "group_by_length": True,
                "schedule": "constant",
            },
        }
    raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(KINDS)}")


def _code_fingerprint(kind: str) -> str:
    """Hash of the source that builds the models of `kind`, so a change to it builds fresh ones."""

    digest = hashlib.sha256()
    sources = [Path(tiny_model.__file__), Path(synthetic.__file__)]
    if kind.startswith("warm-long"):
        sources.append(Path(synthetic_long.__file__))
    for path in sources:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """`$RPO_CACHE_DIR`, else `.cache/models` at the repository root (git-ignored)."""
    env = os.environ.get("RPO_CACHE_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "models"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory inter-process lock (POSIX); elsewhere no lock, and the atomic rename still protects."""
    if fcntl is None:  # pragma: no cover - non-POSIX
        yield
        return
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def tiny_model_path(kind: str, cache_dir: str | Path | None = None) -> Path:
    """Where `cached_tiny_model(kind, cache_dir)` keeps its model (which may not be built yet)."""
    # lazy: heavy import (torch), paid only on this path
    import torch

    # lazy: heavy import (transformers), paid only on this path
    import transformers

    recipe = _recipe(kind)
    identity = {
        "kind": kind,
        "recipe": recipe,
        "code": _code_fingerprint(kind),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{kind}-{key}"


def cached_tiny_model(kind: str = "warm", cache_dir: str | Path | None = None) -> Path:
    """Path of a ready tiny model of `kind` ("warm", "random-tied", "random-untied"), built on first use."""
    final = tiny_model_path(kind, cache_dir)
    if (final / "config.json").exists():
        return final
    recipe = _recipe(kind)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{final.name}.lock"):
        if (final / "config.json").exists():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
        try:
            log.info("building tiny model %s into %s", kind, final)
            if "warm" in recipe:
                random_dir = build_tiny_model(tmp / "random", **recipe["build"])
                warm = dict(recipe["warm"])
                task_fields = warm.pop("task")
                long_task = warm.pop("task_kind", "short") == "long"
                task = LongTaskConfig(**task_fields) if long_task else SyntheticTaskConfig(**task_fields)
                # No time cap: the cached model must not depend on how busy the machine is (a capped run
                # on a loaded machine stops short of the accuracy cliff near the end).
                warm_start(random_dir, tmp / "model", task_cfg=task, max_seconds=math.inf, **warm)
                shutil.rmtree(random_dir)
            else:
                build_tiny_model(tmp / "model", **recipe["build"])
            (tmp / "model" / "rpo_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
            try:
                os.rename(tmp / "model", final)
            except OSError:
                if not (final / "config.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
