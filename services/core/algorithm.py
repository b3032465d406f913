"""The RPO algorithm core: pure functions, no I/O, no torch (losses live in `trainer/learner/losses.py`).

Everything here follows docs/algorithm.md ("Steps, and the function that does each"; arXiv 2601.19404)
and is unit-tested against values derived by hand. Guarantees:
- truncation never cuts more than the answer holds, and m = 0 keeps the whole answer (no `a[:-0]` bug);
- length-aware shaping is computed per group and touches correct responses only;
- epsilon is the probability of storing the BEST response; otherwise one of the OTHER responses,
  uniformly, is stored (the paper's direction, not the release code's comment).

Where we choose something the paper leaves open, the docstring says so and `docs/algorithm.md` repeats it.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from services.core.schemas.common import RELATIVE_LIMIT_PATTERN, TruncationLimit

"""L: a fixed number of tokens, or relative to l, the shortest response length in the question's last group."""

SuffixBudgetSpec = int | Literal["m"]
"""How many new tokens a suffix may have: "m" (the release code's cap, paper-faithful) or a fixed maximum."""


def truncation_limit(spec: TruncationLimit, last_group_min_len: int | None, cached_len: int) -> int:
    """Resolve L to a token count for one question.

    A relative spec uses l = the shortest response in the question's last group; when no group has been
    seen yet (only the seeded answer exists) we use the cached answer's length, as docs/algorithm.md says.
    A share of l ("0.5l", "0.1l") rounds down, computed exactly (0.1 is a tenth, not its binary neighbour).
    """
    if isinstance(spec, bool):  # bool is an int subclass; refuse it explicitly
        raise ValueError(f"truncation limit must be a token count or a share of l like '0.5l', got {spec!r}")
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"truncation limit must be >= 0 tokens, got {spec}")
        return spec
    base = last_group_min_len if last_group_min_len is not None else cached_len
    if base < 0:
        raise ValueError(f"response length must be >= 0, got {base}")
    if not re.match(RELATIVE_LIMIT_PATTERN, spec):
        raise ValueError(
            f"unknown truncation limit {spec!r}; use an integer or a share of l: '0.5l', '0.1l', 'l'"
        )
    share = Fraction(spec[:-1] or "1")
    return math.floor(base * share)


def draw_truncation(limit: int, rng: random.Random) -> int:
    """Draw m ~ U{0..L}: how many tokens to cut from the END of the cached answer (both ends inclusive)."""
    if limit < 0:
        raise ValueError(f"truncation limit must be >= 0, got {limit}")
    return rng.randint(0, limit)


def prefix_length(answer_len: int, m: int) -> int:
    """Tokens kept when m are cut from the end of an answer of `answer_len` tokens (never negative).

    The cache server slices packed token bytes with it instead of building Python lists.
    """
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    return max(answer_len - m, 0)


def truncate(answer_ids: Sequence[int], m: int) -> list[int]:
    """prefix = a[:len(a) - m]; m = 0 keeps everything, m >= len(a) leaves an empty prefix."""
    return list(answer_ids[: prefix_length(len(answer_ids), m)])


def cached_answer(response_ids: Sequence[int], finish_reason: str) -> list[int]:
    """The answer the cache stores for a response: without the EOS / stop token a `stop` finish ends with
    (the prompt template adds it back when a prefix is continued); a `length` finish is kept whole."""
    return list(response_ids[:-1]) if finish_reason == "stop" and response_ids else list(response_ids)


def suffix_budget(m: int, spec: SuffixBudgetSpec, prefix_len: int, max_response_tokens: int) -> int:
    """Max new tokens for the suffixes of one question.

    "m" caps each suffix at the number of tokens cut (the release code; the paper's token counts only match
    with this cap); an integer is a fixed cap. Either way the whole response stays within
    `max_response_tokens`. At least one token is always decoded: with m = 0 the paper's cap would give G
    copies of the cached answer (a zero-advantage group) and vLLM needs max_tokens >= 1.
    """
    cap = m if spec == "m" else int(spec)
    room = max_response_tokens - prefix_len
    return max(1, min(cap, room))


def length_shaped_rewards(
    raw_rewards: Sequence[float],
    lengths: Sequence[int],
    alpha: float,
    low: float = 0.5,
    high: float = 1.0,
    correct: Sequence[bool] | None = None,
    contributions: Sequence[float] | None = None,
) -> list[float]:
    """Length-aware shaping over ONE group of G responses (docs/algorithm.md, step 3).

    f_i = clip(sigmoid(alpha * (l_ref - len_i)), low, high), l_ref the mean length of all G responses. A
    CORRECT response's correctness contribution c_i (the correctness function's weight times its score) is
    scaled by f_i, its other terms kept: R_i = raw_i + c_i * (f_i - 1). Every other response keeps its
    value as written (negative and partial rewards included): R_i = raw_i. `correct` defaults to
    raw_i >= 1 and `contributions` to raw_i (one function: its score is the reward), so for the paper's
    binary reward this is exactly its formula (1 -> f_i, 0 -> 0). alpha = 0 gives every correct response
    0.5 of its correctness contribution: a scaled binary reward, as the formula says.
    """
    if len(raw_rewards) != len(lengths):
        raise ValueError(f"{len(raw_rewards)} rewards but {len(lengths)} lengths")
    if not raw_rewards:
        return []
    if low > high:
        raise ValueError(f"shaping bounds inverted: low={low} > high={high}")
    flags = [r >= 1.0 for r in raw_rewards] if correct is None else list(correct)
    parts = list(raw_rewards) if contributions is None else list(contributions)
    if not len(flags) == len(parts) == len(raw_rewards):
        raise ValueError(
            f"{len(raw_rewards)} rewards but {len(flags)} verdicts and {len(parts)} contributions"
        )
    l_ref = sum(lengths) / len(lengths)
    shaped = []
    for raw, length, ok, part in zip(raw_rewards, lengths, flags, parts, strict=True):
        if not ok:
            shaped.append(float(raw))
            continue
        z = alpha * (l_ref - length)
        sig = 1.0 / (1.0 + math.exp(-z)) if z >= -700 else 0.0
        shaped.append(raw + part * (min(max(sig, low), high) - 1.0))
    return shaped


def overlong_penalty(length: int, max_response_tokens: int, buffer_tokens: int) -> float:
    """DAPO's soft overlong punishment, added to the reward.

    0 while length <= L_max - L_cache; then falls linearly to -1 at L_max; -1 beyond L_max.
    """
    if buffer_tokens <= 0:
        return -1.0 if length > max_response_tokens else 0.0
    soft_start = max_response_tokens - buffer_tokens
    if length <= soft_start:
        return 0.0
    if length <= max_response_tokens:
        return (soft_start - length) / buffer_tokens
    return -1.0


def group_advantages(rewards: Sequence[float], eps: float = 1e-4, unbiased_std: bool = True) -> list[float]:
    """A_i = (R_i - mean(R)) / (std(R) + eps) over one group (docs/algorithm.md, step 4).

    std is the sample standard deviation (Bessel-corrected, as torch.std in TRL's GRPO that the release code
    runs); `unbiased_std=False` gives the population one. A group of equal rewards gives all zeros; so does a
    group of one.
    """
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    if n == 1:
        return [0.0]
    denom = (n - 1) if unbiased_std else n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / denom)
    return [(r - mean) / (std + eps) for r in rewards]


def dynamic_sampling_keep(correct: Sequence[bool]) -> bool:
    """DAPO's dynamic-sampling filter: keep a group only when 0 < #correct < G."""
    k = sum(1 for c in correct if c)
    return 0 < k < len(correct)


def batch_advantages(
    groups: Sequence[Sequence[float]], scale: Literal["group", "batch", "none"] = "group", eps: float = 1e-4
) -> list[list[float]]:
    """Advantages of a batch of groups, as TRL's `scale_rewards` says: A_i = R_i - mean(group), divided by
    std(group) + eps (`group`: `group_advantages`, the paper's Eq. 3), by std(every reward of the batch) + eps
    (`batch`), or by nothing (`none`, Dr. GRPO). Standard deviations are sample ones (torch.std in TRL)."""
    if scale == "group":
        return [group_advantages(g, eps) for g in groups]
    if scale not in ("batch", "none"):
        raise ValueError(f"unknown scale_rewards {scale!r}; use group, batch or none")
    centred = [[r - sum(g) / len(g) for r in g] if g else [] for g in groups]
    if scale == "none":
        return centred
    rewards = [r for g in groups for r in g]
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1)) if len(rewards) > 1 else 0.0
    return [[a / (std + eps) for a in g] for g in centred]


def dynamic_sampling_keep_rewards(shaped_rewards: Sequence[float], tolerance: float = 1e-9) -> bool:
    """The filter on shaped rewards: keep a group whose rewards are not all equal, so it has a non-zero
    advantage. With length-aware shaping an all-correct group of different lengths is kept (the shaping's
    point is to rescue such groups); DAPO's correctness filter would drop it."""
    return bool(shaped_rewards) and max(shaped_rewards) - min(shaped_rewards) > tolerance


def expected_suffix_tokens(limit: int, answer_len: int) -> float:
    """E[tokens decoded for one suffix] when m ~ U{0..limit} is cut from an answer of `answer_len` tokens
    and the suffix budget is m (the release code's cap): E[max(1, min(m, answer_len))], since a suffix
    regrows about what was cut, at most the budget, and m = 0 still decodes one token."""
    if limit < 0 or answer_len < 0:
        raise ValueError(f"limit and answer_len must be >= 0, got {limit}, {answer_len}")
    return sum(max(1, min(m, answer_len)) for m in range(limit + 1)) / (limit + 1)


def predicted_decode_ratio(limit: TruncationLimit, cached_len: float, full_len: float) -> float:
    """Predicted decoded tokens per sample of RPO over full-path rollouts: E[decoded suffix] / mean full
    response. `cached_len` is the typical cached answer (and, for a relative L, the typical shortest
    response of a group) in tokens; `full_len` the mean full-path response. Cache misses (which decode
    G full samples) are not counted: after cache initialisation every training question has an entry."""
    if full_len <= 0:
        raise ValueError(f"full_len must be > 0, got {full_len}")
    length = max(0, round(cached_len))
    tokens = truncation_limit(limit, length, length)
    return expected_suffix_tokens(tokens, length) / full_len


@dataclass(frozen=True)
class CacheChoice:
    """Which response of a group replaces the cache entry, and whether it was the best one."""

    index: int
    choice: Literal["best", "other"]


def select_for_cache(
    shaped_rewards: Sequence[float],
    correct: Sequence[bool],
    epsilon: float,
    rng: random.Random,
    only_correct: bool = False,
) -> CacheChoice | None:
    """Epsilon-greedy cache update (docs/algorithm.md, step 6).

    Draw u ~ U(0,1): if u <= epsilon store the response with the highest shaped reward (the first on ties),
    otherwise a uniformly chosen OTHER response. `only_correct=True` restricts the pool to correct
    responses before the draw (our reading of "only replace with a correct response": the cache stays
    correct where it can and still explores); with no correct response it returns None (entry kept).
    A pool of one gives that response, counted as "best".
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    if len(shaped_rewards) != len(correct):
        raise ValueError(f"{len(shaped_rewards)} rewards but {len(correct)} correctness flags")
    pool = [i for i in range(len(shaped_rewards)) if correct[i] or not only_correct]
    if not pool:
        return None
    best = max(pool, key=lambda i: (shaped_rewards[i], -i))
    u = rng.random()
    if u <= epsilon or len(pool) == 1:
        return CacheChoice(index=best, choice="best")
    others = [i for i in pool if i != best]
    return CacheChoice(index=rng.choice(others), choice="other")
