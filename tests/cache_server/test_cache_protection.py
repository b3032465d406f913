"""Protection: bearer token on mutating endpoints (and never in logs), the body size limit, and every
class of bad input answered 422 naming the field with nothing written; the one error shape throughout."""

from __future__ import annotations

import json
import logging

import httpx
import msgpack
import pytest
from cache_helpers import MAX_BODY_BYTES, TOKEN, run_keys
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from services.core.server_kit import install_common

AUTH = {"Authorization": f"Bearer {TOKEN}"}
GOOD_ENTRY = {"question_id": "ok", "token_ids": [1, 2, 3]}
GOOD_GROUP = {
    "question_id": "ok",
    "candidates": [{"suffix_ids": [1], "reward": 1.0, "correct": True}],
    "policy_version": 1,
}


@pytest.fixture
async def http(cache_url):
    async with httpx.AsyncClient(base_url=cache_url, timeout=10) as client:
        yield client


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "field"}
    return body["error"]


# ---------------------------------------------------------------------------------------------------------
# Auth


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/entries", {"entries": [GOOD_ENTRY]}),
        ("POST", "/updates", {"step": 0, "epsilon": 0.5, "groups": [GOOD_GROUP]}),
        ("DELETE", "", None),
    ],
)
async def test_mutating_endpoints_need_the_token(http, run_id, redis_client, caplog, method, path, body):
    caplog.set_level(logging.DEBUG)
    url = f"/v1/runs/{run_id}{path}"
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": "Basic x"},
    ):
        r = await http.request(method, url, json=body, headers=headers)
        assert r.status_code == 401 and error_of(r)["type"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert run_keys(redis_client, run_id) == []
    r = await http.request(method, url, json=body, headers=AUTH)
    assert r.status_code == 200
    assert TOKEN not in caplog.text


async def test_the_export_needs_the_token(http, run_id):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = await http.get(f"/v1/runs/{run_id}/export", headers=headers)
        assert r.status_code == 401 and error_of(r)["type"] == "unauthorized"
    r = await http.get(f"/v1/runs/{run_id}/export", headers=AUTH)
    assert r.status_code == 200 and r.text.startswith('{"rpo_cache_export"')


async def test_reads_need_no_token(http, run_id):
    assert (await http.get(f"/v1/runs/{run_id}/stats")).status_code == 200
    r = await http.post(f"/v1/runs/{run_id}/prefixes", json={"question_ids": ["a"], "truncation_limit": 3})
    assert r.status_code == 200


# ---------------------------------------------------------------------------------------------------------
# Body size limit


async def test_a_declared_large_body_is_refused_before_reading(http, run_id, redis_client):
    big = {"entries": [{"question_id": "big", "token_ids": list(range(MAX_BODY_BYTES // 4))}]}
    r = await http.put(f"/v1/runs/{run_id}/entries", json=big, headers=AUTH)
    assert r.status_code == 413 and error_of(r)["type"] == "payload_too_large"
    assert run_keys(redis_client, run_id) == []


async def test_an_undeclared_large_body_is_refused_while_reading(http, run_id, redis_client):
    packed = msgpack.packb({"entries": [{"question_id": "big", "token_ids": b"\0" * (MAX_BODY_BYTES + 4)}]})

    async def chunks():  # no Content-Length: chunked transfer encoding
        for i in range(0, len(packed), 65536):
            yield packed[i : i + 65536]

    headers = {**AUTH, "Content-Type": "application/msgpack"}
    r = await http.put(f"/v1/runs/{run_id}/entries", content=chunks(), headers=headers)
    assert r.status_code == 413 and error_of(r)["type"] == "payload_too_large"
    assert run_keys(redis_client, run_id) == []


# ---------------------------------------------------------------------------------------------------------
# Bad input: 422 naming the field, nothing written

BAD_PUTS = [
    ({"entries": [GOOD_ENTRY, {"question_id": "x", "token_ids": []}]}, "entries.1.token_ids"),
    ({"entries": [GOOD_ENTRY, {"question_id": "x", "token_ids": [1, -5]}]}, "entries.1.token_ids"),
    ({"entries": [GOOD_ENTRY, {"question_id": "x", "token_ids": [1, 2**32]}]}, "entries.1.token_ids"),
    ({"entries": [GOOD_ENTRY, {"question_id": "x", "token_ids": "1 2 3"}]}, "entries.1.token_ids"),
    ({"entries": [GOOD_ENTRY, {"question_id": "x", "token_ids": [1.5]}]}, "entries.1.token_ids"),
    ({"entries": [GOOD_ENTRY, {"question_id": "", "token_ids": [1]}]}, "entries.1.question_id"),
    ({"entries": [GOOD_ENTRY, {"question_id": "x", "token_ids": [1], "reward": "high"}]}, "entries.1.reward"),
    (
        {"entries": [GOOD_ENTRY, {"question_id": "x", "token_ids": [1], "policy_version": -1}]},
        "entries.1.policy_version",
    ),
    ({"entries": [GOOD_ENTRY, {"question_id": "x", "token_ids": [1], "colour": "red"}]}, "entries.1.colour"),
    ({"entries": [GOOD_ENTRY, GOOD_ENTRY]}, "entries"),
    ({"entries": []}, "entries"),
    ({"entries": [GOOD_ENTRY], "overwrite": "maybe"}, "overwrite"),
    ({"entries": [GOOD_ENTRY, {"question_id": "x", "token_ids": list(range(70000))}]}, "entries.1.token_ids"),
]


@pytest.mark.parametrize(("body", "field"), BAD_PUTS)
async def test_bad_puts_name_the_field_and_write_nothing(http, run_id, redis_client, body, field):
    r = await http.put(f"/v1/runs/{run_id}/entries", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    err = error_of(r)
    assert err["type"] == "validation_error" and err["field"] == field, err
    assert run_keys(redis_client, run_id) == []


def update_with(**changes) -> dict:
    body = {"step": 1, "epsilon": 0.5, "groups": [GOOD_GROUP, {**GOOD_GROUP, "question_id": "two"}]}
    body.update(changes)
    return body


def group_with(**changes) -> dict:
    return {**GOOD_GROUP, "question_id": "two", **changes}


BAD_UPDATES = [
    (update_with(epsilon=1.5), "epsilon"),
    (update_with(epsilon=-0.1), "epsilon"),
    (update_with(epsilon="often"), "epsilon"),
    (update_with(step=-1), "step"),
    (update_with(groups=[]), "groups"),
    (update_with(groups=[GOOD_GROUP, GOOD_GROUP]), "groups"),
    (update_with(groups=[GOOD_GROUP, group_with(candidates=[])]), "groups.1.candidates"),
    (update_with(groups=[GOOD_GROUP, group_with(policy_version=-2)]), "groups.1.policy_version"),
    (
        update_with(
            groups=[GOOD_GROUP, group_with(candidates=[{"suffix_ids": [], "reward": 1, "correct": True}])]
        ),
        "groups.1",
    ),
    (
        update_with(
            groups=[GOOD_GROUP, group_with(candidates=[{"suffix_ids": [1], "reward": "nan", "correct": 1}])]
        ),
        "groups.1.candidates.0.reward",
    ),
    (
        update_with(groups=[GOOD_GROUP, group_with(candidates=[{"suffix_ids": [1], "correct": True}])]),
        "groups.1.candidates.0.reward",
    ),
    (update_with(surprise=True), "surprise"),
]


@pytest.mark.parametrize(("body", "field"), BAD_UPDATES)
async def test_bad_updates_name_the_field_and_write_nothing(http, run_id, redis_client, body, field):
    r = await http.post(f"/v1/runs/{run_id}/updates", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    assert error_of(r)["field"] == field, r.text
    assert run_keys(redis_client, run_id) == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"question_ids": ["a"], "truncation_limit": -1}, "truncation_limit"),
        ({"question_ids": ["a"], "truncation_limit": "1.5l"}, "truncation_limit"),
        ({"question_ids": ["a"], "truncation_limit": 2.5}, "truncation_limit"),
        ({"question_ids": ["a"], "truncation_limit": "300"}, "truncation_limit"),
        ({"question_ids": [], "truncation_limit": 3}, "question_ids"),
        ({"question_ids": [""], "truncation_limit": 3}, "question_ids.0"),
        ({"question_ids": ["a"], "truncation_limit": 3, "seed": "x"}, "seed"),
        ({"question_ids": ["a"]}, "truncation_limit"),
        ({"question_ids": [f"q{i}" for i in range(4097)], "truncation_limit": 3}, "question_ids"),
    ],
)
async def test_bad_prefix_requests_name_the_field(http, run_id, body, field):
    r = await http.post(f"/v1/runs/{run_id}/prefixes", json=body)
    assert r.status_code == 422 and error_of(r)["field"] == field, r.text


async def test_bad_run_ids_and_bodies(http):
    r = await http.post("/v1/runs/a*b/prefixes", json={"question_ids": ["a"], "truncation_limit": 3})
    assert r.status_code == 422 and error_of(r)["field"] == "run_id"
    r = await http.post(
        "/v1/runs/x/prefixes", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422 and error_of(r)["type"] == "validation_error"
    r = await http.post(
        "/v1/runs/x/prefixes", content=b"\xc1", headers={"Content-Type": "application/msgpack"}
    )
    assert r.status_code == 422 and "msgpack" in error_of(r)["message"]
    r = await http.post("/v1/runs/x/prefixes", content=b"q=a", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and error_of(r)["type"] == "unsupported_media_type"
    r = await http.get("/v1/nothing-here")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found"


async def test_packed_token_ids_must_be_whole_uint32s(http, run_id, redis_client):
    body = msgpack.packb({"entries": [{"question_id": "a", "token_ids": b"\x01\x00\x00"}]})
    r = await http.put(
        f"/v1/runs/{run_id}/entries", content=body, headers={**AUTH, "Content-Type": "application/msgpack"}
    )
    assert r.status_code == 422 and error_of(r)["field"] == "entries.0.token_ids"
    assert run_keys(redis_client, run_id) == []


# ---------------------------------------------------------------------------------------------------------
# The shared layer on its own


async def test_unexpected_errors_are_a_logged_500_without_details(caplog):
    app = FastAPI()
    registry = CollectorRegistry()

    async def ready() -> None:
        return None

    install_common(app, registry=registry, readiness=ready, api_token=None, max_body_bytes=1024)

    @app.get("/boom/{item}")
    async def boom(item: str) -> None:
        raise RuntimeError("internal detail that must not leak")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        r = await client.get("/boom/17")
        assert r.status_code == 500
        err = error_of(r)
        assert err["type"] == "internal_error" and "internal detail" not in r.text
        metrics = (await client.get("/metrics")).text
    assert "internal detail that must not leak" in caplog.text  # logged with its traceback
    assert 'rpo_http_request_duration_seconds_count{endpoint="/boom/{item}",method="GET"} 1.0' in metrics
    assert "/boom/17" not in metrics


# ---------------------------------------------------------------------------------------------------------
# Hostile input, by hand (the generated kind is in test_cache_fuzz.py)


async def test_deeply_nested_json_is_a_4xx_not_a_crash(http, run_id, redis_client):
    deep = "[" * 100_000 + "]" * 100_000  # far past any parser's recursion limit
    for method, path in (("PUT", "/entries"), ("POST", "/updates"), ("POST", "/prefixes")):
        r = await http.request(
            method,
            f"/v1/runs/{run_id}{path}",
            content=deep,
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:200])
        assert error_of(r)["type"] in {"validation_error", "invalid_input", "bad_request"}
    assert run_keys(redis_client, run_id) == []
    assert (await http.get("/readyz")).status_code == 200  # still serving


@pytest.mark.parametrize("reward", [float("inf"), float("-inf"), 1e309])
async def test_infinite_rewards_are_refused(http, run_id, redis_client, reward):
    body = update_with(
        groups=[GOOD_GROUP, group_with(candidates=[{"suffix_ids": [1], "reward": reward, "correct": True}])]
    )
    r = await http.post(
        f"/v1/runs/{run_id}/updates",
        content=json.dumps(body),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and error_of(r)["field"] == "groups.1.candidates.0.reward", r.text
    assert run_keys(redis_client, run_id) == []


@pytest.mark.parametrize("version", [-1, 2**63, 10**30])
async def test_negative_or_huge_versions_are_refused(http, run_id, redis_client, version):
    r = await http.post(
        f"/v1/runs/{run_id}/updates",
        json=update_with(groups=[GOOD_GROUP, group_with(policy_version=version)]),
        headers=AUTH,
    )
    assert r.status_code == 422 and error_of(r)["field"] == "groups.1.policy_version", r.text
    assert run_keys(redis_client, run_id) == []


@pytest.mark.parametrize("bad_run", ["..%2F..%2Fetc", "r%C3%BCn", "a*b", "x%7Bslot%7D", "a" * 129])
async def test_run_ids_with_path_glob_or_unicode_characters_are_refused(http, redis_client, bad_run):
    r = await http.put(f"/v1/runs/{bad_run}/entries", json={"entries": [GOOD_ENTRY]}, headers=AUTH)
    assert r.status_code in (404, 422), (bad_run, r.status_code, r.text)
    assert (
        list(redis_client.scan_iter(match="rpo:{*" + bad_run[:3].replace("%", "") + "*}", count=1000)) == []
    )


async def test_unicode_question_ids_round_trip(http, run_id):
    qid = "问题-42/../ü\u200b"
    r = await http.put(
        f"/v1/runs/{run_id}/entries", json={"entries": [{**GOOD_ENTRY, "question_id": qid}]}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    r = await http.post(f"/v1/runs/{run_id}/prefixes", json={"question_ids": [qid], "truncation_limit": 1})
    assert r.status_code == 200 and r.json()["results"][0]["question_id"] == qid
