"""Writing a model's tensors as an HF directory's safetensors files: shards of at most a given size with
their index, or one `model.safetensors` when it all fits; and the size buckets a ZeRO-3 export gathers
parameters in, so no more than one bucket is ever gathered at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch


def size_buckets(
    named: list[tuple[str, torch.Tensor]], limit: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of tensors of at most `limit` bytes (full size; a larger tensor goes alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = getattr(tensor, "ds_numel", tensor.numel()) * tensor.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


class ShardWriter:
    """Writes tensors into safetensors shards of at most `limit` bytes; one file when it all fits."""

    def __init__(self, out: Path, limit: int):
        self.out, self.limit = out, limit
        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
            stale.unlink()
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.limit:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        # lazy: heavy import (safetensors), paid only on this path
        from safetensors.torch import save_file

        path = self.out / f".shard-{len(self.shards):05d}.safetensors.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].replace(self.out / "model.safetensors")
            return
        n = len(self.shards)
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.replace(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
