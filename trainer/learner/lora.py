"""The learner's LoRA adapters (`train.lora`), with PEFT: wrapping the policy, reading the adapter out under
PEFT's saved names (what each step pushes), and the merged weights under the base's HF names (what exports
and checkpoints' hf/ hold). Under ZeRO-3 every function that reads parameters is collective (it gathers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from services.core.adapter_wire import PEFT_PREFIX
from services.core.config_training import LoraSection

ADAPTER = "default"
"""PEFT's name of the one adapter the learner trains."""


def wrap(model: Any, lora: LoraSection) -> Any:
    """The model with a fresh adapter (B = 0, so it starts as the base); only the adapter trains."""
    # lazy: heavy import (peft), paid only with LoRA on
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _gathered(params: list[torch.Tensor]) -> Any:
    """A context that makes ZeRO-3 partitioned `params` whole on every rank (a no-op for others)."""
    # lazy: heavy import (deepspeed), paid only on this path
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")], modifier_rank=None)


def _saved_name(name: str) -> str:
    """`base_model.model.X.lora_A.default.weight` -> `base_model.model.X.lora_A.weight` (PEFT's saved form)."""
    return name.replace(f".{ADAPTER}.", ".")


def adapter_weights(peft_model: Any, main: bool) -> list[tuple[str, torch.Tensor]]:
    """The adapter's A and B matrices under PEFT's saved names, CPU copies on rank 0 (`main`), nothing on
    the others; collective under ZeRO-3."""
    named = [(n, p) for n, p in peft_model.named_parameters() if ".lora_" in n]
    with _gathered([p for _, p in named]):
        return [(_saved_name(n), p.detach().to("cpu", copy=True)) for n, p in named] if main else []


def _hf_name(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def deltas(peft_model: Any) -> dict[str, torch.Tensor]:
    """(alpha / r) * B A of every adapted layer, on the CPU, keyed by the name of the base weight it adds to
    (`...q_proj.base_layer.weight`); collective under ZeRO-3 (the adapter is gathered)."""
    # lazy: heavy import (peft), paid only with LoRA on
    from peft.tuners.lora import LoraLayer

    layers = {
        f"{name}.base_layer.weight": module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    }
    adapter_params = [p for n, p in peft_model.named_parameters() if ".lora_" in n]
    with _gathered(adapter_params), torch.no_grad():
        return {name: layer.get_delta_weight(ADAPTER).detach().cpu() for name, layer in layers.items()}


def merged(
    named: list[tuple[str, torch.Tensor]], layer_deltas: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """`named` (the PEFT model's tensors, or a gathered ZeRO-3 bucket of them) without the adapter, under the
    base's HF names, each adapted weight plus its delta: the model PEFT's `merge_and_unload` would give,
    leaving the live one as it is."""
    for name, tensor in named:
        if ".lora_" in name:
            continue
        if name in layer_deltas:
            tensor = tensor.detach().cpu() + layer_deltas[name].to(tensor.dtype)
        yield _hf_name(name), tensor
