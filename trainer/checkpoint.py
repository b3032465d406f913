"""Checkpoints of a training run, and the stop request that triggers the last one.

A checkpoint is one directory `run_dir/checkpoints/step-NNNNNNNN/` holding everything a resumed run needs
to continue exactly where this one stood after step N:
- `learner/`: the learner's DeepSpeed checkpoint (weights, optimizer, scheduler, policy version, and each
  rank's Python/NumPy/torch RNG states; written by every rank, `trainer/learner/engine.py`);
- `cache.ndjson`: the run's experience cache, exported from the cache server (RPO mode only);
- `state.json`: step, policy version, data cursor, run id and mode.

Guarantees: a checkpoint is written into `step-N.partial/` and renamed into place only when complete, so a
crash mid-save never leaves a directory that `latest()` would pick; only the last `train.keep_checkpoints`
complete checkpoints are kept; restoring the cache replaces the run's whole namespace on the cache server
(entries AND the idempotency markers of updates made after the checkpoint) with the snapshot.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("rpo.checkpoint")

STATE_FILE = "state.json"
CACHE_FILE = "cache.ndjson"
LEARNER_DIR = "learner"
HF_DIR = "hf"
"""The checkpoint's policy as an HF model directory (train.checkpoint_hf): load it with transformers, serve it
with `rpo serve rollout --model`."""
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainerState:
    """The loop's own state at the end of a step (the learner keeps its own in `learner/`)."""

    step: int
    """Steps completed."""
    policy_version: int
    """Version of the policy the learner holds (what every replica serves after the step)."""
    cursor: dict[str, int]
    """`DataCursor.state_dict()`: epoch and position in the seeded order."""
    run_id: str
    mode: str
    saved_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        return cls(**json.loads(text))


class Checkpointer:
    """Naming, atomic completion, discovery and pruning of checkpoint directories (rank 0 decides)."""

    def __init__(self, root: str | Path, keep: int):
        self.root = Path(root)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()
        ]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def begin(self, step: int) -> Path:
        """A fresh `step-N.partial/` directory to save into (a stale one from a crash is removed)."""
        partial = self.path_for(step).with_name(self.path_for(step).name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        return partial

    def commit(self, partial: Path, state: TrainerState) -> Path:
        """Write the state file last, rename the directory into place, prune old ones."""
        tmp = partial / (STATE_FILE + ".tmp")
        tmp.write_text(state.to_json())
        tmp.replace(partial / STATE_FILE)
        final = self.path_for(state.step)
        if final.exists():  # the same step saved twice (a stop request right after a periodic save)
            shutil.rmtree(final)
        partial.rename(final)
        self.prune()
        return final

    def prune(self) -> None:
        done = self.complete()
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step-*.partial"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def read_state(checkpoint: Path) -> TrainerState:
        return TrainerState.from_json((checkpoint / STATE_FILE).read_text())


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step and save a checkpoint.

    The first signal sets the flag (the step in flight finishes); a second Ctrl-C interrupts at once.
    Handlers are installed only in the main thread and restored by `close()`.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = name
        log.warning("%s received: finishing the current step, then saving a checkpoint and stopping", name)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
