"""The typed step record survives its trip through metrics.jsonl, and everything that reads it agrees."""

import json

from prometheus_client import generate_latest

from trainer.telemetry.metrics import TrainerMetrics
from trainer.telemetry.progress import StepProgress, format_step_line, read_records, read_step_records
from trainer.telemetry.records import LearnerStats, StepRecord


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
        learner=LearnerStats(
            loss=0.01,
            kl=0.002,
            clip_fraction=0.25,
            entropy=0.75,
            grad_norm=0.5,
            lr=1e-6,
            tokens=300,
            sequences=32,
            micro_batches=2,
            model_tokens=900,
            seconds=0.8,
            policy_version=step,
        ),  # fmt: skip
        raw_reward_mean=0.4,
        reward_std=0.3,
        zero_std_groups_ratio=0.125,
        reward_functions={"acc": 0.5},
        reward_functions_std={"acc": 0.5},
        response_len_min=12,
        response_len_max=96,
        truncated_ratio=0.0625,
        all_correct_groups_ratio=0.25,
        correct_length_groups=4,
        correct_length_varied_ratio=0.75,
        correct_length_spread=6.5,
        correct_below_group_mean=7,
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
    # the learner's numbers stay typed in memory and are a flat dict on disk, a figure that does not apply left out
    on_disk = _record(1).to_json()["learner"]
    assert on_disk["loss"] == 0.01 and on_disk["sequences"] == 32 and "is_weight_mean" not in on_disk
    # a record from an older writer (no entropy yet) reads back with 0 for it; a step that learned nothing, None
    older = {**_record(1).to_json(), "learner": {k: v for k, v in on_disk.items() if k != "entropy"}}
    assert (
        StepRecord.from_json(older).learner.entropy == 0 and StepRecord.from_json(older).learner.loss == 0.01
    )
    assert StepRecord.from_json({**_record(1).to_json(), "learner": {}}).learner is None
    line = format_step_line(_record(2), 2)
    assert line.startswith(
        "step 2/2 v2 | reward 0.250 (raw 0.400) std 0.300 zero-std 12% acc 50.0% len 12/40.0/96 trunc 6% "
        "all-correct 25% len-varied 75% shorter 7 | "
        "loss 0.01 kl 0.002 grad 0.5 lr 1e-06 clip 25% ent 0.75 | decoded 320"
    ), line
    metrics = TrainerMetrics()
    metrics.observe_step(_record(1))
    text = generate_latest(metrics.registry).decode()
    assert "rpo_train_generated_tokens_total 320.0" in text
    assert 'rpo_train_cache_updates_total{choice="best"} 5.0' in text
    for expected in (
        "rpo_train_step 1.0",
        "rpo_train_raw_reward_mean 0.4",
        "rpo_train_reward_mean 0.25",
        "rpo_train_reward_std 0.3",
        "rpo_train_zero_std_groups_ratio 0.125",
        'rpo_train_reward_function_std{function="acc"} 0.5',
        'rpo_train_response_length_tokens{stat="max"} 96.0',
        "rpo_train_truncated_ratio 0.0625",
        "rpo_train_all_correct_groups_ratio 0.25",
        "rpo_train_correct_length_varied_ratio 0.75",
        "rpo_train_correct_length_spread_tokens 6.5",
        "rpo_train_correct_below_group_mean 7.0",
        "rpo_train_loss 0.01",
        "rpo_train_kl 0.002",
        "rpo_train_grad_norm 0.5",
        "rpo_train_learning_rate 1e-06",
        "rpo_train_clipped_ratio 0.25",
        "rpo_train_entropy 0.75",
    ):
        assert expected in text, expected


def test_the_reward_spread_of_a_step_by_hand():
    """Two groups of 2: raw and shaped rewards apart, each function's std, TRL's reward_std and zero-std share."""
    from services.core.schemas.rollout import RolloutGroup, RolloutSample
    from trainer.rollouts.collected import reward_spread

    def sample(n, raw, shaped, acc, finish="stop"):
        return RolloutSample(
            response_ids=[1] * n,
            prefix_len=0,
            suffix_logprobs=[0.0] * n,
            finish_reason=finish,
            raw_reward=raw,
            shaped_reward=shaped,
            correct=acc >= 1,
            reward_scores={"acc": acc, "pen": None if acc else -1.0},
        )

    groups = [
        RolloutGroup(
            question_id="a",
            cache_hit=False,
            m=0,
            prefix_len=0,
            samples=[sample(2, 1.0, 0.75, 1.0), sample(6, -1.0, -1.0, 0.0, "length")],
        ),
        RolloutGroup(
            question_id="b",
            cache_hit=False,
            m=0,
            prefix_len=0,
            samples=[sample(4, -1.0, -1.0, 0.0), sample(4, -1.0, -1.0, 0.0)],
        ),
    ]
    got = reward_spread(groups)
    # raw: 1, -1, -1, -1 -> mean -0.5, population std sqrt((2.25 + 3 * 0.25) / 4) = sqrt(0.75)
    assert got["raw_reward_mean"] == -0.5
    assert abs(got["raw_reward_std"] - 0.75**0.5) < 1e-12
    # acc scores 1, 0, 0, 0 -> std sqrt(0.1875); pen scored where not None: -1 x 3 -> std 0
    assert abs(got["reward_functions_std"]["acc"] - 0.1875**0.5) < 1e-12
    assert got["reward_functions_std"]["pen"] == 0.0
    # group a: shaped 0.75, -1 -> sample std |0.75 + 1| / sqrt(2); group b: 0 -> mean of the two, and b is zero-std
    assert abs(got["reward_std"] - (1.75 / 2**0.5) / 2) < 1e-12
    assert got["zero_std_groups_ratio"] == 0.5
    assert (got["response_len_min"], got["response_len_max"], got["truncated_ratio"]) == (2, 6, 0.25)


def test_the_length_room_of_a_step_by_hand():
    """All-correct groups, correct-length spread over groups with two or more correct responses, and the
    correct responses shorter than their group's mean (the ones the length-aware reward lifts)."""
    from services.core.schemas.rollout import RolloutGroup, RolloutSample
    from trainer.rollouts.collected import length_room

    def sample(n, correct):
        return RolloutSample(
            response_ids=[1] * n,
            prefix_len=0,
            suffix_logprobs=[0.0] * n,
            finish_reason="stop",
            raw_reward=float(correct),
            shaped_reward=float(correct),
            correct=correct,
        )

    def group(name, *samples):
        return RolloutGroup(question_id=name, cache_hit=True, m=3, prefix_len=0, samples=list(samples))

    groups = [
        group("a", sample(10, True), sample(14, True), sample(12, False)),  # mean 12: the 10 is below it
        group("b", sample(8, True), sample(8, True), sample(8, True)),  # all correct, no spread, none below
        group("c", sample(9, True), sample(5, False), sample(7, False)),  # one correct: no spread; 9 > mean 7
    ]
    got = length_room(groups)
    assert got["all_correct_groups_ratio"] == 1 / 3
    assert got["correct_length_groups"] == 2  # a and b
    assert got["correct_length_varied_ratio"] == 0.5  # a varies, b does not
    assert got["correct_length_spread"] == (4 + 0) / 2
    assert got["correct_below_group_mean"] == 1
    assert length_room([]) == {}
