"""`model.path` to a directory: a local HF model directory as given, or the embedded tiny model.

`builtin:tiny-warm` is the tiny Qwen2 warm-started on the synthetic task, `builtin:tiny-random` the same
architecture untrained, `builtin:tiny-warm-long` the tiny Qwen2 warm-started on the long-reasoning task
(all built once and cached by `services.demo.tiny_model_cache.cached_tiny_model`).
"""

from __future__ import annotations

from pathlib import Path

from services.core.config import ConfigError
from services.demo.tiny_model_cache import cached_tiny_model

BUILTIN_MODELS = {
    "builtin:tiny-warm": "warm",
    "builtin:tiny-warm-long": "warm-long",
    "builtin:tiny-random": "random-tied",
}


def not_a_model_directory(what: str, spec: str) -> str:
    """The message for a model path with no config.json; a Hub id gets how to fetch it, since none is fetched."""
    message = f"{what}: not an HF model directory (no config.json there)"
    if (
        "/" in spec
        and not Path(spec).exists()
        and not spec.startswith(("/", ".", "~"))
        and spec.count("/") == 1
    ):
        message += (
            f"; {spec!r} looks like a Hugging Face Hub id, and nothing is downloaded at run time: fetch it first, "
            f"e.g. `huggingface-cli download {spec} --local-dir models/{spec.split('/')[1]}`, and give that directory"
        )
    return message


def resolve_model_path(spec: str) -> Path:
    """The model directory for `spec`; builds the tiny model on first use. Raises ConfigError (a ValueError)
    naming the problem if it is not a model directory."""
    if spec.startswith("builtin:"):
        kind = BUILTIN_MODELS.get(spec)
        if kind is None:
            raise ConfigError(
                f"model.path {spec!r}: unknown built-in model; use one of {sorted(BUILTIN_MODELS)}"
            )

        return cached_tiny_model(kind)
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ConfigError(not_a_model_directory(f"model.path {spec!r}", spec))
    return path
