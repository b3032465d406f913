"""Experiment tracking: every record the trainer writes to metrics.jsonl, also sent to TensorBoard, MLflow or
Weights & Biases (`train.report_to`), as TRL's `report_to` does. A thin adapter over the records: the step
records' numbers (nested ones flattened, `phases/train`), the evaluations' (`eval/<split>/T<temperature>/<name>`:
one curve per split and temperature over the steps), and the resolved config once at the start (secrets
masked); with `train.log_completions`, each step's sampled completions as a table.

Where each writes (all under the run directory unless the backend's own variable says otherwise):
- `tensorboard`: `<run_dir>/tensorboard` (TensorBoard's event files; `tensorboard --logdir runs`);
- `mlflow`: `MLFLOW_TRACKING_URI` if set, else the file store `<run_dir>/mlruns` (no server or database
  needed; MLflow 3 keeps it behind `MLFLOW_ALLOW_FILE_STORE`, which this sets); the experiment is
  `MLFLOW_EXPERIMENT_NAME` or `rpo`, the MLflow run is named after the run id, the config goes in as params;
- `wandb`: project `WANDB_PROJECT` or `rpo`, the run named after the run id, files under `<run_dir>/wandb`;
  offline (`WANDB_MODE=offline`, sync later with `wandb sync`) unless `WANDB_API_KEY` is set or
  `WANDB_MODE` says otherwise, so a run never waits on an unreachable server.

Guarantees: a backend that fails to start ends the trainer's start with a message naming it (a missing
library names the extra to install); a backend that fails later is logged once and dropped, never stopping
training; only rank 0 tracks. After the start, every write runs on one background thread in the order the
trainer made them, so a slow backend (a remote MLflow server, a large completions table) never holds up a
step; `close` waits up to `CLOSE_TIMEOUT_S` for what is queued, and a backend that falls `QUEUE_LIMIT`
writes behind has the newest ones dropped, with a warning. The libraries are optional (`pip install "rpo-rl[tracking]"`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("rpo.tracking")

BACKENDS = ("tensorboard", "mlflow", "wandb")
QUEUE_LIMIT = 1024
"""Writes waiting for the background thread before new ones are dropped (hundreds of steps' worth)."""
CLOSE_TIMEOUT_S = 120.0
"""How long `close` waits for the queued writes (then it warns and closes what it can)."""


class TrackingError(RuntimeError):
    """A tracking backend could not start; the message names it and what to do."""


def flatten(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The numbers of a record, nested keys joined with `/` (booleans and text left out)."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield name, float(value)


def eval_series(record: Mapping[str, Any]) -> str:
    """An evaluation's name in the trackers: its split and temperature (`eval/val/T0.6`), so that the
    evaluations of one split at one temperature (before, every k steps, after) draw one curve over the steps;
    a record without them keeps its label (`eval/after`)."""
    if "split" in record and "temperature" in record:
        return f"eval/{record['split']}/T{float(record['temperature']):g}"
    return f"eval/{record['label']}"


def metrics_of(record: Mapping[str, Any]) -> tuple[int, dict[str, float]] | None:
    """(step, metrics) to send for a metrics.jsonl record, or None for records with nothing to plot."""
    kind = record.get("kind")
    if kind == "step":
        skip = {"kind", "time", "step"}
        return int(record["step"]), dict(flatten({k: v for k, v in record.items() if k not in skip}))
    if kind == "eval":
        skip = {"kind", "time", "step", "label", "split", "temperature"}
        numbers = flatten({k: v for k, v in record.items() if k not in skip}, f"{eval_series(record)}/")
        return int(record.get("step", 0)), dict(numbers)
    return None


class _TensorBoard:
    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]):
        # lazy: heavy import (torch, tensorboard), paid only when asked for
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def table(self, step: int, name: str, columns: Sequence[str], rows: list[list[Any]]) -> None:
        cells = ["| " + " | ".join(map(_markdown, row)) + " |" for row in rows]
        head = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        self.writer.add_text(name, "\n".join(head + cells), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]):
        # lazy: heavy import (mlflow), paid only when asked for
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 refuses its file store unless told otherwise; it needs no server and no database
            # package, which suits a run directory (a server or `sqlite:///...` via MLFLOW_TRACKING_URI).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "rpo"))
        self.run = mlflow.start_run(run_name=run_name)
        params = {name: value for name, value in _params(config)}
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            mlflow.log_params(dict(list(params.items())[start : start + 100]))

        # the writes come from the tracker's thread, where the fluent API has no active run: the client,
        # told the run id, writes to this run from any thread
        self.client = mlflow.MlflowClient()
        self.metric = mlflow.entities.Metric

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [self.metric(_mlflow_name(k), float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run.info.run_id, metrics=batch, synchronous=True)

    def table(self, step: int, name: str, columns: Sequence[str], rows: list[list[Any]]) -> None:
        data = {column: [row[i] for row in rows] for i, column in enumerate(columns)}
        self.client.log_table(self.run.info.run_id, data=data, artifact_file=f"{name}/step_{step:06d}.json")

    def close(self) -> None:
        self.mlflow.end_run()


class _WandB:
    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]):
        # lazy: heavy import (wandb), paid only when asked for
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "rpo"),
            name=run_name,
            dir=str(run_dir),
            config=config,
            mode=mode,
            settings=wandb.Settings(init_timeout=60, silent=True),
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def table(self, step: int, name: str, columns: Sequence[str], rows: list[list[Any]]) -> None:
        # lazy: heavy import (wandb), paid only when asked for
        import wandb

        self.run.log({name: wandb.Table(columns=list(columns), data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()


_CLASSES = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny (or mlflow)", "wandb": "wandb"}


def _params(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    for key, value in config.items():
        if isinstance(value, Mapping):
            yield from _params(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", str(value)[:500]


def _markdown(value: Any) -> str:
    """A table cell as Markdown text: `|` escaped, line breaks kept inside the cell."""
    return str(value).replace("|", "\\|").replace("\n", "<br>")


def _mlflow_name(name: str) -> str:
    """MLflow's metric names allow letters, digits and `_-. /`; `pass@1` becomes `pass_at_1`."""
    return name.replace("@", "_at_")


class Tracker:
    """The backends of `train.report_to`, fed every record the trainer writes (rank 0)."""

    def __init__(self, backends: list[str], run_dir: str | Path, run_name: str, config: dict[str, Any]):
        self.sinks: dict[str, Any] = {}
        self._dropped = 0
        self._thread: threading.Thread | None = None
        for name in backends:
            try:
                self.sinks[name] = _CLASSES[name](Path(run_dir), run_name, config)
            except ImportError as exc:
                self.close()
                raise TrackingError(
                    f"train.report_to: {name} needs the {_PACKAGES[name]} package ({exc}); install the "
                    f'tracking extra: pip install "rpo-rl[tracking]"'
                ) from None
            except Exception as exc:  # noqa: BLE001 - each library raises its own types
                self.close()
                raise TrackingError(
                    f"train.report_to: {name} did not start: {type(exc).__name__}: {exc}"
                ) from None
            log.info("tracking to %s", name)
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_LIMIT)
        self._thread = threading.Thread(target=self._write_queued, name="rpo-tracking", daemon=True)
        self._thread.start()

    def record(self, record: Mapping[str, Any]) -> None:
        sent = metrics_of(record)
        if sent is None or not sent[1]:
            return
        self._send("log", *sent)

    def table(self, step: int, name: str, columns: Sequence[str], rows: list[list[Any]]) -> None:
        """A table at `step` (a step's sampled completions): TensorBoard text, an MLflow table artifact
        `<name>/step_<step>.json`, a W&B Table."""
        self._send("table", step, name, columns, rows)

    def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait until every queued write is done (False: not within `timeout` seconds)."""
        done = threading.Event()
        try:
            self._queue.put(done.set, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def _send(self, method: str, *args: Any) -> None:
        if not self.sinks:
            return
        try:
            self._queue.put_nowait((method, args))
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1:
                log.warning(
                    "tracking is %d writes behind (a backend is slow or hangs); newer writes are dropped "
                    "until it catches up",
                    QUEUE_LIMIT,
                )

    def _write_queued(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if callable(item):  # a flush marker
                item()
                continue
            self._each(item[0], *item[1])

    def _each(self, method: str, *args: Any) -> None:
        for name, sink in list(self.sinks.items()):
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # noqa: BLE001 - tracking never stops training
                log.warning(
                    "tracking to %s failed (%s: %s); it is turned off for this run",
                    name,
                    type(exc).__name__,
                    exc,
                )
                self.sinks.pop(name, None)

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            if self.flush():
                self._queue.put_nowait(None)  # the thread ends; the queue is empty
                self._thread.join(CLOSE_TIMEOUT_S)
            else:
                log.warning(
                    "tracking: writes still queued after %.0f s; closing the backends without them",
                    CLOSE_TIMEOUT_S,
                )
        if self._dropped:
            log.warning("tracking: %d writes were dropped while a backend was behind", self._dropped)
        for name, sink in list(self.sinks.items()):
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("closing %s failed: %s", name, exc)
        self.sinks.clear()
