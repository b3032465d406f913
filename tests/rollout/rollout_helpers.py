"""What the rollout tests share: the tiny tokenizer's id map, transformers as the reference engine, and a
replica wrapper that remembers which weights it serves (so every test can compute what it should answer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from services.core.http_client import RetryPolicy
from services.core.schemas.rollout import GenerateRequest, GenerateResponse
from services.models.tiny_model import BYTE_OFFSET, EOS_ID, RANDOM_INIT_STD, build_tiny_model
from trainer.weights.http_wire import push_weights

FAST = RetryPolicy(connect_timeout_seconds=5, read_timeout_seconds=120, max_attempts=1, max_total_seconds=180)
PROMPT_TEXTS = ["Q: 12+7+30=?\nA: ", "hello world", "The tiny model says: ", "61+58="]


def encode(text: str) -> list[int]:
    """The tiny tokenizer's ids: one per ASCII character (services/models/tiny_model.py)."""
    return [BYTE_OFFSET + ord(c) for c in text]


def decode(ids: list[int]) -> str:
    return "".join(chr(i - BYTE_OFFSET) for i in ids if i >= BYTE_OFFSET)


PROMPTS = [encode(t) for t in PROMPT_TEXTS]


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def random_weights(out_dir: Path, *, tied: bool, seed: int) -> dict[str, torch.Tensor]:
    """A fresh random tiny model with the cached random kinds' recipe but another seed: genuinely different
    weights of the same shapes (what a push must be able to install)."""
    build_tiny_model(out_dir, tie_word_embeddings=tied, num_layers=2, seed=seed, init_std=RANDOM_INIT_STD)
    return load_weights(out_dir)


def hf_model(model_dir: Path, weights: dict[str, torch.Tensor]):
    """transformers' Qwen2 with the architecture of `model_dir` and exactly `weights` (float32, eval)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert set(missing) <= allowed_missing and not unexpected, (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


@torch.no_grad()
def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt, stopping after EOS (included), like the replica at temperature 0."""
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out: list[int] = []
        past = None
        step_input = ids
        for _ in range(max_new_tokens):
            result = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            if token == EOS_ID:
                break
            step_input = torch.tensor([[token]])
        outputs.append(out)
    return outputs


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """log softmax (temperature 1) of each of `tokens` given the prompt and the tokens before it."""
    ids = torch.tensor([prompt + tokens])
    logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]


def generate(url: str, request: GenerateRequest, timeout: float = 120.0) -> GenerateResponse:
    reply = httpx.post(
        url + "/v1/generate",
        content=request.model_dump_json(),
        timeout=timeout,
        headers={"content-type": "application/json"},
    )
    assert reply.status_code == 200, reply.text
    return GenerateResponse.model_validate_json(reply.content)


def greedy(url: str, prompts: list[list[int]] = PROMPTS, max_tokens: int = 24) -> tuple[int, list[list[int]]]:
    reply = generate(url, GenerateRequest(prompts=prompts, n=1, max_tokens=max_tokens, temperature=0.0))
    return reply.policy_version, [r[0].token_ids for r in reply.results]


def version_of(url: str) -> int:
    return httpx.get(url + "/v1/weights/version", timeout=10).json()["policy_version"]


@dataclass
class Replica:
    """A test-private replica and the weights it serves (updated by `push`)."""

    server: object
    tied: bool
    weights: dict[str, torch.Tensor]
    version: int = 0
    _models: dict[int, object] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def model_dir(self) -> Path:
        return self.server.model_dir

    def push(self, weights: dict[str, torch.Tensor]):
        result = push_weights(self.url, weights, self.version + 1, policy=FAST, timeout_seconds=120)
        self.version += 1
        self.weights = weights
        return result

    def reference(self):
        """transformers loaded with the weights this replica serves now."""
        if self.version not in self._models:
            self._models = {self.version: hf_model(self.model_dir, self.weights)}
        return self._models[self.version]
