"""Group rollouts through the shared replica (warm tiny model) against the real cache server and Redis.

The questions are the synthetic task's; five of eight have a cached (correct) answer, three are misses.
Everything the replica returns is checked against what it must be: the prefix is the cached answer minus
the m tokens the cache server draws for (seed, question), suffixes stay within `suffix_budget`, raw rewards
are the reward function on the decoded response, shaped rewards are `length_shaped_rewards` (plus the
overlong penalty when on), token counts add up, misses seed the cache, full mode leaves the cache alone.
"""

from __future__ import annotations

import json
import re
import uuid

import httpx
import msgpack
import pytest
from rollout_helpers import decode, encode

from services.core.algorithm import cached_answer, length_shaped_rewards, overlong_penalty, suffix_budget
from services.core.clients.cache import SyncCacheClient
from services.core.clients.rollout import ROLLOUT_PATH, RolloutClient
from services.core.schemas.cache import PutEntry
from services.core.schemas.common import (
    JSON_MEDIA_TYPE,
    MSGPACK_MEDIA_TYPE,
    decode_model,
    encode_model,
    unpack_token_ids,
)
from services.core.schemas.rollout import RolloutQuestion, RolloutRequest, RolloutResponse
from services.core.synthetic import PROMPT_TEMPLATE, SyntheticTaskConfig, check_answer, make_split

ROWS = make_split(SyntheticTaskConfig(train_size=8), "train")
CACHED = ROWS[:5]
MISSED = ROWS[5:]
SEED = 11
LIMIT = 16
MAX_RESPONSE = 120
ALPHA = 0.1


def _questions(rows) -> list[RolloutQuestion]:
    return [
        RolloutQuestion(
            id=r["id"],
            prompt_ids=encode(PROMPT_TEMPLATE.format(question=r["question"])),
            reference=r["answer"],
        )
        for r in rows
    ]


def _request(run_id: str, rows, **overrides) -> RolloutRequest:
    fields = {
        "run_id": run_id,
        "questions": _questions(rows),
        "mode": "rpo",
        "group_size": 4,
        "truncation_limit": LIMIT,
        "suffix_budget": "m",
        "max_response_tokens": MAX_RESPONSE,
        "temperature": 1.0,
        "seed": SEED,
        "reward": "exact",
        "alpha": ALPHA,
    }
    return RolloutRequest(**{**fields, **overrides})


def _counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        k: float(v) for k, v in re.findall(r"^(rpo_[a-z_]+_total(?:\{[^}]*\})?) ([0-9.e+-]+)$", text, re.M)
    }


@pytest.fixture
def cache(rollout_cache_url):
    """A fresh run namespace on the real cache server, with the cached answers of CACHED (no EOS)."""
    run_id = f"rollout-test-{uuid.uuid4().hex[:10]}"
    client = SyncCacheClient(rollout_cache_url)
    client.put_entries(
        run_id, [PutEntry(question_id=r["id"], token_ids=encode(r["solution"])) for r in CACHED]
    )
    yield client, run_id
    client.delete_run(run_id)
    client.close()


def _check_rewards(group, reference: str, req: RolloutRequest) -> None:
    raw = [check_answer(decode(s.response_ids), reference) for s in group.samples]
    lengths = [len(s.response_ids) for s in group.samples]
    shaped = length_shaped_rewards(raw, lengths, req.alpha, req.shaping_low, req.shaping_high)
    if req.overlong_buffer_tokens:
        shaped = [
            r + overlong_penalty(n, req.max_response_tokens, req.overlong_buffer_tokens)
            for r, n in zip(shaped, lengths, strict=True)
        ]
    assert [s.raw_reward for s in group.samples] == raw
    assert [s.shaped_reward for s in group.samples] == pytest.approx(shaped, abs=1e-12)
    assert [s.correct for s in group.samples] == [r >= 1.0 for r in raw]


def test_rpo_rollouts_take_prefixes_from_the_cache_and_decode_within_the_budget(rollout_server, cache):
    cache_client, run_id = cache
    req = _request(run_id, ROWS)
    before = _counters(rollout_server.url)
    with RolloutClient(rollout_server.url) as client:
        reply = client.rollouts(req)
    after = _counters(rollout_server.url)

    assert reply.policy_version == 0 and reply.replica == rollout_server.url.removeprefix("http://")
    assert [g.question_id for g in reply.groups] == [r["id"] for r in ROWS]
    draws = {
        p.question_id: p for p in cache_client.prefixes(run_id, [r["id"] for r in CACHED], LIMIT, seed=SEED)
    }
    generated = reused = 0
    for row, group in zip(ROWS, reply.groups, strict=True):
        assert len(group.samples) == 4
        if row in CACHED:
            answer = encode(row["solution"])
            assert group.cache_hit and not group.seeded_cache
            assert group.m == draws[row["id"]].m <= LIMIT  # the cache server's draw for (seed, question)
            assert group.prefix_len == max(len(answer) - group.m, 0)
            budget = suffix_budget(group.m, "m", group.prefix_len, MAX_RESPONSE)
        else:
            assert not group.cache_hit and group.m == 0 and group.prefix_len == 0
            budget = MAX_RESPONSE
        for sample in group.samples:
            suffix = sample.response_ids[sample.prefix_len :]
            assert sample.prefix_len == group.prefix_len
            if group.cache_hit:
                assert sample.response_ids[: group.prefix_len] == answer[: group.prefix_len]
            assert 1 <= len(suffix) <= budget
            assert len(sample.suffix_logprobs) == len(suffix)
            assert all(lp <= 0.0 for lp in sample.suffix_logprobs)
            assert sample.finish_reason in ("stop", "length")
            generated += len(suffix)
            reused += sample.prefix_len
        _check_rewards(group, row["answer"], req)
    assert reply.stats.generated_tokens == generated
    assert reply.stats.reused_prefix_tokens == reused > 0
    assert after["rpo_generated_tokens_total"] - before["rpo_generated_tokens_total"] == generated
    assert after["rpo_reused_prefix_tokens_total"] - before["rpo_reused_prefix_tokens_total"] == reused
    assert (
        after['rpo_rollout_requests_total{mode="rpo",outcome="ok"}']
        == before['rpo_rollout_requests_total{mode="rpo",outcome="ok"}'] + 1
    )
    assert any(s.correct for g in reply.groups for s in g.samples), "the warm model should solve some"

    # Each miss seeded its entry with the group's first non-empty sample, without its trailing EOS.
    entries = cache_client.read_entries(run_id, [r["id"] for r in MISSED])
    for group, entry in zip(reply.groups[len(CACHED) :], entries, strict=True):
        first = next(s for s in group.samples if cached_answer(s.response_ids, s.finish_reason))
        assert group.seeded_cache and entry is not None
        assert unpack_token_ids(entry.token_ids) == cached_answer(first.response_ids, first.finish_reason)
        assert 2 not in unpack_token_ids(entry.token_ids)[-1:]  # no EOS stored
        assert entry.policy_version == 0
        assert entry.last_group_min_len == min(len(s.response_ids) for s in group.samples)


def test_full_mode_decodes_whole_responses_and_leaves_the_cache_alone(rollout_server, cache):
    cache_client, run_id = cache
    stored = cache_client.read_entries(run_id, [r["id"] for r in ROWS])
    with RolloutClient(rollout_server.url) as client:
        rpo = client.rollouts(_request(run_id, CACHED))
        full_req = _request(run_id, CACHED, mode="full", overlong_buffer_tokens=20, max_response_tokens=60)
        full = client.rollouts(full_req)
    assert cache_client.read_entries(run_id, [r["id"] for r in ROWS]) == stored

    for row, group in zip(CACHED, full.groups, strict=True):
        assert not group.cache_hit and group.m == 0 and group.prefix_len == 0 and not group.seeded_cache
        for sample in group.samples:
            assert len(sample.suffix_logprobs) == len(sample.response_ids) <= 60
        _check_rewards(group, row["answer"], full_req)
    assert full.stats.reused_prefix_tokens == 0
    samples = 4 * len(CACHED)
    rpo_per_sample = rpo.stats.generated_tokens / samples
    full_per_sample = full.stats.generated_tokens / samples
    assert full_per_sample > 2 * rpo_per_sample, (full_per_sample, rpo_per_sample)


def test_the_same_seed_draws_the_same_prefixes(rollout_server, cache):
    _, run_id = cache
    with RolloutClient(rollout_server.url) as client:
        first = client.rollouts(_request(run_id, CACHED, temperature=0.0))
        second = client.rollouts(_request(run_id, CACHED, temperature=0.0))
        other = client.rollouts(_request(run_id, CACHED, temperature=0.0, seed=SEED + 1))
    assert [(g.m, g.prefix_len) for g in first.groups] == [(g.m, g.prefix_len) for g in second.groups]
    assert [g.samples[0].response_ids for g in first.groups] == [
        g.samples[0].response_ids for g in second.groups
    ]
    assert [g.m for g in first.groups] != [g.m for g in other.groups]


def test_msgpack_and_json_bodies_carry_the_same_rollouts(rollout_server, cache):
    """The services' clients (the trainer's among them) speak msgpack both ways; a JSON caller gets the same
    typed answer. Greedy and seeded, so the same request decodes the same ids."""
    _, run_id = cache
    request = _request(run_id, CACHED[:3], temperature=0.0, group_size=2, max_response_tokens=40)
    url = rollout_server.url + ROLLOUT_PATH

    as_json = httpx.post(
        url, content=encode_model(request, False), headers={"Content-Type": JSON_MEDIA_TYPE}, timeout=120
    )
    assert as_json.status_code == 200 and as_json.headers["content-type"] == JSON_MEDIA_TYPE
    json_reply = decode_model(RolloutResponse, as_json.content, False)

    packed = {"Content-Type": MSGPACK_MEDIA_TYPE, "Accept": MSGPACK_MEDIA_TYPE}
    as_msgpack = httpx.post(url, content=encode_model(request, True), headers=packed, timeout=120)
    assert as_msgpack.status_code == 200 and as_msgpack.headers["content-type"] == MSGPACK_MEDIA_TYPE
    raw = msgpack.unpackb(as_msgpack.content)  # a msgpack body, not JSON under another name
    assert raw["groups"][0]["samples"][0]["response_ids"] == json_reply.groups[0].samples[0].response_ids
    msgpack_reply = decode_model(RolloutResponse, as_msgpack.content, True)

    wire: list[tuple[str, str, str]] = []  # (request Content-Type, Accept, reply Content-Type) per call
    with RolloutClient(rollout_server.url) as client:
        client.http._http.event_hooks["response"].append(
            lambda r: wire.append(
                (r.request.headers["content-type"], r.request.headers["accept"], r.headers["content-type"])
            )
        )
        client_reply = client.rollouts(request)
    assert wire == [(MSGPACK_MEDIA_TYPE, MSGPACK_MEDIA_TYPE, MSGPACK_MEDIA_TYPE)]

    def decoded(reply: RolloutResponse) -> list:
        return [
            (
                g.question_id,
                g.m,
                g.prefix_len,
                [(s.response_ids, s.raw_reward, s.shaped_reward) for s in g.samples],
            )
            for g in reply.groups
        ]

    assert all(g.cache_hit for g in json_reply.groups)  # the prefixes came from the cache
    assert decoded(msgpack_reply) == decoded(json_reply) == decoded(client_reply)
    for a, b in zip(json_reply.groups, msgpack_reply.groups, strict=True):
        for sa, sb in zip(a.samples, b.samples, strict=True):
            assert sb.suffix_logprobs == pytest.approx(sa.suffix_logprobs, abs=1e-4)
    assert msgpack_reply.stats.generated_tokens == json_reply.stats.generated_tokens


BATCH_REWARD = '''
import json
from pathlib import Path


def echo(prompts, completions, completion_ids, reference, level, **kwargs):
    """Writes down what it got (one line per batch) and scores len(completion_ids) + level / 1000."""
    with Path(__file__).with_suffix(".jsonl").open("a") as fh:
        fh.write(json.dumps({"prompts": prompts, "completions": completions, "reference": reference,
                             "level": level, "others": sorted(kwargs)}) + "\\n")
    return [len(ids) + lv / 1000 for ids, lv in zip(completion_ids, level)]
'''


def test_weighted_reward_functions_on_a_replica_sum_and_a_batch_function_gets_the_row(
    rollout_server, tmp_path
):
    """exact (correctness) + 0.1 format + 0.01 a TRL-style function from a file: each sample's reward is the
    weighted sum of the scores the replica reports, and the batch function got the prompt and the columns."""
    from services.core.reward_examples import boxed_format_reward

    (tmp_path / "batch_reward.py").write_text(BATCH_REWARD)
    rows = ROWS[:4]
    questions = [
        q.model_copy(update={"prompt": r["question"], "columns": {"level": i, "id": r["id"]}})
        for i, (q, r) in enumerate(zip(_questions(rows), rows, strict=True))
    ]
    rewards = [
        {"function": "exact"},
        {"function": "format", "weight": 0.1},
        {"function": f"{tmp_path / 'batch_reward.py'}:echo", "weight": 0.01},
    ]
    req = _request("unused", rows, mode="full", questions=questions, rewards=rewards, reward="auto")
    with RolloutClient(rollout_server.url) as client:
        reply = client.rollouts(req)
    for i, (row, group) in enumerate(zip(rows, reply.groups, strict=True)):
        for s in group.samples:
            text = decode(s.response_ids)
            exact = check_answer(text, row["answer"])
            fmt = boxed_format_reward([text])[0]
            echo = len(s.response_ids) + i / 1000
            assert s.reward_scores == pytest.approx({"exact": exact, "format": fmt, "echo": echo})
            assert s.raw_reward == pytest.approx(exact + 0.1 * fmt + 0.01 * echo)
            assert s.correct == (exact >= 1.0)  # the first function decides, not the sum
        # Shaping scales the correctness term (exact, weight 1) of the correct responses alone: a wrong answer
        # keeps its format bonus and echo score as written.
        lengths = [len(s.response_ids) for s in group.samples]
        shaped = length_shaped_rewards(
            [s.raw_reward for s in group.samples],
            lengths,
            req.alpha,
            correct=[s.correct for s in group.samples],
            contributions=[s.reward_scores["exact"] for s in group.samples],
        )
        assert [s.shaped_reward for s in group.samples] == pytest.approx(shaped, abs=1e-12)
        for s in group.samples:
            if not s.correct:
                assert s.shaped_reward == s.raw_reward
    calls = [json.loads(line) for line in (tmp_path / "batch_reward.jsonl").read_text().splitlines()]
    assert sum(len(c["completions"]) for c in calls) == 4 * 4  # every response, in batches of whole groups
    got = {
        (p, lv, ref)
        for c in calls
        for p, lv, ref in zip(c["prompts"], c["level"], c["reference"], strict=True)
    }
    assert got == {(r["question"], i, r["answer"]) for i, r in enumerate(rows)}
    assert all(c["others"] == ["id"] for c in calls)  # the row's other column, by name


PENALTY_REWARD = '''
def penalty(completions, **kwargs):
    """TRL-style, one value per completion: -1 (a penalty) and 0.5 (partial credit) in turn."""
    return [-1.0 if i % 2 == 0 else 0.5 for i in range(len(completions))]
'''


def test_without_length_shaping_a_penalty_reaches_the_advantage_as_written(rollout_server, tmp_path):
    """`length_shaping: false`: the reward of every response is its weighted sum, negative values kept (a
    batch holds whole groups of 4, so each group scores -1, 0.5, -1, 0.5)."""
    (tmp_path / "penalty.py").write_text(PENALTY_REWARD)
    rows = ROWS[:2]
    rewards = [{"function": f"{tmp_path / 'penalty.py'}:penalty", "weight": 2.0}]
    req = _request("unused", rows, mode="full", rewards=rewards, reward="auto", length_shaping=False)
    with RolloutClient(rollout_server.url) as client:
        reply = client.rollouts(req)
    for group in reply.groups:
        assert [s.reward_scores["penalty"] for s in group.samples] == [-1.0, 0.5, -1.0, 0.5]
        assert [s.raw_reward for s in group.samples] == [-2.0, 1.0, -2.0, 1.0]
        assert [s.shaped_reward for s in group.samples] == [-2.0, 1.0, -2.0, 1.0]
        assert not any(s.correct for s in group.samples)  # correct: the function's own score >= 1


def test_top_k_min_p_and_repetition_penalty_reach_vllms_sampling(rollout_server):
    """top_k = 1 (or min_p = 1: only tokens as likely as the best) at temperature 1 leaves the most likely
    token alone, so every sample is the greedy one; a strong repetition penalty changes the responses."""
    rows = ROWS[:2]
    with RolloutClient(rollout_server.url) as client:
        greedy = client.rollouts(_request("unused", rows, mode="full", temperature=0.0, group_size=1))
        for narrowed in ({"top_k": 1}, {"min_p": 1.0}):
            reply = client.rollouts(_request("unused", rows, mode="full", **narrowed))
            for g, group in zip(greedy.groups, reply.groups, strict=True):
                assert [s.response_ids for s in group.samples] == [g.samples[0].response_ids] * 4, narrowed
                # the log-probs are those after the filter: the one token kept has probability 1
                assert all(
                    lp == pytest.approx(0.0, abs=1e-5) for s in group.samples for lp in s.suffix_logprobs
                )
        penalised = client.rollouts(
            _request("unused", rows, mode="full", temperature=0.0, group_size=1, repetition_penalty=5.0)
        )
    assert [g.samples[0].response_ids for g in penalised.groups] != [
        g.samples[0].response_ids for g in greedy.groups
    ]
