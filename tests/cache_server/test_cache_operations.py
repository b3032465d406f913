"""Every cache operation through the real service: put, read back, prefixes (truncation edge cases,
deterministic seeding), epsilon-greedy updates (idempotent replays), stats, delete, export and import."""

from __future__ import annotations

import random

import httpx
import pytest
from cache_helpers import TOKEN, entry, group, run_keys

from services.core.algorithm import prefix_length, truncate
from services.core.clients.cache import CacheClient, ExportFileError, read_export_file
from services.core.schemas.cache import PutEntry
from services.core.schemas.common import pack_token_ids, unpack_token_ids

# ---------------------------------------------------------------------------------------------------------
# Pure pieces


def test_packed_slice_equals_truncate_for_every_length_and_m():
    # The store slices packed bytes instead of calling truncate on lists; both must agree everywhere,
    # m = 0 (keep all: the a[:-0] trap) and m >= len (empty prefix) included.
    for n in range(0, 7):
        answer = list(range(10, 10 + n))
        packed = pack_token_ids(answer)
        for m in range(0, 9):
            assert unpack_token_ids(packed[: prefix_length(n, m) * 4]) == truncate(answer, m)


def test_token_ids_round_trip_through_packing():
    ids = [0, 1, 151_643, 2**32 - 1]
    assert unpack_token_ids(pack_token_ids(ids)) == ids
    assert len(pack_token_ids(ids)) == 16


# ---------------------------------------------------------------------------------------------------------
# Put and read back


async def test_put_then_read_back_every_field(cache, run_id):
    reply = await cache.put_entries(
        run_id, [entry("q1", [5, 6, 7], reward=0.75, correct=True, policy_version=3, last_group_min_len=9)]
    )
    assert reply.written == 1 and reply.skipped_question_ids == []
    [e, missing] = await cache.read_entries(run_id, ["q1", "nope"])
    assert missing is None
    assert unpack_token_ids(e.token_ids) == [5, 6, 7] and e.length == 3
    assert (e.reward, e.correct, e.policy_version, e.last_group_min_len) == (0.75, True, 3, 9)
    assert e.update_count == 0 and e.last_step is None and e.created_at == e.updated_at > 0
    assert (await cache.stats(run_id)).entries == 1


async def test_put_without_overwrite_keeps_existing_entries(cache, run_id):
    await cache.put_entries(run_id, [entry("q1", [1]), entry("q2", [2])])
    reply = await cache.put_entries(run_id, [entry("q1", [9, 9]), entry("q3", [3])], overwrite=False)
    assert reply.written == 1 and reply.skipped_question_ids == ["q1"]
    e1, e3 = await cache.read_entries(run_id, ["q1", "q3"])
    assert unpack_token_ids(e1.token_ids) == [1] and unpack_token_ids(e3.token_ids) == [3]
    await cache.put_entries(run_id, [entry("q1", [9, 9])], overwrite=True)
    assert unpack_token_ids((await cache.read_entries(run_id, ["q1"]))[0].token_ids) == [9, 9]


async def test_json_and_msgpack_bodies_give_the_same_answers(cache_url, run_id):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=cache_url, headers=headers, timeout=10) as http:
        r = await http.put(
            f"/v1/runs/{run_id}/entries", json={"entries": [{"question_id": "q", "token_ids": [4, 5, 6]}]}
        )
        assert r.status_code == 200 and r.json() == {"written": 1, "skipped_question_ids": []}
        body = {"question_ids": ["q"], "truncation_limit": 1, "seed": 3}
        as_json = (await http.post(f"/v1/runs/{run_id}/prefixes", json=body)).json()["results"][0]
    async with CacheClient(cache_url, token=TOKEN) as client:
        [as_msgpack] = await client.prefixes(run_id, ["q"], 1, seed=3)
    assert as_json["prefix_ids"] == unpack_token_ids(as_msgpack.prefix_ids)
    assert as_json["m"] == as_msgpack.m and as_json["answer_len"] == 3


# ---------------------------------------------------------------------------------------------------------
# Prefix retrieval


async def test_prefix_miss_is_reported_not_an_error(cache, run_id):
    [r] = await cache.prefixes(run_id, ["unknown"], 300)
    assert (r.hit, r.prefix_ids, r.m, r.answer_len, r.policy_version) == (False, b"", 0, 0, None)


async def test_limit_zero_returns_the_whole_answer(cache, run_id):
    await cache.put_entries(run_id, [entry("q", [1, 2, 3, 4], policy_version=2)])
    for _ in range(5):
        [r] = await cache.prefixes(run_id, ["q"], 0)
        assert r.hit and r.m == 0 and unpack_token_ids(r.prefix_ids) == [1, 2, 3, 4] and r.policy_version == 2


async def test_limit_beyond_the_answer_can_cut_everything(cache, run_id):
    # L = 50 on a 4-token answer: m ~ U{0..50}, so m >= 4 (empty prefix) happens about 47/51 of the time.
    await cache.put_entries(run_id, [entry("q", [1, 2, 3, 4])])
    ms = set()
    for seed in range(40):
        [r] = await cache.prefixes(run_id, ["q"], 50, seed=seed)
        assert 0 <= r.m <= 50 and r.limit == 50
        assert unpack_token_ids(r.prefix_ids) == [1, 2, 3, 4][: max(4 - r.m, 0)]
        ms.add(r.m)
    assert any(m >= 4 for m in ms)


async def test_relative_limits_use_the_last_group_else_the_answer(cache, run_id):
    # No group seen: l = the cached answer's length (10): "l" -> L = 10, "0.5l" -> L = 5.
    # last_group_min_len = 7: "l" -> 7, "0.5l" -> 3 (rounded down).
    await cache.put_entries(
        run_id, [entry("fresh", list(range(10))), entry("seen", list(range(10)), last_group_min_len=7)]
    )
    fresh_l, seen_l = await cache.prefixes(run_id, ["fresh", "seen"], "l")
    fresh_h, seen_h = await cache.prefixes(run_id, ["fresh", "seen"], "0.5l")
    assert (fresh_l.limit, seen_l.limit, fresh_h.limit, seen_h.limit) == (10, 7, 5, 3)
    for r in (fresh_l, seen_l, fresh_h, seen_h):
        assert 0 <= r.m <= r.limit and len(r.prefix_ids) // 4 == 10 - r.m


async def test_seeded_draws_do_not_depend_on_batch_order(cache, run_id):
    qids = [f"q{i}" for i in range(30)]
    await cache.put_entries(run_id, [entry(q, list(range(100))) for q in qids])
    first = {r.question_id: r.m for r in await cache.prefixes(run_id, qids, 80, seed=7)}
    shuffled = qids[:]
    random.Random(1).shuffle(shuffled)
    again = {r.question_id: r.m for r in await cache.prefixes(run_id, shuffled[:20], 80, seed=7)}
    assert all(first[q] == again[q] for q in again)
    other = {r.question_id: r.m for r in await cache.prefixes(run_id, qids, 80, seed=8)}
    assert other != first  # 30 draws from U{0..80} agreeing by chance: (1/81)^30


async def test_prefix_tokens_and_hits_are_counted(cache, cache_url, run_id):
    async def metric(name: str) -> float:
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(f"{cache_url}/metrics")).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    before = {n: await metric(n) for n in ("rpo_cache_hits_total", "rpo_cache_misses_total")}
    tokens_before = await metric("rpo_cache_prefix_tokens_total")
    await cache.put_entries(run_id, [entry("a", [1, 2, 3])])
    await cache.prefixes(run_id, ["a", "b"], 0)
    assert await metric("rpo_cache_hits_total") == before["rpo_cache_hits_total"] + 1
    assert await metric("rpo_cache_misses_total") == before["rpo_cache_misses_total"] + 1
    assert await metric("rpo_cache_prefix_tokens_total") == tokens_before + 3
    assert await metric("rpo_cache_entries") >= 1


# ---------------------------------------------------------------------------------------------------------
# Epsilon-greedy updates


async def test_epsilon_one_stores_the_best_whole_response(cache, run_id):
    await cache.put_entries(run_id, [entry("q", [1, 2, 3, 4])])
    [r] = await cache.update(run_id, 1, [group("q", [0.5, 0.9, 0.0], prefix=[1, 2], version=4)], epsilon=1.0)
    assert (r.choice, r.index, r.applied) == ("best", 1, True)
    [e] = await cache.read_entries(run_id, ["q"])
    # Stored: the whole response, prefix [1, 2] + suffix [101]; the group's shortest response is 3 tokens.
    assert unpack_token_ids(e.token_ids) == [1, 2, 101]
    assert (e.reward, e.correct, e.policy_version, e.last_group_min_len) == (0.9, True, 4, 3)
    assert (e.update_count, e.last_step) == (1, 1)


async def test_epsilon_zero_stores_another_response(cache, run_id):
    [r] = await cache.update(run_id, 1, [group("q", [0.5, 0.9, 0.0])], epsilon=0.0, seed=1)
    assert r.choice == "other" and r.index in (0, 2) and r.applied
    [e] = await cache.read_entries(run_id, ["q"])
    assert unpack_token_ids(e.token_ids) == [100 + r.index]  # a miss is seeded by the update
    assert (await cache.stats(run_id)).entries == 1


async def test_only_correct_keeps_the_entry_when_no_response_is_correct(cache, run_id):
    await cache.put_entries(run_id, [entry("q", [7, 7])])
    [r] = await cache.update(
        run_id,
        2,
        [group("q", [0.0, 0.0], correct=[False, False], min_response_len=5)],
        epsilon=0.5,
        only_correct=True,
    )
    assert (r.choice, r.index, r.applied) == ("none", None, True)
    [e] = await cache.read_entries(run_id, ["q"])
    # The answer stays, but the last group's length is recorded (L = "0.5l" / "l" follows the last group).
    assert unpack_token_ids(e.token_ids) == [7, 7] and e.last_group_min_len == 5 and e.update_count == 0


async def test_only_correct_chooses_among_correct_ones(cache, run_id):
    for step in range(10):
        [r] = await cache.update(
            run_id,
            step,
            [group("q", [0.9, 0.6, 0.0], correct=[False, True, False])],
            epsilon=0.0,
            only_correct=True,
        )
        assert r.index == 1 and r.choice == "best"  # a pool of one is "best"


async def test_a_replayed_update_returns_the_recorded_outcome_and_changes_nothing(cache, run_id):
    groups = [group("q1", [0.1, 0.2, 0.3]), group("q2", [0.3, 0.2])]
    first = await cache.update(run_id, 5, groups, epsilon=0.5)
    entries_after_first = await cache.read_entries(run_id, ["q1", "q2"])
    for _ in range(3):  # without a seed the server would draw again: the record must win
        replay = await cache.update(run_id, 5, groups, epsilon=0.5)
        assert [(r.index, r.choice) for r in replay] == [(r.index, r.choice) for r in first]
        assert not any(r.applied for r in replay)
    assert await cache.read_entries(run_id, ["q1", "q2"]) == entries_after_first
    # The same questions at the next step are a new update.
    [r1, _] = await cache.update(run_id, 6, groups, epsilon=0.5)
    assert r1.applied and (await cache.read_entries(run_id, ["q1"]))[0].update_count == 2


async def test_seeded_updates_are_reproducible(cache, run_id):
    groups = [group(f"q{i}", [0.1, 0.5, 0.2, 0.4]) for i in range(20)]
    a = await cache.update(run_id, 1, groups, epsilon=0.5, seed=11)
    other_run = run_id + "-b"
    try:
        b = await cache.update(other_run, 1, list(reversed(groups)), epsilon=0.5, seed=11)
        assert [(r.question_id, r.index) for r in a] == sorted(
            [(r.question_id, r.index) for r in b], key=lambda x: int(x[0][1:])
        )
    finally:
        await cache.delete_run(other_run)


# ---------------------------------------------------------------------------------------------------------
# Run-level operations


async def test_delete_run_removes_every_key_of_that_run_only(cache, run_id, redis_client):
    await cache.put_entries(run_id, [entry("a", [1]), entry("b", [2])])
    await cache.update(run_id, 1, [group("a", [1.0, 0.0])], epsilon=1.0)
    neighbour = run_id + "-n"
    await cache.put_entries(neighbour, [entry("a", [1])])
    try:
        assert len(run_keys(redis_client, run_id)) == 4  # 2 entries, the index, 1 step marker
        assert await cache.delete_run(run_id) == 4
        assert run_keys(redis_client, run_id) == [] and (await cache.stats(run_id)).entries == 0
        assert (await cache.stats(neighbour)).entries == 1
    finally:
        await cache.delete_run(neighbour)


async def test_export_then_import_restores_a_run_exactly(cache, run_id, tmp_path):
    entries = [
        entry(f"q{i}", list(range(i + 1)), reward=i / 10, correct=i % 2 == 0, policy_version=i)
        for i in range(600)
    ]
    await cache.put_entries(run_id, entries)
    await cache.update(run_id, 3, [group("q1", [0.0, 1.0])], epsilon=1.0)
    path = tmp_path / "cache.ndjson"
    assert await cache.export_run(run_id, path) == 600
    header, exported = read_export_file(path)
    assert header.run_id == run_id and len(exported) == 600
    target = run_id + "-copy"
    try:
        assert await cache.import_file(target, path) == 600
        ids = [f"q{i}" for i in range(600)]
        assert await cache.read_entries(target, ids) == await cache.read_entries(run_id, ids)
    finally:
        await cache.delete_run(target)


def test_sync_client_export_import_and_a_cut_file(sync_cache, run_id, tmp_path):
    sync_cache.put_entries(
        run_id, [PutEntry(question_id="a", token_ids=[1, 2]), PutEntry(question_id="b", token_ids=[3])]
    )
    path = tmp_path / "x.ndjson"
    assert sync_cache.export_run(run_id, path) == 2
    lines = path.read_text().splitlines()
    cut = tmp_path / "cut.ndjson"
    cut.write_text("\n".join(lines[:-1]) + "\n")  # no trailer
    with pytest.raises(ExportFileError, match="cut short"):
        sync_cache.import_file(run_id + "-cut", cut)
    bad = tmp_path / "bad.ndjson"
    bad.write_text("\n".join([lines[0], lines[1].replace('"length":', '"length":-'), *lines[2:]]) + "\n")
    with pytest.raises(ExportFileError, match="line 2"):
        sync_cache.import_file(run_id + "-bad", bad)
    assert sync_cache.stats(run_id + "-cut").entries == 0 and sync_cache.stats(run_id + "-bad").entries == 0


async def test_openapi_documents_every_endpoint_and_its_bodies(cache_url):
    async with httpx.AsyncClient(timeout=10) as http:
        doc = (await http.get(f"{cache_url}/openapi.json")).json()
    paths = doc["paths"]
    for path, method in [
        ("/v1/runs/{run_id}/entries", "put"),
        ("/v1/runs/{run_id}/entries/read", "post"),
        ("/v1/runs/{run_id}/prefixes", "post"),
        ("/v1/runs/{run_id}/updates", "post"),
        ("/v1/runs/{run_id}/stats", "get"),
        ("/v1/runs/{run_id}", "delete"),
        ("/v1/runs/{run_id}/export", "get"),
    ]:
        assert method in paths[path], path
    schemas = doc["components"]["schemas"]
    for name in ("PutEntriesRequest", "PrefixRequest", "UpdateRequest", "GroupUpdate", "ErrorResponse"):
        assert name in schemas, name
    assert "epsilon" in schemas["UpdateRequest"]["properties"]
    assert schemas["UpdateCandidate"]["properties"]["suffix_ids"]["type"] == "array"
