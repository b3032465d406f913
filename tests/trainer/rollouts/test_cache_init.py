"""`rpo cache init`: the stored answer, and seeding through the real services (resumable)."""

from __future__ import annotations

import subprocess
import sys

from services.core.algorithm import cached_answer
from tests.trainer.training_helpers import REPO, run_config, seed


def test_the_stored_answer_drops_the_stop_token_only():
    assert cached_answer([7, 8, 2], "stop") == [7, 8]  # EOS (or a stop token) ends a `stop` finish
    assert cached_answer([7, 8, 9], "length") == [7, 8, 9]  # cut by the length cap: nothing to drop
    assert cached_answer([2], "stop") == []  # nothing left to store: the question stays a miss


def test_cache_init_samples_once_per_question_and_resumes_without_overwriting(
    tmp_path, warm_model_dir, rollout_cache_url, rollout_server
):
    """Through the session's read-only replica (policy version 0) and the real cache server."""
    from services.core.clients.cache import SyncCacheClient
    from services.core.schemas.cache import PutEntry
    from services.core.schemas.common import unpack_token_ids

    cfg, config_file = run_config(
        tmp_path, warm_model_dir, rollout_cache_url, [rollout_server.url], "data.max_questions=40"
    )
    ids = [f"arith-train-{i:05d}" for i in range(40)]
    run_id = cfg.services.run_id
    with SyncCacheClient(rollout_cache_url) as cache:
        # Ten questions were seeded before (an interrupted init, or entries the trainer has updated since).
        cache.put_entries(run_id, [PutEntry(question_id=q, token_ids=[7, 7, 7]) for q in ids[:10]])
        stats = seed(cfg)
        assert (stats["already_cached"], stats["written"] + stats["empty"]) == (10, 30)
        entries = cache.read_entries(run_id, ids)
        assert all(unpack_token_ids(e.token_ids) == [7, 7, 7] for e in entries[:10])  # never overwritten
        fresh = [e for e in entries[10:] if e is not None]
        assert len(fresh) == stats["written"] and all(e.policy_version == 0 for e in fresh)
        assert all(2 not in unpack_token_ids(e.token_ids) for e in fresh)  # stored without EOS (id 2)
        assert stats["correct"] == sum(e.correct for e in fresh)

        # The command itself, run again: nothing left to sample.
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", "cache", "init", "--config", str(config_file)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "0 entries written, 40 already cached" in done.stdout
        assert cache.stats(run_id).entries == 10 + stats["written"]


def test_the_trainer_seeds_only_a_fresh_rpo_run_and_only_when_asked():
    from services.core.config import load_config
    from services.supervisor.main_job import preset_path
    from trainer.rollouts.cache_init import trainer_seeds_cache

    rpo = load_config(preset_path(), [])
    assert rpo.train.seed_cache and trainer_seeds_cache(rpo, resumed=False)
    assert not trainer_seeds_cache(rpo, resumed=True)  # its cache comes back from the checkpoint
    assert not trainer_seeds_cache(load_config(preset_path(), ["train.seed_cache=false"]), resumed=False)
    assert not trainer_seeds_cache(load_config(preset_path(), ["algorithm.mode=full"]), resumed=False)
