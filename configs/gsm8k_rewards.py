"""Reward functions for GSM8K, written as TRL writes them (`(completions, **kwargs) -> list[float]`, one batch
per call), used by configs/one-gpu-gsm8k.yaml. GSM8K's `answer` column ends with `#### 72`; a completion is
right when its last \\boxed{} holds that number. Copy this file as the start of your own.
"""

from __future__ import annotations

import re

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
ENDS_BOXED = re.compile(r"\S.*\\boxed\{[^{}]+\}\s*$", re.DOTALL)


def _text(completion) -> str:
    """A completion's text: the string itself, or a conversational completion's assistant turns."""
    if isinstance(completion, list):
        return "".join(turn.get("content", "") for turn in completion if isinstance(turn, dict))
    return str(completion)


def _number(text: str) -> float | None:
    """`1,234`, `$72`, `72.0` and `72` as one number; None when it is not one."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def gsm8k_accuracy(completions, answer, **kwargs):
    """1.0 when the completion's last \\boxed{} holds the number after the reference's `####`, else 0.0."""
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        boxed = BOXED.findall(_text(completion))
        want = _number(reference.rsplit("####", 1)[-1])
        got = _number(boxed[-1]) if boxed else None
        rewards.append(1.0 if got is not None and want is not None and got == want else 0.0)
    return rewards


def boxed_format(completions, **kwargs):
    """1.0 when the completion reasons and ends with one \\boxed{} answer, else 0.0 (weight it small)."""
    return [
        1.0 if ENDS_BOXED.match(_text(c)) and len(BOXED.findall(_text(c))) == 1 else 0.0 for c in completions
    ]
