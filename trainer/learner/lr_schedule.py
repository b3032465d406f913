"""The learning-rate schedule of the learner's optimizer (`train.lr_scheduler`): warm-up, then constant,
linear or cosine decay over the planned optimizer steps, as TRL's schedulers of those names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LRSchedule:
    """Multiplier of the peak lr after `step` optimizer steps: linear warm-up, then cosine, linear or constant.

    Warm-up covers w = ceil(warmup_ratio * total) steps with factors 1/(w+1) .. w/(w+1) (never 0: the
    first step learns); cosine (or linear, as transformers' linear schedule) then falls from 1 at step w towards
    0 at step `total`.
    """

    total: int
    warmup: int
    kind: str

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
