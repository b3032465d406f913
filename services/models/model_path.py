"""`model.path` to a directory: a local HF model directory as given, a Hugging Face Hub id resolved to its
snapshot in the Hugging Face cache (`services.core.hub`), or the embedded tiny model.

`builtin:tiny-warm` is the tiny Qwen2 warm-started on the synthetic task, `builtin:tiny-random` the same
architecture untrained, `builtin:tiny-warm-long` the tiny Qwen2 warm-started on the long-reasoning task
(`builtin:tiny-warm-long-var` on its varied wording)
(all built once and cached by `services.models.tiny_model_cache.cached_tiny_model`). A Hub id resolves to the
snapshot of one commit: `rpo run` resolves it once and hands that directory to every process it starts.
"""

from __future__ import annotations

from pathlib import Path

from services.core.config import ConfigError
from services.core.hub import HubError, hub_snapshot, looks_like_hub_id
from services.models.tiny_model_cache import cached_tiny_model

BUILTIN_MODELS = {
    "builtin:tiny-warm": "warm",
    "builtin:tiny-warm-long": "warm-long",
    "builtin:tiny-warm-long-var": "warm-long-var",
    "builtin:tiny-random": "random-tied",
}


def not_a_model_directory(what: str, spec: str) -> str:
    """The message for a local model path with no config.json."""
    return (
        f"{what}: not an HF model directory (no config.json there); give a local model directory or a "
        "Hugging Face Hub id such as Qwen/Qwen2.5-0.5B-Instruct"
    )


def resolve_model_path(spec: str, revision: str | None = None) -> Path:
    """The model directory for `spec` at `revision` (Hub ids only); builds the tiny model on first use.
    Raises ConfigError (a ValueError) naming the problem if there is no model there."""
    if spec.startswith("builtin:"):
        kind = BUILTIN_MODELS.get(spec)
        if kind is None:
            raise ConfigError(
                f"model.path {spec!r}: unknown built-in model; use one of {sorted(BUILTIN_MODELS)}"
            )

        return cached_tiny_model(kind)
    if looks_like_hub_id(spec):
        try:
            path = hub_snapshot(spec, "model", revision, "model.path")
        except HubError as exc:
            raise ConfigError(str(exc)) from None
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.path {spec!r}: its Hub snapshot {path} has no config.json (not a model)"
            )
        return path
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ConfigError(not_a_model_directory(f"model.path {spec!r}", spec))
    return path
