"""Example reward functions written as TRL writes them: `(completions, **kwargs) -> list[float]`, one batch
per call. Use one by name (`format`) or by path (`services.core.reward_examples:boxed_format_reward`), or copy
it as a starting point for your own (docs/training.md, "Rewards").
"""

from __future__ import annotations

import re
from typing import Any

_ONE_BOXED_AT_THE_END = re.compile(r"^(?!.*\\boxed\{.*\\boxed\{).*\S.*\\boxed\{[^{}]+\}\s*$", re.DOTALL)
"""Some reasoning, then exactly one \\boxed{...} answer, and nothing after it."""


def completion_text(completion: Any) -> str:
    """A completion's text: the string itself, or a conversational completion's assistant content."""
    if isinstance(completion, list):
        return "".join(turn.get("content", "") for turn in completion if isinstance(turn, dict))
    return str(completion)


def boxed_format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 for a completion that reasons, then gives exactly one \\boxed{} answer and stops; else 0.0.

    The common partner of a correctness reward: with a small weight (say 0.1) it rewards the answer's form
    even before the answers are right."""
    return [1.0 if _ONE_BOXED_AT_THE_END.match(completion_text(c)) else 0.0 for c in completions]
