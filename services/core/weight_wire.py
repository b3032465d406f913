"""The weight push's wire format, shared by the sender (trainer/weights/http_wire.py) and the receiver
(services/rollout/weight_receive.py): one safetensors file as the body (an 8-byte little-endian header
length, the JSON header padded to 8 bytes, then each tensor's bytes in header order), its dtype codes, and
the manifest of what a push must contain: exactly the served model's tensors, with their shapes and the
served dtype, in a consistent byte layout (422 naming the field or tensor otherwise). Importable without
torch.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.errors import InvalidInput

MAX_HEADER_BYTES = 100 * 2**20
"""Largest safetensors JSON header accepted (the format's own limit)."""
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
TORCH_DTYPE_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
"""torch dtype name (`str(tensor.dtype)` without `torch.`) -> safetensors code, for every code above."""
HEADER_LENGTH = struct.Struct("<Q")
"""The 8 bytes in front of the header: its length, little-endian."""


def encode_header(header: dict[str, Any]) -> bytes:
    """The body's first bytes: length prefix and JSON header, padded so the data starts 8-byte aligned."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return HEADER_LENGTH.pack(len(raw)) + raw


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    """safetensors dtype code (F32, BF16, ...)."""
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (no tensor data is read)."""
    with path.open("rb") as f:
        (length,) = HEADER_LENGTH.unpack(f.read(8))
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: safetensors header of {length} bytes")
        return json.loads(f.read(length))


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF model directory (one file, or the shards its index names)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise ValueError(
            f"{model_dir}: no safetensors weights (HTTP weight pushes need them to check against)"
        )
    return found


class WeightManifest:
    """Names, shapes and dtypes a push must carry: the served checkpoint's tensors, floating ones in the
    served dtype. A tied LM head (`lm_head.weight` absent from a tied checkpoint) may be sent or not."""

    def __init__(self, expected: dict[str, TensorSpec], optional: dict[str, TensorSpec] | None = None):
        self.expected = expected
        self.optional = optional or {}

    @classmethod
    def from_model_dir(cls, model_dir: Path, served_dtype: str) -> WeightManifest:
        expected: dict[str, TensorSpec] = {}
        for path in checkpoint_files(model_dir):
            for name, info in read_safetensors_header(path).items():
                if name == "__metadata__":
                    continue
                dtype = served_dtype if info["dtype"] in FLOAT_DTYPES else info["dtype"]
                expected[name] = TensorSpec(dtype, tuple(info["shape"]))
        optional = {}
        config_path = model_dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        tied = config.get(
            "tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)
        )
        embed = expected.get("model.embed_tokens.weight")
        if tied and embed is not None and "lm_head.weight" not in expected:
            optional["lm_head.weight"] = embed
        return cls(expected, optional)

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(s.shape) * DTYPE_BYTES[s.dtype] for s in self.expected.values())

    def check(self, header: dict[str, Any]) -> int:
        """Check a push's header; returns the data size it announces. Raises InvalidInput naming the tensor."""
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        for name in sorted(self.expected):
            if name not in tensors:
                raise InvalidInput(
                    f"the push lacks tensor {name!r} ({len(self.expected) - len(tensors.keys() & self.expected.keys())} "
                    "of the served model's tensors are missing); a push carries every tensor",
                    field=f"weights.{name}",
                )
        spans = []
        for name, info in tensors.items():
            field = f"weights.{name}"
            spec = self.expected.get(name) or self.optional.get(name)
            if spec is None:
                raise InvalidInput(
                    f"unknown tensor {name!r}: the served model has no such weight", field=field
                )
            if not isinstance(info, dict):
                raise InvalidInput(f"tensor {name!r}: header entry is not an object", field=field)
            dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if dtype != spec.dtype:
                raise InvalidInput(
                    f"tensor {name!r} has dtype {dtype}; the replica serves {spec.dtype} (cast before pushing)",
                    field=field,
                )
            if not isinstance(shape, list) or tuple(shape) != spec.shape:
                raise InvalidInput(
                    f"tensor {name!r} has shape {shape}; the served model's is {list(spec.shape)}",
                    field=field,
                )
            if (
                not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets)
                or offsets[1] - offsets[0] != math.prod(spec.shape) * DTYPE_BYTES[spec.dtype]
            ):
                raise InvalidInput(
                    f"tensor {name!r}: data_offsets {offsets} do not fit its shape", field=field
                )
            spans.append((offsets[0], offsets[1], name))
        spans.sort()
        end = 0
        for start, stop, name in spans:
            if start != end:
                raise InvalidInput(
                    f"tensor {name!r}: data starts at byte {start}, expected {end} (overlap or gap)",
                    field=f"weights.{name}",
                )
            end = stop
        return end
