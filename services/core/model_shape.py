"""A causal LM's shape read from its `config.json`, and the counts the memory plan is built from: parameters,
LoRA adapter parameters, KV-cache bytes per token. Pure Python (no torch, no transformers), so `rpo plan`
runs on any machine.

Guarantees: the parameter count is exact for the decoder families this project trains (Qwen2/2.5, Qwen3,
Llama, Mistral: embeddings, attention with grouped KV heads and the biases each family has, a gated MLP,
RMSNorms, a tied or separate LM head); tests/core/test_memory_plan.py checks it against the real torch models.
Another `model_type` is counted with the same formula and flagged (`exact` is False).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXACT_FAMILIES = ("qwen2", "qwen3", "llama", "mistral")
"""`model_type`s whose parameter count is exact; others follow the same formula, flagged as approximate."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ModelShapeError(ValueError):
    """A config.json this planner cannot read; the message names the missing key."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes a decoder-only transformer's memory depends on (HF config.json names in comments)."""

    model_type: str
    hidden: int  # hidden_size
    intermediate: int  # intermediate_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads (grouped-query attention)
    head_dim: int  # head_dim, else hidden_size / num_attention_heads
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings
    max_positions: int  # max_position_embeddings
    dtype: str  # torch_dtype / dtype the checkpoint is stored in
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3's per-head RMSNorm on q and k

    @property
    def exact(self) -> bool:
        return self.model_type in EXACT_FAMILIES

    # ------------------------------------------------------------------------------------------ counts
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer, by its module name."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_params(self) -> int:
        """Parameters of one decoder layer: its linears (and their biases) and norms."""
        shapes = self.linear_shapes()
        n = sum(a * b for a, b in shapes.values())
        if self.qkv_bias:
            n += sum(shapes[m][1] for m in ("q_proj", "k_proj", "v_proj"))
        if self.o_bias:
            n += self.hidden
        if self.mlp_bias:
            n += 2 * self.intermediate + self.hidden
        n += 2 * self.hidden  # input and post-attention RMSNorm weights
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    def params(self) -> int:
        """Every parameter: embeddings, the layers, the final norm, and the LM head unless tied."""
        embed = self.vocab * self.hidden
        return embed + self.layers * self.layer_params() + self.hidden + (0 if self.tied else embed)

    def lora_params(self, rank: int, target_modules: list[str]) -> int:
        """Adapter parameters of LoRA at `rank` on the named linears of every layer: r x (in + out) each
        (A is r x in, B is out x r). Names that match no linear of this model add nothing."""
        shapes = self.linear_shapes()
        return self.layers * sum(rank * sum(shapes[m]) for m in target_modules if m in shapes)

    def unknown_lora_targets(self, target_modules: list[str]) -> list[str]:
        return [m for m in target_modules if m not in self.linear_shapes()]

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache of one token in every layer: 2 (K and V) x layers x KV heads x head_dim x bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def _need(config: dict[str, Any], key: str, where: str) -> Any:
    if key not in config or config[key] is None:
        raise ModelShapeError(
            f"{where}: no {key!r} in the model's config.json (a decoder-only LM is expected)"
        )
    return config[key]


def shape_from_config(config: dict[str, Any], where: str = "config.json") -> ModelShape:
    """The shape from a parsed config.json (a multimodal config's `text_config` when it has one)."""
    if "text_config" in config and "hidden_size" not in config:
        config = {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings", False)}
    model_type = str(config.get("model_type", "unknown"))
    hidden = int(_need(config, "hidden_size", where))
    heads = int(_need(config, "num_attention_heads", where))
    head_dim = int(config.get("head_dim") or hidden // heads)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return ModelShape(
        model_type=model_type,
        hidden=hidden,
        intermediate=int(_need(config, "intermediate_size", where)),
        layers=int(_need(config, "num_hidden_layers", where)),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        vocab=int(_need(config, "vocab_size", where)),
        tied=bool(config.get("tie_word_embeddings", False)),
        max_positions=int(config.get("max_position_embeddings") or 0),
        dtype=dtype if dtype in DTYPE_BYTES else "float32",
        # Qwen2 has q/k/v biases and no o bias; Llama-style configs say so with attention_bias.
        qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
    )


def read_shape(path: str | Path) -> ModelShape:
    """The shape of the model at `path`: a model directory (its config.json) or a config.json file."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text())
    except OSError as exc:
        raise ModelShapeError(f"{file}: cannot read the model's config ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ModelShapeError(f"{file}: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelShapeError(f"{file}: not a model config (a JSON object is expected)")
    return shape_from_config(config, str(file))
