"""A LoRA replica (`train.lora.rank` > 0) on a real vLLM engine: it loads the base once and serves each pushed
adapter from the next request on. Its greedy tokens equal transformers + PEFT with the same adapter, after
one push and after the next (the previous adapter is gone); a push of other LoRA settings or of whole-model
weights is refused naming the field, and the adapter serving stays."""

from __future__ import annotations

import httpx
import pytest
import torch
from rollout_helpers import FAST, PROMPTS, greedy, hf_greedy, hf_model, load_weights, version_of

from services.core.adapter_wire import METADATA_KEY, settings_json
from services.core.config_training import LoraSection
from trainer.weights.http_wire import WeightPushError, push_weights

MAX_TOKENS = 24
LORA = LoraSection(rank=8, alpha=16.0)


@pytest.fixture(scope="module")
def lora_replica(tiny_model_dir, rollout_server_factory):
    server = rollout_server_factory(tiny_model_dir, overrides=["train.lora.rank=8", "train.lora.alpha=16"])
    yield server
    server.stop()


def peft_policy(model_dir, seed: int, lora: LoraSection = LORA):
    """transformers' model of `model_dir` with a PEFT adapter whose B is drawn (not zero), and the adapter's
    tensors under PEFT's saved names."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    base = hf_model(model_dir, load_weights(model_dir))
    torch.manual_seed(seed)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules))
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    return model, get_peft_model_state_dict(model)


def push_adapter(url: str, adapter: dict, version: int, lora: LoraSection = LORA):
    return push_weights(
        url, adapter, version, policy=FAST, timeout_seconds=120, metadata={METADATA_KEY: settings_json(lora)}
    )


def test_greedy_tokens_after_each_adapter_push_match_transformers_with_peft(lora_replica, tiny_model_dir):
    version, base_tokens = greedy(lora_replica.url, max_tokens=MAX_TOKENS)
    assert version == 0
    assert base_tokens == hf_greedy(
        hf_model(tiny_model_dir, load_weights(tiny_model_dir)), PROMPTS, MAX_TOKENS
    )

    served = []
    for version, seed in [(1, 11), (2, 12)]:
        model, adapter = peft_policy(tiny_model_dir, seed)
        result = push_adapter(lora_replica.url, adapter, version)
        assert result.policy_version == version and version_of(lora_replica.url) == version
        got_version, tokens = greedy(lora_replica.url, max_tokens=MAX_TOKENS)
        assert got_version == version
        assert tokens == hf_greedy(model, PROMPTS, MAX_TOKENS)
        served.append(tokens)
    # each adapter changed the output, so the comparison above proves the adapter (not the base) is served
    assert served[0] != base_tokens and served[1] != served[0]


def test_pushes_that_are_not_this_replicas_adapter_are_refused_and_the_adapter_stays(
    lora_replica, tiny_model_dir
):
    before = greedy(lora_replica.url, max_tokens=MAX_TOKENS)
    served = before[0]
    _, other_rank = peft_policy(tiny_model_dir, 3, LoraSection(rank=4, alpha=16.0))
    with pytest.raises(WeightPushError) as refused:
        push_adapter(lora_replica.url, other_rank, served + 1, LoraSection(rank=4, alpha=16.0))
    assert f"weights.__metadata__.{METADATA_KEY}" in str(refused.value)
    _, adapter = peft_policy(tiny_model_dir, 4)
    with pytest.raises(WeightPushError) as refused:  # right tensors, other alpha: would be scaled wrongly
        push_adapter(lora_replica.url, adapter, served + 1, LoraSection(rank=8, alpha=32.0))
    assert "train.lora must agree on both sides" in str(refused.value)
    with pytest.raises(WeightPushError) as refused:  # a whole model where an adapter belongs
        push_weights(
            lora_replica.url,
            load_weights(tiny_model_dir),
            served + 1,
            policy=FAST,
            timeout_seconds=120,
            metadata={METADATA_KEY: settings_json(LORA)},
        )
    assert "unknown tensor" in str(refused.value) or "lacks tensor" in str(refused.value)
    assert greedy(lora_replica.url, max_tokens=MAX_TOKENS) == before
    assert httpx.get(lora_replica.url + "/readyz", timeout=10).status_code == 200
