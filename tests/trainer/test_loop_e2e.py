"""The training loop's own step: its pure parts (data order, step plan, batch split, DAPO refill, the step
record) and, end to end, a few RPO steps through the real services (Redis, cache server, one and two rollout
replicas, DeepSpeed on CPU). Replicas that fail, freeze or die during a run: test_loop_replica_faults.py."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.core.clients.replica_set import RolloutBatch, RolloutPlans, split_evenly
from services.core.config import load_config
from services.core.data import Question
from tests.trainer.training_helpers import rollout_group
from trainer.rollouts.collected import CollectedGroups
from trainer.rollouts.data_order import DataCursor, planned_steps, request_seed
from trainer.rollouts.source import collect_groups

# ------------------------------------------------------------------------------------------------------------
# Pure parts


def test_cursor_visits_every_question_once_per_epoch_in_a_seeded_order():
    cursor = DataCursor(size=10, seed=3)
    first = cursor.take(4) + cursor.take(4) + cursor.take(2)
    assert sorted(first) == list(range(10))  # one epoch = each question exactly once
    assert first != list(range(10))  # shuffled
    assert cursor.epoch == 0 and cursor.position == 10
    second = cursor.take(10)
    assert sorted(second) == list(range(10)) and second != first  # a new order per epoch
    assert DataCursor(size=10, seed=3).take(10) == first  # same seed, same order


def test_cursor_resumes_exactly_and_never_repeats_a_question_in_one_batch():
    a = DataCursor(size=7, seed=1)
    a.take(5)
    b = DataCursor(size=7, seed=1)
    b.load_state_dict(a.state_dict())
    assert a.take(6) == b.take(6)
    # A batch that crosses the epoch boundary skips questions it already holds.
    c = DataCursor(size=3, seed=0)
    c.take(2)
    batch = c.take(3)
    assert len(batch) == 3 and len(set(batch)) == 3
    # `exclude` (questions already in the step) is honoured, and the batch shrinks only when it must.
    assert set(c.take(5, exclude={0})) == {1, 2}
    with pytest.raises(ValueError, match="same dataset"):
        DataCursor(size=4, seed=1).load_state_dict(a.state_dict())


def test_planned_steps():
    assert planned_steps(100, 32, epochs=1, max_steps=None) == 4  # ceil(100 / 32)
    assert planned_steps(100, 32, epochs=4, max_steps=None) == 13  # ceil(400 / 32)
    assert planned_steps(100, 32, epochs=4, max_steps=5) == 5


def test_request_seed_varies_per_step_and_round_only():
    assert request_seed(0, 1, 0) == request_seed(0, 1, 0)
    assert len({request_seed(0, s, r) for s in range(1, 20) for r in range(3)}) == 57


def test_split_evenly():
    assert split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([1], 4) == [[1]]  # never an empty chunk
    assert split_evenly(list(range(4)), 1) == [[0, 1, 2, 3]]


@dataclass
class FakeRemote:
    """Answers rollouts from a table of per-question correctness; records what it was asked (its own replica
    set, with the config's real rollout plans)."""

    correctness: dict[str, list[bool]]
    asked: list[list[str]] = field(default_factory=list)
    plans: RolloutPlans = field(default_factory=lambda: RolloutPlans.from_config(load_config(None, [])))

    @property
    def replica_set(self):
        return self

    def rollouts(self, replicas, questions, prompts, *, settings, min_policy_version, phase):
        self.asked.append([q.id for q in questions])
        groups = [rollout_group(q.id, self.correctness[q.id]) for q in questions]
        return RolloutBatch(
            groups, min_policy_version, 3 * 2 * len(groups), 2 * 2 * len(groups), 0.1, 0.01, 0, []
        )


def test_dapo_dynamic_sampling_refills_from_the_cursor_and_is_bounded():
    questions = [Question(id=f"q{i}", question=f"question {i}", answer="1") for i in range(8)]
    # q0..q3 all wrong or all right (dropped); q4..q7 mixed (kept).
    table = {f"q{i}": [i % 2 == 0] * 2 if i < 4 else [True, False] for i in range(8)}
    cfg = load_config(
        None,
        ["algorithm.algorithm=dapo", "train.questions_per_step=3", "algorithm.dynamic_sampling_max_rounds=2"],
    )
    cursor = DataCursor(size=8, seed=0)
    remote = FakeRemote(table)
    collected = collect_groups(remote, cursor, questions, {}, cfg, step=1, replicas=["r"], version=7)
    kept = [g.question_id for g in collected.train_groups]
    assert len(kept) <= 3 and all(table[q] == [True, False] for q in kept)
    assert 1 <= collected.rounds <= 3  # one round + at most 2 refills
    asked = [q for batch in remote.asked for q in batch]
    assert len(asked) == len(set(asked))  # a question is never rolled out twice in one step
    # Each refill asks exactly for the groups still missing.
    kept_so_far = 0
    for batch in remote.asked:
        assert len(batch) == 3 - kept_so_far
        kept_so_far += sum(1 for q in batch if table[q] == [True, False])
    # Every rolled-out group (kept or not) is there for the cache update.
    assert [g.question_id for g in collected.all_groups] == asked
    assert collected.policy_version == 7


def test_grpo_keeps_every_group_in_one_round():
    questions = [Question(id=f"q{i}", question=f"question {i}", answer="1") for i in range(5)]
    table = {f"q{i}": [False, False] for i in range(5)}
    cfg = load_config(None, ["train.questions_per_step=4"])
    remote = FakeRemote(table)
    collected = collect_groups(remote, DataCursor(5, 0), questions, {}, cfg, 1, ["r"], 0)
    assert len(remote.asked) == 1 and len(collected.train_groups) == 4


def test_step_record_figures():
    collected = CollectedGroups()
    batch = RolloutBatch(
        [rollout_group("a", [True, False]), rollout_group("b", [False, False])], 0, 12, 8, 2.0, 0.2, 1, ["r"]
    )
    collected.add(batch, keep=None, limit=10)
    record = collected.record(step=1, policy_version=1, epoch=0)
    assert record.samples == 4 and record.accuracy == 0.25  # 1 correct of 4
    assert record.reward_mean == 0.125  # shaped 0.5 once, 0 three times
    assert record.decoded_tokens_per_sample == 3.0  # 12 decoded / 4 samples
    assert record.tokens_per_second == 6.0  # 12 tokens in 2 s
    assert record.response_len_mean == 5.0 and record.rollout_retries == 1
    # each function's mean over the samples it scored (format said None on the correct one)
    assert record.reward_functions == {"exact": 0.25, "format": 1.0}


# ------------------------------------------------------------------------------------------------------------
# End to end: `rpo train` as a subprocess, the real cache server (over the real Redis), two real vLLM replicas


@pytest.fixture(scope="module")
def rpo_run(tmp_path_factory, warm_model_dir, rollout_cache_url, training_replicas):
    """Three RPO steps of `rpo train` spread over two replicas, with the cache before and after."""
    from services.core.clients.cache import SyncCacheClient
    from tests.trainer.training_helpers import run_config, run_trainer, seed
    from trainer.telemetry.progress import read_records

    tmp = tmp_path_factory.mktemp("rpo-run")
    urls = [r.url for r in training_replicas]
    cfg, config_file = run_config(tmp, warm_model_dir, rollout_cache_url, urls)
    seeded = seed(cfg)
    ids = [f"arith-train-{i:05d}" for i in range(48)]
    with SyncCacheClient(rollout_cache_url) as cache:
        before = dict(zip(ids, cache.read_entries(cfg.services.run_id, ids), strict=True))
        output = run_trainer(config_file, log_path=tmp / "trainer.log")
        after = dict(zip(ids, cache.read_entries(cfg.services.run_id, ids), strict=True))
    records = read_records(cfg.train.run_dir, "step")
    return SimpleNamespace(
        cfg=cfg, urls=urls, seeded=seeded, before=before, after=after, records=records, output=output
    )


def test_rpo_steps_leave_every_replica_at_the_trainers_version(rpo_run):
    from tests.trainer.training_helpers import replica_version

    assert rpo_run.seeded["written"] + rpo_run.seeded["empty"] == 48
    assert [r["step"] for r in rpo_run.records] == [1, 2, 3]
    versions = [r["policy_version"] for r in rpo_run.records]
    assert versions == list(range(versions[0], versions[0] + 3))  # one new version per step
    assert [replica_version(url) for url in rpo_run.urls] == [versions[-1]] * 2
    for r in rpo_run.records:
        assert r["samples"] == 8 * 4 and r["reused_prefix_tokens"] > 0
        assert set(r["phases"]) == {"rollout", "reward", "train", "weight_sync", "cache"}
        assert r["phases"]["weight_sync"] > 0 and r["learner"]["sequences"] == 32
        assert r["weight_transport"] == "http"  # the configured transport, said in every step record


def test_rpo_steps_update_the_cache_by_the_epsilon_greedy_rule(rpo_run):
    """The questions of step s (the cursor's order) have exactly one update, made at step s with the
    responses of the policy before step s; every other entry is untouched."""
    trained = {}
    cursor = DataCursor(48, rpo_run.cfg.train.seed)
    for record in rpo_run.records:
        for index in cursor.take(8):
            trained[f"arith-train-{index:05d}"] = record
    for qid, entry in rpo_run.after.items():
        old = rpo_run.before[qid]
        if qid in trained:
            assert entry.update_count == 1 and entry.last_step == trained[qid]["step"], qid
            assert entry.policy_version == trained[qid]["policy_version"] - 1, qid
            assert entry.last_group_min_len is not None
        elif old is not None:
            assert entry.model_dump() == old.model_dump(), qid
    for record in rpo_run.records:
        updates = record["cache_updates"]
        assert updates["best"] + updates["other"] == 8 and updates["none"] == 0  # epsilon 0.5: both kinds
    assert sum(r["cache_updates"]["best"] for r in rpo_run.records) not in (0, 24)


def test_full_path_baseline_decodes_more_tokens_per_sample_and_never_calls_the_cache(
    rpo_run, tmp_path, warm_model_dir, rollout_cache_url, training_replicas
):
    from services.core.clients.cache import SyncCacheClient
    from tests.trainer.training_helpers import replica_version, run_config, run_trainer
    from trainer.telemetry.progress import read_records

    url = training_replicas[0].url  # the same loop on ONE replica, cache off
    cfg, config_file = run_config(
        tmp_path,
        warm_model_dir,
        rollout_cache_url,
        [url],
        "algorithm.mode=full",
        "data.eval_dataset=builtin:arith-eval",
        "data.eval_max_questions=8",
        "sampling.eval_samples=1",
    )
    run_trainer(config_file, log_path=tmp_path / "trainer.log")
    records = read_records(cfg.train.run_dir, "step")
    assert len(records) == 3 and replica_version(url) == records[-1]["policy_version"]
    # The replica served the RPO run's last weights; the evaluation before training ran on this run's.
    before = next(r for r in read_records(cfg.train.run_dir, "eval") if r["label"] == "before")
    assert (
        before["policy_version"] == records[0]["policy_version"] - 1 > rpo_run.records[-1]["policy_version"]
    )
    full = sum(r["generated_tokens"] for r in records) / sum(r["samples"] for r in records)
    rpo = sum(r["generated_tokens"] for r in rpo_run.records) / sum(r["samples"] for r in rpo_run.records)
    assert rpo < 0.8 * full, (rpo, full)
    assert all(r["reused_prefix_tokens"] == 0 and r["cache_updates"] == {} for r in records)
    with SyncCacheClient(rollout_cache_url) as cache:
        assert cache.stats(cfg.services.run_id).entries == 0


def test_a_fresh_rpo_run_seeds_its_empty_cache_so_step_one_already_reuses_prefixes(
    tmp_path, warm_model_dir, rollout_cache_url, training_replicas
):
    """The compose flow: `rpo train` on a run whose cache nobody initialised (train.seed_cache, on by
    default). Without it every question of the first epoch is a miss and tokens saved stay 0."""
    from services.core.clients.cache import SyncCacheClient
    from tests.trainer.training_helpers import run_config, run_trainer
    from trainer.telemetry.progress import read_records

    cfg, config_file = run_config(
        tmp_path,
        warm_model_dir,
        rollout_cache_url,
        [r.url for r in training_replicas],
        "train.max_steps=1",
        "train.report_to=tensorboard,mlflow,wandb",  # and the trackers see the real trainer's records
    )
    with SyncCacheClient(rollout_cache_url) as cache:
        assert cache.stats(cfg.services.run_id).entries == 0
        run_trainer(config_file, log_path=tmp_path / "trainer.log")
        entries = cache.stats(cfg.services.run_id).entries
    records = read_records(cfg.train.run_dir, None)
    kinds = [r["kind"] for r in records]
    assert kinds.index("cache_init") < kinds.index("step")  # seeded before step 1
    seeded = next(r for r in records if r["kind"] == "cache_init")
    assert seeded["already_cached"] == 0 and seeded["written"] + seeded["empty"] == 48
    assert entries == seeded["written"] > 0
    step = next(r for r in records if r["kind"] == "step")
    assert step["step"] == 1 and step["reused_prefix_tokens"] > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(cfg.train.run_dir) / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reused_prefix_tokens")] == [
        (1, step["reused_prefix_tokens"])
    ]
    assert list((Path(cfg.train.run_dir) / "mlruns").rglob("reward_mean"))  # MLflow's file store
    assert list((Path(cfg.train.run_dir) / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B, offline


def test_committed_cache_update_is_the_best_response_or_another(
    tmp_path, warm_model_dir, rollout_cache_url, training_replicas
):
    """Through the real replica and cache server: epsilon 1 stores the best response of each group (the
    highest shaped reward), epsilon 0 one of the others; the stored answer is prefix + suffix, no EOS."""
    from services.core.algorithm import cached_answer
    from services.core.data import encode_prompt, load_questions
    from tests.trainer.training_helpers import replica_version, run_config, seed
    from trainer.rollouts.services import RemoteServices

    url = training_replicas[0].url
    for epsilon in (1.0, 0.0):
        cfg, _ = run_config(
            tmp_path, warm_model_dir, rollout_cache_url, [url], f"algorithm.epsilon={epsilon}"
        )
        seed(cfg)
        questions = load_questions(cfg.data.dataset, cfg.data, 6)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(warm_model_dir)
        prompts = {q.id: encode_prompt(tokenizer, q, cfg.data) for q in questions}
        remote = RemoteServices(cfg)
        try:
            version = replica_version(url)
            batch = remote.replica_set.rollouts(
                [url],
                questions,
                prompts,
                settings=remote.plans.train(seed=5),
                min_policy_version=version,
                phase="t",
            )
            counts = remote.commit_cache_updates(step=1, groups=batch.groups, policy_version=version)
            entries = remote.cache.read_entries(cfg.services.run_id, [q.id for q in questions])
        finally:
            remote.close()
        assert counts[("best" if epsilon == 1.0 else "other")] == 6
        for group, entry in zip(batch.groups, entries, strict=True):
            from services.core.schemas.common import unpack_token_ids

            stored = unpack_token_ids(entry.token_ids)
            answers = [cached_answer(s.response_ids, s.finish_reason) for s in group.samples]
            best = max(range(len(answers)), key=lambda i: (group.samples[i].shaped_reward, -i))
            if epsilon == 1.0:
                assert stored == answers[best]
            else:
                assert stored in [a for i, a in enumerate(answers) if i != best]


def test_dapo_refill_asks_the_real_replica_again_until_the_batch_is_full(
    tmp_path, warm_model_dir, rollout_cache_url, rollout_server
):
    """DAPO's dynamic sampling through the real replica (its real rewards decide what is kept): the questions
    the cursor hands out first get a reference answer the model never writes, so their groups come back
    all wrong and are dropped; the step must ask the replica again for the groups still missing. Sampled
    hot (T = 1.5) with rounds to spare: a warm model that solves most questions returns many all-correct
    groups too, which are dropped as well."""
    import re

    import httpx
    from transformers import AutoTokenizer

    from services.core.data import encode_prompt, load_questions
    from tests.trainer.training_helpers import replica_version, run_config
    from trainer.learner.batch import build_samples
    from trainer.rollouts.services import RemoteServices

    want, group_size = 2, 6
    cfg, _ = run_config(
        tmp_path,
        warm_model_dir,
        rollout_cache_url,
        [rollout_server.url],
        "algorithm.algorithm=dapo",
        "algorithm.mode=full",
        f"algorithm.group_size={group_size}",
        "algorithm.dynamic_sampling_max_rounds=8",
        f"train.questions_per_step={want}",
        "data.max_questions=24",
        "sampling.temperature=1.5",
    )
    questions = load_questions(cfg.data.dataset, cfg.data, cfg.data.max_questions)
    unsolvable = {questions[i].id for i in DataCursor(len(questions), cfg.train.seed).take(want)}
    questions = [replace(q, answer="unsolvable") if q.id in unsolvable else q for q in questions]
    tokenizer = AutoTokenizer.from_pretrained(warm_model_dir)
    prompts = {q.id: encode_prompt(tokenizer, q, cfg.data) for q in questions}

    def requests_served() -> float:
        text = httpx.get(rollout_server.url + "/metrics", timeout=10).text
        return float(
            re.search(r'^rpo_rollout_requests_total\{mode="full",outcome="ok"\} (\S+)$', text, re.M)[1]
        )

    version, before = replica_version(rollout_server.url), requests_served()
    remote = RemoteServices(cfg)
    try:
        collected = collect_groups(
            remote,
            DataCursor(len(questions), cfg.train.seed),
            questions,
            prompts,
            cfg,
            step=1,
            replicas=[rollout_server.url],
            version=version,
        )
    finally:
        remote.close()

    rolled_out = [g.question_id for g in collected.all_groups]
    assert set(rolled_out[:want]) == unsolvable  # round 1: every group all wrong ...
    assert not any(s.correct for g in collected.all_groups[:want] for s in g.samples)
    assert collected.rounds >= 2 and len(rolled_out) > want  # ... so the step asked again
    assert requests_served() - before == collected.rounds  # each round one request to the replica
    assert len(rolled_out) == len(set(rolled_out)) and collected.policy_version == version
    # The batch is full, and only of groups whose rewards differ (their advantages are not all zero).
    kept = collected.train_groups
    assert len(kept) == want and not unsolvable & {g.question_id for g in kept}
    for group in kept:
        assert 0 < sum(s.correct for s in group.samples) < group_size
        assert len({s.shaped_reward for s in group.samples}) > 1
    assert any(s.advantage != 0 for s in build_samples(kept, prompts, cfg.algorithm))
    for group in collected.all_groups:  # a group was dropped only for all-equal correctness
        if not any(group is k for k in kept):
            assert len({s.correct for s in group.samples}) == 1, group.question_id
