"""What a run visits, and in which order, reproducibly: the data cursor (a seeded shuffle per epoch that
survives a resume), the number of steps, and the seed of each rollout round.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class DataCursor:
    """Which questions come next: a seeded shuffle of all question indices per epoch, read in order.

    The order of epoch e depends only on (seed, e), so a cursor restored from `state_dict()` continues with
    exactly the questions the interrupted run would have taken.
    """

    size: int
    seed: int
    epoch: int = 0
    position: int = 0
    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            indices = list(range(self.size))
            random.Random(f"rpo-data-{self.seed}-{epoch}").shuffle(indices)
            self._orders = {epoch: indices}  # keep one epoch's order in memory
        return self._orders[epoch]

    def take(self, n: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """The next `n` question indices (fewer only if the dataset has fewer), skipping `exclude`.

        A batch that crosses an epoch boundary continues in the next epoch's order; a question never appears
        twice in one call (nor in `exclude`), even when the two epochs' orders would repeat it.
        """
        want = min(n, self.size - len(exclude))
        out: list[int] = []
        seen = set(exclude)
        while len(out) < want:
            if self.position >= self.size:
                self.epoch += 1
                self.position = 0
            index = self.order(self.epoch)[self.position]
            self.position += 1
            if index not in seen:
                seen.add(index)
                out.append(index)
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("size", self.size) != self.size:
            raise ValueError(
                f"the checkpoint's data cursor is for {state['size']} questions, this run has {self.size}: "
                "resume with the same dataset and data.max_questions"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def planned_steps(num_questions: int, questions_per_step: int, epochs: int, max_steps: int | None) -> int:
    """Steps of a run: enough batches to see every question `epochs` times, capped by `max_steps`."""
    steps = math.ceil(epochs * num_questions / questions_per_step)
    return min(steps, max_steps) if max_steps else steps


def request_seed(base: int, step: int, round_index: int) -> int:
    """The seed of a step's rollout round: varies per step and round (so each step draws new truncation
    points), identical for every chunk and retry of the round (so a retry asks the same question)."""
    return random.Random(f"rpo-rollout-{base}-{step}-{round_index}").getrandbits(31)
