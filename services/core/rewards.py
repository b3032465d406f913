"""Verifiable rewards: a response's text against a reference answer, as a float in [0, 1].

Built in: `math` (math-verify on the LAST \\boxed{...} of the response against the reference) and `exact`
(exact match of the last \\boxed{...}, for the synthetic task); `format` names the shipped example format
reward. Users plug in their own as `package.module:function`, either `(response: str, reference: str) ->
float` or TRL's batch form (services.core.reward_terms, which combines several with weights).

Guarantee: `score_safely` never raises. A reward function that raises, or returns something that is not
a finite number, gives 0 and a logged warning naming the question: never a crashed step.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import math
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

RewardFn = Callable[[str, str], float]


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text` (nested braces balanced), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i = start + len("\\boxed{")
        depth = 1
        j = i
        while j < len(text) and depth:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
            j += 1
        if depth == 0:
            return text[i : j - 1]
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try an earlier one
    return None


def exact_boxed_reward(response: str, reference: str) -> float:
    """1.0 iff the last \\boxed{} content, stripped, equals the reference string exactly."""
    boxed = last_boxed(response)
    return 1.0 if boxed is not None and boxed.strip() == reference.strip() else 0.0


def math_reward(response: str, reference: str) -> float:
    """math-verify equivalence of the last \\boxed{} answer and the reference (1.0 or 0.0).

    math-verify bounds its own time with signal.alarm, which only works in a process's main thread; in other
    threads (a server's executor) it runs without that bound, so servers should score in worker processes.
    """
    # lazy: heavy import (math_verify), paid only on this path
    from math_verify import parse, verify

    boxed = last_boxed(response)
    if boxed is None:
        return 0.0
    in_main = threading.current_thread() is threading.main_thread()
    timeout = 5 if in_main else None
    gold_text = reference if "$" in reference or "\\boxed" in reference else f"${reference}$"
    gold = parse(gold_text, parsing_timeout=timeout)
    pred = parse(f"${boxed}$", parsing_timeout=timeout)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0


BUILTIN_REWARDS: dict[str, RewardFn] = {"math": math_reward, "exact": exact_boxed_reward}


class RewardSpecError(ValueError):
    """The configured reward function cannot be found or is not callable."""


EXAMPLE_REWARDS = {"format": "services.core.reward_examples:boxed_format_reward"}
"""Names of the shipped example functions (batch-style, services.core.reward_examples)."""


def resolve_reward(spec: str, dataset: str = "") -> Callable[..., Any]:
    """`math`, `exact`, `format`, `auto` (exact for the built-in datasets, math otherwise),
    `package.module:function` or `path/to/file.py:function` (a per-response or a batch function,
    services.core.reward_terms)."""
    if spec == "auto":
        spec = "exact" if dataset.startswith("builtin:") else "math"
    spec = EXAMPLE_REWARDS.get(spec, spec)
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise RewardSpecError(
            f"reward function {spec!r}: use one of {sorted([*BUILTIN_REWARDS, *EXAMPLE_REWARDS])}, 'auto' "
            "or 'package.module:function'"
        )
    module_name, attr = spec.rsplit(":", 1)
    module = _module_from_file(spec, module_name) if module_name.endswith(".py") else None
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise RewardSpecError(f"reward function {spec!r}: cannot import {module_name}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardSpecError(f"reward function {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def _module_from_file(spec: str, path_text: str) -> ModuleType:
    """A reward module given as a file (`path/to/rewards.py:function`), loaded once per process."""
    path = Path(path_text).resolve()
    name = "rpo_reward_file_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    if not path.is_file():
        raise RewardSpecError(
            f"reward function {spec!r}: no file {path} (paths are read where rewards are scored)"
        )
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file may raise anything on import
        raise RewardSpecError(
            f"reward function {spec!r}: {path} failed to load: {type(exc).__name__}: {exc}"
        ) from None
    sys.modules[name] = module
    return module


def score_safely(fn: RewardFn, response: str, reference: str, question_id: str) -> float:
    """Call a reward function; an exception or a non-finite/non-numeric result scores 0 with a warning."""
    try:
        value = fn(response, reference)
        value = float(value)
    except Exception as exc:  # noqa: BLE001 - a user's reward function may raise anything
        log.warning("reward function failed on question %s: %s: %s", question_id, type(exc).__name__, exc)
        return 0.0
    if not math.isfinite(value):
        log.warning("reward function returned %r on question %s; scored 0", value, question_id)
        return 0.0
    return value
