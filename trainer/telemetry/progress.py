"""What the user sees of a run: a progress bar over the steps, one log line per step, and the same records
as JSON lines in the run directory (`metrics.jsonl`), which the summary and the benchmarks read back.

Guarantees: one JSON object per line, flushed after every step, so a killed run leaves every finished step
on disk; a resumed run appends (a `resume` event marks the point); nothing here is needed for training to
be correct. Only rank 0 creates a `StepProgress`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer.telemetry.records import StepRecord
from trainer.telemetry.tracking import Tracker

log = logging.getLogger("rpo.train")

PHASES = ("rollout", "reward", "train", "weight_sync", "cache")
"""The step-time breakdown. `reward` is the replicas' scoring time, which happens inside `rollout` (it is
reported on its own because it runs on CPU even on a GPU box); the others are sequential phases."""

METRICS_FILE = "metrics.jsonl"


def format_step_line(r: StepRecord, total_steps: int) -> str:
    """One human line per step, e.g. `step 3/40 v3 | reward 0.41 (raw 0.52) std 0.31 zero-std 25% acc 52.1%
    len 12/41.2/96 trunc 0% all-correct 12% len-varied 50% shorter 7 | loss 0.012 kl 0.0004 grad 0.81 lr 1e-06
    clip 0% ent 0.9 | decoded 1,204 ...`: `all-correct`, `len-varied` (groups whose correct responses differ
    in length) and `shorter` (correct responses shorter than their group's mean) are the room the length-aware
    reward had. The weight push's transport follows its time (`sync 0.31 (http)`)."""
    p, learner = r.phases, r.learner
    learned = ""
    if learner is not None:
        learned = (
            f"loss {learner.loss:.4g} kl {learner.kl:.4g} grad {learner.grad_norm:.3g} lr {learner.lr:.3g} "
            f"clip {100 * learner.clip_fraction:.0f}% ent {learner.entropy:.3g} | "
        )
    return (
        f"step {r.step}/{total_steps} v{r.policy_version} | reward {r.reward_mean:.3f} "
        f"(raw {r.raw_reward_mean:.3f}) std {r.reward_std:.3f} zero-std {100 * r.zero_std_groups_ratio:.0f}% "
        f"acc {100 * r.accuracy:.1f}% len {r.response_len_min}/{r.response_len_mean:.1f}/{r.response_len_max} "
        f"trunc {100 * r.truncated_ratio:.0f}% all-correct {100 * r.all_correct_groups_ratio:.0f}% "
        f"len-varied {100 * r.correct_length_varied_ratio:.0f}% shorter {r.correct_below_group_mean} | {learned}"
        f"decoded {r.generated_tokens:,} ({r.decoded_tokens_per_sample:.1f}/sample) "
        f"reused {r.reused_prefix_tokens:,} | {r.tokens_per_second:,.0f} tok/s | "
        f"{r.step_seconds:.2f}s: rollout {p['rollout']:.2f} (reward {p['reward']:.2f}) "
        f"train {p['train']:.2f} sync {p['weight_sync']:.2f}"
        + (f" ({r.weight_transport})" if r.weight_transport else "")
        + f" cache {p['cache']:.2f}"
    )


def read_records(run_dir: str | Path, kind: str | None = "step") -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (only those of `kind`, or all with None)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
        if kind is None or rec.get("kind") == kind:
            records.append(rec)
    return records


def read_step_records(run_dir: str | Path) -> list[StepRecord]:
    """The step records of a run's metrics.jsonl, typed."""
    return [StepRecord.from_json(r) for r in read_records(run_dir, "step")]


class StepProgress:
    """Progress bar + per-step log line + JSONL records for one training process (rank 0)."""

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        start_step: int,
        log_every: int = 1,
        tracker: Tracker | None = None,
    ):
        """`tracker`: experiment trackers (trainer/telemetry/tracking.py) that get every record written here."""
        self.tracker = tracker
        self.total_steps = total_steps
        self.log_every = log_every
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        # disable=None: no bar when stderr is not a terminal (CI, `rpo run` logs), the log lines remain.
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=None)

    def event(self, kind: str, **fields: Any) -> None:
        """A non-step record (`resume`, `eval`, `checkpoint`, `stop`, ...)."""
        self._write({"kind": kind, "time": time.time(), **fields})

    def step(self, record: StepRecord) -> None:
        self._write({"kind": "step", "time": time.time(), **record.to_json()})
        self._bar.update(1)
        self._bar.set_postfix(
            reward=f"{record.reward_mean:.3f}",
            acc=f"{100 * record.accuracy:.0f}%",
            decoded=f"{record.decoded_tokens_per_sample:.0f}/sample",
        )
        if record.step % self.log_every == 0 or record.step == self.total_steps:
            log.info(
                format_step_line(record, self.total_steps),
                extra={"step": record.step, "policy_version": record.policy_version},
            )

    def _write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, default=float) + "\n")
        self._fh.flush()
        if self.tracker is not None:
            self.tracker.record(record)

    def close(self) -> None:
        self._bar.close()
        self._fh.close()
        if self.tracker is not None:
            self.tracker.close()

    @contextlib.contextmanager
    def logging_above_bar(self) -> Iterator[None]:
        """Route log lines through tqdm while the bar is shown, so they do not tear it."""
        if self._bar.disable:
            yield
            return

        with logging_redirect_tqdm():
            yield
