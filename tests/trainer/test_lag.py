"""`train.max_lag: 1` on real services (`rpo train` over the trainer tests' two warm-model replicas and the
cache server): step k+1's rollouts are made while step k trains, one version behind; each cached answer
carries the version that produced it and is updated once, at its step; lagged samples get importance
weights; a checkpoint taken with a batch in flight resumes without losing or repeating that batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from trainer.rollouts.data_order import DataCursor

QUESTIONS = 48
PER_STEP = 8


@pytest.fixture(scope="module")
def lag_run(tmp_path_factory, warm_model_dir, rollout_cache_url, training_replicas):
    """Four RPO steps with max_lag 1 and a checkpoint after step 2 (step 3's batch then in flight)."""
    from services.core.clients.cache import SyncCacheClient
    from tests.trainer.training_helpers import run_config, run_trainer, seed
    from trainer.telemetry.progress import read_records

    tmp = tmp_path_factory.mktemp("lag-run")
    urls = [r.url for r in training_replicas]
    cfg, config_file = run_config(
        tmp,
        warm_model_dir,
        rollout_cache_url,
        urls,
        "train.max_lag=1",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=2",
    )
    seed(cfg)
    ids = [f"arith-train-{i:05d}" for i in range(QUESTIONS)]
    output = run_trainer(config_file, log_path=tmp / "trainer.log")
    with SyncCacheClient(rollout_cache_url) as cache:
        after = dict(zip(ids, cache.read_entries(cfg.services.run_id, ids), strict=True))
    records = read_records(cfg.train.run_dir, "step")
    return SimpleNamespace(
        cfg=cfg,
        config_file=config_file,
        urls=urls,
        records=records,
        after=after,
        ids=ids,
        output=output,
        tmp=tmp,
    )


def _trained_at(cfg, records) -> dict[str, dict]:
    """Question id -> the record of the step that trained it (the cursor's seeded order)."""
    cursor = DataCursor(QUESTIONS, cfg.train.seed)
    return {f"arith-train-{i:05d}": record for record in records for i in cursor.take(PER_STEP)}


def test_each_step_trains_on_rollouts_one_version_behind_and_weights_them(lag_run):
    from tests.trainer.training_helpers import replica_version

    records = lag_run.records
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    versions = [r["policy_version"] for r in records]
    assert versions == list(range(versions[0], versions[0] + 4))
    # step 1 has nothing ahead of it; every later step trains on a batch made while the previous one trained
    assert [r["lag"] for r in records] == [0, 1, 1, 1]
    assert "is_weight_mean" not in records[0]["learner"] and records[0]["learner"]["lagged_tokens"] == 0
    for r in records[1:]:
        learner = r["learner"]
        assert learner["lagged_tokens"] > 0 and 0 < learner["is_weight_mean"] <= 2.0  # tis_cap
        assert 0 <= learner["is_truncated"] <= 1
        assert r["samples"] == PER_STEP * 4 and r["reused_prefix_tokens"] > 0
    assert [replica_version(url) for url in lag_run.urls] == [versions[-1]] * 2


def test_the_cache_keeps_the_version_that_produced_each_answer_and_updates_it_once(lag_run):
    trained = _trained_at(lag_run.cfg, lag_run.records)
    assert len(trained) == 4 * PER_STEP
    for qid, record in trained.items():
        entry = lag_run.after[qid]
        assert entry.update_count == 1 and entry.last_step == record["step"], qid
        # made by the policy before the step, and lag versions before that
        assert entry.policy_version == record["policy_version"] - 1 - record["lag"], qid


def test_a_checkpoint_with_a_batch_in_flight_resumes_it_without_loss_or_repeat(lag_run, rollout_cache_url):
    from services.core.clients.cache import SyncCacheClient
    from tests.trainer.training_helpers import run_trainer
    from trainer.telemetry.progress import read_records

    run_dir = Path(lag_run.cfg.train.run_dir)
    checkpoints = run_dir / "checkpoints"
    state = json.loads((checkpoints / f"step-{2:08d}" / "state.json").read_text())
    assert state["cursor"]["position"] == 2 * PER_STEP  # not 3 * 8: step 3's questions were in flight
    first = {q for q, e in lag_run.after.items() if e is not None and e.last_step == 3}
    assert len(first) == PER_STEP
    shutil.rmtree(checkpoints / f"step-{4:08d}")  # resume from step 2, as after a crash in step 3
    (run_dir / "metrics.jsonl").unlink()
    run_trainer(lag_run.config_file, "--resume", log_path=lag_run.tmp / "resumed.log")
    records = read_records(lag_run.cfg.train.run_dir, "step")
    assert [r["step"] for r in records] == [3, 4]
    assert records[0]["lag"] == 0  # the first step after a resume rolls its batch out on the spot
    with SyncCacheClient(rollout_cache_url) as cache:
        after = dict(
            zip(lag_run.ids, cache.read_entries(lag_run.cfg.services.run_id, lag_run.ids), strict=True)
        )
    again = {q for q, e in after.items() if e is not None and e.last_step == 3}
    assert again == first  # the same questions as the batch that was in flight, each updated once
    assert all(after[q].update_count == 1 for q in again)
