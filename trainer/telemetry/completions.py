"""Sampled completions of each training step (`train.log_completions`, TRL's option of that name): the first
`train.num_completions_to_log` responses the step trains on, with their prompt, text, rewards (as written,
shaped, each function's score) and advantage, appended to `<run_dir>/completions.jsonl` and sent as a table
to each tracker. Rank 0 only.

Guarantees: one JSON object per response and line, flushed after each step (a resumed run appends); a row's
advantage is the one the learner trained it with; nothing here changes training (a failure to decode is the
only cost, and a tracker that fails is dropped as for any record).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.core.schemas.rollout import RolloutGroup

COMPLETIONS_FILE = "completions.jsonl"

COLUMNS = (
    "step",
    "question_id",
    "prompt",
    "completion",
    "raw_reward",
    "shaped_reward",
    "advantage",
    "correct",
    "length",
    "prefix_len",
    "finish_reason",
)
"""The table's columns, in order (`reward_scores` follows in the JSON lines)."""


def completion_rows(
    step: int,
    groups: Sequence[RolloutGroup],
    samples: Sequence[Any],
    prompts: dict[str, str],
    decode: Any,
    limit: int | None,
) -> list[dict[str, Any]]:
    """The rows of one step: the trained groups' responses in order (at most `limit`), each beside the
    learner's sample it became (`trainer.learner.batch.TrainSample`, same order) for its advantage."""
    rows: list[dict[str, Any]] = []
    k = 0
    for group in groups:
        for sample in group.samples:
            if limit is not None and len(rows) >= limit:
                return rows
            trained = samples[k] if k < len(samples) else None
            k += 1
            if trained is not None and trained.question_id != group.question_id:
                raise ValueError(
                    f"completions: sample {k - 1} is of {trained.question_id}, not {group.question_id}"
                )
            rows.append(
                {
                    "step": step,
                    "question_id": group.question_id,
                    "prompt": prompts.get(group.question_id, ""),
                    "completion": decode(sample.response_ids),
                    "raw_reward": sample.raw_reward,
                    "shaped_reward": sample.shaped_reward,
                    "advantage": trained.advantage if trained is not None else None,
                    "correct": sample.correct,
                    "length": len(sample.response_ids),
                    "prefix_len": sample.prefix_len,
                    "finish_reason": sample.finish_reason,
                    "reward_scores": dict(sample.reward_scores),
                }
            )
    return rows


class CompletionLog:
    """Appends each step's rows to `<run_dir>/completions.jsonl`."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / COMPLETIONS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        for row in rows:
            self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_completions(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every row of a run's completions.jsonl."""
    path = Path(run_dir) / COMPLETIONS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class StepCompletions:
    """What the loop holds when `train.log_completions` is on: the file, the tracker, the tokenizer."""

    def __init__(
        self, run_dir: str | Path, tokenizer: Any, questions: Sequence[Any], limit: int | None, tracker: Any
    ):
        self.log = CompletionLog(run_dir)
        self.tokenizer = tokenizer
        self.prompts = {q.id: q.prompt_as_given() for q in questions}
        self.limit = limit
        self.tracker = tracker

    def step(self, step: int, collected: Any) -> None:
        """Log the step's sampled completions (`CollectedGroups`: its trained groups and samples)."""
        rows = completion_rows(
            step,
            collected.train_groups,
            collected.samples,
            self.prompts,
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            self.limit,
        )
        self.log.write(rows)
        if self.tracker is not None and rows:
            self.tracker.table(
                step, "completions", COLUMNS, [[_cell(row[c]) for c in COLUMNS] for row in rows]
            )

    def close(self) -> None:
        self.log.close()


def _cell(value: Any) -> Any:
    """A table cell: text, a number, or a bool as is; anything else (a conversation's turns) as JSON."""
    return value if value is None or isinstance(value, str | int | float | bool) else json.dumps(value)
