"""The run's lengths fitted to the model it names, checked before any engine starts.

Guarantees:
- `model_context` reads the model's own context (positions) from its config.json, as transformers names it;
- `fitted_context` is what `model.max_model_len` means when it is left unset: the model's context, at most
  `algorithm.max_response_tokens` + `PROMPT_ROOM_TOKENS`, with a sentence saying how it was chosen;
- `check_fit` refuses, in one `ConfigError` naming both numbers, a context longer than the model has
  (vLLM would refuse it with a traceback deep in a replica's log) and a response budget the context cuts
  to nothing; `response_budget_note` says, with the numbers, when the context cuts the budget.
Every process that starts an engine or a run calls `check_fit` first, so the mistake is one line at start.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.core.config import ConfigError, RunConfig

PROMPT_ROOM_TOKENS = 512
"""Room for the prompt when the context is sized from the response budget (`fitted_context`)."""

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
"""Where HF configs keep the model's context, in the order transformers' own models use them."""


def model_context(model_dir: Path) -> int | None:
    """The model's context in tokens from `model_dir/config.json` (a multimodal model's `text_config`
    too); None when the config names none."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        for key in POSITION_KEYS:
            value = section.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def fitted_context(cfg: RunConfig, model_dir: Path) -> tuple[int, str]:
    """`model.max_model_len` as the run uses it, and how it was chosen (for the start-up log)."""
    positions = model_context(model_dir)
    if cfg.model.max_model_len is not None:
        return cfg.model.max_model_len, f"model.max_model_len {cfg.model.max_model_len} (set)"
    wanted = cfg.algorithm.max_response_tokens + PROMPT_ROOM_TOKENS
    if positions is None:
        return wanted, (
            f"model.max_model_len {wanted}: algorithm.max_response_tokens {cfg.algorithm.max_response_tokens} "
            f"+ {PROMPT_ROOM_TOKENS} for the prompt (the model's config names no context length)"
        )
    chosen = min(positions, wanted)
    why = (
        f"the model's {positions} positions"
        if chosen == positions
        else f"algorithm.max_response_tokens {cfg.algorithm.max_response_tokens} + {PROMPT_ROOM_TOKENS} for "
        f"the prompt (the model has {positions} positions)"
    )
    return chosen, f"model.max_model_len {chosen}: {why}"


def check_fit(cfg: RunConfig, model_dir: Path) -> int:
    """The context the run uses for this model; raises ConfigError when the config does not fit it."""
    context, _ = fitted_context(cfg, model_dir)
    positions = model_context(model_dir)
    if positions is not None and context > positions:
        raise ConfigError(
            f"model.max_model_len {context} is longer than the model's context: its config.json says "
            f"{positions} positions ({model_dir}); set model.max_model_len to at most {positions}, or leave it "
            "unset to size it from the model"
        )
    if context < 16:
        raise ConfigError(f"model.max_model_len {context}: too short for a prompt and a response")
    return context


def response_budget_note(cfg: RunConfig, context: int, longest_prompt: int) -> str | None:
    """A sentence when the context leaves less than `algorithm.max_response_tokens` after the longest
    prompt (responses are then cut at the context), else None."""
    room = context - longest_prompt
    budget = cfg.algorithm.max_response_tokens
    if room >= budget:
        return None
    return (
        f"algorithm.max_response_tokens is {budget} but the context (model.max_model_len {context}) leaves "
        f"{max(room, 0)} tokens after the longest prompt ({longest_prompt} tokens): responses to the longest "
        f"prompts are cut at {max(room, 0)}; raise model.max_model_len or lower algorithm.max_response_tokens"
    )
