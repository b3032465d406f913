"""Weight pushes: a bad push changes nothing; generation running during a push never fails and each reply's
tokens come from the version it names; the version and its gauge move forward."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import xxhash
from rollout_helpers import FAST, PROMPTS, generate, greedy, hf_greedy, hf_model, random_weights, version_of

from services.core.schemas.rollout import CHECKSUM_HEADER, WEIGHTS_MEDIA_TYPE, GenerateRequest
from trainer.weights.http_wire import SafetensorsBody, WeightPushError, materialize, push_weights


def _weight_url(url: str) -> str:
    """The replica's weight data plane, as its API announces it."""
    port = httpx.get(url + "/v1/weights/version", timeout=10).json()["weight_port"]
    return f"http://127.0.0.1:{port}"


def _raw_push(url: str, version: int, body: bytes, checksum: str | None, content_type=WEIGHTS_MEDIA_TYPE):
    headers = {"content-type": content_type}
    if checksum is not None:
        headers[CHECKSUM_HEADER] = checksum
    return httpx.put(f"{_weight_url(url)}/v1/weights/{version}", content=body, headers=headers, timeout=60)


def _body(weights) -> bytes:
    body = SafetensorsBody(materialize(weights))
    return b"".join(bytes(p) for p in body.pieces())


def _sha(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


@pytest.fixture
def served(tied_replica):
    """The replica's greedy output now; the test checks it is the same afterwards."""
    version, tokens = greedy(tied_replica.url)
    assert version == tied_replica.version
    yield tokens
    version, after = greedy(tied_replica.url)
    assert version == tied_replica.version, "a rejected push moved the version"
    assert after == tokens, "a rejected push changed the served weights"


def _bad(kind: str, replica, tmp_path):
    """(version, body, checksum, content type) of one kind of bad push, and the field the 422 must name."""
    good = dict(replica.weights)
    nxt = replica.version + 1
    if kind == "wrong shape":
        weights = {**good, "model.norm.weight": good["model.norm.weight"][:64].clone()}
        return (nxt, _body(weights), None, WEIGHTS_MEDIA_TYPE), "weights.model.norm.weight"
    if kind == "unknown name":
        weights = {**good, "model.layers.9.mlp.up_proj.weight": good["model.norm.weight"].clone()}
        return (nxt, _body(weights), None, WEIGHTS_MEDIA_TYPE), "weights.model.layers.9.mlp.up_proj.weight"
    if kind == "missing tensor":
        weights = {k: v for k, v in good.items() if k != "model.layers.1.self_attn.q_proj.bias"}
        return (nxt, _body(weights), None, WEIGHTS_MEDIA_TYPE), "weights.model.layers.1.self_attn.q_proj.bias"
    if kind == "wrong dtype":
        weights = {k: v.half() for k, v in good.items()}
        return (nxt, _body(weights), None, WEIGHTS_MEDIA_TYPE), "weights.lm_head.weight|weights.model.*"
    new = random_weights(tmp_path / "new", tied=True, seed=999)
    body = _body(new)
    if kind == "wrong checksum":
        return (nxt, body, _sha(body + b"x"), WEIGHTS_MEDIA_TYPE), CHECKSUM_HEADER
    if kind == "no checksum":
        return (nxt, body, "", WEIGHTS_MEDIA_TYPE), CHECKSUM_HEADER
    if kind == "truncated body":
        return (nxt, body[:-100], _sha(body[:-100]), WEIGHTS_MEDIA_TYPE), "body"
    if kind == "not safetensors":
        junk = b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64
        return (nxt, junk, _sha(junk), WEIGHTS_MEDIA_TYPE), "body"
    if kind == "stale version":
        return (replica.version, body, _sha(body), WEIGHTS_MEDIA_TYPE), "version"
    if kind == "wrong content type":
        return (nxt, body, _sha(body), "application/json"), None
    raise AssertionError(kind)


BAD_PUSHES = [
    "wrong shape",
    "unknown name",
    "missing tensor",
    "wrong dtype",
    "wrong checksum",
    "no checksum",
    "truncated body",
    "not safetensors",
    "stale version",
    "wrong content type",
]


@pytest.mark.parametrize("kind", BAD_PUSHES)
def test_a_bad_push_is_refused_and_changes_nothing(kind, tied_replica, served, tmp_path):
    if kind == "stale version" and tied_replica.version == 0:
        tied_replica.push(random_weights(tmp_path / "first", tied=True, seed=998))
        served[:] = greedy(tied_replica.url)[1]
    (version, body, checksum, content_type), field = _bad(kind, tied_replica, tmp_path)
    if checksum is None:
        checksum = _sha(body)
    reply = _raw_push(tied_replica.url, version, body, checksum, content_type)
    expected_status = {"stale version": 409, "wrong content type": 415}.get(kind, 422)
    assert reply.status_code == expected_status, reply.text
    error = reply.json()["error"]
    if field is not None:
        assert re.fullmatch(field.replace(".", r"\.").replace("*", ".*"), error["field"]), error
    assert error["message"]
    assert version_of(tied_replica.url) == tied_replica.version


def test_the_client_names_the_replica_and_the_phase(tied_replica, served):
    bad = {**tied_replica.weights, "model.norm.weight": tied_replica.weights["model.norm.weight"][:3].clone()}
    with pytest.raises(WeightPushError) as caught:
        push_weights(tied_replica.url, bad, tied_replica.version + 1, policy=FAST)
    assert caught.value.failures[tied_replica.url][0] == "validate"
    assert tied_replica.url in str(caught.value) and "model.norm.weight" in str(caught.value)

    closed = "http://127.0.0.1:9"  # nothing listens on the discard port
    with pytest.raises(WeightPushError) as caught:
        push_weights(closed, tied_replica.weights, 1, policy=FAST)
    assert caught.value.failures[closed][0] == "connect"


def test_generation_during_a_push_completes_on_the_old_or_the_new_weights(tied_replica, tmp_path):
    old_weights, old_version = tied_replica.weights, tied_replica.version
    new_weights = random_weights(tmp_path / "new", tied=True, seed=500 + old_version)
    expected = {
        old_version: hf_greedy(hf_model(tied_replica.model_dir, old_weights), PROMPTS, 64),
        old_version + 1: hf_greedy(hf_model(tied_replica.model_dir, new_weights), PROMPTS, 64),
    }
    assert expected[old_version] != expected[old_version + 1]
    request = GenerateRequest(prompts=PROMPTS, n=1, max_tokens=64, temperature=0.0)

    with ThreadPoolExecutor(max_workers=17) as pool:
        replies = [pool.submit(generate, tied_replica.url, request) for _ in range(16)]
        push = pool.submit(tied_replica.push, new_weights)
        replies += [pool.submit(generate, tied_replica.url, request) for _ in range(16)]
        push_result = push.result(timeout=120)
        results = [r.result(timeout=120) for r in replies]  # every request completes (generate asserts 200)

    assert push_result.policy_version == old_version + 1
    versions = set()
    for reply in results:
        versions.add(reply.policy_version)
        tokens = [r[0].token_ids for r in reply.results]
        assert tokens == expected[reply.policy_version], (
            f"reply of version {reply.policy_version} mixes weights"
        )
    assert versions <= {old_version, old_version + 1}
    assert greedy(tied_replica.url, max_tokens=64) == (old_version + 1, expected[old_version + 1])


def test_version_gauge_and_sync_histogram_follow_a_push(tied_replica, tmp_path):
    def scrape() -> dict[str, float]:
        text = httpx.get(tied_replica.url + "/metrics", timeout=10).text
        return {
            name: float(value)
            for name, value in re.findall(r"^(rpo_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", text, re.M)
        }

    before = scrape()
    assert before["rpo_policy_version"] == tied_replica.version
    tied_replica.push(random_weights(tmp_path / "new", tied=True, seed=700 + tied_replica.version))
    after = scrape()
    assert after["rpo_policy_version"] == tied_replica.version
    assert after["rpo_weight_sync_seconds_count"] == before["rpo_weight_sync_seconds_count"] + 1
    assert (
        after['rpo_weight_pushes_total{outcome="applied"}']
        == before['rpo_weight_pushes_total{outcome="applied"}'] + 1
    )
    version = httpx.get(tied_replica.url + "/v1/weights/version", timeout=10).json()
    assert isinstance(version.pop("weight_port"), int)
    assert version == {
        "policy_version": tied_replica.version,
        "replica": tied_replica.url.removeprefix("http://"),
        "updating": False,
        "dtype": "F32",
        "weight_transfer": "http",
    }


def test_the_api_port_redirects_a_push_to_the_weight_port(tied_replica, served, tmp_path):
    """`curl -L -T`-style clients find the data plane: 307 to the weight port, where the push is checked."""
    body = _body(random_weights(tmp_path / "new", tied=True, seed=321))
    url = f"{tied_replica.url}/v1/weights/{tied_replica.version + 1}"
    headers = {"content-type": WEIGHTS_MEDIA_TYPE, CHECKSUM_HEADER: _sha(body + b"x")}
    moved = httpx.put(url, content=b"", headers=headers, timeout=30)
    assert moved.status_code == 307, moved.text
    assert (
        moved.headers["location"] == f"{_weight_url(tied_replica.url)}/v1/weights/{tied_replica.version + 1}"
    )
    assert "weight port" in moved.json()["error"]["message"]
    followed = httpx.put(url, content=body, headers=headers, timeout=60, follow_redirects=True)
    assert followed.status_code == 422 and followed.json()["error"]["field"] == CHECKSUM_HEADER, followed.text
