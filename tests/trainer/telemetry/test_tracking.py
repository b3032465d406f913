"""train.report_to: the step records, evaluations and config reach each real tracker, read back from its
own files (TensorBoard's event files, MLflow's file store through its client, W&B's offline run)."""

from __future__ import annotations

import json
import sys

import pytest

from services.core.config import load_config
from trainer.telemetry.tracking import Tracker, TrackingError, metrics_of

STEPS = [
    {
        "kind": "step",
        "time": 1.0,
        "step": s,
        "reward_mean": 0.25 * s,
        "accuracy": 0.5,
        "phases": {"train": 0.1 * s, "rollout": 0.2},
        "cache_updates": {"best": 3, "other": 5},
        "learner": {"loss": 1.0 / s},
    }
    for s in (1, 2, 3)
]
EVALS = [
    {
        "kind": "eval",
        "time": 0.5,
        "label": "val before",
        "step": 0,
        "split": "val",
        "temperature": 0.6,
        "pass@1": 0.5,
    },
    {
        "kind": "eval",
        "time": 1.5,
        "label": "val step 2",
        "step": 2,
        "split": "val",
        "temperature": 0.6,
        "pass@1": 0.6,
    },
    {
        "kind": "eval",
        "time": 1.6,
        "label": "val step 2 T=1",
        "step": 2,
        "split": "val",
        "temperature": 1.0,
        "pass@1": 0.4,
    },
]
EVAL = {
    "kind": "eval",
    "time": 2.0,
    "label": "after",
    "step": 3,
    "split": "test",
    "temperature": 0.6,
    "pass@1": 0.75,
    "questions": 100,
}


TABLE_COLUMNS = ("step", "prompt", "completion", "raw_reward", "advantage")
TABLE_ROWS = [[3, "2+3=?", "2+3=5. \\boxed{5}", 1.0, 0.5], [3, "2+3=?", "a | b\nc", -1.0, -0.5]]
"""A step's sampled completions (train.log_completions), as the loop sends them."""


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    """A run directory with every backend fed the same records; the config the trackers were given."""
    # MLflow exports its tracking URI (and the tracker its file-store switch) into os.environ, where later
    # tests' subprocesses would inherit them: registered here so that teardown puts the environment back.
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, ["train.report_to=tensorboard,mlflow,wandb", "algorithm.group_size=5"])
    assert cfg.train.report_to == ["tensorboard", "mlflow", "wandb"]  # a comma-separated list, as documented
    tracker = Tracker(cfg.train.report_to, tmp_path, "run-test-1", cfg.public_dict())
    records = [{"kind": "resume", "step": 0}, EVALS[0], *STEPS[:2], *EVALS[1:], STEPS[2], EVAL]
    for record in [*records, {"kind": "checkpoint", "step": 3}]:
        tracker.record(record)
    tracker.table(3, "completions", TABLE_COLUMNS, TABLE_ROWS)
    tracker.close()
    return tmp_path


def test_records_become_flat_metrics_per_step():
    assert metrics_of(STEPS[1]) == (
        2,
        {
            "reward_mean": 0.5,
            "accuracy": 0.5,
            "phases/train": pytest.approx(0.2),
            "phases/rollout": 0.2,
            "cache_updates/best": 3.0,
            "cache_updates/other": 5.0,
            "learner/loss": 0.5,
        },
    )
    assert metrics_of(EVAL) == (3, {"eval/test/T0.6/pass@1": 0.75, "eval/test/T0.6/questions": 100.0})
    # one series per split and temperature, so the evaluations every k steps draw a curve
    assert [metrics_of(e) for e in EVALS] == [
        (0, {"eval/val/T0.6/pass@1": 0.5}),
        (2, {"eval/val/T0.6/pass@1": 0.6}),
        (2, {"eval/val/T1/pass@1": 0.4}),
    ]
    # a record from before the split was recorded keeps its label
    assert metrics_of({"kind": "eval", "label": "after", "step": 3, "pass@1": 0.7}) == (
        3,
        {"eval/after/pass@1": 0.7},
    )
    assert metrics_of({"kind": "checkpoint", "step": 3, "path": "x"}) is None


def test_tensorboard_event_files_hold_every_step_and_the_config(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [e.step for e in events.Scalars("phases/train")] == [1, 2, 3]
    assert [(e.step, e.value) for e in events.Scalars("eval/test/T0.6/pass@1")] == [(3, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("eval/val/T0.6/pass@1")] == [
        (0, 0.5),
        (2, pytest.approx(0.6)),
    ]
    assert "config/text_summary" in events.Tags()["tensors"]
    (table,) = events.Tensors("completions/text_summary")
    text = table.tensor_proto.string_val[0].decode()
    assert table.step == 3
    assert "| step | prompt | completion | raw_reward | advantage |" in text
    assert "| 3 | 2+3=? | a \\| b<br>c | -1.0 | -0.5 |" in text  # a cell's | and line break kept in the cell


def test_mlflow_file_store_holds_the_metrics_and_the_config_as_params(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("rpo")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run-test-1"
    assert run.data.params["algorithm.group_size"] == "5"
    history = client.get_metric_history(run.info.run_id, "reward_mean")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "eval/test/T0.6/pass_at_1")] == [0.75]
    curve = client.get_metric_history(run.info.run_id, "eval/val/T0.6/pass_at_1")
    assert sorted((m.step, m.value) for m in curve) == [(0, 0.5), (2, 0.6)]
    table = json.loads(
        (tracked / "mlruns")
        .joinpath(experiment.experiment_id, run.info.run_id, "artifacts", "completions", "step_000003.json")
        .read_text()
    )
    assert table["columns"] == list(TABLE_COLUMNS)
    assert table["data"] == TABLE_ROWS


def wandb_records(path):
    """The protobuf records of a W&B run file: a 7-byte header (`:W&B`, magic, version), then LevelDB's log
    format (32 KiB blocks of records with a 7-byte header: CRC, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        if left < 7 or (length == 0 and kind == 0):  # a block's zero-filled tail
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_offline_run_holds_the_history_and_the_config(tracked):
    (run_file,) = (tracked / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind in ("config", "run"):
            items = record.config.update if kind == "config" else record.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
    steps = [(h["_step"], h["reward_mean"]) for h in history if "reward_mean" in h]
    assert steps == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert any(h.get("eval/test/T0.6/pass@1") == 0.75 for h in history)
    curve = [(h["_step"], h["eval/val/T0.6/pass@1"]) for h in history if "eval/val/T0.6/pass@1" in h]
    assert curve == [(0, 0.5), (2, 0.6)]
    (table_file,) = run_file.parent.glob("files/media/table/completions_3_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(TABLE_COLUMNS) and table["data"] == TABLE_ROWS
    algorithm = config["algorithm"]
    assert (
        algorithm.get("value", algorithm)["group_size"] == 5
    )  # some versions wrap each key as {"value": ...}


def test_an_unknown_tracker_is_refused_and_a_missing_library_names_the_extra(monkeypatch, tmp_path):
    from services.core.config import ConfigError

    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(None, ["train.report_to=tensorbored"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # the library absent: `import wandb` raises ImportError
    with pytest.raises(
        TrackingError, match=r'wandb needs the wandb package .*pip install "rpo-rl\[tracking\]"'
    ):
        Tracker(["wandb"], tmp_path, "r", {})


def _scalar_steps(run_dir, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def _hold_writes(tracker: Tracker):
    """The real TensorBoard backend's writes held until `release` is set (`entered`: one is waiting)."""
    import threading

    entered, release = threading.Event(), threading.Event()
    sink = tracker.sinks["tensorboard"]
    write = sink.log

    def held(step, metrics):
        entered.set()
        release.wait(60)
        write(step, metrics)

    sink.log = held
    return entered, release


def test_a_backend_that_hangs_never_holds_up_a_step_and_its_writes_land_in_order(tmp_path):
    tracker = Tracker(["tensorboard"], tmp_path, "r", {})
    entered, release = _hold_writes(tracker)
    for record in STEPS:
        tracker.record(record)  # returns while the backend is stuck
    assert entered.wait(10) and not tracker.flush(timeout=0.2)  # the writes are still waiting on it
    release.set()
    assert tracker.flush(timeout=30)
    tracker.close()
    assert _scalar_steps(tmp_path, "reward_mean") == [1, 2, 3]


def test_a_backend_that_falls_too_far_behind_loses_the_newest_writes_with_a_warning(
    tmp_path, monkeypatch, caplog
):
    import trainer.telemetry.tracking as tracking

    monkeypatch.setattr(tracking, "QUEUE_LIMIT", 1)
    tracker = Tracker(["tensorboard"], tmp_path, "r", {})
    entered, release = _hold_writes(tracker)
    tracker.record(STEPS[0])
    assert entered.wait(10)  # step 1 is being written; step 2 fills the queue; step 3 has no room
    with caplog.at_level("WARNING", logger="rpo.tracking"):
        tracker.record(STEPS[1])
        tracker.record(STEPS[2])
        release.set()
        tracker.close()
    assert _scalar_steps(tmp_path, "reward_mean") == [1, 2]
    assert "1 writes behind" in caplog.text and "1 writes were dropped" in caplog.text
