"""The training loop: its pure parts (data order, step plan, batch split, DAPO refill) and, end to end, a few
RPO steps through the real services (Redis, cache server, one and two rollout replicas, DeepSpeed on CPU)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.core.clients.replica_set import RolloutBatch, RolloutPlans, split_evenly
from services.core.config import load_config
from services.core.data import Question
from services.core.schemas.rollout import RolloutGroup, RolloutSample
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


def _group(qid: str, correct: list[bool], prefix: int = 2) -> RolloutGroup:
    samples = [
        RolloutSample(
            response_ids=[5] * (prefix + 3),
            prefix_len=prefix,
            suffix_logprobs=[-0.5] * 3,
            finish_reason="stop",
            raw_reward=float(c),
            shaped_reward=0.5 * c,
            correct=c,
            reward_scores={"exact": float(c), "format": None if c else 1.0},
        )
        for c in correct
    ]
    return RolloutGroup(question_id=qid, cache_hit=True, m=3, prefix_len=prefix, samples=samples)


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
        groups = [_group(q.id, self.correctness[q.id]) for q in questions]
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
        [_group("a", [True, False]), _group("b", [False, False])], 0, 12, 8, 2.0, 0.2, 1, ["r"]
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
# Spreading a batch over replicas, with a failing one (stand-in HTTP replicas: the real ones are below)


class _StandIn:
    """A loopback HTTP server answering /v1/rollouts (msgpack or JSON bodies, JSON replies) with one group
    per question, or with `fail_status`."""

    def __init__(self, fail_status: int | None = None):
        import http.server
        import json
        import threading

        import msgpack

        outer = self
        self.asked: list[list[str]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = msgpack.unpackb(raw) if "msgpack" in self.headers["Content-Type"] else json.loads(raw)
                ids = [q["id"] for q in body["questions"]]
                outer.asked.append(ids)
                if fail_status is not None:
                    payload, status = (
                        {"error": {"type": "unavailable", "message": "engine down"}},
                        fail_status,
                    )
                else:
                    payload, status = (
                        {
                            "policy_version": body["min_policy_version"],
                            "replica": f"stand-in:{outer.port}",
                            "groups": [_group(q, [True, False]).model_dump() for q in ids],
                            "stats": {
                                "generated_tokens": 6 * len(ids),
                                "reused_prefix_tokens": 4 * len(ids),
                                "generation_seconds": 0.01,
                                "reward_seconds": 0.001,
                                "cache_seconds": 0.001,
                            },
                        },
                        200,
                    )
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_batch_is_split_over_replicas_and_a_failed_chunk_moves_to_another(caplog):
    from trainer.rollouts.services import RemoteServices

    good, bad = _StandIn(), _StandIn(fail_status=503)
    cfg = load_config(None, ["services.max_attempts=2", "services.retry_backoff_seconds=0.01"])
    remote = RemoteServices(cfg)
    questions = [Question(id=f"q{i}", question=f"question {i}", answer="1") for i in range(5)]
    prompts = {q.id: [1, 2, 3] for q in questions}
    try:
        batch = remote.replica_set.rollouts(
            [good.url, bad.url],
            questions,
            prompts,
            settings=remote.plans.train(seed=1),
            min_policy_version=4,
            phase="rollout (step 3, round 1)",
        )
    finally:
        good.close(), bad.close()
    assert [g.question_id for g in batch.groups] == [q.id for q in questions]  # question order kept
    assert bad.asked == [["q3", "q4"]]  # split 3 + 2
    # the failed chunk went to the good one; the two requests race (the bad replica answers at once), so
    # either may reach it first
    assert sorted(good.asked) == [["q0", "q1", "q2"], ["q3", "q4"]] and batch.retries == 1
    assert batch.policy_version == 4 and batch.generated_tokens == 30
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert bad.url in warning and "rollout (step 3, round 1)" in warning and "retrying them on" in warning
    assert "readyz" in warning  # what to check


def test_a_chunk_that_fails_everywhere_names_every_replica():
    from services.core.clients.replica_set import RolloutFailed
    from trainer.rollouts.services import RemoteServices

    a, b = _StandIn(fail_status=500), _StandIn(fail_status=503)
    cfg = load_config(None, ["services.max_attempts=2", "services.retry_backoff_seconds=0.01"])
    remote = RemoteServices(cfg)
    questions = [Question(id="q0", question="question 0", answer="1")]
    try:
        with pytest.raises(RolloutFailed) as err:
            remote.replica_set.rollouts(
                [a.url, b.url],
                questions,
                {"q0": [1]},
                settings=remote.plans.evaluation,
                min_policy_version=0,
                phase="evaluation",
            )
    finally:
        a.close(), b.close()
    assert a.url in str(err.value) and b.url in str(err.value) and "evaluation" in str(err.value)


# ------------------------------------------------------------------------------------------------------------
# End to end: `rpo train` as a subprocess, the real cache server (over the real Redis), two real vLLM replicas


@pytest.fixture(scope="module")
def rpo_run(tmp_path_factory, warm_model_dir, rollout_cache_url, training_replicas):
    """Three RPO steps of `rpo train` spread over two replicas, with the cache before and after."""
    from tests.trainer.training_helpers import run_config, run_trainer, seed

    from services.core.clients.cache import SyncCacheClient
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
    from tests.trainer.training_helpers import replica_version, run_config, run_trainer

    from services.core.clients.cache import SyncCacheClient
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
    from tests.trainer.training_helpers import run_config, run_trainer

    from services.core.clients.cache import SyncCacheClient
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
    from tests.trainer.training_helpers import replica_version, run_config, seed

    from services.core.algorithm import cached_answer
    from services.core.data import encode_prompt, load_questions
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
    from tests.trainer.training_helpers import replica_version, run_config
    from transformers import AutoTokenizer

    from services.core.data import encode_prompt, load_questions
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


def wait_until_decoding(url: str, trainer, timeout_seconds: float = 120.0) -> None:
    """Until the replica's engine has requests running (vLLM's own gauge, on the replica's /metrics);
    the trainer must stay alive meanwhile."""
    import time

    import httpx

    def decoding() -> bool:
        try:
            text = httpx.get(url + "/metrics", timeout=2).text
        except httpx.HTTPError:
            return False
        return any(
            line.startswith("vllm:num_requests_running") and float(line.split()[-1]) > 0
            for line in text.splitlines()
        )

    deadline = time.monotonic() + timeout_seconds
    while not decoding():
        assert time.monotonic() < deadline and trainer.process.poll() is None, trainer.output()[-4000:]
        time.sleep(0.02)


@pytest.mark.parametrize("max_lag", [0, 1])
def test_a_frozen_replica_is_named_while_it_hangs_sits_out_and_catches_up_when_resumed(
    tmp_path, warm_model_dir, rollout_cache_url, training_replicas, max_lag
):
    """SIGSTOP one of the two replicas as step 2 begins: its requests time out (bounded), it sits the steps
    out while the other serves them, the wait is logged with its URL and phase while it lasts, and once
    SIGCONT'd it is pushed the current weights; synchronous, and with the rollouts one step ahead (the batch
    in flight when it froze moves to the other replica). (vLLM's running-requests gauge lags the engine, so
    it cannot time a freeze to the middle of a decode reliably.)"""
    import os
    import signal

    from tests.trainer.training_helpers import Trainer, replica_version, run_config, seed, wait_for_step

    from trainer.telemetry.progress import read_records

    survivor, frozen = training_replicas
    cfg, config_file = run_config(
        tmp_path,
        warm_model_dir,
        rollout_cache_url,
        [survivor.url, frozen.url],
        "train.max_steps=5",
        "services.request_timeout_seconds=15",
        "train.weight_sync_timeout_seconds=20",
        "services.slow_call_notice_seconds=2",
        f"train.max_lag={max_lag}",
    )
    seed(
        cfg.model_copy(update={"services": cfg.services.model_copy(update={"rollout_urls": [survivor.url]})})
    )
    trainer = Trainer(config_file, log_path=tmp_path / "trainer.log")
    wait_for_step(cfg.train.run_dir, 1, trainer)
    os.killpg(frozen.process.pid, signal.SIGSTOP)  # the API process and its engine core
    try:
        wait_for_step(cfg.train.run_dir, 3, trainer)  # the run goes on without it
    finally:
        os.killpg(frozen.process.pid, signal.SIGCONT)
    assert trainer.wait(300) == 0, trainer.output()[-6000:]
    records = read_records(cfg.train.run_dir, "step")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["lag"] for r in records] == [0] + [max_lag] * 4
    output = trainer.output()
    assert f"still waiting on {frozen.url}" in output  # named while it hung, not after
    assert f"replica {frozen.url} sits this step out" in output
    # resumed, it was brought to the trainer's weights like any replica that fell behind
    assert replica_version(frozen.url) == replica_version(survivor.url) == records[-1]["policy_version"]


@pytest.mark.parametrize("max_lag", [0, 1])
def test_a_replica_killed_while_decoding_leaves_the_step_to_the_other_and_a_restarted_one_catches_up(
    tmp_path, warm_model_dir, rollout_cache_url, training_replicas, rollout_server_factory, max_lag
):
    """Synchronous, and with the rollouts one step ahead (the batch in flight moves to the survivor). Runs last
    in this module: it kills the second training replica and puts the one restarted at its address in its
    place, so the next parameter kills that one."""
    import os
    import signal
    from urllib.parse import urlparse

    from tests.trainer.training_helpers import Trainer, replica_version, run_config, seed, wait_for_step

    from trainer.telemetry.progress import read_records

    survivor, victim = training_replicas
    cfg, config_file = run_config(
        tmp_path,
        warm_model_dir,
        rollout_cache_url,
        [survivor.url, victim.url],
        "train.max_steps=500",
        "train.epochs=100",
        f"train.max_lag={max_lag}",
    )  # stopped with SIGTERM below, once the restarted replica has served
    # Earlier tests left the two replicas at different versions: seed through one (a batch never mixes
    # versions); the trainer's first step brings both to one new version.
    seed(
        cfg.model_copy(update={"services": cfg.services.model_copy(update={"rollout_urls": [survivor.url]})})
    )
    trainer = Trainer(config_file, log_path=tmp_path / "trainer.log")
    wait_for_step(cfg.train.run_dir, 1, trainer)
    wait_until_decoding(victim.url, trainer)  # kill it in the middle of a step's rollouts
    os.killpg(victim.process.pid, signal.SIGKILL)  # the API process and its engine core
    victim.process.wait(timeout=30)
    wait_for_step(cfg.train.run_dir, 3, trainer)  # the steps go on, on the survivor
    # A new replica at the same address: it starts at version 0 and must be brought up to date
    # before it serves the trainer's rollouts.
    address = urlparse(victim.url)
    restarted = rollout_server_factory(warm_model_dir, cache_url=rollout_cache_url, port=address.port)
    training_replicas[1] = restarted
    back = max(r["step"] for r in read_records(cfg.train.run_dir, "step"))
    wait_for_step(cfg.train.run_dir, back + 2, trainer)  # a whole step with the restarted replica in it
    trainer.process.send_signal(signal.SIGTERM)  # stop after the current step (a checkpoint is saved)
    assert trainer.wait(300) == 0, trainer.output()[-6000:]
    records = read_records(cfg.train.run_dir, "step")
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert max(r["lag"] for r in records) == max_lag  # never more behind than allowed, and ahead when asked
    output = trainer.output()
    # the in-flight chunk moved (or, killed between two steps' rollouts, it sat the next step out), named
    assert victim.url in output and ("retrying them on" in output or "sits this step out" in output)
    assert replica_version(survivor.url) == records[-1]["policy_version"]
    assert replica_version(restarted.url) == records[-1]["policy_version"]
