"""The LoRA adapter push, shared by the sender (the trainer) and the receiver (a replica): which tensors an
adapter of `train.lora` carries for a given base model, under PEFT's saved names, and the adapter_config.json
that vLLM (and PEFT) load it with. An adapter push is a weight push (services/core/weight_wire.py: one
safetensors body, checksum, manifest) whose manifest is the adapter's, not the model's, and whose metadata
carries the LoRA settings it was trained with, so a replica configured otherwise refuses it (422) instead of
serving it scaled wrongly. Importable without torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.core.config_training import LoraSection
from services.core.errors import InvalidInput
from services.core.weight_wire import (
    FLOAT_DTYPES,
    TensorSpec,
    WeightManifest,
    checkpoint_files,
    read_safetensors_header,
)

PEFT_PREFIX = "base_model.model."
"""PEFT's prefix of a saved adapter's tensor names."""
METADATA_KEY = "rpo_lora"
"""The safetensors metadata entry of an adapter push: its LoRA settings as JSON."""


def settings_json(lora: LoraSection) -> str:
    """What a push says about the adapter it carries (compared by the replica)."""
    return json.dumps(
        {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": sorted(lora.target_modules)}
    )


def adapter_config(lora: LoraSection, base_model: str) -> dict[str, Any]:
    """PEFT's adapter_config.json for an adapter of these settings (what vLLM and PEFT read)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def write_adapter_config(directory: Path, lora: LoraSection, base_model: str) -> None:
    (directory / "adapter_config.json").write_text(
        json.dumps(adapter_config(lora, base_model), indent=1) + "\n"
    )


def adapter_tensor_names(module: str) -> tuple[str, str]:
    """The saved names of one adapted layer's A and B matrices (`module`: its HF name, without `.weight`)."""
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


class AdapterManifest(WeightManifest):
    """What an adapter push must carry: for every 2-D weight of the base whose layer name ends in one of
    `target_modules`, A of shape [r, in] and B of shape [out, r] in the served dtype; and the same LoRA
    settings in its metadata."""

    def __init__(self, expected: dict[str, TensorSpec], settings: str):
        super().__init__(expected)
        self.settings = settings

    @classmethod
    def for_base(cls, model_dir: Path, lora: LoraSection, served_dtype: str) -> AdapterManifest:
        targets = set(lora.target_modules)
        expected: dict[str, TensorSpec] = {}
        for path in checkpoint_files(model_dir):
            for name, info in read_safetensors_header(path).items():
                if (
                    name == "__metadata__"
                    or not name.endswith(".weight")
                    or info["dtype"] not in FLOAT_DTYPES
                ):
                    continue
                module = name.removesuffix(".weight")
                if module.rpartition(".")[2] in targets and len(info["shape"]) == 2:
                    out_features, in_features = info["shape"]
                    a, b = adapter_tensor_names(module)
                    expected[a] = TensorSpec(served_dtype, (lora.rank, in_features))
                    expected[b] = TensorSpec(served_dtype, (out_features, lora.rank))
        if not expected:
            raise ValueError(
                f"{model_dir}: no linear layer named {sorted(targets)} (train.lora.target_modules) to adapt"
            )
        return cls(expected, settings_json(lora))

    def check(self, header: dict[str, Any]) -> int:
        metadata = header.get("__metadata__") or {}
        sent = metadata.get(METADATA_KEY)
        if sent != self.settings:
            raise InvalidInput(
                f"weights.__metadata__.{METADATA_KEY}: not an adapter of this replica's LoRA settings "
                f"(train.lora must agree on both sides): the push says {sent}, the replica serves {self.settings}",
                field=f"weights.__metadata__.{METADATA_KEY}",
            )
        return super().check(header)
