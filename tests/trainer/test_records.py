"""The typed step record survives its trip through metrics.jsonl, and everything that reads it agrees."""

import json

from prometheus_client import generate_latest

from trainer.metrics import TrainerMetrics
from trainer.progress import StepProgress, format_step_line, read_records, read_step_records
from trainer.records import StepRecord


def _record(step: int) -> StepRecord:
    return StepRecord(
        step=step,
        policy_version=step,
        epoch=0,
        questions=8,
        trained_groups=8,
        samples=32,
        rounds=1,
        reward_mean=0.25,
        accuracy=0.5,
        response_len_mean=40.0,
        cache_hit_rate=1.0,
        generated_tokens=320,
        reused_prefix_tokens=960,
        decoded_tokens_per_sample=10.0,
        tokens_per_second=1000.0,
        rollout_retries=0,
        step_seconds=1.5,
        phases={"rollout": 0.5, "reward": 0.1, "train": 0.8, "weight_sync": 0.1, "cache": 0.1},
        weight_sync_seconds=0.1,
        cache_updates={"best": 5, "other": 3, "none": 0},
        learner={"loss": 0.01},
    )


def test_a_step_record_reads_back_equal_and_feeds_the_line_and_the_metrics(tmp_path):
    progress = StepProgress(tmp_path, total_steps=2, start_step=0)
    try:
        for step in (1, 2):
            progress.step(_record(step))
        progress.event("eval", label="after")
    finally:
        progress.close()
    assert read_step_records(tmp_path) == [_record(1), _record(2)]
    assert [r["kind"] for r in read_records(tmp_path, None)] == ["step", "step", "eval"]
    # a newer writer's extra keys are ignored, not an error
    line = {**_record(3).to_json(), "kind": "step", "something_new": 1}
    assert StepRecord.from_json(json.loads(json.dumps(line))) == _record(3)
    assert format_step_line(_record(2), 2).startswith("step 2/2 v2 | reward 0.250 acc 50.0%")
    metrics = TrainerMetrics()
    metrics.observe_step(_record(1))
    text = generate_latest(metrics.registry).decode()
    assert "rpo_train_generated_tokens_total 320.0" in text
    assert 'rpo_train_cache_updates_total{choice="best"} 5.0' in text
