"""`model.path` to a directory: a local HF model directory as given, or the embedded tiny model.

`builtin:tiny-warm` is the tiny Qwen2 warm-started on the synthetic task, `builtin:tiny-random` the same
architecture untrained, `builtin:tiny-warm-long` the tiny Qwen2 warm-started on the long-reasoning task
(all built once and cached by `services.demo.tiny_model.cached_tiny_model`).
"""

from __future__ import annotations

from pathlib import Path

from services.demo.tiny_model import cached_tiny_model

BUILTIN_MODELS = {
    "builtin:tiny-warm": "warm",
    "builtin:tiny-warm-long": "warm-long",
    "builtin:tiny-random": "random-tied",
}


def resolve_model_path(spec: str) -> Path:
    """The model directory for `spec`; builds the tiny model on first use. Raises ValueError if missing."""
    if spec.startswith("builtin:"):
        kind = BUILTIN_MODELS.get(spec)
        if kind is None:
            raise ValueError(
                f"model.path {spec!r}: unknown built-in model; use one of {sorted(BUILTIN_MODELS)}"
            )

        return cached_tiny_model(kind)
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ValueError(f"model.path {spec!r}: not an HF model directory (no config.json there)")
    return path
