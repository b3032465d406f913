"""Plain sampling (`/v1/generate`) and the input checks every generation shares.

Guarantees: a prompt with a token id outside the vocabulary, a prompt that fills the context, or a cap that
would run past the context is refused with 422 naming the field, before the engine sees it; a request runs
under one policy version (held in the gate's shared slot for its whole decode) and says which; a request
needing a newer version than the replica serves gets 409.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

from services.core.errors import Conflict, InvalidInput, Unavailable
from services.core.schemas.rollout import GenerateRequest, GenerateResponse, Sample
from services.rollout.engine import RolloutEngine
from services.rollout.metrics import RolloutMetrics
from services.rollout.weight_updater import WeightUpdater

SEED_BITS = 62


def derive_seed(seed: int | None, key: str) -> int | None:
    """A per-question seed that depends only on (seed, key), never on batch order or replica."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**SEED_BITS


def check_prompt(prompt: Sequence[int], field: str, vocab_size: int, max_model_len: int) -> None:
    """422 naming `field` for an out-of-vocabulary id or a prompt that leaves no room in the context."""
    for j, token in enumerate(prompt):
        if token >= vocab_size:
            raise InvalidInput(
                f"token id {token} at position {j} is out of the vocabulary (ids 0..{vocab_size - 1})",
                field=field,
            )
    if len(prompt) >= max_model_len:
        raise InvalidInput(
            f"the prompt has {len(prompt)} tokens; the replica's context (model.max_model_len) is {max_model_len}, "
            "which leaves no room for a response",
            field=field,
        )


def check_serving(updater: Any, min_policy_version: int, replica: str) -> int:
    """The served version, or 409 when it is older than the request needs / 503 when out of service."""
    if updater.broken:
        raise Unavailable(f"replica {replica} is out of service: {updater.broken}", retry_after_seconds=30)
    if updater.version < min_policy_version:
        raise Conflict(
            f"replica {replica} serves policy version {updater.version}; this request needs >= {min_policy_version} "
            "(push the current weights to it first)",
            field="min_policy_version",
        )
    return updater.version


class Generation:
    """`/v1/generate`: every prompt is its own engine request, all issued at once."""

    def __init__(self, engine: RolloutEngine, updater: WeightUpdater, metrics: RolloutMetrics, replica: str):
        self.engine = engine
        self.updater = updater
        self.metrics = metrics
        self.replica = replica

    def check(self, req: GenerateRequest) -> list[int]:
        """Per-prompt caps, after checking every prompt and cap against the model."""
        if isinstance(req.max_tokens, list) and len(req.max_tokens) != len(req.prompts):
            raise InvalidInput(
                f"{len(req.max_tokens)} caps for {len(req.prompts)} prompts: give one per prompt, or one number",
                field="max_tokens",
            )
        caps = req.max_tokens if isinstance(req.max_tokens, list) else [req.max_tokens] * len(req.prompts)
        limit = self.engine.max_model_len
        for i, (prompt, cap) in enumerate(zip(req.prompts, caps, strict=True)):
            check_prompt(prompt, f"prompts.{i}", self.engine.vocab_size, limit)
            if len(prompt) + cap > limit:
                field = f"max_tokens.{i}" if isinstance(req.max_tokens, list) else "max_tokens"
                raise InvalidInput(
                    f"max_tokens {cap} with a prompt of {len(prompt)} tokens (prompts.{i}) runs past the context "
                    f"of {limit} tokens (model.max_model_len); the most it can be is {limit - len(prompt)}",
                    field=field,
                )
        return caps

    async def run(self, req: GenerateRequest) -> GenerateResponse:
        caps = self.check(req)
        async with self.updater.gate.shared():
            version = check_serving(self.updater, req.min_policy_version, self.replica)
            outputs = await asyncio.gather(
                *(
                    self.engine.generate(
                        prompt,
                        n=req.n,
                        max_tokens=cap,
                        temperature=req.temperature,
                        top_p=req.top_p,
                        seed=None if req.seed is None else (req.seed + i) % 2**SEED_BITS,
                        policy_version=version,
                    )
                    for i, (prompt, cap) in enumerate(zip(req.prompts, caps, strict=True))
                )
            )
        self.metrics.generated_tokens.inc(sum(len(s.token_ids) for samples in outputs for s in samples))
        results = [
            [
                Sample.model_construct(
                    token_ids=s.token_ids, logprobs=s.logprobs, finish_reason=s.finish_reason
                )
                for s in samples
            ]
            for samples in outputs
        ]
        return GenerateResponse.model_construct(policy_version=version, results=results)
